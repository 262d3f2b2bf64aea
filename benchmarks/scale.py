"""Scale benchmark: search latency, throughput and bytes per item as the catalog grows.

Generative retrieval (trie-constrained beam search over structured, RQ or atomic identifiers, with the
product's own reference engine `genret.decoding.TransformersEngine.search`) against dense search
over the same number of vectors (brute force with `genret.alignment.dense_rank`, FAISS exact
`IndexFlatIP`, FAISS `IndexHNSWFlat` and `IndexIVFPQ`), on the same machine, in one run.

    python benchmarks/scale.py                                  # 1K, 10K, 100K, 1M items
    python benchmarks/scale.py --sizes 1000 10000 --out /tmp/s  # any sizes
    python benchmarks/scale.py --quick                          # 1K and 2K, few queries (tests)

What is synthetic, and why that is enough for what is measured:
  * the catalog is N unit vectors in the 256-d aligned space (genret.alignment's `dim`), drawn
    from a mixture of 4,096 Gaussian clusters; the catalogs are nested (the first N rows of one
    seeded stream), so every size sees the same data;
  * identifiers are assigned to those vectors by the product's own schemes (`StructuredIds`,
    branching 32; `ResidualQuantizationIds`, 3 levels x 256 codes, collisions get one more
    code; `AtomicIds`, one new token per item), unchanged: their k-means fits on at most 256
    points per centroid and assigns every point to its nearest centroid, so "build s" is what a
    catalog of that size costs;
  * every generative search is timed again with a hubness prior (`genret.trie.IdPrior`, random
    offsets) inside the beam search;
  * the language model is a randomly initialised `LlamaForCausalLM` with SmolLM2-135M's shape
    cut to 2 layers (the `cpu` training setting), vocabulary = a few hundred text tokens + the
    identifier tokens. Its weights are random: latency is measured, not accuracy;
  * query prompts are random caption-like word sequences mapped to text tokens; dense query
    vectors are catalog vectors plus noise. Encoding the query text is excluded for every
    method (dense search needs MiniLM + the text head for it; generative search reads the
    prompt tokens itself, and that prefill is included in its latency). MiniLM's own time per
    query is measured once and reported beside the table for reference.

Every (size, method) result is written to <out>/sizes/<N>/<method>.json as soon as it is
measured, so the same command resumes after an interruption. At the end: <out>/results.json,
<out>/results.md and <out>/scale.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import tracemalloc
import weakref
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIM = 256  # genret.alignment.TwoTower's default aligned-space size
CENTERS = 4096  # clusters of the synthetic catalog
CLUSTER_SPREAD = 0.06  # per-dimension std of a catalog point around its (unit) cluster centre
QUERY_NOISE = 0.04  # per-dimension std of a dense query around its catalog point
CHUNK = 100_000  # rows generated per seeded chunk (keeps catalogs nested across sizes)
K = 10  # results per query, and beams (the product's default: beams = k)

# SmolLM2-135M-Instruct's shape (hidden, MLP, heads, kv heads, head dim, rope, tied embeddings)
LM_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=True)
END, BOS = 0, 1  # text-token ids of the end (eos) and bos tokens in the synthetic vocabulary
PROMPT_HEAD = [2, 3, 4, 5, 6]  # "Find the image:" stands in as 5 fixed tokens ...
PROMPT_TAIL = [7, 8, 9, 10]  # ... and "\nImage id:" as 4, around the query's words
WORDS = ("a an the dog dogs man woman girl boy child children people person two three black white brown red "
         "blue green yellow small large young running runs jumping jumps playing plays sitting standing walking "
         "on in at near with over through grass beach water snow street field park ball frisbee bike shirt "
         "jacket hat camera crowd building mountain river wave toy stick rope fence wall car").split()

METHODS = {  # slug -> label
    "gen-structured": "generative, structured ids (b=32)",
    "gen-rq": "generative, RQ ids (3x256)",
    "gen-atomic": "generative, atomic ids (one token per item)",
    "brute-force": "brute force (torch matmul + top-k)",
    "faiss-flat": "FAISS IndexFlatIP (exact)",
    "faiss-hnsw": "FAISS HNSW (M=32, efSearch=64)",
    "faiss-ivfpq": "FAISS IVF-PQ (sqrt(N) lists, 32 B codes, nprobe=16)",
}
SCHEMES = {"gen-structured": ("structured", {"branching": 32}), "gen-rq": ("rq", {"levels": 3, "codebook_size": 256}),
           "gen-atomic": ("atomic", {})}
# the hubness prior (genret.trie.IdPrior) is timed on every generative search with offsets drawn
# uniformly from [-PRIOR_SPREAD, 0]: its cost depends on the trie's shape, not on the values
PRIOR_SPREAD = 20.0
HNSW_M, HNSW_EF_SEARCH = 32, 64
# FAISS 1.15 computes exact (flat) distances with its own SIMD kernels unless the work passes
# `distance_compute_blas_threshold` (default 128,000), so a batch of 32 x 256-d queries still
# takes the SIMD path: one pass over the vectors per query. Measured here over 100K vectors, 1 thread:
# 1 query 6.5 ms SIMD vs 18 ms BLAS; 32 queries 203 ms SIMD vs 33 ms BLAS. Each search takes the
# faster path: SIMD (FAISS's default) below BLAS_MIN_QUERIES queries, BLAS from there on.
BLAS_MIN_QUERIES = 8
IVF_PQ_M, IVF_NPROBE = 32, 16

FULL = dict(sizes=[1_000, 10_000, 100_000, 1_000_000], queries=100, warmup=5, batch=32, batches=4, min_seconds=2.0,
            encoder=True)
QUICK = dict(sizes=[1_000, 2_000], queries=10, warmup=2, batch=8, batches=2, min_seconds=0.1, encoder=False)


# --------------------------------------------------------------------------- synthetic data


def catalog_vectors(n: int, seed: int = 0) -> np.ndarray:
    """(n, DIM) float32 unit vectors; the first rows of one stream, so catalogs nest across sizes."""
    centers = np.random.default_rng(seed).standard_normal((CENTERS, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, 1 + start // CHUNK])
        block = centers[rng.integers(0, CENTERS, CHUNK)[:rows]]
        block += CLUSTER_SPREAD * rng.standard_normal((CHUNK, DIM), dtype=np.float32)[:rows]
        out[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def catalog_keys(n: int) -> list[str]:
    return [f"img{i:07d}" for i in range(n)]


def query_vectors(x: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.integers(0, len(x), count)] + QUERY_NOISE * rng.standard_normal((count, x.shape[1]), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def query_texts(count: int, seed: int = 2) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 15)))) for _ in range(count)]


# --------------------------------------------------------------------------- generative search


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ writes to fd 2 (FAISS's "please provide at least N training points")."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class SyntheticPrompts:
    """The part of genret.prompts.Prompts that search uses, over the synthetic text vocabulary."""

    end = END

    def __init__(self, text_vocab: int):
        self.text_vocab = text_vocab

    def retrieve(self, query: str) -> list[int]:
        first = max(PROMPT_TAIL) + 1
        words = [first + zlib.crc32(w.encode()) % (self.text_vocab - first) for w in query.split()]
        return PROMPT_HEAD + words + PROMPT_TAIL


def make_engine(lm, trie, prompts):
    """The product's reference engine (genret.decoding.TransformersEngine) around a synthetic
    model: same search method, same trie-constrained HF beam search."""
    from genret.decoding import TransformersEngine

    class SyntheticEngine(TransformersEngine):
        def __init__(self):  # no model store: the LM, trie and prompts are given; text prompts only
            self.device, self.lm, self.trie, self.prompts = "cpu", lm, trie, prompts
            self.query_soft_prefix, self.cache_prompts = None, True
            self._mask_tensors = weakref.WeakKeyDictionary()

    return SyntheticEngine()


class InstrumentedTrie:
    """Wraps an IdTrie: times allowed_next and records every sequence the engine maps to a key."""

    def __init__(self, trie):
        self.trie, self.seconds, self.calls, self.returned = trie, 0.0, 0, []
        self.end_token = trie.end_token

    def allowed_next(self, prefix):
        started = time.perf_counter()
        out = self.trie.allowed_next(prefix)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return out

    def key_for(self, sequence):
        key = self.trie.key_for(sequence)
        self.returned.append((tuple(int(t) for t in sequence), key))
        return key

    def max_depth(self):
        return self.trie.max_depth()

    def __len__(self):
        return len(self.trie)


def random_lm(vocab_size: int, layers: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, bos_token_id=BOS, eos_token_id=END,
                         pad_token_id=END, **LM_SHAPE)
    return LlamaForCausalLM(config).eval()


def assign_ids(method: str, keys: list[str], x: np.ndarray):
    from genret import identifiers

    scheme, options = SCHEMES[method]
    return identifiers.make_scheme(scheme, **options).assign(keys, {}, x)


def tokenize_ids(assignment, text_vocab: int) -> dict[str, list[int]]:
    """Identifier text -> token ids, as the tokenizer does with the scheme's added tokens."""
    token_id = {t: text_vocab + i for i, t in enumerate(assignment.new_tokens)}
    split = re.compile(r"<[^>]+>").findall
    return {key: [token_id[t] for t in split(text)] for key, text in assignment.ids.items()}


def run_generative(method: str, n: int, x: np.ndarray, args, log) -> dict:
    import torch

    from genret.trie import IdTrie

    keys = catalog_keys(n)
    started = time.perf_counter()
    assignment = assign_ids(method, keys, x)
    assign_s = time.perf_counter() - started
    new_tokens = len(assignment.new_tokens)
    tracemalloc.start()
    sequences = tokenize_ids(assignment, args.text_vocab)
    id_map_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del assignment
    gc.collect()

    started = time.perf_counter()
    trie = IdTrie(sequences, end_token=END)
    trie_s = time.perf_counter() - started
    del trie
    gc.collect()
    tracemalloc.start()  # a second build, traced: the bytes the trie itself allocates
    trie = IdTrie(sequences, end_token=END)
    trie_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    log(f"  ids assigned in {assign_s:.1f}s ({new_tokens} new tokens), trie built in {trie_s:.1f}s, "
        f"{trie_bytes / n:.0f} B/item")

    lm = random_lm(args.text_vocab + new_tokens, args.layers)
    hidden = lm.config.hidden_size
    tied = bool(lm.config.tie_word_embeddings)
    id_rows_bytes = new_tokens * hidden * 4 * (1 if tied else 2)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    prompts = SyntheticPrompts(args.text_vocab)
    engine = make_engine(lm, trie, prompts)
    texts = query_texts(args.warmup + args.queries + args.batch * (args.batches + 1))
    singles = texts[: args.warmup + args.queries]
    batches = [texts[len(singles) + i * args.batch : len(singles) + (i + 1) * args.batch] for i in range(args.batches + 1)]

    timing = measure(lambda q: engine.search([q], k=K, beams=K), lambda qs: engine.search(qs, k=K, beams=K),
                     singles, batches, args.warmup, args.min_seconds)

    # Instrumented pass over the same queries: trie time per query, and every beam the engine
    # mapped back to a key must be a real catalog id with exactly that token sequence.
    probe = InstrumentedTrie(trie)
    checked_queries = singles[args.warmup :][: max(1, min(20, args.queries))]
    hits = []
    with torch.inference_mode():
        for q in checked_queries:
            hits += engine.search([q], k=K, beams=K, trie=probe)[0]
    single_probe = (probe.seconds, probe.calls)
    batch_hits = engine.search(batches[1] if len(batches) > 1 else batches[0], k=K, beams=K, trie=probe)
    hits += [h for row in batch_hits for h in row]
    prior = time_prior(engine, trie, keys, singles, batches, args)
    log(f"  with a prior: p50 {prior['p50_ms']:.2f} ms, {prior['qps']:.1f} q/s (built in {prior['build_s']:.2f}s)")
    catalog = set(keys)
    invalid = sum(1 for seq, key in probe.returned if key is None or key not in catalog or list(seq) != sequences[key])
    hits_outside = sum(1 for h in hits if h.key not in catalog)
    depths = np.array([len(s) for s in sequences.values()])

    result = {
        **timing,
        "build_s": assign_s + trie_s,
        "assign_ids_s": assign_s,
        "trie_build_s": trie_s,
        "bytes_per_item": (trie_bytes + id_rows_bytes) / n,
        "trie_bytes": trie_bytes,
        "id_token_rows_bytes": id_rows_bytes,
        "id_map_bytes": id_map_bytes,
        "model_bytes": model_bytes,
        "new_tokens": new_tokens,
        "vocab_size": args.text_vocab + new_tokens,
        "id_tokens_mean": float(depths.mean()),
        "id_tokens_max": int(depths.max()),
        "decode_steps_max": trie.max_depth(),
        "trie_ms_per_query": 1e3 * single_probe[0] / len(checked_queries),
        "trie_calls_per_query": single_probe[1] / len(checked_queries),
        "checked_queries": len(checked_queries) + len(batch_hits),
        "checked_beams": len(probe.returned),
        "beams_outside_catalog": invalid,
        "hits_checked": len(hits),
        "hits_outside_catalog": hits_outside,
        "hits_per_query_min": min(len(r) for r in batch_hits),
        "sample_hit": hits[0].key if hits else None,
        "prior": prior,
    }
    if invalid or hits_outside:
        log(f"  WARNING: {invalid} beams and {hits_outside} hits outside the catalog")
    del engine, lm, trie, sequences
    gc.collect()
    return result


def time_prior(engine, trie, keys: list[str], singles, batches, args) -> dict:
    """The same searches with a hubness prior (random offsets): what building it costs, the
    latency and throughput with it, and the bytes it holds (tracemalloc of its build)."""
    from genret.trie import IdPrior

    offsets = dict(zip(keys, (-PRIOR_SPREAD * np.random.default_rng(3).random(len(keys))).tolist()))
    gc.collect()
    tracemalloc.start()  # a first build, traced (which slows it): the bytes the prior holds,
    traced = IdPrior(trie, offsets)
    traced.step_offsets([])  # with the root's step offsets, which every search reads
    prior_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del traced
    gc.collect()
    started = time.perf_counter()
    prior = IdPrior(trie, offsets)
    build_s = time.perf_counter() - started
    timing = measure(lambda q: engine.search([q], k=K, beams=K, prior=prior),
                     lambda qs: engine.search(qs, k=K, beams=K, prior=prior),
                     singles, batches, args.warmup, args.min_seconds)
    return {**timing, "build_s": build_s, "bytes": prior_bytes}


# --------------------------------------------------------------------------- dense search


def run_dense(method: str, n: int, x: np.ndarray, args, log, exact_top: np.ndarray | None) -> dict:
    import faiss

    qv = query_vectors(x, args.warmup + args.queries + args.batch * (args.batches + 1))
    singles = [qv[i : i + 1] for i in range(args.warmup + args.queries)]
    rest = qv[len(singles) :]
    batches = [rest[i * args.batch : (i + 1) * args.batch] for i in range(args.batches + 1)]
    started = time.perf_counter()
    extra = {}
    if method == "brute-force":
        from genret.alignment import dense_rank  # the product's dense baseline (torch matmul + topk)

        index_bytes = x.nbytes  # dense_rank wraps x as a tensor without copying it

        def search(q):
            return dense_rank(q, x, k=K)[0]
    else:
        if method == "faiss-flat":
            index = faiss.IndexFlatIP(DIM)
            index.add(x)
        elif method == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.add(x)
            index.hnsw.efSearch = HNSW_EF_SEARCH
            extra = {"M": HNSW_M, "efConstruction": index.hnsw.efConstruction, "efSearch": HNSW_EF_SEARCH}
        elif method == "faiss-ivfpq":
            nlist = int(min(4096, max(8, round(math.sqrt(n)))))
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, nlist, IVF_PQ_M, 8, faiss.METRIC_INNER_PRODUCT)
            sample = x[np.random.default_rng(3).permutation(n)[: min(n, max(64 * nlist, 16_384))]]
            with quiet_stderr():  # FAISS warns (in C++) when a small catalog trains the 256-code PQ
                index.train(sample)
            index.add(x)
            index.nprobe = min(IVF_NPROBE, nlist)
            extra = {"nlist": nlist, "pq_bytes": IVF_PQ_M, "nprobe": index.nprobe, "train_points": len(sample)}
        else:
            raise ValueError(method)
        index_bytes = len(faiss.serialize_index(index))
        simd_threshold = faiss.cvar.distance_compute_blas_threshold

        def search(q):
            faiss.cvar.distance_compute_blas_threshold = 1 if len(q) >= BLAS_MIN_QUERIES else simd_threshold
            try:
                return index.search(q, K)[1]
            finally:
                faiss.cvar.distance_compute_blas_threshold = simd_threshold
    build_s = time.perf_counter() - started
    log(f"  built in {build_s:.1f}s, {index_bytes / n:.0f} B/item")

    timing = measure(search, search, singles, batches, args.warmup, args.min_seconds)
    measured = np.concatenate([search(q) for q in singles[args.warmup :]])
    out = {**timing, "build_s": build_s, "bytes_per_item": index_bytes / n, "index_bytes": index_bytes, **extra}
    if exact_top is not None:
        out["recall@10_vs_exact"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(measured, exact_top)]))
    out["top"] = measured.tolist()
    return out


# --------------------------------------------------------------------------- timing


def measure(search_one, search_batch, singles, batches, warmup: int, min_seconds: float = 1.0) -> dict:
    """Batch-1 latency over the single queries after `warmup` of them, and throughput over the
    batches after the first (a warm-up batch), cycled until at least `min_seconds` have passed
    (dense searches take microseconds per batch)."""
    import torch

    with torch.inference_mode():
        latencies, cpu = [], []
        for i, q in enumerate(singles):
            started, cpu_started = time.perf_counter(), time.thread_time()
            search_one(q)
            if i >= warmup:
                latencies.append(time.perf_counter() - started)
                cpu.append(time.thread_time() - cpu_started)
        search_batch(batches[0])
        started = time.perf_counter()
        count = rounds = 0
        while rounds == 0 or time.perf_counter() - started < min_seconds:
            for b in batches[1:]:
                search_batch(b)
                count += len(b)
            rounds += 1
        seconds = time.perf_counter() - started
    ms, cpu_ms = 1e3 * np.array(latencies), 1e3 * np.array(cpu)
    # CPU time of this (only working) thread: what the search costs, net of time spent descheduled
    # while other jobs held the cores; with --threads 1 every method runs on this thread.
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "queries": len(ms), "qps": count / seconds, "batch": len(batches[0]),
            "batch_queries": count, "load_avg": os.getloadavg()[0]}


def query_encoder_ms(texts: list[str], warmup: int) -> dict:
    """MiniLM time per query (batch 1): what dense search adds before its index lookup."""
    try:
        from genret.encoders import TextEncoder

        encoder = TextEncoder(device="cpu")
        ms = []
        for i, t in enumerate(texts):
            started = time.perf_counter()
            encoder.encode([t])
            if i >= warmup:
                ms.append(1e3 * (time.perf_counter() - started))
        return {"p50_ms": float(np.median(ms)), "queries": len(ms)}
    except Exception as e:  # the weights package may be missing; the benchmark does not need it
        return {"error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- report


def fmt_n(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("K", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def tables(results: dict, sizes: list[int]) -> list[str]:
    lo, hi = fmt_n(min(sizes)), fmt_n(max(sizes))
    head = "| method | " + " | ".join(f"p50 ms @{fmt_n(n)}" for n in sizes) + \
        f" | p50({hi})/p50({lo}) | same, CPU time | queries/s @{hi}, batch | bytes/item @{hi} | build s @{hi} |"
    lines = ["## Summary", "", head, "|---" * (len(sizes) + 6) + "|"]
    for slug, label in METHODS.items():
        rows = results.get(slug, {})
        cells = [fmt(rows[str(n)]["p50_ms"]) if str(n) in rows else "" for n in sizes]
        both = str(max(sizes)) in rows and str(min(sizes)) in rows
        ratio = rows[str(max(sizes))]["p50_ms"] / rows[str(min(sizes))]["p50_ms"] if both else None
        cpu_ratio = rows[str(max(sizes))]["cpu_p50_ms"] / rows[str(min(sizes))]["cpu_p50_ms"] if both else None
        top = rows.get(str(max(sizes)), {})
        throughput = f"{fmt(top['qps'])} @{top['batch']}" if top else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'' if cpu_ratio is None else f'{cpu_ratio:.2f}x'} | "
                     f"{throughput} | "
                     f"{fmt(top.get('bytes_per_item'))} | {fmt(top.get('build_s'))} |")
    lines += ["", "## Every size", "",
              "| method | N | build s | p50 ms | p95 ms | CPU p50 ms | queries/s @batch | bytes/item | load | details |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for slug, label in METHODS.items():
        for n in sizes:
            r = results.get(slug, {}).get(str(n))
            if r is None:
                continue
            if slug.startswith("gen-"):
                details = (f"{r['id_tokens_mean']:.2f} id tokens (max {r['id_tokens_max']}), "
                           f"{r['decode_steps_max']} steps; trie {fmt(r['trie_ms_per_query'])} ms/query; "
                           f"trie {fmt(r['trie_bytes'] / n)} + id rows {fmt(r['id_token_rows_bytes'] / n)} B/item; "
                           f"{r['beams_outside_catalog']}/{r['checked_beams']} beams outside catalog")
            else:
                details = "" if "recall@10_vs_exact" not in r else f"recall@10 vs exact {r['recall@10_vs_exact']:.3f}"
            lines.append(f"| {label} | {fmt_n(n)} | {fmt(r['build_s'])} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                         f"{fmt(r['cpu_p50_ms'])} | {fmt(r['qps'])} @{r['batch']} | {fmt(r['bytes_per_item'])} | "
                         f"{r['load_avg']:.1f} | {details} |")
    lines += ["", "## The hubness prior's cost", "",
              "The same searches with an `IdPrior` (random offsets) added inside the beam search.", "",
              "| method | N | p50 ms, plain | p50 ms, with prior | CPU p50 ms, plain / with | queries/s @batch, plain | "
              "with prior | prior build s | prior bytes/item |", "|---|---|---|---|---|---|---|---|---|"]
    for slug, label in METHODS.items():
        for n in sizes:
            r = results.get(slug, {}).get(str(n))
            if r is None or "prior" not in r:
                continue
            pr = r["prior"]
            lines.append(f"| {label} | {fmt_n(n)} | {fmt(r['p50_ms'])} | {fmt(pr['p50_ms'])} | "
                         f"{fmt(r['cpu_p50_ms'])} / {fmt(pr['cpu_p50_ms'])} | {fmt(r['qps'])} @{r['batch']} | "
                         f"{fmt(pr['qps'])} | {fmt(pr['build_s'])} | {fmt(pr['bytes'] / n)} |")
    return lines


def write_report(out: Path, results: dict, meta: dict) -> None:
    sizes = meta["sizes"]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    enc = meta.get("query_encoder") or {}
    lines = [f"# Scale benchmark: generative vs dense search, {fmt_n(min(sizes))} to {fmt_n(max(sizes))} items", "",
             f"Machine: {meta['machine']}; torch threads {meta['threads']}, FAISS threads {meta['threads']}. "
             f"k = beams = {K}; latency = batch-1 p50/p95 over {meta['queries']} queries after {meta['warmup']} "
             f"warm-up; throughput: {meta['batches']} batches of {meta['batch']} queries, repeated for at least "
             f"{meta['min_seconds']} s. Vectors: {DIM}-d float32. "
             f"LM: random-weight Llama, SmolLM2-135M shape, {meta['layers']} layers, {meta['text_vocab']} text "
             f"tokens + id tokens. Identifiers: the product's schemes, k-means included.",
             "", "Query text encoding is excluded for every method"
             + (f" (MiniLM alone: {enc['p50_ms']:.1f} ms p50 per query here, needed by dense search only)."
                if "p50_ms" in enc else "."),
             "p50/p95: wall clock. CPU p50: CPU time of the searching thread (every method runs on one thread), "
             "which leaves out time spent descheduled while other jobs held the cores. load: the 1-minute load "
             "average when the method was measured.", ""]
    lines += tables(results, sizes)
    lines += ["", "Bytes/item: generative = id trie (tracemalloc of its build; key strings excluded, as dense "
              "search needs a row->key map too) + the id tokens' embedding rows (tied head) / N; the LM's own "
              "weights are a fixed cost, not counted (see results.json `model_bytes`). Dense = the index "
              "(brute force: the N x d float32 matrix; FAISS: `serialize_index` size) / N.",
              "", f"Reproduce: `{meta['command']}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "scale.png", results, meta)


def plot(path: Path, results: dict, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = (("p50_ms", "batch-1 p50 latency (ms)"), ("qps", f"throughput at batch {meta['batch']} (queries/s)"),
              ("bytes_per_item", "bytes per catalog item"))
    for ax, (field, title) in zip(axes, panels):
        for slug, label in METHODS.items():
            rows = results.get(slug, {})
            ns = sorted(int(n) for n in rows)
            if ns:
                style = "-o" if slug.startswith("gen-") else "--s"
                ax.plot(ns, [rows[str(n)][field] for n in ns], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalog items N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"genret scale benchmark ({meta['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{name}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no GPU used"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="sizes 1000 2000 and few queries (for tests)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--queries", type=int, help="batch-1 queries timed per method and size (default 100)")
    parser.add_argument("--batch", type=int, help="batch size for throughput (default 32)")
    parser.add_argument("--batches", type=int, help="timed batches for throughput (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the random LM (default 2)")
    parser.add_argument("--text-vocab", type=int, default=512, help="text tokens besides the id tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads for every method (default 1: on a small machine shared "
                             "with other jobs, OpenMP threads on contended cores make timings erratic)")
    parser.add_argument("--no-encoder", action="store_true", help="skip timing MiniLM query encoding")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.sizes = sorted(set(args.sizes or preset["sizes"]))
    for name in ("queries", "batch", "batches"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.warmup, args.min_seconds = preset["warmup"], preset["min_seconds"]
    out = args.out or REPO / "benchmarks" / "results" / ("scale-quick" if args.quick else "scale-cpu")
    out.mkdir(parents=True, exist_ok=True)

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    meta = {"sizes": args.sizes, "queries": args.queries, "warmup": args.warmup, "batch": args.batch,
            "batches": args.batches, "layers": args.layers, "text_vocab": args.text_vocab,
            "threads": args.threads, "min_seconds": args.min_seconds,
            "faiss_blas_from_queries": BLAS_MIN_QUERIES, "machine": machine(), "k": K, "dim": DIM,
            "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__},
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    encoder_path = out / "query_encoder.json"
    if not encoder_path.exists() and preset["encoder"] and not args.no_encoder:
        encoder_path.write_text(json.dumps(query_encoder_ms(query_texts(args.warmup + args.queries), args.warmup)))
    if encoder_path.exists():
        meta["query_encoder"] = json.loads(encoder_path.read_text())

    results: dict[str, dict[str, dict]] = {}
    for n in args.sizes:
        size_dir = out / "sizes" / str(n)
        size_dir.mkdir(parents=True, exist_ok=True)
        x = None
        exact_top = None
        for slug in args.methods:
            path = size_dir / f"{slug}.json"
            if not path.exists():
                if x is None:
                    x = catalog_vectors(n)
                log(f"[{fmt_n(n)}] {METHODS[slug]}")
                if slug.startswith("gen-"):
                    r = run_generative(slug, n, x, args, log)
                else:
                    if exact_top is None and slug != "brute-force":
                        bf = size_dir / "brute-force.json"
                        exact_top = np.array(json.loads(bf.read_text())["top"]) if bf.exists() else None
                    r = run_dense(slug, n, x, args, log, exact_top)
                    if slug == "brute-force":
                        exact_top = np.array(r["top"])
                r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                path.write_text(json.dumps(r))
                log(f"  p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, {r['qps']:.1f} q/s @{r['batch']}, "
                    f"{r['bytes_per_item']:.0f} B/item")
            r = json.loads(path.read_text())
            r.pop("top", None)
            results.setdefault(slug, {})[str(n)] = r
            gc.collect()
        del x
        gc.collect()
        write_report(out, results, meta)
    write_report(out, results, meta)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
