"""The scale benchmark (benchmarks/scale.py) in its quick setting: it runs end to end, writes its
report, resumes from its per-size files, and the generative search never leaves the catalog.

It runs as a subprocess: the benchmark pins torch's thread count, which must not leak into the
rest of the test session. No timing is asserted (this machine may be busy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script

pytest.importorskip("faiss")  # faiss-cpu: the `load` extra, installed by scripts/setup

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"


def _load_scale():
    return load_script(SCRIPT, "scale_benchmark")


def _run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_every_method_and_size(quick_run):
    out, proc = quick_run
    scale = _load_scale()
    for name in ("results.json", "results.md", "scale.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    sizes = data["meta"]["sizes"]
    assert sizes == scale.QUICK["sizes"]
    assert set(data["results"]) == set(scale.METHODS)
    table = (out / "results.md").read_text()
    assert table in proc.stdout  # the table is printed too
    for slug, label in scale.METHODS.items():
        assert label in table
        for n in sizes:
            r = data["results"][slug][str(n)]
            assert (out / "sizes" / str(n) / f"{slug}.json").exists()
            assert r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["qps"] > 0 and r["bytes_per_item"] > 0
            assert f"| {label} | {scale.fmt_n(n)} |" in table
    lo, hi = scale.fmt_n(min(sizes)), scale.fmt_n(max(sizes))
    assert f"p50({hi})/p50({lo})" in table


def test_generative_search_stays_inside_the_catalog(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    for slug in ("gen-structured", "gen-rq", "gen-atomic"):
        for n, r in data["results"][slug].items():
            assert r["checked_beams"] > 0 and r["hits_checked"] > 0, (slug, n)
            assert r["beams_outside_catalog"] == 0, (slug, n)
            assert r["hits_outside_catalog"] == 0, (slug, n)
            assert r["hits_per_query_min"] == min(10, int(n)), (slug, n)
            assert r["decode_steps_max"] == r["id_tokens_max"] + 1
            assert int(r["sample_hit"][3:]) < int(n)  # keys are img0000000 .. img{n-1}
            prior = r["prior"]  # the same searches, timed with a hubness prior
            assert prior["p50_ms"] > 0 and prior["qps"] > 0 and prior["bytes"] > 0 and prior["build_s"] >= 0
    assert data["results"]["gen-atomic"][str(n)]["id_tokens_max"] == 1
    assert "## The hubness prior's cost" in (out / "results.md").read_text()


def test_exact_dense_methods_agree(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    for n, r in data["results"]["faiss-flat"].items():
        assert r["recall@10_vs_exact"] == pytest.approx(1.0), n


def test_rerun_resumes_from_the_per_size_files(quick_run):
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())["results"]
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1K]" not in proc.stdout  # nothing measured again
    assert json.loads((out / "results.json").read_text())["results"] == before


def test_synthetic_catalogs_nest_and_ids_are_unique():
    scale = _load_scale()
    small, large = scale.catalog_vectors(500), scale.catalog_vectors(1200)
    assert np.array_equal(small, large[:500])
    assert np.allclose(np.linalg.norm(large, axis=1), 1.0, atol=1e-5)
    keys = scale.catalog_keys(300)
    for method in ("gen-structured", "gen-rq", "gen-atomic"):
        assignment = scale.assign_ids(method, keys, scale.catalog_vectors(300))
        sequences = scale.tokenize_ids(assignment, 512)
        assert len({tuple(s) for s in sequences.values()}) == len(keys)
        assert all(t >= 512 for s in sequences.values() for t in s)
