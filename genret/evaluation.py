"""Recall@K of held-out text queries: the number that decides whether an approach works."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from .decoding import EmbeddingReranker, Hit, TransformersEngine, reranked
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
    rerank_weights: Sequence[float] = (),
    progress: bool = True,
) -> dict:
    """R@K of (query text, relevant image key) pairs, searching `candidates` (default: all ids).
    With a reranker, also R@K re-ranked at its weight ("reranked") and at each of
    `rerank_weights` ("reranked_by_weight"), all from the same beams."""
    trie = engine.trie if candidates is None else engine.stored.trie(candidates)
    hits, similarities = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(queries), batch_size), desc="queries", disable=not progress):
        texts = [q for q, _ in queries[start : start + batch_size]]
        batch = engine.search(texts, k=max(k, beams), beams=beams, trie=trie)
        hits += batch
        if reranker is not None:
            similarities += reranker.similarities(texts, batch)
    seconds = time.perf_counter() - started
    targets = [t for _, t in queries]

    def recall_of(rows: list[list[Hit]]) -> dict[str, float]:
        return recall([[h.key for h in row] for row in rows], targets)

    result = {"queries": len(queries), "candidates": len(trie), "beams": beams,
              "seconds_per_query": seconds / max(1, len(queries)), **recall_of(hits)}
    if reranker is not None:
        result["reranked"] = {"weight": reranker.weight, **recall_of(reranked(hits, similarities, reranker.weight))}
        if rerank_weights:
            result["reranked_by_weight"] = {str(w): recall_of(reranked(hits, similarities, w)) for w in rerank_weights}
    return result


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


def evaluate_describe_and_ask(engine: TransformersEngine, references: Mapping[str, Sequence[str]], *,
                              seed: int = 0, batch_size: int = 16, words_per_image: int = 3,
                              progress: bool = True) -> dict:
    """How well the model speaks about images it knows only by id: the content-word F1 of its
    description against the image's reference captions, and its accuracy on the yes/no
    questions training asks, about up to `words_per_image` words its captions mention and as
    many they do not (several per image: one pair each gave a standard error near 0.05)."""
    from .training import content_words, presence_question, presence_words

    rng = random.Random(seed)
    keys = [k for k, captions in references.items() if captions]
    words = {k: sorted({w for c in references[k] for w in content_words(c)}) for k in keys}
    vocabulary = sorted({w for ws in words.values() for w in ws})
    prompts, f1s, correct, asked = engine.prompts, [], 0, 0
    for start in tqdm(range(0, len(keys), batch_size), desc="describe/ask", disable=not progress):
        batch = keys[start : start + batch_size]
        ids = [engine.stored.id_tokens[k] for k in batch]
        descriptions = engine.generate([prompts.describe(i) for i in ids])
        f1s += [word_f1(d, references[k]) for d, k in zip(descriptions, batch)]
        questions, expected = [], []
        for key, id_tokens in zip(batch, ids):
            present, absent = presence_words(rng, words[key], vocabulary, words_per_image)
            for word, answer in [(w, "yes") for w in present] + [(w, "no") for w in absent]:
                questions.append(prompts.ask(id_tokens, presence_question(word)))
                expected.append(answer)
        answers = engine.generate(questions, max_new_tokens=4) if questions else []
        correct += sum(a.lower().startswith(e) for a, e in zip(answers, expected))
        asked += len(questions)
    return {"images": len(keys), "describe_word_f1": float(sum(f1s) / max(1, len(f1s))),
            "yes_no_accuracy": correct / max(1, asked), "questions": asked}


def check_candidates(trie: IdTrie, queries: Sequence[tuple[str, str]]) -> None:
    missing = sorted({t for _, t in queries if t not in trie})
    if missing:
        raise ValueError(f"{len(missing)} query targets are not in the catalog, e.g. {missing[:3]}")
