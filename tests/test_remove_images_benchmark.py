"""The removal benchmark (benchmarks/remove_images.py) on a small grown catalog: it runs, removes
what it says, and reports the weights linked rather than copied. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "remove_images.py"


def test_removing_from_a_grown_catalog_reports_each_size(tiny_default_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--sizes", "300", "50", "--remove", "10",
               "--base", str(tiny_default_model_dir), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["ids"], r["removed"], r["weights_linked"]) for r in rows] == [(50, 10, True), (300, 10, True)]
    assert "| 300 | 10 |" in (tmp_path / "results.md").read_text()
    bad = subprocess.run([*command[:2], "--sizes", "10", "--remove", "10"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "each size must exceed --remove" in bad.stderr
