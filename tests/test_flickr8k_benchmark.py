"""The Flickr8k benchmark's run names: a scheme and '+'-joined levers stand for TrainConfig fields,
and a name it does not know is refused with the list of levers before any work starts. (The
benchmark itself needs the data and minutes per run: it is run by hand, not here.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genret.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "flickr8k.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flickr8k_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_name_stands_for_its_config_fields(bench):
    config = bench.run_config("rq+pq+qp+res2+layers4+noise0.5")
    assert config == {"scheme": "rq", "scheme_options": {"levels": 3, "codebook_size": 64},
                      "pseudo_queries": "neighbors", "query_tokens": 4, "query_residuals": 2, "num_layers": 4,
                      "query_noise": 0.5}
    assert bench.run_config("structured")["scheme_options"] == {"branching": 32}
    assert bench.run_config("rq+qp+qt8")["query_tokens"] == 8  # later levers win
    assert bench.run_config("atomic+ai+fz+da") == {"scheme": "atomic", "id_embeddings": "aligned",
                                                   "freeze_id_rows": True, "describe": True, "ask": True}


@pytest.mark.parametrize("name", ["foo", "rq+bogus", "rq+res", "rq+pq3", "rq+res1.5"])
def test_unknown_names_are_refused_with_the_levers(bench, name):
    with pytest.raises(ValueError) as error:
        bench.run_config(name)
    assert repr(name) in str(error.value)
    if name != "foo":
        assert "resN: " in str(error.value) and "pq: " in str(error.value)


def test_every_default_run_and_lever_makes_a_valid_config(bench):
    for setting in bench.SETTINGS.values():
        for name in bench.DEFAULT_RUNS:
            TrainConfig(**{**setting["config"], **bench.run_config(name)})
        for word, (_, _, value) in bench.LEVERS.items():
            lever = word + ("2" if isinstance(value, type) else "")
            TrainConfig(**{**setting["config"], **bench.run_config(f"rq+qp+ai+{lever}")})


@pytest.mark.parametrize("name, message", [("rq+bogus", "unknown lever 'bogus'"),
                                           ("rq+res2", "set query_tokens > 0")])
def test_the_command_refuses_a_bad_run_before_working(tmp_path, name, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENRET_FLICKR8K": str(tmp_path)}
    (tmp_path / "captions.csv").write_text("image,caption\n")  # past the data check; nothing is read
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--schemes", "rq+pq", name],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
