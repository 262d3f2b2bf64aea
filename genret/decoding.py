"""Trie-constrained decoding with plain transformers: the reference engine.

Beam search may only follow the catalog's id trie, so every hypothesis it returns is a real
image; its score is the id's log-probability given the query. The vLLM engine in `service/`
implements the same interface and must agree with this one on greedy top-1.
"""

from __future__ import annotations

import bisect
import numbers
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from .catalog import is_blank
from .encoders import usable_device
from .model_store import ModelStoreError, StoredModel, require_strings
from .prompts import Prompts
from .trie import IdPrior, IdTrie


@dataclass(frozen=True)
class Hit:
    key: str
    score: float


@dataclass(frozen=True)
class Answer:
    """An answer, and at its first token log P(Yes) - log P(No): how far the model leaned, which
    greedy decoding hides (a model can rank the right questions higher and still answer every
    one of them "yes"), so a caller can pick its own threshold."""

    text: str
    yes_log_odds: float

    @property
    def verdict(self) -> bool | None:
        """True for an answer whose first word is yes, False for no, None for any other ("Nothing."
        is not a no)."""
        first = self.text.split(maxsplit=1)[0].strip(".,!?;:").lower() if self.text.strip() else ""
        return {"yes": True, "no": False}.get(first)

    @property
    def is_yes_or_no(self) -> bool:
        return self.verdict is not None

    @property
    def yes_probability(self) -> float | None:
        """P(Yes) / (P(Yes) + P(No)) at the first token, for an answer that is yes or no (None
        otherwise: "A dog on a beach." did not choose between them)."""
        return float(1 / (1 + np.exp(-self.yes_log_odds))) if self.is_yes_or_no else None


class TransformersEngine:
    def __init__(self, stored: StoredModel, device: str | None = None, cache_prompts: bool = True):
        """`cache_prompts=False` lets beam search recompute each prompt once per beam, as HF's
        generate does on its own: the path the prompt cache is checked and timed against."""
        self.stored, self.cache_prompts = stored, cache_prompts
        self.device = usable_device(device)
        self.lm = stored.load_lm(self.device)
        self.tokenizer = stored.load_tokenizer()
        self.prompts = Prompts(self.tokenizer)
        self.trie = stored.trie()
        self.query_soft_prefix = stored.load_query_soft_prefix(self.device)
        self._mask_tensors = weakref.WeakKeyDictionary()

    def mask_tensors(self, trie: IdTrie, prior: IdPrior | None) -> dict:
        """TrieMask's device tensors for this trie and prior, kept across searches for as long as
        the trie (or the prior, which belongs to one trie) is alive elsewhere."""
        return self._mask_tensors.setdefault(prior if prior is not None else trie, {})

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        pad = self.prompts.end
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, mask

    def retrieval_inputs(self, queries: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """generate() inputs for the retrieve prompts, and how many leading positions of its
        output sequences are prompt (none when the prompt is given as embeddings)."""
        prompts = [self.prompts.retrieve(q) for q in queries]
        if self.query_soft_prefix is None:
            ids, mask = self._left_padded(prompts)
            return {"input_ids": ids, "attention_mask": mask}, ids.shape[1]
        soft = self.query_soft_prefix(queries)
        table = self.lm.get_input_embeddings()
        rows = [torch.cat([s.to(table.weight.dtype), table(torch.tensor(p, device=self.device))]) for s, p in zip(soft, prompts)]
        width = max(len(r) for r in rows)
        embeds = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):  # left-padded, as for token prompts
            embeds[i, width - len(r):], mask[i, width - len(r):] = r, 1
        return {"inputs_embeds": embeds, "attention_mask": mask}, 0

    @torch.inference_mode()
    def search(self, queries: list[str], k: int = 10, beams: int | None = None,
               trie: IdTrie | None = None, prior: IdPrior | None = None,
               within: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> list[list[Hit]]:
        """Top-k catalog images per query, best first, by constrained beam search; with a prior
        (over the same trie), each id's score includes its offset and the beam searches by it.
        `within` (image keys) searches those images alone, and `exclude` all but those (the hits
        already shown, say), as `trie=stored.trie(within, exclude)` does: the beam never spends a
        place on another image (filtering a catalog-wide search's hits would)."""
        if isinstance(queries, str):  # it would search each character
            raise TypeError(f"search takes a list of queries, not one string: search([{queries!r}])")
        require_strings("search", "queries", queries)
        for name, value in (("k", k), ("beams", beams)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise TypeError(f"search's {name} is a count, not {type(value).__name__}: {name}={value!r}")
        if k < 1 or (beams is not None and beams < 1):
            raise ValueError(f"k={k}, beams={beams}: search for at least one image with at least one beam")
        if blank := [i for i, query in enumerate(queries) if is_blank(query)]:
            raise ValueError(f"queries {blank[:5]} are blank (no visible characters): with no words, a search "
                             "returns whatever ids the model favours (the CLI and the service refuse them too)")
        if within is not None or exclude is not None:
            if trie is not None:
                raise ValueError("search takes the images to search (`within`, `exclude`) or a `trie` of them, not both")
            trie = self.stored.trie(within, exclude)
            prior = prior.over(trie) if prior is not None and prior.trie is not trie else prior
        if not queries:
            return []
        trie = trie or self.trie
        if prior is not None and prior.trie is not trie:
            raise ValueError("the prior was built over another trie")
        k = min(k, len(trie))
        beams = max(beams or k, k)
        inputs, width = self.retrieval_inputs(queries)
        if beams > 1 and self.cache_prompts:
            inputs["past_key_values"] = self.prompt_cache(inputs, beams)
        end = self.prompts.end
        out = self.lm.generate(
            **inputs, num_beams=beams, num_return_sequences=beams, max_new_tokens=trie.max_depth(),
            logits_processor=LogitsProcessorList([TrieMask(trie, width, prior, self.mask_tensors(trie, prior))]),
            do_sample=False,
            # beam search's scores come with output_scores, greedy's are re-read from the logits; each
            # is a (batch x beams, vocabulary) tensor per step, so ask only for the one needed
            length_penalty=0.0, early_stopping=True, output_scores=beams > 1, output_logits=beams == 1,
            return_dict_in_generate=True, pad_token_id=end, eos_token_id=end,
        )
        sequences = out.sequences[:, width:].tolist()
        scores = out.sequences_scores.tolist() if beams > 1 else _greedy_scores(out, width, end)
        results = []
        for q in range(len(queries)):
            hits, seen = [], set()
            for seq, score in zip(sequences[q * beams : (q + 1) * beams], scores[q * beams : (q + 1) * beams]):
                key = trie.key_for(_until_end(seq, end))
                if key is not None and beams == 1 and prior is not None:
                    score += prior.offset(key)  # greedy's scores are re-read from the raw logits
                if key is not None and key not in seen and np.isfinite(score):
                    seen.add(key)
                    hits.append(Hit(key, float(score)))
            results.append(sorted(hits, key=lambda h: -h.score)[:k])
        return results

    def prompt_cache(self, inputs: dict[str, torch.Tensor], beams: int) -> DynamicCache:
        """The prompts' keys and values, computed once per query and copied for each beam.

        Beam search copies every prompt `beams` times before its first forward pass, so the
        prompt ran once per beam; ids are a few tokens long, so with wide beams that prefill was
        most of a search. Every position but the last is cached here; `generate` runs the rest."""
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers left-padded rows
        prompt = {name: inputs[name][:, :-1] for name in ("input_ids", "inputs_embeds") if name in inputs}
        cache = DynamicCache(config=self.lm.config)
        self.lm.model(**prompt, attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                      past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(beams)
        return cache

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | None = None,
                 processors: list[LogitsProcessor] = ()) -> list[str]:
        """Greedy continuations; max_new_tokens None: the model's answer_tokens."""
        max_new_tokens = max_new_tokens or self.stored.answer_tokens
        ids, mask = self._left_padded(prompts)
        out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=self.prompts.end, eos_token_id=self.prompts.end,
                               logits_processor=LogitsProcessorList(processors))
        return [self.prompts.decode_answer(_until_end(row, self.prompts.end)) for row in out[:, ids.shape[1]:].tolist()]

    def answers(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[Answer]:
        """Greedy answers with their leaning towards yes, read off the same generation's first step."""
        if not prompts:
            return []
        leaning = FirstStepLogOdds(*self.prompts.yes_no_tokens)
        texts = self.generate(prompts, max_new_tokens, [leaning])
        return [Answer(text, lean) for text, lean in zip(texts, leaning.log_odds, strict=True)]

    @torch.inference_mode()
    def generate_beams(self, prompts: list[list[int]], beams: int, max_new_tokens: int | None = None) -> list[list[str]]:
        """Each prompt's `beams` best continuations by beam search, best first, each text once. A
        score is the summed log-probability (no length penalty), as the vLLM engine ranks them.
        One beam is greedy decoding, and takes its shorter path."""
        if beams == 1:
            return [[text] if text else [] for text in self.generate(prompts, max_new_tokens)]
        ids, mask = self._left_padded(prompts)
        end, max_new_tokens = self.prompts.end, max_new_tokens or self.stored.answer_tokens
        out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               num_beams=beams, num_return_sequences=beams, length_penalty=0.0, early_stopping=True,
                               pad_token_id=end, eos_token_id=end)
        texts = [self.prompts.decode_answer(_until_end(row, end)) for row in out[:, ids.shape[1]:].tolist()]
        return [list(dict.fromkeys(t for t in texts[i * beams : (i + 1) * beams] if t)) for i in range(len(prompts))]

    def ask_contexts(self, keys: list[str], max_new_tokens: int | None = None) -> list[str | None]:
        """What a question about each image follows: nothing, or, for a model trained to ask from
        its description, its own description (its ask_descriptions best ones, joined)."""
        if not self.stored.asks_from_description:
            return [None] * len(keys)
        prompts = [self.prompts.describe(self.stored.image_id_tokens(k)) for k in keys]
        return [" ".join(texts) for texts in self.generate_beams(prompts, self.stored.ask_descriptions, max_new_tokens)]

    def describe(self, key: str) -> str:
        """The memorized image's caption, from its id alone (UnknownImage, UntrainedTask)."""
        return self.describe_many([key])[0]

    def describe_many(self, keys: list[str]) -> list[str]:
        """describe, for several images in one batch (all checked before any is generated)."""
        if isinstance(keys, str):  # it would describe each character
            raise TypeError(f"describe_many takes a list of image keys, not one string: describe_many([{keys!r}])")
        self.stored.require_trained_to("describe")
        prompts = [self.prompts.describe(self.stored.image_id_tokens(key)) for key in keys]
        return self.generate(prompts) if prompts else []

    def ask(self, key: str, question: str) -> str:
        return self.answer(key, question).text

    def answer(self, key: str, question: str) -> Answer:
        """ask, with the answer's leaning towards yes (Answer.yes_probability for a yes/no one)."""
        return self.answer_many([(key, question)])[0]

    def answer_many(self, questions: list[tuple[str, str]]) -> list[Answer]:
        """answer, for several (image key, question) pairs in one batch, all checked before any is
        answered; a model that asks from its description describes each image once."""
        if isinstance(questions, tuple) and len(questions) == 2 and all(isinstance(q, str) for q in questions):
            raise TypeError(f"answer_many takes a list of (image key, question) pairs, not one pair: "
                            f"answer_many([{questions!r}])")
        if malformed := [i for i, pair in enumerate(questions) if not (isinstance(pair, tuple | list) and len(pair) == 2)]:
            raise TypeError(f"answer_many takes (image key, question) pairs: questions {malformed[:5]} are not pairs, "
                            f"e.g. {questions[malformed[0]]!r}")
        require_strings("answer_many", "questions", [question for _, question in questions])
        self.stored.require_trained_to("ask")
        if blank := [i for i, (_, question) in enumerate(questions) if is_blank(question)]:
            raise ValueError("the question is blank" if len(questions) == 1 else f"questions {blank} are blank")
        if not questions:
            return []
        ids = [self.stored.image_id_tokens(key) for key, _ in questions]  # every key, before any is described
        keys = list(dict.fromkeys(key for key, _ in questions))
        contexts = dict(zip(keys, self.ask_contexts(keys), strict=True))
        return self.answers([self.prompts.ask(image_id, question, contexts[key])
                             for image_id, (key, question) in zip(ids, questions, strict=True)])


class FirstStepLogOdds(LogitsProcessor):
    """Reads log P(a) - log P(b) off each row's first generated token (the difference of their
    logits) and changes no score."""

    def __init__(self, a: int, b: int):
        if a == b:
            raise ValueError(f"token {a} twice: the log-odds of a token against itself say nothing")
        self.a, self.b, self.log_odds = a, b, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.log_odds is None:
            self.log_odds = (scores[:, self.a].float() - scores[:, self.b].float()).tolist()
        return scores


class TrieMask(LogitsProcessor):
    """Keeps every beam on the id trie: each token that does not continue its prefix towards a
    catalog id gets -inf. transformers' `prefix_allowed_tokens_fn` reads each beam back from the
    device and writes its mask row alone; here one read serves the whole step and beams at the
    same trie node share one write (at the first step every beam is at the root, and with
    thousands of atomic ids those per-beam writes were most of a search's time). A finished
    sequence may only repeat the end token. With a prior, an allowed token gets its step
    offset instead of 0.

    `tensors` carries each node's device tensors from one search to the next (the engine keeps
    one per trie and prior): with a million atomic ids, turning the root's list into a tensor
    took a quarter of a second every search. Each group's mask is one dense row, broadcast to its
    beams, which is cheaper than writing (beams x allowed) indices one by one."""

    def __init__(self, trie: IdTrie, prompt_width: int, prior: IdPrior | None = None, tensors: dict | None = None):
        self.trie, self.width, self.prior = trie, prompt_width, prior
        # id(allowed list) -> its token ids on the device, and their offsets (0 without a prior);
        # the trie's lists live as long as it does, and so does the end-only list kept here
        self._tensors: dict = {} if tensors is None else tensors
        self.end_only = self._tensors.setdefault("end only", [trie.end_token])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.mask(input_ids[:, self.width:].tolist(), scores)

    def mask(self, prefixes: list[list[int]], scores: torch.Tensor) -> torch.Tensor:
        """What to add to each row of `scores`, whose id so far is that row's prefix: -inf off
        the trie, 0 (or the prior's step offset) on it."""
        # the trie caches each node's list, so one list is one node (or the shared end-only list)
        groups: dict[int, tuple[list[int], list[int], list[int]]] = {}  # -> (allowed, rows, a prefix)
        for row, prefix in enumerate(prefixes):
            allowed = self.trie.allowed_next(prefix) or self.end_only
            groups.setdefault(id(allowed), (allowed, [], prefix))[1].append(row)
        mask = torch.empty_like(scores)  # the groups cover every row, and each writes its rows whole
        for key, (allowed, rows, prefix) in groups.items():
            if key not in self._tensors:
                offsets = None
                if self.prior is not None and allowed is not self.end_only:
                    offsets = torch.tensor(self.prior.step_offsets(prefix), dtype=scores.dtype, device=scores.device)
                self._tensors[key] = (torch.tensor(allowed, device=scores.device), offsets)
            tokens, offsets = self._tensors[key]
            row = torch.full_like(scores[0], float("-inf"))
            if offsets is None:
                row.index_fill_(0, tokens, 0.0)
            else:
                row.index_copy_(0, tokens, offsets)
            mask[torch.tensor(rows, device=scores.device)] = row
        return mask


def _greedy_scores(out, width: int, end: int) -> list[float]:
    """Log-probability of each greedy sequence, on the same scale as beam search's scores."""
    chosen = out.sequences[:, width:]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    token_lp = logprobs.gather(-1, chosen[:, : logprobs.shape[1], None]).squeeze(-1)
    finished = (chosen == end).int().cumsum(1) - (chosen == end).int()  # steps after the end token
    return token_lp.masked_fill(finished[:, : token_lp.shape[1]] > 0, 0.0).sum(1).tolist()


def _until_end(sequence: list[int], end: int) -> list[int]:
    return sequence[: sequence.index(end)] if end in sequence else sequence


@dataclass(frozen=True)
class PriorWeights:
    """What a search adds to each id's score inside the beam (see search_prior): a hashable value,
    so an engine keeps one built prior per distinct weights. Both 0 (the default) = no prior.

    - hubness: subtract this x the image's hubness. The model under-scores images whose captions
      it never trained on; this lets a beam of 10 reach them (re-ranking can only reorder what the
      beam kept), at a cost to queries for captioned images: choose it on queries of both kinds.
    - added_bonus: add this (nats) to each image added after training (`genret add`). Such an
      image has no pseudo-queries, so the model under-scores it against trained ones
      (benchmarks/RESULTS.md: 2-3 nats lifted added images' R@1 0.035 -> 0.09-0.14 while trained
      images kept R@10)."""

    hubness: float = 0.0
    added_bonus: float = 0.0

    def __post_init__(self):
        for name in ("hubness", "added_bonus"):
            value = getattr(self, name)
            try:
                valid = 0 <= value < float("inf")
            except TypeError:
                valid = False
            if not valid:
                raise ValueError(f"prior weight {name} must be a finite number >= 0, not {value!r}")

    def __bool__(self) -> bool:
        return bool(self.hubness or self.added_bonus)

    def check(self, stored: StoredModel) -> None:
        """What search_prior refuses on this model, for an engine whose prior is built in another
        process (vLLM's worker): a hubness weight on a model saved without image hubness."""
        if self.hubness > 0:
            stored.check_image_hubness("search with a hubness prior")


def search_prior(stored: StoredModel, weights: PriorWeights, trie: IdTrie | None = None) -> IdPrior | None:
    """The IdPrior of these weights over the catalog's trie (or `trie`): each id's offset is
    -weights.hubness x its image's hubness, plus weights.added_bonus if it was added after
    training. None when that is 0 for every id. The stored model and the weights decide it, so the
    service's engines take the weights and build the prior where they search (vLLM's in its worker)."""
    weights.check(stored)
    # the bonus first: has_added_images reads every id of a grown model, which a search without one need not
    bonus = weights.added_bonus if weights.added_bonus and stored.has_added_images else 0.0
    if not weights.hubness and not bonus:
        return None
    trie = trie or stored.trie()
    keys = stored.keys  # sorted, in the rows' order; a search within a few images needs their rows alone
    if len(trie) == len(keys):
        rows = range(len(keys))
    else:
        rows = [bisect.bisect_left(keys, key) for key in trie.keys]
        if strays := [key for key, row in zip(trie.keys, rows) if row == len(keys) or keys[row] != key]:
            raise ValueError(f"the trie holds {len(strays)} ids the model lacks, e.g. {sorted(strays)[:3]}")
    hubness = stored.image_hubness() if weights.hubness else np.zeros(len(keys))
    added = stored.added_keys if bonus else frozenset()
    offsets = {keys[row]: -weights.hubness * float(hubness[row]) + (bonus if keys[row] in added else 0.0)
               for row in rows}
    return IdPrior(trie, offsets)


class EmbeddingReranker:
    """GENIUS's re-ranking: each beam's score (a log-probability) plus `weight` times the
    two-tower's query-image similarity, minus `hubness_weight` times the image's hubness.

    Both the two-tower and the LM reading its space favour the captioned images they were fit
    to; the hubness term (genret.alignment.hubness) takes that back. Tune both weights on
    held-out queries searched the way the service searches (its whole catalog)."""

    def __init__(self, stored: StoredModel, weight: float = 10.0, device: str = "cpu", hubness_weight: float = 0.0):
        if not stored.can_rerank:
            raise ModelStoreError(f"{stored.path} cannot re-rank: it lacks alignment.safetensors or "
                                  "image_embeddings.npy (the two-tower and the images' embeddings)")
        self.encode = stored.load_query_encoder(device)
        self.row = {k: i for i, k in enumerate(stored.keys)}
        self.image_embeddings = stored.image_embeddings()
        self.image_hubness = (stored.required_image_hubness("re-rank with a hubness weight") if hubness_weight > 0
                              else stored.image_hubness())
        self.weight, self.hubness_weight, self.device = weight, hubness_weight, device

    @torch.inference_mode()
    def similarities(self, queries: list[str], hits: list[list[Hit]]) -> list[list[float]]:
        query_emb = self.encode(queries).cpu().numpy()
        return [[float(self.image_embeddings[self.row[h.key]] @ q) for h in candidates]
                for q, candidates in zip(query_emb, hits)]

    def hubness(self, hits: list[list[Hit]]) -> list[list[float]] | None:
        if self.image_hubness is None:
            return None
        return [[float(self.image_hubness[self.row[h.key]]) for h in candidates] for candidates in hits]

    def __call__(self, queries: list[str], hits: list[list[Hit]]) -> list[list[Hit]]:
        return reranked(hits, self.similarities(queries, hits), self.weight, self.hubness(hits), self.hubness_weight)


def reranked(hits: list[list[Hit]], similarities: list[list[float]], weight: float,
             hubness: list[list[float]] | None = None, hubness_weight: float = 0.0) -> list[list[Hit]]:
    """Each query's hits re-scored as score + weight * similarity - hubness_weight * hubness, best first."""
    if hubness is None:
        if hubness_weight:
            raise ValueError("a hubness weight needs the hits' hubness")
        hubness = [[0.0] * len(row) for row in hits]
    return [sorted((Hit(h.key, h.score + weight * s - hubness_weight * u) for h, s, u in zip(row, sims, hubs)),
                   key=lambda h: -h.score)
            for row, sims, hubs in zip(hits, similarities, hubness)]
