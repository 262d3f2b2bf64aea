"""The training-throughput benchmark runs the trainer's own step end to end and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_times_every_variant(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--vocab", "600", "--batches", "4", "8",
                           "--steps", "2", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["batch"], r["loss read every"]) for r in rows] == [(4, 1), (4, 20), (8, 1), (8, 20)]
    assert all(r["tokens/s"] > 0 and 0 <= r["padding share"] < 1 for r in rows)
    assert "| batch | optimizer |" in (tmp_path / "results.md").read_text()
