"""The id trie inside vLLM's engine: a logits processor that turns a search step's logits
into the log-probabilities of the trie's allowed next tokens (plus the search prior's step
offsets), and -inf everywhere else.

The engine runs with logprobs_mode="processed_logits", so a request's top-N log-probs are read
after this processor: one request per beam and step returns that beam's best continuations
however wide its trie node is. (Before, each request listed the tokens it wanted scored, at
most 128, so the root of a catalog of atomic ids, one token per image, took a request per 128
images.) A search request names its beam's id tokens so far, and the prior's weights, in
`SamplingParams.extra_args[STEP]`. A step of the beam search over descriptions (an ask after
several) names no trie: `extra_args[LOGPROBS]` turns its logits into log-probabilities alone.
Other requests (describe, ask) pass untouched.

vLLM builds this class in its model-runner (worker) process, from the served checkpoint's
path: the trained model's folder around it (genret.model_store) gives the trie and the hubness.
"""

from __future__ import annotations

from pathlib import Path

import torch
from genret.decoding import PriorWeights, TrieMask, search_prior
from genret.model_store import StoredModel
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

STEP = "genret_trie_step"  # extra_args key: {"prefix": [id tokens so far], "hubness_weight": h, "added_bonus": b}
LOGPROBS = "genret_logprobs"  # extra_args key: true for log-probabilities over the whole vocabulary, no trie


def step_args(prefix: list[int], prior: PriorWeights) -> dict:
    """The extra_args of one search step's request (plain JSON types: vLLM may serialize them)."""
    return {STEP: {"prefix": list(prefix), "hubness_weight": float(prior.hubness),
                   "added_bonus": float(prior.added_bonus)}}


class TrieLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.stored = StoredModel.open(Path(vllm_config.model_config.model).parent)
        self.trie = self.stored.trie()
        self.masks: dict[PriorWeights, TrieMask] = {}  # prior weights -> their mask, device tensors cached
        # batch row -> (id prefix, prior weights), or (None, None): log-probabilities, no trie
        self.steps: dict[int, tuple[list[int], PriorWeights] | tuple[None, None]] = {}

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        step = (params.extra_args or {}).get(STEP)
        if step is None:
            return
        shape = f"extra_args[{STEP!r}] must be {{'prefix': [token ids], 'hubness_weight': h, 'added_bonus': b}}"
        if not (isinstance(step, dict) and isinstance(step.get("prefix"), list)
                and all(isinstance(t, int) for t in step["prefix"])):
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
    def _step_of(params: SamplingParams, prompt_ids, output_ids):
        """A search step's (id prefix, prior), (None, None) for log-probabilities alone, or None."""
        extra = params.extra_args or {}
        if (step := extra.get(STEP)) is not None:
            return step["prefix"], PriorWeights(step["hubness_weight"], step["added_bonus"])
        return (None, None) if extra.get(LOGPROBS) else None

    def mask(self, prior: PriorWeights) -> TrieMask:
        if prior not in self.masks:
            self.masks[prior] = TrieMask(self.trie, 0, search_prior(self.stored, prior, self.trie))
        return self.masks[prior]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.steps:
            return logits
        by_prior: dict[PriorWeights | None, tuple[list[int], list[list[int] | None]]] = {}  # None: no trie
        for row, (prefix, prior) in self.steps.items():
            rows, prefixes = by_prior.setdefault(prior, ([], []))
            rows.append(row)
            prefixes.append(prefix)
        for prior, (rows, prefixes) in by_prior.items():
            index = torch.tensor(rows, device=logits.device)
            logprobs = logits[index].log_softmax(-1)  # over the whole vocabulary, as transformers scores
            logits[index] = logprobs if prior is None else logprobs + self.mask(prior).mask(prefixes, logprobs)
        return logits
