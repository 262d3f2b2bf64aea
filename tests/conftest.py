"""Shared fixtures: one tiny model trained once per test session on part of the demo catalog.

Everything is real: the demo images, the pretrained encoders and SmolLM2 (cut to its first
layers and pruned to the catalog's tokens so a CPU trains it in a minute or two).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_IMAGES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "coins.jpg", "horse.jpg", "moon.jpg",
               "motorcycle.jpg", "rocket.jpg"]
# the size of every test model: seconds to a minute or two of training on a CPU
TINY_SIZE = dict(num_layers=2, memorize_epochs=4, retrieve_epochs=16, batch_size=16, lr=2e-3, prefix_lr=3e-3,
                 align_epochs=20, warmup_steps=5)
# The defaults (atomic ids) at that size learn the captions' words before they learn which id
# each belongs to. At 16 retrieve epochs, seeds 0 and 1 described every image alike, or nearly
# (seed 0 passed the describe test on an Intel machine and failed it on an AMD one). At 32 seeds
# 0-2 each described its own images (content-word F1 0.77-1.0 against 0.08-0.15 for the next
# image's captions), for 20 s more training.
TINY_DEFAULT_SIZE = {**TINY_SIZE, "retrieve_epochs": 32}
# structured ids and a text-only retrieve prompt, none of the defaults' levers (one description
# per image and epoch too: at this size three left these shared, mean-started codes as unsure of
# their captions as one did, mean F1 0.39 against 0.37 over seeds 0-2, and seed 0 described 7 of
# its 8 images alike; benchmarks/RESULTS.md, "Three descriptions per image and epoch")
TINY_CONFIG = dict(scheme="structured", scheme_options={"branching": 4}, **TINY_SIZE, query_tokens=0,
                   id_embeddings="mean", pseudo_queries="none", describe_per_image=1)
# the same with the query's aligned embedding as a soft prefix (genret.model.QueryPrefix) and RQ
# ids, with TrainConfig's 3 descriptions per image and epoch: with one, seed 0 described its images
# little better than the next image's captions on an AMD machine (content-word F1 0.40 against
# 0.31; it passed on an Intel one), and seeds 0-2 ranged 0.32-0.63 against 0.04-0.31; with three,
# 0.66-0.78 against 0.06-0.10, for 5-10 s more training (measured 2026-12-07)
TINY_QUERY_PREFIX_CONFIG = {**TINY_CONFIG, "scheme": "rq", "scheme_options": {"levels": 2, "codebook_size": 4},
                            "query_tokens": 2, "describe_per_image": 3}


def load_script(path: Path, name: str):
    """A script outside any package (benchmarks/, loadtest/), loaded by path as module `name`
    without putting its folder on sys.path. A fresh module on every call, registered in
    sys.modules, where dataclasses and pickling look a module up by its name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory):
    from genret.catalog import load_catalog
    from genret.demo_catalog import write_demo_catalog

    images, captions = write_demo_catalog(tmp_path_factory.mktemp("demo"))
    return load_catalog(images, captions)


@pytest.fixture(scope="session")
def tiny_catalog(demo_catalog):
    return demo_catalog.subset(TINY_IMAGES)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_catalog, tmp_path_factory):
    """A trained tiny model (structured ids); GENRET_TEST_MODEL reuses one across runs."""
    from genret.training import TrainConfig, Trainer

    reuse = os.environ.get("GENRET_TEST_MODEL")
    if reuse and (Path(reuse) / "manifest.json").exists():
        return Path(reuse)
    root = tmp_path_factory.mktemp("tiny_model")
    dest = Path(reuse) if reuse else root / "model"
    Trainer(tiny_catalog, TrainConfig(**TINY_CONFIG), root / "run", progress=False).train(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_query_prefix_model_dir(tiny_catalog, tmp_path_factory):
    """A trained tiny model whose retrieve prompt starts with the query prefix (RQ ids)."""
    from genret.training import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("tiny_query_prefix_model")
    Trainer(tiny_catalog, TrainConfig(**TINY_QUERY_PREFIX_CONFIG), root / "run", progress=False).train(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def tiny_default_model_dir(tiny_catalog, tmp_path_factory):
    """A tiny model of TrainConfig's defaults, what `genret train` gives with no options (atomic
    ids with aligned, frozen rows and the query prefix)."""
    from genret.training import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("tiny_default_model")
    Trainer(tiny_catalog, TrainConfig(**TINY_DEFAULT_SIZE), root / "run", progress=False).train(root / "model")
    return root / "model"


# module fixtures that take `params=MODEL_KINDS` run their module once per kind of model
MODEL_KINDS = {"text prompt": "tiny_model_dir", "query prefix": "tiny_query_prefix_model_dir",
               "defaults": "tiny_default_model_dir"}
