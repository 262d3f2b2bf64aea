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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from genret.model_store import write_json  # atomic: a GPU call's time limit never leaves half a result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("GENRET_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))

# A run's name spells out each lever it uses (below), so every setting starts from the plain
# model, not from TrainConfig's defaults (the recipe the levers found: atomic+pq+qp+ai+fz+dpi3).
PLAIN = dict(query_tokens=0, pseudo_queries="none", id_embeddings="mean", freeze_id_rows=False, describe_per_image=1)
# name -> (train, dev and test images, training config, evaluation beams)
SETTINGS = {
    "cpu": dict(train_images=200, dev_images=50, test_images=50, beams=10, wide_beams=50, config=dict(
        num_layers=2, memorize_epochs=3, retrieve_epochs=8, batch_size=32, lr=2e-3, prefix_lr=3e-3,
        embedding_lr=1e-2, describe=False, ask=False, align_epochs=40, **PLAIN)),
    "gpu": dict(train_images=None, dev_images=None, test_images=None, beams=20, wide_beams=50, config=dict(
        num_layers=None, memorize_epochs=3, retrieve_epochs=8, batch_size=128, lr=3e-4, prefix_lr=1e-3,
        embedding_lr=3e-3, describe=True, ask=True, align_epochs=40, **PLAIN)),
    # the full protocol's data and model, trained briefly and for retrieval alone, to fit one
    # 10-minute GPU call (a lease here is 15 minutes of device time, its start and uploads included)
    "gpu-short": dict(train_images=None, dev_images=None, test_images=None, beams=20, wide_beams=50, config=dict(
        num_layers=None, memorize_epochs=2, retrieve_epochs=4, batch_size=128, lr=3e-4, prefix_lr=1e-3,
        embedding_lr=3e-3, describe=False, ask=False, align_epochs=40, **PLAIN)),
}
# A run is named by its identifier scheme and "+"-joined levers, each a set of TrainConfig
# fields on top of the setting's config (so "rq+pq+qp+res2+layers4" needs no code):
SCHEMES = {
    "string": dict(scheme="string"),
    "numeric": dict(scheme="numeric"),
    "semantic": dict(scheme="semantic"),
    "structured": dict(scheme="structured", scheme_options={"branching": 32}),
    "atomic": dict(scheme="atomic"),
    "rq": dict(scheme="rq", scheme_options={"levels": 3, "codebook_size": 64}),
}
# name -> (what it means, the TrainConfig field (or fields) it sets, its value; where the value is
# a type, the lever takes a number: "res2" sets query_residuals=2)
LEVERS = {
    "pq": ("pseudo-queries for the uncaptioned (test) images: their nearest training captions",
           "pseudo_queries", "neighbors"),
    "qp": ("the query prefix: the query's aligned embedding as 4 soft tokens before the retrieve prompt",
           "query_tokens", 4),
    "td": ("half of the retrieve examples leave the query text out", "query_text_dropout", 0.5),
    "mix": ("GENIUS's query augmentation: mixes of a caption's and its image's embeddings", "query_mixing", 0.5),
    "noise": ("the prefix's inputs jittered by random vectors of length N while training", "query_noise", float),
    "res": ("N synthetic queries per image and epoch: its embedding plus a real caption's offset from its image",
            "query_residuals", int),
    "qt": ("N query-prefix tokens instead of 4", "query_tokens", int),
    "layers": ("keep N decoder layers of the LM", "num_layers", int),
    "ep": ("N retrieve epochs", "retrieve_epochs", int),
    "mep": ("N memorize epochs", "memorize_epochs", int),
    "bs": ("batch size N (on an H200 a step at 512 costs little more than at 128)", "batch_size", int),
    "lr": ("learning rate N for the LM (the prefix and embeddings keep theirs)", "lr", float),
    "plr": ("learning rate N for the image and query prefixes", "prefix_lr", float),
    "ppi": ("N pseudo-queries per uncaptioned image", "pseudo_per_image", int),
    "elr": ("learning rate N for the token embeddings and the head tied to them", "embedding_lr", float),
    "ai": ("id tokens start from where their images sit in the aligned space", "id_embeddings", "aligned"),
    "fz": ("the id tokens' rows (and the head tied to them) stay where they start; word rows train",
           "freeze_id_rows", True),
    "da": ("train describe and ask too, and measure them (the cpu setting leaves them out)", ("describe", "ask"), True),
    "dp": ("describe and ask also train on the uncaptioned images, their pseudo-queries as captions",
           "describe_pseudo", True),
    "dpi": ("N describe examples per image and epoch, each with another of its captions", "describe_per_image", int),
    "api": ("N yes/no question pairs per image and epoch, each about other words", "ask_per_image", int),
    "ad": ("ask after the model's own description: questions follow one of the image's captions in training",
           "ask_from_description", True),
    "adn": ("with ad: N descriptions precede a question (training joins N captions, the engines N beams)",
            "ask_descriptions", int),
    "rp": ("with ad: each retrieve epoch asks at least N yes/no pairs, images asked again after other captions",
           "reading_pairs_per_epoch", int),
    "ls": ("each batch as N length-sorted slices, their gradients summed (the same update, less padding)",
           "length_slices", int),
    "kd": ("share N of the first id token's target is the two-tower's distribution over the catalog",
           "distill_weight", float),
}
# what a run is measured on: recall over the test images and over the whole catalog (at the
# setting's beam, then at the wide beam the re-ranker reads), and describe/ask by id alone
RECALL_SCOPES = ("test", "catalog", "test_wide", "catalog_wide", "dev_wide", "dev_catalog_wide",
                 "test_wide_prior", "catalog_wide_prior", "dev_wide_prior", "dev_catalog_wide_prior")
# each reported wide scope takes its re-ranking weight from the same search over the dev queries
DEV_SCOPE_OF = {"test_wide": "dev_wide", "catalog_wide": "dev_catalog_wide",
                "test_wide_prior": "dev_wide_prior", "catalog_wide_prior": "dev_catalog_wide_prior"}
# the re-ranking weights tried on every wide beam, each with every hubness weight; the report uses
# the pair best on the dev queries
RERANK_WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)
HUBNESS_WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
RERANK_GRID = tuple((w, h) for w in RERANK_WEIGHTS for h in HUBNESS_WEIGHTS)
# the dense baseline's own hubness correction: similarity - beta x hubness, beta best on the dev queries
DENSE_HUBNESS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# the hubness prior inside the search (genret.decoding.search_prior), at the setting's beam: every
# weight searched with the dev queries, each reported scope at the weight best there
BEAM_HUBNESS_WEIGHTS = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0)
PRIOR_SCOPES = {"test_prior": "dev_prior", "catalog_prior": "dev_catalog_prior"}  # reported scope -> dev scope
# the wide beam searched with the prior too (at the weight its scope's dev search chose), then re-ranked
WIDE_PRIOR_OF = {"test_wide_prior": "dev_prior", "catalog_wide_prior": "dev_catalog_prior",
                 "dev_wide_prior": "dev_prior", "dev_catalog_wide_prior": "dev_catalog_prior"}
# --captioned-queries: queries for images whose other captions were trained on, searched over the
# whole catalog beside the test queries; each weight is chosen twice, on the (uncaptioned) dev
# queries as above and on both kinds of dev queries equally ("fair")
CAPTIONED_SCOPES = ("catalog_captioned", "catalog_captioned_wide", "dev_catalog_captioned_wide",
                    "catalog_captioned_prior", "catalog_prior_fair", "catalog_captioned_prior_fair")
# reported prior scope -> the dev scopes whose mean recall chooses its weight
CAPTIONED_PRIOR_FROM = {"catalog_captioned_prior": ("dev_catalog_prior",),
                        "catalog_prior_fair": ("dev_catalog_prior", "dev_catalog_captioned_prior"),
                        "catalog_captioned_prior_fair": ("dev_catalog_prior", "dev_catalog_captioned_prior")}
# re-ranked part -> reported wide scope -> the dev scopes whose mean recall chooses its (w, h)
CAPTIONED_RERANK_FROM = {
    "reranked_dev": {"catalog_captioned_wide": ("dev_catalog_wide",)},
    "reranked_fair": {scope: ("dev_catalog_wide", "dev_catalog_captioned_wide")
                      for scope in ("catalog_wide", "catalog_captioned_wide")}}
DEV_QUERIES = 1000  # at most: dev queries are for choosing a weight, not for reporting
SPOKEN_SCOPES = ("describe_captioned", "describe_uncaptioned")
DEFAULT_RUNS = ["structured+pq", "structured", "atomic", "rq", "rq+pq", "semantic", "string", "numeric",
                "rq+qp", "rq+pq+qp", "structured+pq+qp"]


def run_config(name: str) -> dict:
    """The TrainConfig fields a run's name stands for; ValueError names what it does not know."""
    scheme, *levers = name.split("+")
    if scheme not in SCHEMES:
        raise ValueError(f"run {name!r}: unknown scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    config = dict(SCHEMES[scheme])
    for lever in levers:
        word = lever.rstrip("0123456789.")
        number = lever[len(word):]
        try:
            _, fields, value = LEVERS[word]
            if isinstance(value, type) != bool(number):
                raise ValueError
            for field in fields if isinstance(fields, tuple) else (fields,):
                config[field] = value(number) if isinstance(value, type) else value
        except (KeyError, ValueError):
            raise ValueError(f"run {name!r}: unknown lever {lever!r}; levers:\n" + "\n".join(
                f"  {w}{'N' if isinstance(v, type) else ''}: {meaning}" for w, (meaning, _, v) in LEVERS.items())
            ) from None
    return config


class Protocol(NamedTuple):
    catalog: object  # genret.catalog.Catalog, as the trainer sees it: dev and test captions removed
    queries: list[tuple[str, str]]  # (test caption, its image): what is reported
    test_keys: list[str]
    dev_queries: list[tuple[str, str]]  # (dev caption, its image): what the re-ranking weight is chosen on
    dev_keys: list[str]
    # with --captioned-queries: one held-out caption of each of some train images, whose other
    # captions are trained on (reported, and a second set for the weights); empty without it
    captioned_queries: list[tuple[str, str]] = []
    dev_captioned_queries: list[tuple[str, str]] = []


def build_catalog(data: Path, setting: dict, seed: int = 0, captioned_queries: bool = False) -> Protocol:
    """The catalog as the trainer sees it, and the queries. With `captioned_queries`, as many train
    images as there are test images, and as many again as there are dev images, each lose one
    caption to the queries: every other query seeks an image without trained captions, so a
    score offset that favours such images would raise catalog recall unchecked."""
    from dataclasses import replace

    from genret.catalog import Catalog, load_catalog, read_split

    full = load_catalog(data / "images", data / "captions.csv", duplicates="keep", verify_images=False)
    train, dev, test = (read_split(data / "splits" / f"{s}.txt") for s in ("train", "dev", "test"))
    rng = random.Random(seed)
    if setting["train_images"]:
        train = sorted(rng.sample(train, setting["train_images"]))
        test = sorted(rng.sample(test, setting["test_images"]))
        dev = sorted(rng.sample(dev, setting["dev_images"]))
        catalog = full.subset(train + dev + test)
    else:
        catalog = full
    held_out = [k for k in catalog.keys() if k not in set(train)]
    queries = [(c, k) for k in test for c in full[k].captions]
    dev_queries = [(c, k) for k in dev for c in full[k].captions]
    if len(dev_queries) > DEV_QUERIES:
        dev_queries = sorted(rng.sample(dev_queries, DEV_QUERIES), key=lambda q: q[1])
    catalog = catalog.without_captions_for(held_out)
    captioned, dev_captioned = [], []
    if captioned_queries:  # drawn last, so the draws above are the same with or without them
        pool = rng.sample(train, min(len(train) - 1, len(test) + min(len(dev), DEV_QUERIES)))
        held = {k: rng.randrange(len(catalog[k].captions)) for k in pool}
        captioned = sorted((catalog[k].captions[held[k]], k) for k in pool[: len(test)])
        dev_captioned = sorted((catalog[k].captions[held[k]], k) for k in pool[len(test):])
        catalog = Catalog(tuple(
            replace(im, captions=im.captions[: held[im.key]] + im.captions[held[im.key] + 1:]) if im.key in held
            else im for im in catalog))
    return Protocol(catalog, queries, test, dev_queries, dev, captioned, dev_captioned)


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


def run_scheme(name, protocol: Protocol, setting, out: Path, shared_prepared: Path, seed: int = 0) -> dict:
    import torch

    from genret.decoding import EmbeddingReranker, PriorWeights, TransformersEngine
    from genret.evaluation import evaluate_describe_and_ask, evaluate_generative
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
        held_out = {k: [] for k in test_keys}
        for caption, key in queries:
            held_out[key].append(caption)
        spoken = {"describe_captioned": {k: catalog[k].captions for k in captioned}, "describe_uncaptioned": held_out}
    # the setting's beam first, then the prior (dev weights before the scopes that read them), then the
    # wide beams: a call cut at its time limit has the headline numbers
    headline = [scope for scope in ("test", "catalog", "catalog_captioned") if scope in scopes]
    order = [*headline, *prior_scopes, *[s for s in scopes if s not in headline], *wide_prior_scopes, *spoken]
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


def best_beam_hubness_weight(*devs: dict) -> float:
    """The hubness prior's weight best on the dev queries (R@10, then R@5, then R@1; the smaller on a tie);
    given several dev searches, best on their mean."""
    from genret.evaluation import best_by_recall

    return float(best_by_recall([dev["by_weight"] for dev in devs], lambda h: (-float(h),)))


def at_dev_weight(result: dict) -> dict:
    """Each wide scope re-ranked at the (weight, hubness weight) whose recall on the dev queries,
    searched the same way, is best (R@10, then R@5, then R@1; the smaller weights on a tie), as
    "reranked_dev"."""
    from genret.evaluation import best_by_recall

    pair = lambda key: tuple(float(w) for w in key.split(","))
    choices = [("reranked_dev", scope, (dev,)) for scope, dev in DEV_SCOPE_OF.items()]
    choices += [(part, scope, devs) for part, chosen in CAPTIONED_RERANK_FROM.items() for scope, devs in chosen.items()]
    for part, scope, devs in choices:
        by_weights = [result.get(dev, {}).get("reranked_by_weight") for dev in devs]
        if not all(by_weights) or "reranked_by_weight" not in result.get(scope, {}):
            continue
        best = best_by_recall(by_weights, lambda key: tuple(-w for w in pair(key)))
        weight, hubness_weight = pair(best)
        for s in (scope, *devs) if len(devs) == 1 else (scope,):  # a single dev scope records its own best
            result[s][part] = {"weight": weight, "hubness_weight": hubness_weight, **result[s]["reranked_by_weight"][best]}
    return result


def over_seeds(runs: list[dict]) -> dict:
    """One row from runs that differ only in their training seed: each recall's mean, and its
    standard deviation under "spread" (run-to-run variance is large at the reduced size)."""
    if len(runs) == 1:
        return runs[0]
    row = {"seeds": [r.get("seed", 0) for r in runs], "spread": {}}
    row["dev_weights"] = {scope: [_weights_of(r[scope]["reranked_dev"]) for r in runs] for scope in DEV_SCOPE_OF
                          if all("reranked_dev" in r.get(scope, {}) for r in runs)}
    row["fair_weights"] = {scope: [_weights_of(r[scope]["reranked_fair"]) for r in runs]
                           for scope in CAPTIONED_RERANK_FROM["reranked_fair"]
                           if all("reranked_fair" in r.get(scope, {}) for r in runs)}
    row["beam_hubness_weights"] = {scope: [r[scope]["beam_hubness_weight"] for r in runs]
                                   for scope in (*PRIOR_SCOPES, *CAPTIONED_PRIOR_FROM) if all(scope in r for r in runs)}
    for scope in [s for s in (*RECALL_SCOPES, *PRIOR_SCOPES, *CAPTIONED_SCOPES, *SPOKEN_SCOPES)
                  if all(s in r for r in runs)]:
        row[scope], row["spread"][scope] = {}, {}
        for part in (None, "reranked", "reranked_dev", "reranked_fair"):
            values = [r[scope] if part is None else r[scope].get(part) for r in runs]
            if any(v is None for v in values):
                continue
            for metric in [m for m, v in values[0].items() if isinstance(v, (int, float))]:
                numbers = np.array([v[metric] for v in values], dtype=float)
                target = row[scope] if part is None else row[scope].setdefault(part, {})
                target[metric] = float(numbers.mean())
                if metric.startswith("R@") or metric.endswith(("_f1", "_accuracy")):
                    row["spread"][scope][metric if part is None else f"{part} {metric}"] = float(numbers.std())
    return row


def _cell(row: dict, scope: str, metric: str, part: str | None = None) -> str:
    values = row.get(scope, {})
    value = values.get(metric) if part is None else values.get(part, {}).get(metric)
    if value is None:
        return ""
    spread = row.get("spread", {}).get(scope, {}).get(metric if part is None else f"{part} {metric}")
    return f"{value:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def _yes_no_details(row: dict, scope: str, metric: str) -> str:
    """The yes/no cell's additions: for a model that reads its own description, its accuracy on the
    questions that description answers; and how often the model said yes (the truth: half the time)."""
    if metric != "yes_no_accuracy":
        return ""
    details = [f"{cell} {what}" for key, what in (("yes_no_stated_accuracy", "stated"), ("yes_share", "yes"))
               if (cell := _cell(row, scope, key))]
    return f" ({', '.join(details)})" if details else ""


def _label(name: str, row: dict) -> str:
    return name + (f" ({len(row['seeds'])} seeds)" if "seeds" in row else "")


def _weights_of(reranked_dev: dict) -> list[float]:
    return [reranked_dev["weight"], reranked_dev.get("hubness_weight", 0.0)]


def _dev_weights(row: dict, scope: str) -> str:
    """The re-ranking weights "w, h" (one pair per seed) the dev queries chose for a scope; for
    the dense baseline's hubness correction, its beta."""
    dense = row.get(scope.removesuffix("_wide"), {})
    if "hubness_beta" in dense:
        return f"β {dense['hubness_beta']:g}"
    chosen = row.get(scope, {}).get("reranked_dev")
    pairs = row.get("dev_weights", {}).get(scope) or ([_weights_of(chosen)] if chosen else [])
    return " / ".join(f"{w:g}, {h:g}" for w, h in pairs)


def _captioned_rows(r: dict, meta: dict) -> list[list[str]]:
    """The captioned-queries table's rows for one result: [ranking, chosen on, weight, 7 cells]."""
    def cells(uncaptioned: str, captioned: str, part: str | None = None) -> list[str]:
        values = [_cell(r, scope, k, part) for scope in (uncaptioned, captioned) for k in ("R@1", "R@5", "R@10")]
        tens = [r.get(scope, {}) if part is None else r.get(scope, {}).get(part, {}) for scope in (uncaptioned, captioned)]
        mean = f"{np.mean([t['R@10'] for t in tens]):.3f}" if all("R@10" in t for t in tens) else ""
        return values + [mean]

    def prior(scope: str) -> str:
        return " / ".join(f"{h:g}" for h in r.get("beam_hubness_weights", {}).get(
            scope, [r.get(scope, {}).get("beam_hubness_weight", 0.0)]))

    def rerank(scope: str, part: str) -> str:
        # over seeds, each seed's pair: as chosen for the catalog scope (the same dev searches chose both)
        pairs = r.get("dev_weights" if part == "reranked_dev" else "fair_weights", {}).get("catalog_wide") or \
            [_weights_of(r[scope][part])]
        return " / ".join(f"{w:g}, {h:g}" for w, h in pairs)

    if "catalog_captioned" not in r:
        return []
    if "hubness_beta" in r.get("catalog_captioned", {}):  # the dense baseline's hubness correction
        return [["similarity - β × hubness", "dev", f"{r['catalog_captioned']['hubness_beta']:g}",
                 *cells("catalog", "catalog_captioned")],
                ["similarity - β × hubness", "dev, fair", f"{r['catalog_fair']['hubness_beta']:g}",
                 *cells("catalog_fair", "catalog_captioned_fair")]]
    searched = "beams" in r["catalog_captioned"]
    rows = [[f"beam {meta['beams']}" if searched else "similarity", "", "", *cells("catalog", "catalog_captioned")]]
    if "catalog_captioned_prior" in r:
        rows += [[f"beam {meta['beams']}, prior h", "dev", prior("catalog_captioned_prior"), *cells("catalog_prior", "catalog_captioned_prior")],
                 [f"beam {meta['beams']}, prior h", "dev, fair", prior("catalog_prior_fair"),
                  *cells("catalog_prior_fair", "catalog_captioned_prior_fair")]]
    for part, chosen_on in (("reranked_dev", "dev"), ("reranked_fair", "dev, fair")):
        if part in r.get("catalog_captioned_wide", {}):
            rows.append([f"re-ranked w, h (beam {meta['wide_beams']})", chosen_on,
                         rerank("catalog_captioned_wide", part),
                         *cells("catalog_wide", "catalog_captioned_wide", part)])
    return rows


def write_report(out: Path, results: dict, meta: dict) -> None:
    write_json(out / "results.json", {"meta": meta, "results": results})
    lines = [f"# Flickr8k generative retrieval ({meta['setting']} setting)", "",
             f"catalog {meta['catalog_images']} images, {meta['train_captions']} training captions, "
             f"{meta['queries']} test queries over {meta['test_images']} test images, {meta['dev_queries']} dev "
             f"queries over {meta['dev_images']} dev images; beams {meta['beams']}; machine: {meta['machine']}", "",
             f"Re-ranked: a beam of {meta['wide_beams']}, each hit's score (its log-probability) plus w × the "
             "two-tower's query-image similarity minus h × the image's hubness (its mean similarity to its "
             "5 nearest training captions), w and h the pair best on the dev queries (w of "
             f"{', '.join(f'{w:g}' for w in RERANK_WEIGHTS)}; h of {', '.join(f'{w:g}' for w in HUBNESS_WEIGHTS)}; "
             "one pair per seed), searching the dev images for the test scope and the whole catalog for the "
             "catalog scope. The dense baseline's hubness correction ranks by similarity - β × hubness, β "
             f"(of {', '.join(f'{b:g}' for b in DENSE_HUBNESS)}) chosen on the dev queries the same way.", "",
             "| approach | test R@1 | test R@5 | test R@10 | catalog R@1 | catalog R@5 | catalog R@10 | "
             "test R@1/5/10, re-ranked | catalog R@1/5/10, re-ranked | w, h (dev): test; catalog | "
             "s/query (test, catalog wide) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        wide = r.get("catalog_wide", {})
        reranked = [" / ".join(_cell(r, scope, k, "reranked_dev") for k in ("R@1", "R@5", "R@10"))
                    if "reranked_dev" in r.get(scope, {}) else "" for scope in ("test_wide", "catalog_wide")]
        seconds = f"{r['test']['seconds_per_query']:.4f}" + (f", {wide['seconds_per_query']:.3f}" if wide else "")
        cells = [_cell(r, scope, k) for scope in ("test", "catalog") for k in ("R@1", "R@5", "R@10")]
        weights = [_dev_weights(r, scope) for scope in ("test_wide", "catalog_wide")]
        weights = "; ".join(weights) if any(weights) else ""
        lines.append(f"| {_label(name, r)} | {' | '.join(cells + reranked)} | {weights} | {seconds} |")
    prior = {name: r for name, r in results.items() if all(scope in r for scope in PRIOR_SCOPES)}
    if prior:
        lines += ["", f"Searched with the hubness prior in the beam (beam {meta['beams']}): each id's score is its "
                  "log-probability minus h × its image's hubness, inside the search, h (of "
                  f"{', '.join(f'{h:g}' for h in BEAM_HUBNESS_WEIGHTS)}) the weight best on the dev queries, "
                  "searched over the dev images for the test scope and the whole catalog for the catalog scope. "
                  f"Re-ranked: a beam of {meta['wide_beams']} searched with the same prior, then re-ranked as "
                  "above, (w, h) chosen on the dev queries searched the same way.", "",
                  "| approach | test R@1 | test R@5 | test R@10 | catalog R@1 | catalog R@5 | catalog R@10 | "
                  "test R@1/5/10, re-ranked | catalog R@1/5/10, re-ranked | prior h (dev): test; catalog | "
                  "re-ranking w, h (dev): test; catalog |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in prior.items():
            cells = [_cell(r, scope, k) for scope in PRIOR_SCOPES for k in ("R@1", "R@5", "R@10")]
            cells += [" / ".join(_cell(r, scope, k, "reranked_dev") for k in ("R@1", "R@5", "R@10"))
                      if "reranked_dev" in r.get(scope, {}) else "" for scope in ("test_wide_prior", "catalog_wide_prior")]
            weights = "; ".join(" / ".join(f"{h:g}" for h in r.get("beam_hubness_weights", {}).get(
                scope, [r[scope]["beam_hubness_weight"]])) for scope in PRIOR_SCOPES)
            rerank_weights = "; ".join(_dev_weights(r, scope) for scope in ("test_wide_prior", "catalog_wide_prior"))
            lines.append(f"| {_label(name, r)} | {' | '.join(cells)} | {weights} | {rerank_weights.strip('; ')} |")
    spoken = {name: r for name, r in results.items() if "describe_captioned" in r}
    if spoken:
        lines += ["", "Describe and ask by id alone: content-word F1 of the description against the image's captions, "
                  "and yes/no accuracy on whether they mention a word (half do), beside what word frequency alone "
                  "scores on the same questions (the control, genret.evaluation). Captioned: images whose captions "
                  "were trained on; uncaptioned: the test images, whose captions never were.", "",
                  "| approach | captioned describe F1 | captioned yes/no | word prior | uncaptioned describe F1 "
                  "| uncaptioned yes/no | word prior |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in spoken.items():
            cells = [_cell(r, scope, metric) + _yes_no_details(r, scope, metric) for scope in SPOKEN_SCOPES
                     for metric in ("describe_word_f1", "yes_no_accuracy", "yes_no_word_prior")]
            lines.append(f"| {_label(name, r)} | {' | '.join(cells)} |")
        if any(_yes_no_details(r, scope, "yes_no_accuracy") for r in spoken.values() for scope in SPOKEN_SCOPES):
            lines += ["", "In brackets: the yes/no accuracy of a model that asks after its own description on the "
                      "questions that description answers (stated), and the share of questions answered yes (yes; "
                      "the right share is 0.5, and a model near 0 or 1 does not tell images apart) (genret.evaluation)."]
    if any("catalog_captioned" in r for r in results.values()):
        lines += ["", f"Queries for captioned images (`--captioned-queries`): one held-out caption of each of "
                  f"{meta.get('captioned_queries')} train images, whose other captions were trained on, searched over "
                  "the whole catalog beside the test queries (whose images have no trained captions). Each weight is "
                  "chosen twice: on the dev queries as above, which all seek uncaptioned images, and on the mean of "
                  f"those and {meta.get('dev_captioned_queries')} held-out captions of other train images (fair). "
                  "Mean: of the two R@10.", "",
                  "| approach | ranking | weight chosen on | weight | uncaptioned R@1 | R@5 | R@10 | captioned R@1 | R@5 | "
                  "R@10 | mean R@10 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines += [f"| {_label(name, r)} | {' | '.join(cells)} |" for cells in _captioned_rows(r, meta)]
    if any("seeds" in r for r in results.values()):
        lines += ["", "Rows over several seeds: mean ± standard deviation across the training seeds."]
    lines += ["", f"Reproduce: `{meta['command']}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4))
    for i, k in enumerate(("R@1", "R@5", "R@10")):
        errors = [results[n].get("spread", {}).get("test", {}).get(k, 0.0) for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * 0.27, [results[n]["test"][k] for n in names], 0.27, label=k,
               yerr=errors if any(errors) else None, capsize=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("recall over test images")
    ax.set_title(f"Flickr8k, {meta['setting']} setting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)


def protocol_of(out: Path, made: bool) -> dict | None:
    """The protocol what `out` holds was made with (its protocol.json). A folder from before that
    file holds the plain protocol's where it `made` anything that depends on one; else None."""
    if (out / "protocol.json").exists():
        return json.loads((out / "protocol.json").read_text())
    return {"captioned_queries": False} if made else None


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
            TrainConfig(**{**setting["config"], **run_config(name)})
        except ValidationError as error:
            parser.error(f"run {name!r}: " + "; ".join(e["msg"] for e in error.errors()))
        except ValueError as error:
            parser.error(str(error))
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
        results[name] = over_seeds([run_scheme(name, protocol, setting, out, base.prepared, seed)
                                    for seed in range(args.seeds)])
        write_report(out, results, meta)
        print(f"{name}: test {results[name]['test']}", flush=True)
    write_report(out, results, meta)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
