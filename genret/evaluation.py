"""Recall@K of held-out text queries: the number that decides whether an approach works."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .decoding import Hit, TransformersEngine
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
    reranker: Callable[[list[str], list[list[Hit]]], list[list[Hit]]] | None = None,
    progress: bool = True,
) -> dict:
    """R@K of (query text, relevant image key) pairs, searching `candidates` (default: all ids)."""
    trie = engine.trie if candidates is None else engine.stored.trie(candidates)
    plain, reranked = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(queries), batch_size), desc="queries", disable=not progress):
        texts = [q for q, _ in queries[start : start + batch_size]]
        hits = engine.search(texts, k=max(k, beams), beams=beams, trie=trie)
        plain += [[h.key for h in row] for row in hits]
        if reranker is not None:
            reranked += [[h.key for h in row] for row in reranker(texts, hits)]
    seconds = time.perf_counter() - started
    targets = [t for _, t in queries]
    result = {"queries": len(queries), "candidates": len(trie), "beams": beams,
              "seconds_per_query": seconds / max(1, len(queries)), **recall(plain, targets)}
    if reranker is not None:
        result["reranked"] = recall(reranked, targets)
    return result


def check_candidates(trie: IdTrie, queries: Sequence[tuple[str, str]]) -> None:
    missing = sorted({t for _, t in queries if t not in trie})
    if missing:
        raise ValueError(f"{len(missing)} query targets are not in the catalog, e.g. {missing[:3]}")
