"""The benchmark that decides: generative retrieval vs a dense two-tower on Flickr8k.

Protocol (GRACE's): every catalog image is memorized (image -> id); retrieval is trained on
the train split's captions only; the test split's captions are the queries, and test images
are never trained on with their captions. Recall@1/5/10 is reported over the test images and
over the whole catalog, for each identifier scheme and for the dense baseline built from the
same encoders (EfficientNet image features, MiniLM text features, contrastive heads trained
on the same train captions) on the same machine. The dev split's images are memorized and
uncaptioned like the test ones; their captions are the held-out queries on which the
re-ranking weight is chosen, so the test queries are used only to report.

    python benchmarks/flickr8k.py --setting cpu            # reduced: minutes per scheme on a CPU
    python benchmarks/flickr8k.py --setting gpu            # the full protocol (8,091 images)
    python benchmarks/flickr8k.py --setting gpu-short      # the same data and model, one short GPU call

A GPU machine without the images: run `--image-features-only` where the images are and carry
<out>/shared/prepared/image_features.npy; nothing else reads pixels (the catalog reader still
wants a file under each image's name there: empty ones do).

Every step writes its result and every training run checkpoints each epoch, so the same
command resumes after an interruption (a GPU call cut at its time limit, say). Results:
<out>/results.json, <out>/results.md and <out>/recall.png.

This file trains and measures; what a run's name means, the settings, the catalog and the
weight choices are in flickr8k_protocol.py, and the tables in flickr8k_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its protocol and report beside it, run or loaded
from flickr8k_protocol import (  # noqa: E402
    BEAM_HUBNESS_WEIGHTS, CAPTIONED_PRIOR_FROM, DEFAULT_DATA, DEFAULT_RUNS, DENSE_HUBNESS, PRIOR_SCOPES, REPO,
    RERANK_GRID, SCHEMES, SETTINGS, WIDE_PRIOR_OF, Protocol, at_dev_weight, best_beam_hubness_weight,
    build_catalog, protocol_of, run_config)
from flickr8k_report import over_seeds, write_report  # noqa: E402

from genret.model_store import write_json  # noqa: E402  (atomic: a GPU call's time limit never leaves half a result)

def dense_baseline(trainer, protocol: Protocol, keys) -> dict:
    """The two-tower's own ranking; the same corrected for hubness (similarity - beta x each image's
    hubness, beta chosen on the dev queries searched over the same scope); and, as "dense on rq
    codes (quantized)", the plain ranking against each image's RQ reconstruction (its id's
    codebook entries summed): what scoring the rq runs' ids exactly by the query's embedding
    gives, i.e. what the ids' quantization alone costs (a generative model also learns from
    pseudo-queries, so it can do better over the catalog)."""
    import torch

    from genret.alignment import dense_rank, hubness
    from genret.evaluation import best_by_recall, recall
    from genret.identifiers import make_scheme

    tower = trainer.align().cpu().eval()
    with torch.inference_mode():
        image_emb = tower.embed_images(torch.from_numpy(trainer.image_features())).numpy()
    query_emb, dev_emb, bank = (trainer.aligned_text_embeddings(tower, texts) for texts in (
        [q for q, _ in protocol.queries], [q for q, _ in protocol.dev_queries], trainer.caption_pairs()[0]))
    image_hubness = hubness(image_emb, bank)
    rq = make_scheme("rq", **SCHEMES["rq"]["scheme_options"])
    rq.assign(keys, {}, image_emb)
    quantized = sum(codebook[rq.codes[:, level]] for level, codebook in enumerate(rq.codebooks))

    def search(images, queries, emb, subset, beta=0.0) -> dict:
        rows = np.array([keys.index(k) for k in subset])
        started = time.perf_counter()
        ranked, _ = dense_rank(emb, images[rows], k=10, penalty=beta * image_hubness[rows] if beta else None)
        seconds = time.perf_counter() - started
        return {**recall([[subset[i] for i in r] for r in ranked], [t for _, t in queries]),
                "candidates": len(subset), "seconds_per_query": seconds / len(queries)}

    def best_beta(subset, *dev_sets) -> float:
        """On the dev queries, or on the mean of each (queries, embeddings) set given."""
        dev_sets = dev_sets or ((protocol.dev_queries, dev_emb),)
        return best_by_recall([{b: search(image_emb, q, e, subset, b) for b in DENSE_HUBNESS} for q, e in dev_sets],
                              lambda b: (-b,))

    out = {"dense two-tower": {}, "dense two-tower, hubness-corrected": {}, "dense on rq codes (quantized)": {}}
    for scope, subset, dev_subset in (("test", protocol.test_keys, protocol.dev_keys), ("catalog", keys, keys)):
        out["dense two-tower"][scope] = search(image_emb, protocol.queries, query_emb, subset)
        beta = best_beta(dev_subset)
        out["dense two-tower, hubness-corrected"][scope] = {
            **search(image_emb, protocol.queries, query_emb, subset, beta), "hubness_beta": beta}
        out["dense on rq codes (quantized)"][scope] = search(quantized, protocol.queries, query_emb, subset)
    if protocol.captioned_queries:
        captioned = protocol.captioned_queries
        captioned_emb, dev_captioned_emb = (trainer.aligned_text_embeddings(tower, [q for q, _ in qs])
                                            for qs in (captioned, protocol.dev_captioned_queries))
        corrected = out["dense two-tower, hubness-corrected"]
        out["dense two-tower"]["catalog_captioned"] = search(image_emb, captioned, captioned_emb, keys)
        beta = corrected["catalog"]["hubness_beta"]
        corrected["catalog_captioned"] = {**search(image_emb, captioned, captioned_emb, keys, beta), "hubness_beta": beta}
        fair = best_beta(keys, (protocol.dev_queries, dev_emb), (protocol.dev_captioned_queries, dev_captioned_emb))
        corrected["catalog_fair"] = {**search(image_emb, protocol.queries, query_emb, keys, fair), "hubness_beta": fair}
        corrected["catalog_captioned_fair"] = {**search(image_emb, captioned, captioned_emb, keys, fair),
                                               "hubness_beta": fair}
    return out


def run_scheme(name, protocol: Protocol, setting, out: Path, shared_prepared: Path, seed: int = 0,
               spoken_only: bool = False) -> dict:
    import torch

    from genret.decoding import EmbeddingReranker, PriorWeights, TransformersEngine
    from genret.evaluation import evaluate_describe_and_ask, evaluate_generative, query_captions
    from genret.model_store import StoredModel
    from genret.training import TrainConfig, Trainer

    catalog, queries, test_keys = protocol.catalog, protocol.queries, protocol.test_keys
    run_dir = out / "runs" / (name if seed == 0 else f"{name}@seed{seed}")
    result_path = run_dir / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        config = TrainConfig(**{**setting["config"], **run_config(name), "seed": seed})
        prepared = run_dir / "prepared"
        prepared.mkdir(parents=True, exist_ok=True)
        for shared in shared_prepared.iterdir():  # features and alignment are the same for every scheme
            if not (prepared / shared.name).exists():
                shutil.copy(shared, prepared / shared.name)
        started = time.perf_counter()
        Trainer(catalog, config, run_dir).train(run_dir / "model")
        result = {"scheme": config.scheme, "options": config.scheme_options, "pseudo_queries": config.pseudo_queries,
                  "query_tokens": config.query_tokens, "seed": seed, "train_seconds": time.perf_counter() - started}
    # scope -> (queries, candidates, beams, queries per batch); the "_wide" scopes are GENIUS's wide
    # beam, which gives the re-ranker more candidates (their beam 50: R@5 24 -> 68)
    wide = setting["wide_beams"]
    per_batch = 16 if torch.cuda.is_available() else 1  # the same searches, more per call on a GPU
    scopes = {"test": (queries, test_keys, setting["beams"], 16), "catalog": (queries, None, setting["beams"], 16),
              "test_wide": (queries, test_keys, wide, 4), "catalog_wide": (queries, None, wide, 4),
              "dev_wide": (protocol.dev_queries, protocol.dev_keys, wide, 4),
              "dev_catalog_wide": (protocol.dev_queries, None, wide, 4)}
    captioned_queries, dev_captioned_queries = protocol.captioned_queries, protocol.dev_captioned_queries
    if captioned_queries:
        scopes.update({"catalog_captioned": (captioned_queries, None, setting["beams"], 16),
                       "catalog_captioned_wide": (captioned_queries, None, wide, 4),
                       "dev_catalog_captioned_wide": (dev_captioned_queries, None, wide, 4)})
    scopes = {scope: (q, c, b, n * per_batch) for scope, (q, c, b, n) in scopes.items()}
    # the hubness prior: searched with the dev queries at every weight, then with the test queries at the best
    prior_scopes = {"dev_prior": (protocol.dev_queries, protocol.dev_keys), "dev_catalog_prior": (protocol.dev_queries, None),
                    "test_prior": (queries, test_keys), "catalog_prior": (queries, None)}
    prior_from = {scope: (dev,) for scope, dev in PRIOR_SCOPES.items()}  # reported scope -> dev scopes for its weight
    if captioned_queries:
        prior_scopes.update({"dev_catalog_captioned_prior": (dev_captioned_queries, None),
                             "catalog_captioned_prior": (captioned_queries, None),
                             "catalog_prior_fair": (queries, None),
                             "catalog_captioned_prior_fair": (captioned_queries, None)})
        prior_from.update(CAPTIONED_PRIOR_FROM)
    # ... and the wide beam searched with it, at the weight its scope's dev search chose
    wide_prior_scopes = {f"{scope}_prior": scopes[scope] for scope in ("test_wide", "catalog_wide", "dev_wide",
                                                                        "dev_catalog_wide")}
    # describing and answering about images known only by id: ones whose captions were trained
    # on, and the test images, whose captions never were (their held-out ones are the references)
    spoken = {}
    if StoredModel.open(run_dir / "model").manifest["train_config"]["describe"]:
        captioned = [k for k in catalog.keys() if catalog[k].captions][: len(test_keys)]
        spoken = {"describe_captioned": {k: catalog[k].captions for k in captioned},
                  "describe_uncaptioned": query_captions(queries, test_keys)}
    # the setting's beam first, then the prior (dev weights before the scopes that read them), then the
    # wide beams: a call cut at its time limit has the headline numbers
    headline = [scope for scope in ("test", "catalog", "catalog_captioned") if scope in scopes]
    order = list(spoken) if spoken_only else [*headline, *prior_scopes, *[s for s in scopes if s not in headline],
                                               *wide_prior_scopes, *spoken]
    missing = [scope for scope in order if scope not in result]
    if missing:  # evaluated one scope at a time, each saved, so an interruption loses one at most
        stored = StoredModel.open(run_dir / "model")
        engine = TransformersEngine(stored)
        reranker = EmbeddingReranker(stored, device=engine.device)
        result.setdefault("train_history", stored.manifest["history"])
        for scope in missing:
            if scope in spoken:
                result[scope] = evaluate_describe_and_ask(engine, spoken[scope], seed=seed)
            elif scope in prior_scopes:
                scope_queries, candidates = prior_scopes[scope]
                search = lambda h: evaluate_generative(engine, scope_queries, candidates=candidates,
                                                       beams=setting["beams"], batch_size=16 * per_batch,
                                                       prior=PriorWeights(hubness=h))
                if scope in prior_from:  # the dev scopes were searched before it
                    result[scope] = search(best_beam_hubness_weight(*(result[dev] for dev in prior_from[scope])))
                else:
                    result[scope] = {"by_weight": {f"{h:g}": search(h) for h in BEAM_HUBNESS_WEIGHTS}}
            else:
                scope_queries, candidates, beams, batch_size = {**scopes, **wide_prior_scopes}[scope]
                weight = best_beam_hubness_weight(result[WIDE_PRIOR_OF[scope]]) if scope in WIDE_PRIOR_OF else 0.0
                result[scope] = evaluate_generative(engine, scope_queries, candidates=candidates, beams=beams,
                                                    reranker=reranker, batch_size=batch_size,
                                                    rerank_grid=RERANK_GRID if beams == wide else (),
                                                    prior=PriorWeights(hubness=weight))
            write_json(result_path, result)
    result = at_dev_weight(result)
    write_json(result_path, result)  # the run's own file holds its dev-chosen weights too
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--schemes", nargs="+", default=DEFAULT_RUNS, metavar="RUN",
                        help="runs to train, each a scheme and '+'-joined levers, e.g. rq+pq+qp+res2 (see LEVERS)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each scheme with seeds 0..N-1 and report mean ± standard deviation")
    parser.add_argument("--image-features-only", action="store_true",
                        help="compute the catalog's image features into <out>/shared/prepared and stop: what a GPU "
                             "machine without the images needs carried to it (the runs never read pixels again)")
    parser.add_argument("--captioned-queries", action="store_true",
                        help="also hold out one caption of some train images as queries for images whose other "
                             "captions are trained on, report them over the catalog, and choose each catalog weight "
                             "on both kinds of dev queries too (every test and dev query seeks an uncaptioned image, "
                             "so weights chosen on them alone favour those); use its own --out")
    parser.add_argument("--baseline-only", action="store_true",
                        help="train the two-tower, report the dense baseline and stop (no LM is trained; at full "
                             "size this runs on a CPU in minutes)")
    parser.add_argument("--spoken-only", action="store_true",
                        help="train each run and measure only describe and ask by id (no recall scopes): minutes "
                             "per seed instead of tens on the CPU; a later call without it adds the recall scopes "
                             "to the same runs")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: train at least one seed")
    if not (args.data / "captions.csv").exists():
        print(f"flickr8k: no data at {args.data} (set GENRET_FLICKR8K)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import torch
    from pydantic import ValidationError

    from genret.training import TrainConfig, Trainer

    setting = SETTINGS[args.setting]
    for name in args.schemes:  # refused before any work starts, not after hours of the runs before it
        try:
            config = TrainConfig(**{**setting["config"], **run_config(name)})
        except ValidationError as error:
            parser.error(f"run {name!r}: " + "; ".join(e["msg"] for e in error.errors()))
        except ValueError as error:
            parser.error(str(error))
        if args.spoken_only and not config.describe:
            parser.error(f"run {name!r} does not train describe and ask, so --spoken-only would measure nothing: "
                         "add +da")
    out = args.out or REPO / "benchmarks" / "results" / f"flickr8k-{args.setting}"
    out.mkdir(parents=True, exist_ok=True)
    chosen = {"captioned_queries": args.captioned_queries}
    made = (out / "runs").exists() or (out / "dense.json").exists() or any(  # image features do not depend on it
        p.name != "image_features.npy" for p in (out / "shared" / "prepared").glob("*"))
    if protocol_of(out, made) not in (None, chosen):
        parser.error(f"{out} holds runs and caption features made {'with' if not args.captioned_queries else 'without'}"
                     " --captioned-queries: give this protocol its own --out (image_features.npy may be copied over)")
    protocol = build_catalog(args.data, setting, captioned_queries=args.captioned_queries)
    catalog, queries, test_keys = protocol.catalog, protocol.queries, protocol.test_keys
    keys = catalog.keys()

    # features and the two-tower, computed once and shared by the baseline and every scheme
    base = Trainer(catalog, TrainConfig(**setting["config"]), out / "shared")
    base.prepared.mkdir(parents=True, exist_ok=True)
    base.image_features()
    if args.image_features_only:
        print(f"image features: {base.prepared / 'image_features.npy'}")
        return 0
    write_json(out / "protocol.json", chosen)
    base.caption_features(base.caption_pairs()[0])
    base.align()

    results = {}
    dense_path = out / "dense.json"
    if "dense two-tower, hubness-corrected" not in json.loads(dense_path.read_text() if dense_path.exists() else "{}"):
        write_json(dense_path, dense_baseline(base, protocol, keys))
    results.update(json.loads(dense_path.read_text()))
    meta = {"setting": args.setting, "catalog_images": len(catalog), "test_images": len(test_keys),
            "dev_images": len(protocol.dev_keys), "dev_queries": len(protocol.dev_queries),
            "train_captions": len(base.caption_pairs()[0]), "queries": len(queries), "beams": setting["beams"],
            "captioned_queries": len(protocol.captioned_queries),
            "dev_captioned_queries": len(protocol.dev_captioned_queries),
            "wide_beams": setting["wide_beams"],
            "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
            "command": "python benchmarks/flickr8k.py " + " ".join(sys.argv[1:])}
    for name in [] if args.baseline_only else args.schemes:
        results[name] = over_seeds([run_scheme(name, protocol, setting, out, base.prepared, seed, args.spoken_only)
                                    for seed in range(args.seeds)])
        write_report(out, results, meta)
        headline = "test" if "test" in results[name] else "describe_captioned"
        print(f"{name}: {headline} {results[name][headline]}", flush=True)
    write_report(out, results, meta)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
