"""What the Flickr8k benchmark runs and how it chooses: the settings, a run's name (an
identifier scheme and `+`-joined levers, each a set of TrainConfig fields), the scopes a run is
measured on and the weight grids tried on them, the catalog and queries it builds from the data,
and how each reported scope takes its weights from the dev queries.

Shared by benchmarks/flickr8k.py (which trains and measures), flickr8k_report.py (which writes
the tables) and the benchmarks built on the same protocol (add_images.py, search_time.py).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import NamedTuple

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


def protocol_of(out: Path, made: bool) -> dict | None:
    """The protocol what `out` holds was made with (its protocol.json). A folder from before that
    file holds the plain protocol's where it `made` anything that depends on one; else None."""
    if (out / "protocol.json").exists():
        return json.loads((out / "protocol.json").read_text())
    return {"captioned_queries": False} if made else None


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
