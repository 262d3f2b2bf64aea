"""Recall@K of held-out text queries: the number that decides whether an approach works."""

from __future__ import annotations

import random
from collections import Counter
import time
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .decoding import EmbeddingReranker, Hit, PriorWeights, TransformersEngine, reranked, search_prior
from .model_store import ModelStoreError
from .prompts import normalize_caption
from .trie import IdTrie

KS = (1, 5, 10)


def recall(rankings: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int] = KS) -> dict[str, float]:
    n = max(1, len(targets))
    return {f"R@{k}": sum(t in r[:k] for r, t in zip(rankings, targets)) / n for k in ks}


def evaluate_generative(
    engine: TransformersEngine,
    queries: Sequence[tuple[str, str]],
    *,
    candidates: Sequence[str] | None = None,
    beams: int = 10,
    k: int = 10,
    batch_size: int = 16,
    reranker: EmbeddingReranker | None = None,
    rerank_grid: Sequence[tuple[float, float]] = (),
    prior: PriorWeights = PriorWeights(),
    progress: bool = True,
) -> dict:
    """R@K of (query text, relevant image key) pairs, searching `candidates` (default: all ids),
    the search steered by `prior`'s weights (genret.decoding.search_prior).
    With a reranker, also R@K re-ranked at its weights ("reranked") and at each (weight,
    hubness weight) of `rerank_grid` ("reranked_by_weight", keyed "w,h"), all from the same beams."""
    trie = engine.trie if candidates is None else engine.stored.trie(candidates)
    id_prior = search_prior(engine.stored, prior, trie)
    if reranker is not None and reranker.image_hubness is None and any(h for _, h in rerank_grid):
        raise ModelStoreError(f"{engine.stored.path} lacks image_hubness.npy: its grid cannot try hubness weights")
    hits, similarities, hubness = [], [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(queries), batch_size), desc="queries", disable=not progress):
        texts = [q for q, _ in queries[start : start + batch_size]]
        batch = engine.search(texts, k=max(k, beams), beams=beams, trie=trie, prior=id_prior)
        hits += batch
        if reranker is not None:
            similarities += reranker.similarities(texts, batch)
            hubness += reranker.hubness(batch) or [[0.0] * len(row) for row in batch]
    seconds = time.perf_counter() - started
    targets = [t for _, t in queries]

    def recall_of(rows: list[list[Hit]]) -> dict[str, float]:
        return recall([[h.key for h in row] for row in rows], targets)

    # the two kinds of query (see recall_by_kind), and recall for each where both are asked
    trained_captions = engine.stored.trained_caption_keys
    captioned = [t in trained_captions for t in targets]
    kinds = {"captioned": [i for i, c in enumerate(captioned) if c],
             "uncaptioned": [i for i, c in enumerate(captioned) if not c]}
    both = all(kinds.values())
    by_kind = lambda rows: recall_by_kind([[h.key for h in row] for row in rows], targets, kinds)

    result = {"queries": len(queries), "candidates": len(trie), "beams": beams, "beam_hubness_weight": prior.hubness,
              "added_bonus": prior.added_bonus,
              "seconds_per_query": seconds / max(1, len(queries)), **recall_of(hits),
              "query_kinds": {kind: len(rows) for kind, rows in kinds.items()}}
    if both:
        result["by_kind"] = by_kind(hits)
    if reranker is not None:
        weights = {"weight": reranker.weight, "hubness_weight": reranker.hubness_weight}
        fused = reranked(hits, similarities, reranker.weight, hubness, reranker.hubness_weight)
        result["reranked"] = {**weights, **recall_of(fused), **({"by_kind": by_kind(fused)} if both else {})}
        if rerank_grid:
            result["reranked_by_weight"] = recall_over_grid(hits, similarities, hubness, targets, rerank_grid)
            if both:
                grids = {kind: recall_over_grid(*([x[i] for i in rows] for x in (hits, similarities, hubness, targets)),
                                                rerank_grid) for kind, rows in kinds.items()}
                result["reranked_by_weight_by_kind"] = {
                    pair: {**{kind: grids[kind][pair] for kind in kinds}, "mean": _mean(*(g[pair] for g in grids.values()))}
                    for pair in result["reranked_by_weight"]}
    return result


def best_by_recall(tables: Sequence[Mapping], tiebreak: Callable, first: str = "R@10") -> Hashable:
    """The key of `tables` (each: key -> R@K, the same keys) with the best mean `first` across
    them, then the best of the other R@K from the widest down; on a tie, the largest
    tiebreak(key) (negated weights: the smaller wins). The one rule for every weight chosen on
    held-out queries, here and in the benchmarks."""
    order = [first, *(f"R@{k}" for k in sorted(KS, reverse=True) if f"R@{k}" != first)]
    mean = lambda key, k: float(np.mean([table[key][k] for table in tables]))
    return max(tables[0], key=lambda key: (*(mean(key, k) for k in order), *tiebreak(key)))


def chosen_weights(by_prior: Mapping[PriorWeights, dict], by: str = "R@10") -> dict:
    """The search weights best on these evaluations (evaluate_generative's results, one per prior,
    of the same queries): every prior and, where re-ranked, every (weight, hubness weight) of its
    grid. Judged on the mean of the two kinds' recall where both kinds were asked, since a weight
    one kind favours hurts the other (recall_by_kind), else on all the queries; by `by` first
    (R@10 favours larger bonuses than R@1 does: benchmarks/RESULTS.md)."""
    kinds = ("captioned", "uncaptioned") if "by_kind" in next(iter(by_prior.values())) else ("all",)
    tables: dict[str, dict[tuple, dict]] = {kind: {} for kind in kinds}
    for prior, result in by_prior.items():
        for weights, by_kind in _rankings(prior, result, kinds != ("all",)):
            for kind in kinds:
                tables[kind][weights] = by_kind[kind]
    best = best_by_recall(list(tables.values()), lambda weights: tuple(-w for w in weights), first=by)
    chosen = dict(zip(("beam_hubness_weight", "added_bonus", "rerank_weight", "hubness_weight"), best))
    on = "mean of captioned and uncaptioned" if kinds != ("all",) else "all queries"
    return {**chosen, "on": on, "by": by, **_mean(*(table[best] for table in tables.values()))}


def _rankings(prior: PriorWeights, result: dict, both: bool):
    """(weights, recall by kind) of each ranking one evaluation made: its beams' own order, or
    each re-ranking of them; weights = (beam hubness, added bonus[, weight, hubness weight])."""
    split = lambda overall, by_kind: by_kind if both else {"all": overall}
    if "reranked_by_weight" in result:
        for pair, overall in result["reranked_by_weight"].items():
            yield ((prior.hubness, prior.added_bonus, *map(float, pair.split(","))),
                   split(overall, result.get("reranked_by_weight_by_kind", {}).get(pair)))
    elif "reranked" in result:
        reranked = result["reranked"]
        yield ((prior.hubness, prior.added_bonus, reranked["weight"], reranked["hubness_weight"]),
               split(reranked, reranked.get("by_kind")))
    else:
        yield (prior.hubness, prior.added_bonus), split(result, result.get("by_kind"))


def recall_by_kind(rankings: Sequence[Sequence[str]], targets: Sequence[str],
                   kinds: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float]]:
    """R@K of the queries that seek images whose captions were trained on ("captioned"), of the
    rest ("uncaptioned"), and the mean of the two. The model and its two-tower pull every query
    towards the first kind, and a hubness weight pushes back: chosen on one kind alone, it
    favours that kind (benchmarks/RESULTS.md). `kinds`: kind -> the queries' positions."""
    out = {kind: {"queries": len(rows), **recall([rankings[i] for i in rows], [targets[i] for i in rows])}
           for kind, rows in kinds.items()}
    return {**out, "mean": _mean(*out.values())}


def _mean(*recalls: Mapping[str, float]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean([r[f"R@{k}"] for r in recalls])) for k in KS}


def recall_over_grid(hits: list[list[Hit]], similarities: list[list[float]], hubness: list[list[float]],
                     targets: Sequence[str], grid: Sequence[tuple[float, float]]) -> dict[str, dict[str, float]]:
    """R@K re-ranked at every (weight, hubness weight) of `grid`, keyed "w,h": `reranked` for many
    weights at once (a full-size dev search tries about a hundred)."""
    if not hits:
        return {f"{w:g},{h:g}": {f"R@{k}": 0.0 for k in KS} for w, h in grid}
    width = max(len(row) for row in hits)
    padded = lambda rows, fill: np.array([list(r) + [fill] * (width - len(r)) for r in rows], dtype=np.float64)
    scores = padded([[h.score for h in row] for row in hits], -np.inf)
    sims, hubs = padded(similarities, 0.0), padded(hubness, 0.0)
    is_target = np.array([[h.key == t for h in row] + [False] * (width - len(row)) for row, t in zip(hits, targets)])
    out = {}
    for weight, hubness_weight in grid:
        fused = scores + weight * sims - hubness_weight * hubs
        order = np.argsort(-fused, axis=1, kind="stable")
        found = np.take_along_axis(is_target, order, axis=1)
        out[f"{weight:g},{hubness_weight:g}"] = {f"R@{k}": float(found[:, :k].any(axis=1).mean()) for k in KS}
    return out


def word_f1(text: str, references: Sequence[str]) -> float:
    """Content-word F1 of a description against its best-matching reference caption."""
    from .training import content_words

    said = set(content_words(text))
    best = 0.0
    for reference in references:
        expected = set(content_words(reference))
        overlap = len(said & expected)
        if overlap:
            best = max(best, 2 * overlap / (len(said) + len(expected)))
    return best


def query_captions(queries: Sequence[tuple[str, str]], keys: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Each image's held-out query captions: the references its description is scored against.
    With `keys`, every one of them in that order (those without a query get none) and a query for
    any other image is a KeyError; without, the images in the order the queries name them."""
    captions: dict[str, list[str]] = {k: [] for k in keys} if keys is not None else {}
    for caption, key in queries:
        (captions[key] if keys is not None else captions.setdefault(key, [])).append(caption)
    return captions


def evaluate_describe_and_ask(engine: TransformersEngine, references: Mapping[str, Sequence[str]], *,
                              seed: int = 0, batch_size: int = 16, words_per_image: int = 3,
                              progress: bool = True) -> dict:
    """How well the model speaks about images it knows only by id: the content-word F1 of its
    description against the image's reference captions (and the share that are one of them,
    `describe_exact`: training saw each caption as written), and its accuracy on yes/no
    questions built as training builds them (`yes_no_questions`): up to `words_per_image` words
    each image's captions mention, each also asked of an image whose captions do not (several
    per image: one pair each gave a standard error near 0.05). A model that asks from its
    description is asked after its own.

    `yes_no_word_prior` is the accuracy of "yes iff at least t of these images' captions mention
    the word" at its best t: the control that yes/no accuracy has to beat to show knowledge of
    the image. Every word is asked as often with yes as with no, so it is 0.5. `yes_share` is how
    often the model answered yes: near 0 or 1 it does not tell images apart, whatever its accuracy
    (an accuracy is at most 1 - |yes_share - 0.5|).

    `yes_no_auc` asks whether the model leans towards "yes" more on the questions whose answer is
    yes, whichever way greedy decoding then tips (the ROC AUC of log P(Yes) - log P(No); 0.5 knows
    nothing): a model answering "yes" to everything may still rank them, and a calibrated threshold
    would then answer better. `yes_no_by_description` is the accuracy of "yes iff the model's own
    description mentions the word": what it knows of the image when it speaks unprompted, and the
    most that reading one description can score.

    A model that asks from its description also gets `yes_no_stated_accuracy`: its accuracy on
    the questions that description answers (the words it mentions asked "yes", those it does not
    asked "no"), which tells how well it reads apart from how much its descriptions cover (with
    ask_descriptions > 1, the joined descriptions its questions follow)."""
    from .training import content_words, presence_question, yes_no_questions

    keys = [k for k, captions in references.items() if captions]
    prompts, descriptions = engine.prompts, {}
    for start in tqdm(range(0, len(keys), batch_size), desc="describe", disable=not progress):
        batch = keys[start : start + batch_size]
        descriptions.update(zip(batch, engine.generate([prompts.describe(engine.stored.id_tokens[k]) for k in batch])))
    f1s = [word_f1(descriptions[k], references[k]) for k in keys]
    exact = sum(normalize_caption(descriptions[k]) in {normalize_caption(c) for c in references[k]} for k in keys)

    words = {k: {w for c in references[k] for w in content_words(c)} for k in keys}
    questions = yes_no_questions(random.Random(seed), words, words_per_image)
    mentions = Counter(w for ws in words.values() for w in ws)
    context = dict.fromkeys(keys)  # what the engines put before a question (TransformersEngine.ask_contexts)
    if engine.stored.asks_from_description and engine.stored.ask_descriptions == 1:
        context = descriptions
    elif engine.stored.asks_from_description:
        for start in tqdm(range(0, len(keys), batch_size), desc="descriptions", disable=not progress):
            batch = keys[start : start + batch_size]
            context.update(zip(batch, engine.ask_contexts(batch)))
    prompts_asked = [prompts.ask(engine.stored.id_tokens[k], presence_question(w), context[k]) for k, w, _ in questions]
    answered = []
    for start in tqdm(range(0, len(questions), 4 * batch_size), desc="ask", disable=not progress):
        answered += engine.answers(prompts_asked[start : start + 4 * batch_size], max_new_tokens=4)
    right = [a.verdict == yes for a, (_, _, yes) in zip(answered, questions, strict=True)]
    described = {k: set(content_words(descriptions[k])) for k in keys}
    said_yes = sum(a.verdict is True for a in answered)
    asked = len(questions)
    scores = {"images": len(keys), "describe_word_f1": float(sum(f1s) / max(1, len(f1s))),
              "describe_exact": exact / max(1, len(keys)), "yes_no_accuracy": sum(right) / max(1, asked),
              "yes_no_word_prior": max((sum((mentions[w] >= t) == yes for _, w, yes in questions) / max(1, asked)
                                        for t in range(1, max(mentions.values(), default=0) + 2)), default=0.0),
              "yes_share": said_yes / max(1, asked), "questions": asked,
              "yes_no_auc": _auc([yes for _, _, yes in questions], [a.yes_log_odds for a in answered]),
              "yes_no_by_description": sum((w in described[k]) == yes for k, w, yes in questions) / max(1, asked)}
    if engine.stored.asks_from_description:
        # the questions its descriptions answer: a perfect reader of them scores 1 here, and the rest
        # ask about words they leave out
        said = {k: set(content_words(context[k])) for k in keys}
        stated = [ok for ok, (k, w, yes) in zip(right, questions) if (w in said[k]) == yes]
        scores |= {"yes_no_stated_accuracy": sum(stated) / max(1, len(stated)), "questions_stated": len(stated)}
    return scores


def _auc(truths: Sequence[bool], scores: Sequence[float]) -> float | None:
    """How often a yes-question scores above a no-question (ties count half); None without both kinds."""
    if len(set(truths)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truths, scores))


def check_candidates(trie: IdTrie, queries: Sequence[tuple[str, str]]) -> None:
    missing = sorted({t for _, t in queries if t not in trie})
    if missing:
        raise ValueError(f"{len(missing)} query targets are not in the catalog, e.g. {missing[:3]}")
