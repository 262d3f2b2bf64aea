"""The transformers engine: genret's reference decoder behind the async Engine interface.

transformers' generate() blocks and the model is not meant to be driven from two threads,
so every call runs on one dedicated worker thread: requests queue there in arrival order
(that thread is the engine's one lock) and the event loop stays free for /healthz and the
id store. No batching across requests: machines with traffic run vLLM.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from genret.decoding import Answer, Hit, PriorWeights, TransformersEngine, search_prior
from genret.model_store import StoredModel
from genret.trie import IdPrior

from .engine import EngineError


class HFEngine:
    name = "transformers"

    def __init__(self, stored: StoredModel, device: str | None = None, max_answer_tokens: int | None = None):
        self.stored = stored
        self.device = device
        self.max_answer_tokens = max_answer_tokens
        self._engine: TransformersEngine | None = None
        self._prior: tuple[PriorWeights, IdPrior | None] = (PriorWeights(), None)  # the last weights', built on the worker
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genret-hf")
        self._pending = 0

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def _run(self, fn, *args, **kwargs):
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))
        finally:
            self._pending -= 1

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await self._run(TransformersEngine, self.stored, self.device)

    async def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._engine = None

    def failure(self) -> str | None:
        return None  # in-process: if it fails, the request fails, and the next one tries again

    @property
    def engine(self) -> TransformersEngine:
        if self._engine is None:
            raise EngineError("the transformers engine is not loaded")
        return self._engine

    def prior(self, weights: PriorWeights) -> IdPrior | None:
        if self._prior[0] != weights:
            self._prior = (weights, search_prior(self.stored, weights))
        return self._prior[1]

    async def search(self, query: str, k: int, beams: int, prior: PriorWeights = PriorWeights(),
                     within: frozenset[str] | None = None, exclude: frozenset[str] | None = None) -> list[Hit]:
        engine = self.engine
        [hits] = await self._run(lambda: engine.search([query], k=k, beams=max(beams, k), prior=self.prior(prior),
                                                       within=within, exclude=exclude))
        return hits

    async def describe(self, key: str) -> str:
        prompt = self.engine.prompts.describe(self.stored.id_tokens[key])
        [text] = await self._run(self.engine.generate, [prompt], max_new_tokens=self.max_answer_tokens)
        return text

    async def ask(self, key: str, question: str) -> Answer:
        [context] = await self._run(self.engine.ask_contexts, [key], max_new_tokens=self.max_answer_tokens)
        prompt = self.engine.prompts.ask(self.stored.id_tokens[key], question, context)
        [answer] = await self._run(self.engine.answers, [prompt], max_new_tokens=self.max_answer_tokens)
        return answer

