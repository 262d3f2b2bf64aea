"""The vLLM search benchmark (benchmarks/vllm_search.py) on a small grown catalog: 300 atomic ids,
so the trie's root is wider than anything a request could once list (128 tokens). The service's
vLLM engine must rank every query as the transformers engine does, with and without a hubness
prior, within some ids and leaving some out, in one request per beam and step.

It runs as a subprocess (vLLM spawns its engine process). No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "vllm_search.py"
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_grown_atomic_catalog_searches_as_in_transformers_one_request_per_beam_step(tiny_default_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--sizes", "300", "--queries", "4", "--in-flight", "4", "--within", "50",
               "--exclude", "200", "--base", str(tiny_default_model_dir), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())["results"]["300"]
    for name in ("plain", "prior"):
        assert result["agreement"][name]["same_ranked_keys"] == result["agreement"][name]["queries"] == 4
        assert result["agreement"][name]["max_score_difference"] < 1e-3
        # the root (300 ids) in one request, then each of the 10 beams' end token in one
        assert result[name]["requests_per_search"] == 11
    # within 50 of them: as many requests, each naming the tokens allowed, and the same ranking
    assert result["within"]["ids"] == 50 and result["within"]["requests_per_search"] == 11
    assert result["agreement"]["within"]["same_ranked_keys"] == result["agreement"]["within"]["queries"] == 4
    # the next page, each query's first 10 hits and more ids left out (200 asked, at most half the catalog
    # hidden, some of them on a first page): the same, the root forbidding them
    assert result["next page"]["ids_hidden"] == 150 and 150 <= result["next page"]["ids_left_out"] <= 160
    assert result["next page"]["requests_per_search"] == 11
    assert result["agreement"]["next page"]["same_ranked_keys"] == result["agreement"]["next page"]["queries"] == 4
    assert "| 300 |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "models" / "300" / "manifest.json").read_text())["catalog_size"] == 300
