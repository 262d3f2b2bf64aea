"""benchmarks/add_images.py's bookkeeping, without training: the report of both kinds of query
and the refusal to mix protocols in one folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "add_images.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "add_images_benchmark")


def test_the_report_shows_queries_for_trained_images_beside_the_added_ones(bench):
    def recalls(r10):
        return {"R@1": 0.1, "R@5": 0.5, "R@10": r10}

    def run(captioned_r10: float) -> dict:
        result = {f"{scope}@{h:g}": recalls(0.5) for scope in ("test", "catalog") for h in bench.BEAM_HUBNESS_WEIGHTS}
        result.update({f"captioned@{h:g}": recalls(captioned_r10 - h / 1000) for h in bench.BEAM_HUBNESS_WEIGHTS})
        result["describe_test_images"] = {"describe_word_f1": 0.2, "yes_no_accuracy": 0.6}
        return result

    added = run(0.9)
    for h in bench.BONUS_HUBNESS_WEIGHTS:
        for b in bench.BONUSES:
            added[f"catalog@{h:g}+bonus{b:g}"] = recalls(0.5 + b / 10)
            added[f"captioned@{h:g}+bonus{b:g}"] = recalls(0.9 - b / 10)
    for scope, weights, r in (("held_out_plain", (0.0, 0.0), 0.4), ("held_out_by_R@10", (0.0, 3.0), 0.45),
                              ("held_out_by_R@1", (0.0, 1.0), 0.42)):
        added[scope] = {"beam_hubness_weight": weights[0], "added_bonus": weights[1],
                        **{metric: r + (0.1 if metric.startswith("captioned") else 0) for metric in bench.HELD_OUT_METRICS}}
        added[f"choose@{weights[0]:g}+bonus{weights[1]:g}"] = {"R@10": 0.0}  # the choice's own searches: not reported
    results = {"trained-in": bench.over_seeds([run(0.95)]), "added": bench.over_seeds([added])}
    meta = {"setting": "cpu", "catalog": 300, "added": 50, "queries": 250, "beams": 10, "seeds": 1,
            "add_seconds": 4.0, "command": "x", "commit": "abc", "captioned_queries": 50,
            "held_out_weights": {"R@10": [(0.0, 3.0)], "R@1": [(0.0, 1.0)]}}
    report = bench.report(results, meta)
    assert "one held-out caption of each of 50 train images" in report
    assert "| test images trained in (pseudo-queries) | 0.100 / 0.950 | 0.100 / 0.930 | 0.100 / 0.910 | " \
           "0.100 / 0.870 |" in report
    # the added model's captioned R@10 at b = 6 with h = 0: 0.9 - 0.6, beside the test queries' 0.5 + 0.6
    assert "| 0 | 0.900 (mean 0.700) | 0.800 (mean 0.700) |" in report and "0.300 (mean 0.700) |" in report
    # weights chosen on held-out queries of both kinds, and what they give on the others
    assert "Chosen per seed: By R@10: h = 0, b = 3. By R@1: h = 0, b = 1." in report and "choose@" not in report
    assert "| no prior | 0.400 / 0.400 | 0.500 / 0.500 | 0.400 / 0.400 |" in report
    assert "| at the h, b chosen by R@10 | 0.450 / 0.450 | 0.550 / 0.550 | 0.450 / 0.450 |" in report
    assert "| at the h, b chosen by R@1 | 0.420 / 0.420 | 0.520 / 0.520 | 0.420 / 0.420 |" in report


def test_a_folder_of_the_plain_protocol_is_not_resumed_with_captioned_queries(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.csv").write_text("image,caption\n")  # past the data check; nothing is read
    (tmp_path / "out" / "seed0").mkdir(parents=True)  # models from before protocol.json: the plain protocol
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--out", str(tmp_path / "out"),
                           "--captioned-queries"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "trained without --captioned-queries: give this protocol its own --out" in done.stderr
    assert "Traceback" not in done.stderr
