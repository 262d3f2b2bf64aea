"""Search time of a trained Flickr8k model, prompts cached once per query against recomputed per beam.

    python benchmarks/search_time.py benchmarks/results/flickr8k-cpu/runs/<run>/model --setting cpu

The test captions of the benchmark's protocol are the queries, searched over the test images
at the setting's beam and at its wide beam, in the batches the benchmark uses on a CPU; both
engines must return the same ranked keys. Writes <model>/../search_time.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import flickr8k_protocol  # the Flickr8k benchmark's protocol and settings, beside this file

WIDE_BATCH, BATCH = 4, 16  # queries per call, as the benchmark searches on a CPU


def timed_search(engine, queries, trie, beams: int, per_call: int) -> tuple[float, list]:
    engine.search(queries[:per_call], k=10, beams=beams, trie=trie)  # warm-up
    started, rows = time.perf_counter(), []
    for i in range(0, len(queries), per_call):
        rows += engine.search(queries[i : i + per_call], k=10, beams=beams, trie=trie)
    return time.perf_counter() - started, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--setting", choices=sorted(flickr8k_protocol.SETTINGS), default="cpu")
    parser.add_argument("--data", type=Path, default=flickr8k_protocol.DEFAULT_DATA)
    args = parser.parse_args()
    sys.path.insert(0, str(flickr8k_protocol.REPO))
    import torch

    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel

    setting = flickr8k_protocol.SETTINGS[args.setting]
    protocol = flickr8k_protocol.build_catalog(args.data, setting)
    queries = [q for q, _ in protocol.queries]
    stored = StoredModel.open(args.model)
    engines = {"recomputed per beam": TransformersEngine(stored, device="cpu", cache_prompts=False),
               "cached once per query": TransformersEngine(stored, device="cpu")}
    trie = stored.trie(protocol.test_keys)
    report = {"model": str(args.model), "queries": len(queries), "torch_threads": torch.get_num_threads(), "rows": []}
    for beams, per_call in ((setting["beams"], BATCH), (setting["wide_beams"], WIDE_BATCH)):
        seconds, hits = {}, {}
        for name, engine in engines.items():
            seconds[name], hits[name] = timed_search(engine, queries, trie, beams, per_call)
        recomputed, cached = hits.values()
        row = {"beams": beams, "queries_per_call": per_call,
               **{f"ms per query, {name}": round(1000 * s / len(queries), 1) for name, s in seconds.items()},
               "speed-up": round(seconds["recomputed per beam"] / seconds["cached once per query"], 2),
               "queries with the same ranked keys": sum([h.key for h in a] == [h.key for h in b]
                                                        for a, b in zip(recomputed, cached)),
               "max score difference": max(abs(h.score - g.score) for a, b in zip(recomputed, cached)
                                           for h, g in zip(a, b))}
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
    (args.model.parent / "search_time.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
