"""What the HTTP layer needs from a decoding engine, and the factory that picks one.

Two engines implement it: `engine_vllm.VLLMEngine` (production: batching across concurrent
requests) and `engine_hf.HFEngine` (plain transformers, for machines without vLLM). Both
decode only inside the model's id trie, so every key they return is in the catalog.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from genret.decoding import Answer, Hit, PriorWeights
from genret.model_store import StoredModel

from .settings import Settings

__all__ = ["Answer", "Engine", "EngineError", "Hit", "InputTooLong", "make_engine"]


class EngineError(RuntimeError):
    """The engine cannot answer (not loaded, or it died): the service answers 503."""


class InputTooLong(ValueError):
    """A prompt that does not fit the engine's context: the client's fault, so a 422."""


@runtime_checkable
class Engine(Protocol):
    name: str
    stored: StoredModel

    async def start(self) -> None:
        """Load the weights (slow; the app calls it in the background and reports readiness)."""

    async def close(self) -> None: ...

    async def search(self, query: str, k: int, beams: int, prior: PriorWeights = PriorWeights(),
                     within: frozenset[str] | None = None, exclude: frozenset[str] | None = None) -> list[Hit]:
        """At most k distinct catalog keys, best first, by trie-constrained beam search of width
        max(beams, k); a score is the id's summed token log-probability given the query plus its
        offset under `prior`, which the beam searches by (genret.decoding.search_prior: the engine
        builds it once per distinct weights, where it searches). A ValueError or ModelStoreError
        if the model cannot take those weights. `within` (keys the model holds): only those images,
        and `exclude`: all but those, each searched as over a trie of those images alone
        (genret.model_store.StoredModel.trie(within, exclude)); a ValueError if none is left."""

    async def describe(self, key: str) -> str: ...

    async def ask(self, key: str, question: str) -> Answer:
        """The greedy answer, and its first token's log P(Yes) - log P(No) (genret.decoding.Answer)."""

    def failure(self) -> str | None:
        """Why the loaded engine cannot serve any more (it died), or None."""

    @property
    def queue_depth(self) -> int:
        """Engine calls waiting or running now (exported as a Prometheus gauge)."""


def make_engine(settings: Settings, stored: StoredModel) -> Engine:
    if settings.resolved_engine() == "vllm":
        from .engine_vllm import VLLMEngine

        return VLLMEngine(stored, settings)
    from .engine_hf import HFEngine

    return HFEngine(stored, device=settings.device, max_answer_tokens=settings.max_answer_tokens)
