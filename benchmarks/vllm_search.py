"""The service's vLLM engine over a growing catalog of atomic ids: search latency and throughput.

    python benchmarks/vllm_search.py                                          # 1K, 10K, 100K ids
    python benchmarks/vllm_search.py --sizes 300 --queries 4 --out /tmp/v     # quick (the test's)

What is real and what is synthetic:
  * the engine is the service's (`service.engine_vllm.VLLMEngine`), in vLLM, as `genret serve` runs it;
  * the model is a trained tiny one (TrainConfig's defaults, atomic ids with the query prefix, at
    the tests' size on 8 demo images; trained here once in about 2 minutes on a CPU, or given with
    --base) grown to N atomic ids: each new key is a new token whose LM row is one of the trained
    id rows plus noise, with a hubness drawn from the trained ones. Only the 8 trained ids mean
    anything: latency is measured, not accuracy;
  * the queries are the demo catalog's captions;
  * the transformers engine (`genret.decoding.TransformersEngine`), the reference both engines
    must agree with, searches the same queries: the report counts those with the same ranked keys.

For each size: the engine's start time; sequential latency (p50, p95) at beam 10 and k 10,
without and with a hubness prior, within `--within` of the ids (POST /search's `within`:
each step's request names the tokens allowed), and the next page: each query's first page of hits
left out, with `--exclude` more ids (POST /search's `exclude`: a step whose prefix leads to them
names the tokens forbidden); throughput with `--in-flight` searches at once;
and how many vLLM requests one search sends. Each size is written to <out>/sizes/<N>.json when it finishes,
so the same command resumes; then <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

K = BEAMS = 10  # the service's defaults
PRIOR_WEIGHT = 2.0
ROW_NOISE = 0.5  # a new id's row: a trained id row plus this x the rows' per-dimension spread, in noise


def train_base(dest: Path) -> Path:
    """TrainConfig's defaults at the tests' size, on the 8 test images of the demo catalog."""
    from genret.catalog import load_catalog
    from genret.demo_catalog import write_demo_catalog
    from genret.training import TrainConfig, Trainer
    from tests.conftest import TINY_IMAGES, TINY_SIZE

    if not (dest / "model" / "manifest.json").exists():
        images, captions = write_demo_catalog(dest / "demo")
        catalog = load_catalog(images, captions).subset(TINY_IMAGES)
        Trainer(catalog, TrainConfig(**TINY_SIZE), dest / "run", progress=False).train(dest / "model")
    return dest / "model"


def grow(base: Path, n: int, dest: Path, seed: int = 0) -> Path:
    """The base model with n atomic ids in all (see the module docstring), written to dest."""
    import torch

    from genret.model_store import MANIFEST, StoredModel, write_json

    if (dest / MANIFEST).exists():
        return dest
    stored = StoredModel.open(base)
    if stored.manifest["scheme"] != "atomic":
        raise SystemExit(f"{base}: the base model must have atomic ids, not {stored.manifest['scheme']}")
    keys = list(stored.catalog.keys())
    if n < len(keys):
        raise SystemExit(f"--sizes: {n} is fewer than the base model's {len(keys)} ids")
    rng = np.random.default_rng(seed)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=shutil.ignore_patterns("lm"))
    tokenizer, lm = stored.load_tokenizer(), stored.load_lm()
    new_keys = [f"synthetic{i:07d}.jpg" for i in range(n - len(keys))]
    new_tokens = [f"<img_{i}>" for i in range(len(keys), n)]
    tokenizer.add_tokens(new_tokens)
    table = lm.get_input_embeddings().weight.data
    trained = table[[stored.id_tokens[k][0] for k in keys]]
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lm.config.vocab_size = len(tokenizer)
    picks = torch.as_tensor(rng.integers(0, len(keys), len(new_keys)))
    noise = torch.as_tensor(rng.standard_normal((len(new_keys), table.shape[1]), dtype=np.float32))
    lm.get_input_embeddings().weight.data[-len(new_keys):] = trained[picks] + ROW_NOISE * trained.std(0) * noise
    lm.save_pretrained(staging / "lm")
    tokenizer.save_pretrained(staging / "lm")
    token_ids = tokenizer.convert_tokens_to_ids(new_tokens)

    records = json.loads((base / "catalog.json").read_text())
    records += [{"key": k, "path": k, "captions": []} for k in new_keys]
    write_json(staging / "catalog.json", records)
    ids = json.loads((base / "identifiers.json").read_text())
    ids["ids"].update(zip(new_keys, new_tokens))
    ids["new_tokens"] += new_tokens
    ids["tokens"].update({k: [t] for k, t in zip(new_keys, token_ids)})
    write_json(staging / "identifiers.json", ids)
    order = np.argsort(np.array(keys + new_keys, dtype=object), kind="stable")  # the tables' rows are in key order
    hubness = stored.image_hubness()
    np.save(staging / "image_hubness.npy", np.concatenate([hubness, rng.choice(hubness, len(new_keys))])[order])
    embeddings = stored.image_embeddings()
    extra = rng.standard_normal((len(new_keys), embeddings.shape[1])).astype(embeddings.dtype)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    np.save(staging / "image_embeddings.npy", np.concatenate([embeddings, extra])[order])
    manifest = {**stored.manifest, "name": f"{stored.manifest['name']}-grown-{n}", "catalog_size": n}
    write_json(staging / MANIFEST, manifest)
    staging.rename(dest)
    return dest


def demo_queries(count: int) -> list[str]:
    from genret.demo_catalog import DEMO_CAPTIONS

    captions = [c for caps in DEMO_CAPTIONS.values() for c in caps]
    return [captions[i % len(captions)] for i in range(count)]


def within_keys(stored, size: int, seed: int = 1) -> frozenset[str]:
    """The ids a search `within` is restricted to (or leaves out): `size` of the catalog's, drawn with a fixed seed."""
    keys = stored.keys
    return frozenset(keys[i] for i in np.random.default_rng(seed).choice(len(keys), min(size, len(keys)), replace=False))


def next_pages(first_pages: list, hidden: frozenset[str]) -> list[frozenset[str]]:
    """What each query's next page leaves out: its first page of hits, and the `hidden` ids."""
    return [frozenset(h.key for h in page) | hidden for page in first_pages]


def percentiles(seconds: list[float]) -> dict:
    ms = 1e3 * np.array(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "queries": len(ms)}


async def measure_vllm(stored, queries: list[str], within: frozenset[str], hidden: frozenset[str], args, log) -> dict:
    from genret.decoding import PriorWeights
    from service.engine_vllm import VLLMEngine
    from service.settings import Settings

    warmup, in_flight = args.warmup, args.in_flight
    started = time.perf_counter()  # the engine's start: its tokenizer and trie, then vLLM's
    engine = VLLMEngine(stored, Settings(gpu_memory_utilization=args.memory_fraction, max_num_seqs=args.max_num_seqs,
                                         max_model_len=512, max_k=K, beams=BEAMS, rerank_beams=BEAMS))
    tokenizer_and_trie_s = time.perf_counter() - started
    await engine.start()
    result = {"engine_start_s": time.perf_counter() - started, "tokenizer_and_trie_s": tokenizer_and_trie_s}
    log(f"  engine start {result['engine_start_s']:.0f} s, of which its tokenizer and trie {tokenizer_and_trie_s:.1f} s")
    requests = [0]
    generate = engine._generate

    async def counted(*args, **kwargs):  # how many vLLM requests a search sends
        requests[0] += 1
        return await generate(*args, **kwargs)

    engine._generate = counted
    try:
        hits = {}
        for name, weight, keys in (("plain", 0.0, None), ("prior", PRIOR_WEIGHT, None), ("within", 0.0, within)):
            for q in queries[:warmup]:
                await engine.search(q, K, BEAMS, prior=PriorWeights(hubness=weight), within=keys)
            seconds, requests[0], hits[name] = [], 0, []
            for q in queries[warmup:]:
                t = time.perf_counter()
                hits[name].append(await engine.search(q, K, BEAMS, prior=PriorWeights(hubness=weight), within=keys))
                seconds.append(time.perf_counter() - t)
            result[name] = {**percentiles(seconds), "requests_per_search": requests[0] / len(seconds)}
            if keys is not None:
                result[name]["ids"] = len(keys)
            log(f"  {name}: p50 {result[name]['p50_ms']:.0f} ms, {result[name]['requests_per_search']:.0f} requests a search")
        for q in queries[:warmup]:
            await engine.search(q, K, BEAMS, exclude=hidden)
        seconds, requests[0], hits["next page"] = [], 0, []
        left_out = next_pages(hits["plain"], hidden)
        for q, exclude in zip(queries[warmup:], left_out):
            t = time.perf_counter()
            hits["next page"].append(await engine.search(q, K, BEAMS, exclude=exclude))
            seconds.append(time.perf_counter() - t)
        result["next page"] = {**percentiles(seconds), "requests_per_search": requests[0] / len(seconds),
                               "ids_hidden": len(hidden),
                               "ids_left_out": round(float(np.mean([len(x) for x in left_out])))}
        log(f"  next page: p50 {result['next page']['p50_ms']:.0f} ms, "
            f"leaving out {result['next page']['ids_left_out']:,} ids")
        batch = (queries[warmup:] * in_flight)[:in_flight]
        t = time.perf_counter()
        await asyncio.gather(*(engine.search(q, K, BEAMS) for q in batch))
        result["in_flight"] = {"searches": in_flight, "queries_per_s": in_flight / (time.perf_counter() - t)}
        log(f"  {in_flight} in flight: {result['in_flight']['queries_per_s']:.2f} queries/s")
    finally:
        await engine.close()
    return result, hits


def reference_hits(stored, queries: list[str], within: frozenset[str], hidden: frozenset[str]) -> dict[str, list]:
    """The transformers engine's hits for the queries, without ("plain") and with ("prior") the
    hubness prior, within the same ids, and their next pages (each query's own first page and
    `hidden` left out, so one search each): one engine (one copy of the LM) for all."""
    from genret.decoding import PriorWeights, TransformersEngine, search_prior

    engine = TransformersEngine(stored, device="cpu")
    searches = {"plain": {}, "prior": {"prior": search_prior(stored, PriorWeights(hubness=PRIOR_WEIGHT), engine.trie)},
                "within": {"within": within}}
    reference = {name: [hits for i in range(0, len(queries), 8)
                        for hits in engine.search(queries[i:i + 8], k=K, beams=BEAMS, **how)]
                 for name, how in searches.items()}
    reference["next page"] = [engine.search([q], k=K, beams=BEAMS, exclude=exclude)[0]
                              for q, exclude in zip(queries, next_pages(reference["plain"], hidden))]
    return reference


def agreement(vllm_hits, reference) -> dict:
    return {"same_ranked_keys": sum([h.key for h in a] == [h.key for h in b] for a, b in zip(vllm_hits, reference)),
            "same_top1": sum(a[0].key == b[0].key for a, b in zip(vllm_hits, reference)),
            "max_score_difference": max(abs(x.score - y.score) for a, b in zip(vllm_hits, reference)
                                        for x, y in zip(a, b)),
            "queries": len(reference)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results: dict, meta: dict) -> str:
    lines = [f"vLLM engine search over atomic ids ({meta['machine']}; commit {meta['commit']}; beam {BEAMS}, k {K})", "",
             "| ids | engine start s (its tokenizer and trie) | requests a search | p50 ms | p95 ms | p50 ms, prior | "
             "p50 ms within some (how many) | p50 ms next page (ids left out) | queries/s (searches in flight) | "
             "same ranked keys as transformers (plain; prior; within; next page) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        own = f" ({r['tokenizer_and_trie_s']:.1f})" if "tokenizer_and_trie_s" in r else ""  # older runs lack it
        within = f"{r['within']['p50_ms']:.0f} ({r['within']['ids']:,})" if "within" in r else ""
        page = f"{r['next page']['p50_ms']:.0f} ({r['next page']['ids_left_out']:,})" if "next page" in r else ""
        same = "; ".join(f"{a['same_ranked_keys']}/{a['queries']}" for a in r["agreement"].values())
        lines.append(f"| {int(n):,} | {r['engine_start_s']:.0f}{own} | {r['plain']['requests_per_search']:.0f} | "
                     f"{r['plain']['p50_ms']:.0f} | {r['plain']['p95_ms']:.0f} | {r['prior']['p50_ms']:.0f} | "
                     f"{within} | {page} | {r['in_flight']['queries_per_s']:.2f} ({r['in_flight']['searches']}) | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm-search")
    parser.add_argument("--base", type=Path, help="a trained model with atomic ids to grow (default: train one)")
    parser.add_argument("--queries", type=int, default=20, help="sequential searches timed per size (default 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=16, help="searches at once for throughput (default 16)")
    parser.add_argument("--within", type=int, default=1_000,
                        help="how many ids the searches `within` some are restricted to (default 1000, at most all)")
    parser.add_argument("--exclude", type=int, default=1_000,
                        help="how many ids each next page leaves out beside its first page's (default 1000: a "
                             "user's hidden images; at most half the catalog; 0: the first page alone)")
    parser.add_argument("--memory-fraction", type=float, default=0.2,
                        help="GENRET_GPU_MEMORY_UTILIZATION: on a CPU the share of RAM vLLM takes (default 0.2; "
                             "a million ids need about 0.5)")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="GENRET_MAX_NUM_SEQS (default 256; vLLM's warm-up holds that many rows of logits, "
                             "4 MB each at a million ids)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.queries < 1 or args.within < 1 or args.exclude < 0:
        parser.error("sizes, --queries and --within must be positive, --exclude at least 0")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    import vllm

    from genret.model_store import StoredModel

    def log(msg: str) -> None:
        print(msg, flush=True)

    base = args.base or train_base(args.out / "base")
    queries = demo_queries(args.warmup + args.queries)
    meta = {"sizes": args.sizes, "queries": args.queries, "warmup": args.warmup, "in_flight": args.in_flight,
            "within": args.within, "exclude": args.exclude,
            "memory_fraction": args.memory_fraction, "max_num_seqs": args.max_num_seqs,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
            "commit": git_commit(), "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
            "command": "python benchmarks/vllm_search.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    results = {}
    for n in sorted(set(args.sizes)):
        path = args.out / "sizes" / f"{n}.json"
        if not path.exists():
            log(f"[{n:,} ids]")
            started = time.perf_counter()
            stored = StoredModel.open(grow(base, n, args.out / "models" / str(n)))
            grow_s = time.perf_counter() - started
            within = within_keys(stored, args.within)
            # At most half the catalog hidden, so a small catalog still has a next page to find.
            hidden = within_keys(stored, min(args.exclude, n // 2), seed=2) if args.exclude else frozenset()
            r, hits = asyncio.run(measure_vllm(stored, queries, within, hidden, args, log))
            reference = reference_hits(stored, queries[args.warmup:], within, hidden)
            r["agreement"] = {name: agreement(hits[name], reference[name]) for name in reference}
            r["grow_s"] = grow_s
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(r, indent=1))
        results[str(n)] = json.loads(path.read_text())
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "results.md").write_text(report(results, meta))
    print(report(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
