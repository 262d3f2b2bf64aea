"""The vLLM engine: the model_store checkpoint in vLLM's async engine, decoding inside the id trie.

vLLM has no trie-constrained beam search, so search runs the beam search here, one token
position per step: every live beam of every concurrent search becomes a one-token request
(prompt = query prompt + the beam's id tokens) for the log-probabilities of exactly the
trie's allowed next tokens. All of them are in flight together, so vLLM batches them, and
prefix caching keeps the shared prompt from being recomputed. Candidates only ever come
from `IdTrie.allowed_next`, so an id outside the catalog cannot be produced.

Scores are raw log-probabilities (log-softmax over the whole vocabulary, before the trie
mask), summed over the id's tokens and its end token, and the beam bookkeeping follows
transformers' beam search (2*beams candidates per step, finished ids only from the top
`beams`, stop when `beams` ids are finished), so both engines rank alike.

Prompts are token ids from genret.prompts (vLLM token prompts), exactly as in training.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import uuid

from genret.decoding import Hit
from genret.model_store import StoredModel
from genret.prompts import Prompts

from .engine import EngineError, InputTooLong
from .settings import Settings

log = logging.getLogger(__name__)

# vLLM returns the log-probs of named tokens (`logprob_token_ids`) for at most this many;
# a wider trie node (atomic ids: one token per image) asks for the whole vocabulary's instead.
MAX_LISTED_TOKENS = 128


class VLLMEngine:
    name = "vllm"

    def __init__(self, stored: StoredModel, settings: Settings | None = None):
        self.stored = stored
        self.settings = settings or Settings()
        self.trie = stored.trie()
        self.prompts = Prompts(stored.load_tokenizer())
        self.end = stored.end_token
        if self.end != self.prompts.end:
            raise EngineError(f"{stored.path}: manifest end token {self.end} is not the tokenizer's eos {self.prompts.end}")
        self.max_listed_tokens = MAX_LISTED_TOKENS
        self._llm = None
        self._pending = 0

    @property
    def queue_depth(self) -> int:
        return self._pending

    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        s, cpu = self.settings, current_platform.is_cpu()
        return AsyncEngineArgs(
            model=str(self.stored.lm_path),
            dtype=s.dtype if s.dtype != "auto" else ("float32" if cpu else "bfloat16"),
            enforce_eager=s.enforce_eager if s.enforce_eager is not None else cpu,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=True,  # every beam step repeats the query prompt
            max_logprobs=-1,  # wide trie nodes ask for the whole vocabulary's log-probs
            logprobs_mode="raw_logprobs",  # before the allowed-token mask: transformers' scale
            disable_log_stats=True,
            seed=0,
        )

    async def start(self) -> None:
        if self._llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        # Building the engine blocks for a minute (it starts the engine-core process and loads
        # the weights): do it on a thread so the event loop keeps answering /healthz.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args())

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    async def _generate(self, prompt: list[int], params):
        if self._llm is None:
            raise EngineError("the vLLM engine is not loaded")
        if self._llm.errored:
            raise EngineError(f"the vLLM engine died: {self._llm.dead_error}")
        self._pending += 1
        try:
            final = None
            async for out in self._llm.generate({"prompt_token_ids": prompt}, params, request_id=uuid.uuid4().hex):
                final = out
            return final.outputs[0]
        finally:
            self._pending -= 1

    def _check_fits(self, prompt: list[int], new_tokens: int) -> None:
        if len(prompt) + new_tokens > self.settings.max_model_len:
            raise InputTooLong(f"the prompt is {len(prompt)} tokens; with {new_tokens} to generate it exceeds "
                               f"the engine's max_model_len={self.settings.max_model_len}")

    async def next_logprobs(self, prompt: list[int], allowed: list[int]) -> dict[int, float]:
        """One forward pass: the log-probability of each allowed next token."""
        from vllm import SamplingParams

        if len(allowed) <= self.max_listed_tokens:
            # allowed_token_ids is not needed for the scores, but it keeps even the token vLLM
            # samples (and ignores) inside the trie.
            params = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=allowed,
                                    logprob_token_ids=allowed, detokenize=False)
            [position] = (await self._generate(prompt, params)).logprobs
            return {t: position[t].logprob for t in allowed}
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True, detokenize=False)
        flat = (await self._generate(prompt, params)).logprobs
        row = dict(zip(flat.token_ids[flat.start_indices[0]:flat.end_indices[0]],
                       flat.logprobs[flat.start_indices[0]:flat.end_indices[0]]))
        return {t: row[t] for t in allowed}

    async def search(self, query: str, k: int, beams: int) -> list[Hit]:
        trie, end = self.trie, self.end
        prompt = self.prompts.retrieve(query)
        self._check_fits(prompt, trie.max_depth())
        k = min(k, len(trie))
        beams = max(beams, k)
        running: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        finished: list[tuple[float, tuple[int, ...]]] = []
        for _ in range(trie.max_depth()):
            steps = await asyncio.gather(*(self.next_logprobs(prompt + list(seq), trie.allowed_next(seq))
                                           for _, seq in running))
            candidates = heapq.nlargest(2 * beams, ((score + lp, seq + (t,)) for (score, seq), lps in zip(running, steps)
                                                    for t, lp in lps.items()), key=lambda c: c[0])
            running = []
            for rank, (score, seq) in enumerate(candidates):
                if seq[-1] == end:
                    if rank < beams:
                        finished.append((score, seq))
                elif len(running) < beams:
                    running.append((score, seq))
            finished = heapq.nlargest(beams, finished, key=lambda c: c[0])
            if len(finished) >= beams or not running:
                break
        hits = [Hit(trie.key_for(seq), score) for score, seq in finished]
        assert all(h.key is not None for h in hits), "a finished beam left the trie"
        return hits[:k]

    async def _greedy(self, prompt: list[int]) -> str:
        from vllm import SamplingParams

        n = self.settings.max_answer_tokens
        self._check_fits(prompt, n)
        params = SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=[self.end], detokenize=False)
        out = await self._generate(prompt, params)
        return self.prompts.decode_answer([t for t in out.token_ids if t != self.end])

    async def describe(self, key: str) -> str:
        return await self._greedy(self.prompts.describe(self.stored.id_tokens[key]))

    async def ask(self, key: str, question: str) -> str:
        return await self._greedy(self.prompts.ask(self.stored.id_tokens[key], question))
