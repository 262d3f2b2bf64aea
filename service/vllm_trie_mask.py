"""The id trie inside vLLM's engine: a logits processor that turns a search step's logits
into the log-probabilities of the trie's allowed next tokens (plus the search prior's step
offsets), and -inf everywhere else.

The engine runs with logprobs_mode="processed_logits", so a request's top-N log-probs are read
after this processor: one request per beam and step returns that beam's best continuations
however wide its trie node is. (Before, each request listed the tokens it wanted scored, at
most 128, so the root of a catalog of atomic ids, one token per image, took a request per 128
images.) A search request names its beam's id tokens so far, and the prior's weights, in
`SamplingParams.extra_args[STEP]`. A search within some images (POST /search's `within`) also
names the next tokens their own trie allows, with those tokens' prior offsets: the processor
keeps those alone, inside the catalog's trie all the same. A search that leaves some images out
(`exclude`) names, where its beam's prefix leads to them, the tokens that lead to nothing else:
the processor forbids those (or, where leaving them out changes the prior's offsets, it names the
tokens allowed as a search within does). A step of the beam search over
descriptions (an ask after several) names no trie: `extra_args[LOGPROBS]` turns its logits into
log-probabilities alone. Other requests (describe, ask) pass untouched.

vLLM builds this class in its model-runner (worker) process, from the served checkpoint's
path: the trained model's folder around it (genret.model_store) gives the trie and the hubness.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from genret.decoding import PriorWeights, TrieMask, search_prior
from genret.model_store import StoredModel
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

# extra_args key: {"prefix": [id tokens so far], "hubness_weight": h, "added_bonus": b}, and within
# some images also "allowed": [the next tokens their trie allows], "offsets": [each one's prior offset] or None,
# and leaving some out "forbidden": [tokens of the catalog's trie that lead to left-out images alone]
STEP = "genret_trie_step"
LOGPROBS = "genret_logprobs"  # extra_args key: true for log-probabilities over the whole vocabulary, no trie


def step_args(prefix: list[int], prior: PriorWeights, allowed: list[int] | None = None,
              offsets: list[float] | None = None, forbidden: list[int] | None = None) -> dict:
    """The extra_args of one search step's request (plain JSON types: vLLM may serialize them)."""
    step = {"prefix": list(prefix), "hubness_weight": float(prior.hubness), "added_bonus": float(prior.added_bonus)}
    if allowed is not None:
        step["allowed"] = list(allowed)
        step["offsets"] = None if offsets is None else [float(x) for x in offsets]
    if forbidden is not None:
        step["forbidden"] = list(forbidden)
    return {STEP: step}


class Step(NamedTuple):
    """One batch row's search step: its id prefix and prior weights (both None: log-probabilities
    alone, no trie), within some images the tokens allowed next, with their offsets, and leaving
    some out the tokens forbidden."""

    prefix: list[int] | None
    prior: PriorWeights | None
    allowed: list[int] | None = None
    offsets: list[float] | None = None
    forbidden: list[int] | None = None


class TrieLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.stored = StoredModel.open(Path(vllm_config.model_config.model).parent)
        self.trie = self.stored.trie()
        self.masks: dict[PriorWeights, TrieMask] = {}  # prior weights -> their mask, device tensors cached
        self.steps: dict[int, Step] = {}  # batch row -> its step

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        step = (params.extra_args or {}).get(STEP)
        if step is None:
            return
        shape = (f"extra_args[{STEP!r}] must be {{'prefix': [token ids], 'hubness_weight': h, 'added_bonus': b}}, "
                 "within some images with 'allowed': [token ids] and 'offsets': [a number each] or None, "
                 "leaving some out with 'forbidden': [token ids]")
        if not (isinstance(step, dict) and _tokens(step.get("prefix"))):
            raise ValueError(shape)
        if "allowed" in step:
            allowed, offsets = step["allowed"], step.get("offsets")
            if not (_tokens(allowed) and allowed and (offsets is None or (
                    isinstance(offsets, list) and len(offsets) == len(allowed)
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in offsets)))):
                raise ValueError(shape)
        if "forbidden" in step and not (_tokens(step["forbidden"]) and "allowed" not in step):
            raise ValueError(shape)
        try:
            PriorWeights(step.get("hubness_weight"), step.get("added_bonus"))
        except ValueError as e:
            raise ValueError(f"{shape}: {e}") from None

    def is_argmax_invariant(self) -> bool:
        return False  # it masks: greedy decoding must see it too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.steps, batch_update, self._step_of)

    @staticmethod
    def _step_of(params: SamplingParams, prompt_ids, output_ids) -> Step | None:
        extra = params.extra_args or {}
        if (step := extra.get(STEP)) is not None:
            return Step(step["prefix"], PriorWeights(step["hubness_weight"], step["added_bonus"]),
                        step.get("allowed"), step.get("offsets"), step.get("forbidden"))
        return Step(None, None) if extra.get(LOGPROBS) else None

    def mask(self, prior: PriorWeights) -> TrieMask:
        if prior not in self.masks:
            self.masks[prior] = TrieMask(self.trie, 0, search_prior(self.stored, prior, self.trie))
        return self.masks[prior]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.steps:
            return logits
        by_prior: dict[PriorWeights | None, tuple[list[int], list[list[int] | None]]] = {}  # None: no trie
        for row, step in self.steps.items():
            # a step within some images brings its own offsets: the catalog's trie, unweighted, only bounds it
            prior = PriorWeights() if step.allowed is not None else step.prior
            rows, prefixes = by_prior.setdefault(prior, ([], []))
            rows.append(row)
            prefixes.append(step.prefix)
        for prior, (rows, prefixes) in by_prior.items():
            index = torch.tensor(rows, device=logits.device)
            logprobs = logits[index].log_softmax(-1)  # over the whole vocabulary, as transformers scores
            logits[index] = logprobs if prior is None else logprobs + self.mask(prior).mask(prefixes, logprobs)
        for row, step in self.steps.items():
            if step.allowed is not None:
                tokens = torch.tensor(step.allowed, device=logits.device)
                within = torch.full_like(logits[row], float("-inf"))
                within[tokens] = 0.0 if step.offsets is None else torch.tensor(step.offsets, dtype=logits.dtype,
                                                                                device=logits.device)
                logits[row] += within
            elif step.forbidden:
                logits[row, torch.tensor(step.forbidden, device=logits.device)] = float("-inf")
        return logits


def _tokens(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
