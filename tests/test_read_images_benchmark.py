"""The image reading benchmark (benchmarks/read_images.py) on a few small photos: it runs each mode
in its own process and writes its table. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "read_images.py"


def test_read_images_reports_each_size_and_mode(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--count", "3", "--sizes", "320x240", "900x600", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["size"], r["mode"], r["images"]) for r in rows] == [
        ("320x240", "encode_paths", 3), ("320x240", "whole", 3), ("900x600", "encode_paths", 3), ("900x600", "whole", 3)]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert "| 900x600 | whole | 3 |" in (tmp_path / "results.md").read_text()
    bad = subprocess.run([*command[:2], "--sizes", "12by3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--sizes are WIDTHxHEIGHT" in bad.stderr
