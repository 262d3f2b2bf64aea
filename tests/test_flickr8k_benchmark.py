"""The Flickr8k benchmark's run names: a scheme and '+'-joined levers stand for TrainConfig fields,
and a name it does not know is refused with the list of levers before any work starts; the
re-ranking weight is chosen on dev queries; the reduced catalog keeps dev and test captions out.
(The benchmark itself needs minutes per run: it is run by hand, not here.) Its first step alone,
the image features a GPU machine without the images needs, runs here where Flickr8k is present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genret.training import TrainConfig
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "flickr8k.py"
FLICKR8K = Path(os.environ.get("GENRET_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))
# a reduced-setting run's meta, for the report tests
CPU_META = {"setting": "cpu", "catalog_images": 300, "train_captions": 1000, "queries": 250, "test_images": 50,
            "dev_queries": 250, "dev_images": 50, "beams": 10, "wide_beams": 50, "machine": "CPU", "command": "x"}


@pytest.fixture(scope="module")
def flickr8k_protocol():
    """The benchmark's settings, run names, catalog and weight choices (benchmarks/flickr8k_protocol.py),
    as the script imports it: loading the script puts benchmarks/ on sys.path for the two modules beside it."""
    load_script(SCRIPT, "flickr8k_benchmark")
    return sys.modules["flickr8k_protocol"]


@pytest.fixture(scope="module")
def flickr8k_report(flickr8k_protocol):
    """Its tables and plot (benchmarks/flickr8k_report.py)."""
    return sys.modules["flickr8k_report"]


def test_a_name_stands_for_its_config_fields(flickr8k_protocol):
    config = flickr8k_protocol.run_config("rq+pq+qp+res2+layers4+noise0.5")
    assert config == {"scheme": "rq", "scheme_options": {"levels": 3, "codebook_size": 64},
                      "pseudo_queries": "neighbors", "query_tokens": 4, "query_residuals": 2, "num_layers": 4,
                      "query_noise": 0.5}
    assert flickr8k_protocol.run_config("structured")["scheme_options"] == {"branching": 32}
    assert flickr8k_protocol.run_config("rq+qp+qt8")["query_tokens"] == 8  # later levers win
    assert flickr8k_protocol.run_config("atomic+ai+fz+da") == {"scheme": "atomic", "id_embeddings": "aligned",
                                                   "freeze_id_rows": True, "describe": True, "ask": True}
    assert flickr8k_protocol.run_config("atomic+bs512+lr0.0006+plr0.002+elr0.006+mep3+ep12") == {  # a GPU schedule, named on the command line
        "scheme": "atomic", "batch_size": 512, "lr": 0.0006, "prefix_lr": 0.002, "embedding_lr": 0.006,
        "memorize_epochs": 3, "retrieve_epochs": 12}


@pytest.mark.parametrize("name", ["foo", "rq+bogus", "rq+res", "rq+pq3", "rq+res1.5"])
def test_unknown_names_are_refused_with_the_levers(flickr8k_protocol, name):
    with pytest.raises(ValueError) as error:
        flickr8k_protocol.run_config(name)
    assert repr(name) in str(error.value)
    if name != "foo":
        assert "resN: " in str(error.value) and "pq: " in str(error.value)


def test_every_default_run_and_lever_makes_a_valid_config(flickr8k_protocol):
    for setting in flickr8k_protocol.SETTINGS.values():
        for name in flickr8k_protocol.DEFAULT_RUNS:
            TrainConfig(**{**setting["config"], **flickr8k_protocol.run_config(name)})
        for word, (_, _, value) in flickr8k_protocol.LEVERS.items():
            lever = word + ("1" if isinstance(value, type) else "")  # 1: valid for every numeric lever (kd is a share)
            TrainConfig(**{**setting["config"], **flickr8k_protocol.run_config(f"rq+pq+qp+ai+da+ad+{lever}")})


@pytest.mark.parametrize("args, message", [
    (["--schemes", "rq+pq", "rq+bogus"], "unknown lever 'bogus'"),
    (["--schemes", "rq+pq", "rq+res2"], "set query_tokens > 0"),
    # --spoken-only measures describe and ask alone, so a run that does not train them is refused
    (["--spoken-only", "--schemes", "atomic+da", "atomic+pq"], "'atomic+pq' does not train describe and ask")])
def test_the_command_refuses_a_bad_run_before_working(tmp_path, args, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENRET_FLICKR8K": str(tmp_path)}
    (tmp_path / "captions.csv").write_text("image,caption\n")  # past the data check; nothing is read
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_measured_spoken_only_is_in_the_describe_table_alone(flickr8k_protocol, flickr8k_report, tmp_path):
    spoken = {"describe_word_f1": 0.9, "yes_no_accuracy": 0.6, "yes_no_word_prior": 0.5}
    recalls = {"R@1": 0.1, "R@5": 0.5, "R@10": 0.8, "seconds_per_query": 0.01}
    results = {"atomic+da": {"test": recalls, **{scope: spoken for scope in flickr8k_protocol.SPOKEN_SCOPES}},
               "atomic+da+dpi3": {scope: spoken for scope in flickr8k_protocol.SPOKEN_SCOPES}}
    flickr8k_report.write_report(tmp_path, results, CPU_META)
    report = (tmp_path / "results.md").read_text()
    assert "| atomic+da | 0.100 |" in report and "| atomic+da+dpi3 | 0.900 | 0.600 | 0.500 |" in report
    assert "| atomic+da+dpi3 | 0.100" not in report and (tmp_path / "recall.png").exists()


def test_the_rerank_weights_are_the_pair_best_on_the_dev_queries(flickr8k_protocol, flickr8k_report):
    def recalls(r10, r5=0.5):
        return {"R@1": 0.1, "R@5": r5, "R@10": r10}

    result = {"dev_wide": {"reranked_by_weight": {"0,0": recalls(0.6), "5,0": recalls(0.8), "10,0": recalls(0.8),
                                                  "50,0": recalls(0.8, r5=0.6), "50,100": recalls(0.8, r5=0.6)}},
              "test_wide": {"reranked_by_weight": {"0,0": recalls(0.9), "5,0": recalls(0.1), "10,0": recalls(0.2),
                                                   "50,0": recalls(0.3), "50,100": recalls(0.4)}}}
    result["catalog_wide"] = {"reranked_by_weight": {"0,0": recalls(0.4), "5,0": recalls(0.5), "0,20": recalls(0.6)}}
    result["dev_catalog_wide"] = {"reranked_by_weight": {"0,0": recalls(0.3), "5,0": recalls(0.2), "0,20": recalls(0.5)}}
    flickr8k_protocol.at_dev_weight(result)
    # not the test's own best; of two pairs equal on dev, the smaller weights
    assert result["test_wide"]["reranked_dev"] == {"weight": 50.0, "hubness_weight": 0.0, **recalls(0.3)}
    # chosen on its own dev search
    assert result["catalog_wide"]["reranked_dev"] == {"weight": 0.0, "hubness_weight": 20.0, **recalls(0.6)}
    assert flickr8k_protocol.at_dev_weight({"test_wide": {"R@10": 0.5}}) == {"test_wide": {"R@10": 0.5}}  # no dev scope
    row = flickr8k_report.over_seeds([result, result])
    assert row["dev_weights"] == {"test_wide": [[50.0, 0.0]] * 2, "catalog_wide": [[0.0, 20.0]] * 2}
    assert flickr8k_report._dev_weights(row, "catalog_wide") == "0, 20 / 0, 20"


def test_the_beam_hubness_weight_is_the_one_best_on_the_dev_queries_and_reported(
        flickr8k_protocol, flickr8k_report, tmp_path):
    def recalls(r10, r5=0.5, h=0.0):
        return {"R@1": 0.1, "R@5": r5, "R@10": r10, "beam_hubness_weight": h, "seconds_per_query": 0.01}

    dev = {"by_weight": {"0": recalls(0.5), "5": recalls(0.7), "10": recalls(0.7), "20": recalls(0.7, r5=0.6)}}
    assert flickr8k_protocol.best_beam_hubness_weight(dev) == 20.0  # R@10 ties, then R@5
    dev["by_weight"]["20"] = recalls(0.7)
    assert flickr8k_protocol.best_beam_hubness_weight(dev) == 5.0  # a full tie: the smaller weight
    run = {"test": recalls(0.8), "catalog": recalls(0.4), "test_prior": recalls(0.85, h=5.0),
           "catalog_prior": recalls(0.6, h=20.0), "dev_prior": dev, "dev_catalog_prior": dev,
           "catalog_wide_prior": {**recalls(0.6), "reranked_by_weight": {"0,0": recalls(0.6), "1000,1000": recalls(0.8)}},
           "dev_catalog_wide_prior": {**recalls(0.6), "reranked_by_weight": {"0,0": recalls(0.5), "1000,1000": recalls(0.7)}}}
    flickr8k_protocol.at_dev_weight(run)  # the wide beam searched with the prior is re-ranked at its own dev pair
    assert run["catalog_wide_prior"]["reranked_dev"] == {"weight": 1000.0, "hubness_weight": 1000.0, **recalls(0.8)}
    row = flickr8k_report.over_seeds([run, {**run, "catalog_prior": recalls(0.5, h=40.0)}])
    assert row["beam_hubness_weights"] == {"test_prior": [5.0, 5.0], "catalog_prior": [20.0, 40.0]}
    assert row["catalog_prior"]["R@10"] == pytest.approx(0.55)
    flickr8k_report.write_report(tmp_path, {"dense": {"test": recalls(0.9), "catalog": recalls(0.5)}, "atomic": row}, CPU_META)
    report = (tmp_path / "results.md").read_text()
    assert "| atomic (2 seeds) | 0.100 ± 0.000 | 0.500 ± 0.000 | 0.850 ± 0.000 | 0.100 ± 0.000 | 0.500 ± 0.000 | " \
           "0.550 ± 0.050 |  | 0.100 ± 0.000 / 0.500 ± 0.000 / 0.800 ± 0.000 | 5 / 5; 20 / 40 | 1000, 1000 / 1000, 1000 |" \
           in report
    assert report.count("| dense |") == 1  # the dense rows have no prior table row


def test_the_spoken_table_adds_the_questions_a_models_own_description_answers_and_how_often_it_said_yes(
        flickr8k_protocol, flickr8k_report, tmp_path):
    spoken = {"describe_word_f1": 0.9, "yes_no_accuracy": 0.6, "yes_no_word_prior": 0.5}
    recalls = {"R@1": 0.1, "R@5": 0.5, "R@10": 0.8, "seconds_per_query": 0.01}
    reader = {scope: {**spoken, "yes_no_stated_accuracy": 0.95, "yes_share": 0.45, "yes_no_auc": 0.7,
                      "yes_no_by_description": 0.55} for scope in flickr8k_protocol.SPOKEN_SCOPES}
    results = {"atomic": {"test": recalls, **{scope: spoken for scope in flickr8k_protocol.SPOKEN_SCOPES}},
               "atomic+ad": {"test": recalls, **reader}}
    flickr8k_report.write_report(tmp_path, results, CPU_META)
    report = (tmp_path / "results.md").read_text()
    assert "| atomic | 0.900 | 0.600 | 0.500 | 0.900 | 0.600 | 0.500 |" in report
    details = "(0.950 stated, 0.450 yes, 0.700 AUC, 0.550 by description)"
    assert f"| atomic+ad | 0.900 | 0.600 {details} | 0.500 | 0.900 | 0.600 {details} | 0.500 |" in report
    assert "the questions that description answers" in report and "answered yes" in report
    assert "ROC AUC" in report
    # a seed whose questions were all of one kind has no AUC: no mean of it is reported, and the rest are
    runs = [{**reader, "seed": 0}, {**reader, "seed": 1}]
    scope = flickr8k_protocol.SPOKEN_SCOPES[0]
    runs[1][scope] = {**reader[scope], "yes_no_auc": None, "yes_no_accuracy": 0.8}
    row = flickr8k_report.over_seeds(runs)
    assert row[scope]["yes_no_accuracy"] == pytest.approx(0.7) and "yes_no_auc" not in row[scope]


@pytest.mark.skipif(not (FLICKR8K / "captions.csv").exists(), reason="Flickr8k is not present")
def test_dev_and_test_images_are_memorized_but_never_trained_on_with_their_captions(flickr8k_protocol):
    protocol = flickr8k_protocol.build_catalog(FLICKR8K, flickr8k_protocol.SETTINGS["cpu"])
    catalog, test, dev = protocol.catalog, set(protocol.test_keys), set(protocol.dev_keys)
    assert len(catalog) == 300 and len(test) == len(dev) == 50 and not test & dev
    assert test | dev <= set(catalog.keys())
    assert all(not catalog[k].captions for k in test | dev)
    assert sum(bool(catalog[k].captions) for k in catalog.keys()) == 200
    assert {k for _, k in protocol.queries} == test and len(protocol.queries) == 250
    assert {k for _, k in protocol.dev_queries} == dev and len(protocol.dev_queries) == 250


@pytest.mark.skipif(not (FLICKR8K / "captions.csv").exists(), reason="Flickr8k is not present")
def test_captioned_queries_are_held_out_captions_of_train_images_and_change_nothing_else(flickr8k_protocol):
    plain = flickr8k_protocol.build_catalog(FLICKR8K, flickr8k_protocol.SETTINGS["cpu"])
    protocol = flickr8k_protocol.build_catalog(FLICKR8K, flickr8k_protocol.SETTINGS["cpu"], captioned_queries=True)
    assert (protocol.queries, protocol.test_keys, protocol.dev_queries, protocol.dev_keys) == \
        (plain.queries, plain.test_keys, plain.dev_queries, plain.dev_keys)
    assert not plain.captioned_queries and not plain.dev_captioned_queries
    reported, dev = ({k for _, k in qs} for qs in (protocol.captioned_queries, protocol.dev_captioned_queries))
    assert len(reported) == len(protocol.captioned_queries) == 50 and len(dev) == len(protocol.dev_captioned_queries) == 50
    assert not reported & dev and not (reported | dev) & (set(plain.test_keys) | set(plain.dev_keys))
    for caption, key in protocol.captioned_queries + protocol.dev_captioned_queries:
        before, after = plain.catalog[key].captions, protocol.catalog[key].captions
        assert caption in before and caption not in after and len(after) == len(before) - 1
    untouched = [k for k in plain.catalog.keys() if k not in reported | dev]
    assert all(protocol.catalog[k] == plain.catalog[k] for k in untouched)


def test_fair_weights_are_best_on_the_mean_of_both_kinds_of_dev_queries(flickr8k_protocol):
    def recalls(r10):
        return {"R@1": 0.1, "R@5": 0.5, "R@10": r10}

    uncaptioned = {"by_weight": {"0": recalls(0.4), "10": recalls(0.5), "40": recalls(0.6)}}
    captioned = {"by_weight": {"0": recalls(0.9), "10": recalls(0.88), "40": recalls(0.6)}}
    assert flickr8k_protocol.best_beam_hubness_weight(uncaptioned) == 40.0
    assert flickr8k_protocol.best_beam_hubness_weight(uncaptioned, captioned) == 10.0  # mean 0.69, against 0.65 and 0.6
    result = {"dev_catalog_wide": {"reranked_by_weight": {"0,0": recalls(0.3), "0,20": recalls(0.5)}},
              "dev_catalog_captioned_wide": {"reranked_by_weight": {"0,0": recalls(0.9), "0,20": recalls(0.5)}},
              "catalog_wide": {"reranked_by_weight": {"0,0": recalls(0.35), "0,20": recalls(0.55)}},
              "catalog_captioned_wide": {"reranked_by_weight": {"0,0": recalls(0.8), "0,20": recalls(0.4)}}}
    flickr8k_protocol.at_dev_weight(result)
    # as before: the uncaptioned dev queries alone choose, for both kinds of reported queries ...
    assert result["catalog_wide"]["reranked_dev"]["hubness_weight"] == 20.0
    assert result["catalog_captioned_wide"]["reranked_dev"] == {"weight": 0.0, "hubness_weight": 20.0, **recalls(0.4)}
    # ... and fairly: the mean of both kinds of dev queries (0.6 at 0,0 against 0.5)
    assert result["catalog_wide"]["reranked_fair"] == {"weight": 0.0, "hubness_weight": 0.0, **recalls(0.35)}
    assert result["catalog_captioned_wide"]["reranked_fair"] == {"weight": 0.0, "hubness_weight": 0.0, **recalls(0.8)}
    assert "reranked_fair" not in result["dev_catalog_wide"]  # a choice on two dev scopes is recorded where it is used


def test_the_captioned_table_reports_both_kinds_of_queries_at_each_choice(flickr8k_report, tmp_path):
    def recalls(r10, **extra):
        return {"R@1": 0.1, "R@5": 0.5, "R@10": r10, "seconds_per_query": 0.01, **extra}

    def searched(r10, h=0.0):
        return recalls(r10, beams=10, beam_hubness_weight=h)

    run = {"test": searched(0.8), "catalog": searched(0.4), "catalog_captioned": searched(0.9),
           "catalog_prior": searched(0.6, h=40.0), "catalog_captioned_prior": searched(0.7, h=40.0),
           "catalog_prior_fair": searched(0.5, h=10.0), "catalog_captioned_prior_fair": searched(0.86, h=10.0),
           "test_prior": searched(0.8)}
    dense = {"test": recalls(0.9), "catalog": recalls(0.5), "catalog_captioned": recalls(0.95)}
    corrected = {"test": recalls(0.9, hubness_beta=0.5), "catalog": recalls(0.6, hubness_beta=1.0),
                 "catalog_captioned": recalls(0.8, hubness_beta=1.0), "catalog_fair": recalls(0.55, hubness_beta=0.25),
                 "catalog_captioned_fair": recalls(0.93, hubness_beta=0.25)}
    meta = {**CPU_META, "captioned_queries": 50, "dev_captioned_queries": 50}
    flickr8k_report.write_report(tmp_path, {"dense": dense, "dense, corrected": corrected, "atomic": run}, meta)
    report = (tmp_path / "results.md").read_text()
    assert "one held-out caption of each of 50 train images" in report
    assert "| dense | similarity |  |  | 0.100 | 0.500 | 0.500 | 0.100 | 0.500 | 0.950 | 0.725 |" in report
    assert "| dense, corrected | similarity - β × hubness | dev, fair | 0.25 | 0.100 | 0.500 | 0.550 | 0.100 | 0.500 | " \
           "0.930 | 0.740 |" in report
    assert "| atomic | beam 10 |  |  | 0.100 | 0.500 | 0.400 | 0.100 | 0.500 | 0.900 | 0.650 |" in report
    assert "| atomic | beam 10, prior h | dev | 40 | 0.100 | 0.500 | 0.600 | 0.100 | 0.500 | 0.700 | 0.650 |" in report
    assert "| atomic | beam 10, prior h | dev, fair | 10 | 0.100 | 0.500 | 0.500 | 0.100 | 0.500 | 0.860 | 0.680 |" in report


def test_a_folder_made_without_captioned_queries_is_not_resumed_with_them(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENRET_FLICKR8K": str(tmp_path)}
    (tmp_path / "captions.csv").write_text("image,caption\n")  # past the data check; nothing is read
    (tmp_path / "out" / "runs").mkdir(parents=True)  # runs from before protocol.json: the plain protocol
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--captioned-queries",
                           "--schemes", "atomic"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "made without --captioned-queries: give this protocol its own --out" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not (FLICKR8K / "captions.csv").exists(), reason="Flickr8k is not present")
def test_image_features_only_writes_the_features_a_gpu_machine_needs_and_stops(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENRET_FLICKR8K": str(FLICKR8K)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--setting", "cpu", "--out", str(tmp_path), "--image-features-only"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "shared" / "prepared" / "image_features.npy").shape == (300, 1280)
    assert sorted(p.name for p in (tmp_path / "shared" / "prepared").iterdir()) == ["image_features.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no baseline, no runs, no report
