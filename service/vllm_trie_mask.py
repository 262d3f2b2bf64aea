"""The id trie inside vLLM's engine: a logits processor that turns a search step's logits
into the log-probabilities of the trie's allowed next tokens (plus the hubness prior's step
offsets), and -inf everywhere else.

The engine runs with logprobs_mode="processed_logits", so a request's top-N log-probs are read
after this processor: one request per beam and step returns that beam's best continuations
however wide its trie node is. (Before, each request listed the tokens it wanted scored, at
most 128, so the root of a catalog of atomic ids, one token per image, took a request per 128
images.) A search request names its beam's id tokens so far, and the prior's weight, in
`SamplingParams.extra_args[STEP]`; requests without it (describe, ask) pass untouched.

vLLM builds this class in its model-runner (worker) process, from the served checkpoint's
path: the trained model's folder around it (genret.model_store) gives the trie and the hubness.
"""

from __future__ import annotations

from pathlib import Path

import torch
from genret.decoding import TrieMask, hubness_prior
from genret.model_store import StoredModel
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

STEP = "genret_trie_step"  # extra_args key: {"prefix": [id tokens so far], "hubness_weight": h}


def step_args(prefix: list[int], hubness_weight: float) -> dict:
    """The extra_args of one search step's request."""
    return {STEP: {"prefix": list(prefix), "hubness_weight": float(hubness_weight)}}


class TrieLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.stored = StoredModel.open(Path(vllm_config.model_config.model).parent)
        self.trie = self.stored.trie()
        self.masks: dict[float, TrieMask] = {}  # prior weight (0: none) -> its mask, device tensors cached
        self.steps: dict[int, tuple[list[int], float]] = {}  # batch row -> (id prefix, prior weight)

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        step = (params.extra_args or {}).get(STEP)
        if step is None:
            return
        if not (isinstance(step, dict) and isinstance(step.get("prefix"), list)
                and all(isinstance(t, int) for t in step["prefix"])
                and isinstance(step.get("hubness_weight"), (int, float)) and step["hubness_weight"] >= 0):
            raise ValueError(f"extra_args[{STEP!r}] must be {{'prefix': [token ids], 'hubness_weight': h >= 0}}")

    def is_argmax_invariant(self) -> bool:
        return False  # it masks: greedy decoding must see it too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.steps, batch_update, self._step_of)

    @staticmethod
    def _step_of(params: SamplingParams, prompt_ids, output_ids) -> tuple[list[int], float] | None:
        step = (params.extra_args or {}).get(STEP)
        return None if step is None else (step["prefix"], float(step["hubness_weight"]))

    def mask(self, weight: float) -> TrieMask:
        if weight not in self.masks:
            self.masks[weight] = TrieMask(self.trie, 0, hubness_prior(self.stored, weight, self.trie))
        return self.masks[weight]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.steps:
            return logits
        by_weight: dict[float, tuple[list[int], list[list[int]]]] = {}
        for row, (prefix, weight) in self.steps.items():
            rows, prefixes = by_weight.setdefault(weight, ([], []))
            rows.append(row)
            prefixes.append(prefix)
        for weight, (rows, prefixes) in by_weight.items():
            index = torch.tensor(rows, device=logits.device)
            logprobs = logits[index].log_softmax(-1)  # over the whole vocabulary, as transformers scores
            logits[index] = logprobs + self.mask(weight).mask(prefixes, logprobs)
        return logits
