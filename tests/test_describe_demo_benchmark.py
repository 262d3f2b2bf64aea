"""The demo describe benchmark (benchmarks/describe_demo.py) at a few epochs: it trains, measures,
reports, and reuses what it measured. No quality is asserted at this size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "describe_demo.py"
QUICK = ["--set", "memorize_epochs=1", "--set", "retrieve_epochs=2", "--set", "align_epochs=3"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_describe_demo_trains_measures_and_reuses(tmp_path):
    args = ["--presets", "tiny", "--per-image", "2", "--seeds", "0", *QUICK, "--out", str(tmp_path)]
    done = run(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((tmp_path / "results.json").read_text())["results"]
    assert (row["preset"], row["describe_per_image"], row["seed"], row["images"]) == ("tiny", 2, 0, 18)
    assert all(0.0 <= row[m] <= 1.0 for m in ("describe_exact", "describe_word_f1", "yes_no_accuracy", "R@1"))
    manifest = json.loads((tmp_path / "models" / "tiny-dpi2-seed0" / "manifest.json").read_text())
    assert (manifest["train_config"]["describe_per_image"], manifest["train_config"]["retrieve_epochs"]) == (2, 2)
    report = (tmp_path / "results.md").read_text()
    assert "| tiny | 2 | 0 |" in report and f"Measured at commit {row['commit']}." in report
    assert row["config"] == manifest["train_config"]
    again = run(*args)  # measured already: reported again without training
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[0]) == row
    other = run(*args[:-2], "--set", "memorize_epochs=2", "--out", str(tmp_path))
    assert other.returncode == 2 and "choose another --out" in other.stderr
    assert "another training config (memorize_epochs=1 (now 2))" in other.stderr
    bad = run("--presets", "huge", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "unknown preset(s) huge" in bad.stderr


def test_the_report_adds_the_questions_a_readers_own_description_answers(monkeypatch):
    from .conftest import load_script

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports vllm_search beside it, as when run
    bench = load_script(SCRIPT, "describe_demo_benchmark")
    row = {"preset": "cpu", "describe_per_image": 3, "seed": 0, "describe_exact": 0.5, "images": 18,
           "describe_word_f1": 0.9, "yes_no_accuracy": 0.6, "yes_share": 0.4, "yes_no_word_prior": 0.5,
           "questions": 108, "R@1": 1.0, "train_seconds": 100.0, "commit": "abc"}
    reader = {**row, "seed": 1, "yes_no_stated_accuracy": 0.95, "questions_stated": 66, "yes_no_auc": 0.7,
              "yes_no_by_description": 0.65}
    lines = bench.report([row, reader]).splitlines()
    assert "| cpu | 3 | 0 | 9/18 | 0.900 | 0.600 | 0.400 | 0.500 |  |  |  | 1.000 | 100 |" in lines  # no AUC: older row
    assert "| cpu | 3 | 1 | 9/18 | 0.900 | 0.600 | 0.400 | 0.500 | 0.700 | 0.650 | 0.950 (66/108) | 1.000 | 100 |" in lines
