"""The bundle that carries the benchmark's inputs to a GPU machine: packed here in parts, joined
and laid out there, with damaged or missing parts refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_bundle.py"


def _load():
    return load_script(SCRIPT, "device_bundle")


@pytest.fixture
def sources(tmp_path):
    """A Flickr8k-shaped data folder (captions and splits, no images), features and a package."""
    data = tmp_path / "flickr8k"
    (data / "splits").mkdir(parents=True)
    (data / "captions.csv").write_text("image,caption\na.jpg,A dog runs.\na.jpg,A dog.\nb.jpg,\"A cat, asleep.\"\n")
    for split, keys in (("train", "a.jpg"), ("dev", ""), ("test", "b.jpg")):
        (data / "splits" / f"{split}.txt").write_text(keys + "\n")
    features = tmp_path / "image_features.npy"
    np.save(features, np.random.default_rng(0).standard_normal((2, 1280)).astype(np.float32))
    package = tmp_path / "weights_pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("WEIGHTS = 'here'\n")
    (package / "__pycache__" / "x.pyc").write_bytes(b"stale")
    bundle = _load()
    found = bundle.bundle_sources("gpu-short", data, features)
    # the real weights packages are large: the test carries a small one in their place
    found = {name: path for name, path in found.items() if not name.startswith("site/")}
    return {**found, "site/weights_pkg": package}


def _arrive(parts: list[Path], where: Path) -> Path:
    """What the device calls do: each copies its part folder's files to one place."""
    where.mkdir()
    for folder in parts:
        for f in folder.iterdir():
            shutil.copy(f, where / f.name)
    return where


def test_pack_in_parts_then_unpack_lays_out_what_the_benchmark_reads(sources, tmp_path):
    bundle = _load()
    parts = bundle.pack(sources, tmp_path / "bundle", part_bytes=4096)
    assert len(parts) > 1 and all(p.name.startswith("part-") for p in parts)
    assert all(sum(f.stat().st_size for f in p.iterdir() if f.name != bundle.MANIFEST) <= 4096 for p in parts)

    into = tmp_path / "device"
    env = bundle.unpack(_arrive(parts, tmp_path / "arrived"), into)
    data = into / "data" / "flickr8k"
    assert (data / "captions.csv").read_bytes() == sources["data/flickr8k/captions.csv"].read_bytes()
    assert (data / "splits" / "test.txt").read_text() == "b.jpg\n"
    assert sorted(p.name for p in (data / "images").iterdir()) == ["a.jpg", "b.jpg"]  # empty placeholders
    features = into / "results" / "flickr8k-gpu-short" / "shared" / "prepared" / "image_features.npy"
    assert np.array_equal(np.load(features), np.load(sources[next(n for n in sources if n.endswith(".npy"))]))
    assert (into / "site" / "weights_pkg" / "__init__.py").exists()
    assert not (into / "site" / "weights_pkg" / "__pycache__").exists()
    text = env.read_text()
    assert f"GENRET_FLICKR8K={data}" in text and f"PYTHONPATH={into / 'site'}" in text and "HF_HUB_OFFLINE=1" in text
    assert bundle.unpack(tmp_path / "arrived", into) == env  # a second call finds it done


def test_unpack_names_a_missing_or_damaged_part(sources, tmp_path):
    bundle = _load()
    parts = bundle.pack(sources, tmp_path / "bundle", part_bytes=4096)
    arrived = _arrive(parts[:-1], tmp_path / "arrived")
    with pytest.raises(SystemExit, match=rf"1 of {len(parts)} parts have not arrived: bundle.{len(parts):02d}"):
        bundle.unpack(arrived, tmp_path / "device")

    _arrive(parts[-1:], tmp_path / "last")
    for f in (tmp_path / "last").iterdir():
        shutil.copy(f, arrived / f.name)
    second = arrived / "bundle.02"
    second.write_bytes(second.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="bundle.02 is damaged"):
        bundle.unpack(arrived, tmp_path / "device")
    assert not (tmp_path / "device" / ".unpacked").exists()

    with pytest.raises(SystemExit, match="no manifest.json"):
        bundle.unpack(tmp_path / "nowhere", tmp_path / "device")


def test_pack_refuses_without_the_features_and_says_how_to_make_them(sources, tmp_path):
    bundle = _load()
    data = sources["data/flickr8k/captions.csv"].parent
    with pytest.raises(SystemExit, match="--setting gpu --image-features-only"):
        bundle.bundle_sources("gpu", data, tmp_path / "absent.npy")


def test_manifest_lists_every_part_in_every_part(sources, tmp_path):
    bundle = _load()
    parts = bundle.pack(sources, tmp_path / "bundle", part_bytes=4096)
    manifests = {(p / bundle.MANIFEST).read_text() for p in parts}
    assert len(manifests) == 1
    assert [e["name"] for e in json.loads(manifests.pop())["parts"]] == [f"bundle.{i:02d}" for i in range(1, len(parts) + 1)]
