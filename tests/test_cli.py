"""The CLI's user errors end in one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from genret.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_on_a_missing_captions_file_names_the_file(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    code, _, err = run(capsys, "train", "--images", str(tmp_path / "images"), "--captions",
                       str(tmp_path / "nope.csv"), "--name", "x")
    assert code == 2 and "nope.csv" in err and "Traceback" not in err


def test_train_on_a_catalog_with_an_empty_caption_names_the_row(capsys, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a black square\na.jpg,   \n")
    code, _, err = run(capsys, "train", "--images", str(tmp_path / "images"), "--captions",
                       str(tmp_path / "captions.csv"), "--name", "x", "--run-dir", str(tmp_path / "run"),
                       "--out", str(tmp_path / "model"))
    assert code == 2 and "captions.csv" in err and "row 3" in err
    assert not (tmp_path / "model").exists()


def test_bad_training_option_is_reported(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--images", str(tmp_path), "--captions", str(tmp_path / "c.csv"),
                       "--name", "x", "--set", "batch_size=many")
    assert code == 2 and "batch_size" in err
    code, _, err = run(capsys, "train", "--images", str(tmp_path), "--captions", str(tmp_path / "c.csv"),
                       "--name", "x", "--set", "query_tokens=0", "--set", "query_residuals=2")
    assert code == 2 and "query_residuals" in err and "query_tokens > 0" in err and "()" not in err
    # a misspelt option trained the default config without a word
    code, _, err = run(capsys, "train", "--images", str(tmp_path), "--captions", str(tmp_path / "c.csv"),
                       "--name", "x", "--set", "retreive_epochs=2")
    assert code == 2 and "unknown training option 'retreive_epochs' (did you mean retrieve_epochs" in err
    # a device this machine lacks is named before --fresh clears the run it would have resumed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"an earlier run")
    code, _, err = run(capsys, "train", "--images", str(tmp_path), "--captions", str(tmp_path / "c.csv"),
                       "--name", "x", "--set", "device=banana", "--run-dir", str(tmp_path / "run"), "--fresh")
    assert code == 2 and "device 'banana' is not usable on this machine" in err
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_unknown_model_and_unknown_image(capsys, tiny_model_dir):
    code, _, err = run(capsys, "search", "no-such-model", "a dog")
    assert code == 2 and "no-such-model" in err
    code, _, err = run(capsys, "search", str(tiny_model_dir), "a dog", "--device", "banana")  # torch's own error
    assert code == 2 and "device 'banana' is not usable on this machine" in err
    code, _, err = run(capsys, "describe", str(tiny_model_dir), "not-an-image.jpg")
    assert code == 2 and "not-an-image.jpg" in err


def test_search_prints_ranked_catalog_images(capsys, tiny_model_dir, tiny_catalog):
    code, out, _ = run(capsys, "search", str(tiny_model_dir), "a rocket on a launch pad", "-k", "3")
    assert code == 0
    keys = [line.split()[1] for line in out.strip().splitlines()]
    assert len(keys) == 3 and set(keys) <= set(tiny_catalog.keys())


def test_options_may_come_between_the_model_and_the_rest(capsys, tiny_model_dir):
    """`genret search MODEL -k 3 QUERY` once failed with "unrecognized arguments: QUERY"."""
    model = str(tiny_model_dir)
    _, after, _ = run(capsys, "search", model, "a rocket on a launch pad", "a clock", "-k", "2", "--json")
    code, between, _ = run(capsys, "search", model, "-k", "2", "a rocket on a launch pad", "--json", "a clock")
    assert code == 0 and between == after and len(between.splitlines()) == 2
    _, after, _ = run(capsys, "ask", model, "rocket.jpg", "What is in this image?", "--json")
    code, between, _ = run(capsys, "ask", model, "--json", "rocket.jpg", "What is in this image?")
    assert code == 0 and between == after and json.loads(between)["image_id"] == "rocket.jpg"
    _, after, _ = run(capsys, "describe", model, "rocket.jpg", "moon.jpg")
    code, between, _ = run(capsys, "describe", model, "rocket.jpg", "--device", "cpu", "moon.jpg")
    assert code == 0 and between == after


def test_search_takes_many_queries_from_argv_a_file_or_stdin_and_prints_json_lines(
        capsys, monkeypatch, tiny_model_dir, tiny_catalog, tmp_path):
    import io

    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel

    queries = [f"{img.captions[1]}" for img in tiny_catalog][:3] + ["a rocket on a launch pad"] * 15  # two batches
    stored = StoredModel.open(tiny_model_dir)
    expected = TransformersEngine(stored, device="cpu").search(queries, k=2)
    (tmp_path / "q.txt").write_text("\n".join(queries[1:]) + "\n\n")
    code, out, _ = run(capsys, "search", str(tiny_model_dir), queries[0], "--queries", str(tmp_path / "q.txt"),
                       "-k", "2", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [line["query"] for line in lines] == queries
    assert [[r["image_id"] for r in line["results"]] for line in lines] == [[h.key for h in row] for row in expected]
    assert lines[0]["results"][0]["id"] == stored.identifiers.ids[expected[0][0].key]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(queries[:2]) + "\n"))
    code, out, _ = run(capsys, "search", str(tiny_model_dir), "--queries", "-", "-k", "2")
    blocks = out.strip().split("\n\n")
    assert code == 0 and [b.splitlines()[0] for b in blocks] == [f"# {q}" for q in queries[:2]]
    assert [[line.split()[1] for line in b.splitlines()[1:]] for b in blocks] == \
        [[h.key for h in row] for row in expected[:2]]
    code, _, err = run(capsys, "search", str(tiny_model_dir))
    assert code == 2 and "give a query, or --queries FILE" in err
    code, _, err = run(capsys, "search", str(tiny_model_dir), "--queries", str(tmp_path / "nope.txt"))
    assert code == 2 and "nope.txt: no such queries file" in err


def test_search_within_a_file_of_image_keys(capsys, monkeypatch, tiny_model_dir, tiny_catalog, tmp_path):
    import io

    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel

    within = tiny_catalog.keys()[2:6]
    queries = ["a rocket on a launch pad", tiny_catalog[within[1]].captions[0]]
    expected = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu").search(queries, k=3, within=within)
    (tmp_path / "album.txt").write_text("\n".join(within) + "\n")
    code, out, _ = run(capsys, "search", str(tiny_model_dir), *queries, "-k", "3", "--json",
                       "--within", str(tmp_path / "album.txt"))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [[r["image_id"] for r in line["results"]] for line in lines] == \
        [[h.key for h in row] for row in expected]
    assert all(r["image_id"] in within for line in lines for r in line["results"])
    monkeypatch.setattr("sys.stdin", io.StringIO(within[0] + "\n"))
    code, out, _ = run(capsys, "search", str(tiny_model_dir), queries[0], "--within", "-")
    assert code == 0 and [line.split()[1] for line in out.splitlines()] == [within[0]]
    (tmp_path / "typo.txt").write_text(f"{within[0]}\nmoon.jpeg\n")
    code, _, err = run(capsys, "search", str(tiny_model_dir), queries[0], "--within", str(tmp_path / "typo.txt"))
    assert code == 2 and "1 of 2 image keys are not in model" in err and "moon.jpeg" in err
    (tmp_path / "empty.txt").write_text("\n")
    code, _, err = run(capsys, "search", str(tiny_model_dir), queries[0], "--within", str(tmp_path / "empty.txt"))
    assert code == 2 and "empty.txt: no image keys to search within" in err
    code, _, err = run(capsys, "search", str(tiny_model_dir), "--queries", "-", "--within", "-")
    assert code == 2 and "can read stdin" in err


def test_search_leaves_out_a_file_of_image_keys(capsys, monkeypatch, tiny_model_dir, tiny_catalog, tmp_path):
    import io

    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel

    engine = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu")
    query, keys = "a rocket on a launch pad", tiny_catalog.keys()
    seen = [h.key for h in engine.search([query], k=3)[0]]
    (tmp_path / "seen.txt").write_text("\n".join(seen) + "\nremoved-since.jpg\n")
    code, out, _ = run(capsys, "search", str(tiny_model_dir), query, "-k", "3", "--json",
                       "--exclude", str(tmp_path / "seen.txt"))
    [line] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["image_id"] for r in line["results"]] == \
        [h.key for h in engine.search([query], k=3, exclude=seen)[0]]
    assert not {r["image_id"] for r in line["results"]} & set(seen)
    others = [key for key in keys if key not in seen][:2]
    (tmp_path / "album.txt").write_text("\n".join(seen[:2] + others) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(seen) + "\n"))
    code, out, _ = run(capsys, "search", str(tiny_model_dir), query, "-k", "5", "--within", str(tmp_path / "album.txt"),
                       "--exclude", "-")
    assert code == 0 and {line.split()[1] for line in out.splitlines()} == set(others)
    (tmp_path / "all.txt").write_text("\n".join(keys) + "\n")
    code, _, err = run(capsys, "search", str(tiny_model_dir), query, "--exclude", str(tmp_path / "all.txt"))
    assert code == 2 and f"exclude leaves out all {len(keys)} images" in err
    code, _, err = run(capsys, "search", str(tiny_model_dir), query, "--within", "-", "--exclude", "-")
    assert code == 2 and "only one of --queries, --within and --exclude can read stdin" in err


def test_describe_takes_many_images_or_all_of_them(capsys, tiny_model_dir, tiny_catalog, tmp_path):
    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel

    engine = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu")
    keys = tiny_catalog.keys()
    expected = dict(zip(keys, engine.describe_many(keys)))
    assert expected[keys[0]] == engine.describe(keys[0])  # alone or in a batch, the same description
    code, out, _ = run(capsys, "describe", str(tiny_model_dir), keys[0])
    assert code == 0 and out == expected[keys[0]] + "\n"
    (tmp_path / "keys.txt").write_text(f"{keys[2]}\n{keys[1]}\n")
    code, out, _ = run(capsys, "describe", str(tiny_model_dir), keys[1], "--keys-file", str(tmp_path / "keys.txt"))
    assert code == 0 and out.splitlines() == [f"{k}\t{expected[k]}" for k in (keys[1], keys[2])]
    code, out, _ = run(capsys, "describe", str(tiny_model_dir), "--all", "--json")
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == \
        [{"image_id": k, "description": expected[k]} for k in keys]
    code, out, err = run(capsys, "describe", str(tiny_model_dir), keys[0], "not-an-image.jpg")
    assert code == 2 and "not-an-image.jpg" in err and out == ""  # checked before any is described
    code, _, err = run(capsys, "describe", str(tiny_model_dir))
    assert code == 2 and "keys, --keys-file, or --all" in err


def test_ask_prints_the_answer_and_for_yes_or_no_how_far_the_model_leaned(capsys, tiny_model_dir):
    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel
    from genret.training import presence_question

    engine = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu")
    for question in ("What is in this image?", presence_question("rocket"), presence_question("cat")):
        answer = engine.answer("rocket.jpg", question)
        code, out, _ = run(capsys, "ask", str(tiny_model_dir), "rocket.jpg", question)
        expected = answer.text if not answer.is_yes_or_no else f"{answer.text} (P(yes) {answer.yes_probability:.2f})"
        assert code == 0 and out == expected + "\n", question


def test_ask_answers_a_file_of_questions_in_batches(capsys, tiny_model_dir, tmp_path):
    from genret.decoding import TransformersEngine
    from genret.model_store import StoredModel
    from genret.training import presence_question

    pairs = [("rocket.jpg", presence_question("rocket")), ("coffee.jpg", "What is in this image?"),
             ("rocket.jpg", presence_question("cat"))]
    engine = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu")
    expected = [engine.answer(key, question) for key, question in pairs]
    questions = tmp_path / "questions.tsv"
    questions.write_text("".join(f"{key}\t{question}\n\n" for key, question in pairs[1:]))  # blank lines skipped
    code, out, _ = run(capsys, "ask", str(tiny_model_dir), *pairs[0], "--questions", str(questions), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["image_id"], r["question"], r["answer"]) for r in rows] == \
        [(key, question, answer.text) for (key, question), answer in zip(pairs, expected)]
    for row, answer in zip(rows, expected):  # batched with other questions, padded: the same leaning
        assert (row["yes_probability"] is None) == (answer.yes_probability is None)
        assert row["yes_probability"] == pytest.approx(answer.yes_probability, abs=1e-4)
    code, out, _ = run(capsys, "ask", str(tiny_model_dir), "--questions", str(questions))
    assert code == 0 and [line.split("\t")[:2] for line in out.splitlines()] == [list(p) for p in pairs[1:]]


@pytest.mark.parametrize("lines,says", [
    ("rocket.jpg Is there a rocket?\n", "questions.tsv: line 1: expected an image key, a tab, then the question"),
    ("rocket.jpg\tIs there a rocket?\n\ncoffee.jpg\t  \n", "questions.tsv: line 3: the question: it is empty"),
    ("rocket.jpg\tIs there a rocket?\nnot-an-image.jpg\tIs there a cat?\n", "not-an-image.jpg"),
    ("\n", "give an image and a question about it, or --questions FILE"),
], ids=["no tab", "blank question", "unknown image", "no questions"])
def test_ask_names_what_is_wrong_with_its_questions_file(capsys, tiny_model_dir, tmp_path, lines, says):
    (tmp_path / "questions.tsv").write_text(lines)
    code, out, err = run(capsys, "ask", str(tiny_model_dir), "--questions", str(tmp_path / "questions.tsv"))
    assert code == 2 and says in err and out == "" and "Traceback" not in err  # checked before any is answered


def test_ask_needs_a_question_with_its_image(capsys, tiny_model_dir):
    code, out, err = run(capsys, "ask", str(tiny_model_dir), "rocket.jpg")
    assert code == 2 and "give an image and a question about it" in err and out == ""


def test_search_reranks_at_the_weight_given(capsys, tiny_model_dir, tiny_catalog):
    code, out, _ = run(capsys, "search", str(tiny_model_dir), "a rocket on a launch pad", "-k", "3",
                       "--rerank", "--rerank-weight", "0")
    assert code == 0 and len(out.strip().splitlines()) == 3
    code, out, _ = run(capsys, "search", str(tiny_model_dir), "a rocket on a launch pad", "-k", "3",
                       "--rerank", "--hubness-weight", "50")
    assert code == 0 and len(out.strip().splitlines()) == 3
    for bad in ("-1", "heavy", "nan"):  # argparse's own usage error: exit status 2 and one line
        with pytest.raises(SystemExit) as exited:
            main(["search", str(tiny_model_dir), "a rocket", "--rerank", "--rerank-weight", bad])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "is not a weight" in err and "Traceback" not in err


def test_search_and_evaluate_with_the_hubness_prior_in_the_beam(capsys, tiny_model_dir, tiny_catalog, tmp_path):
    from genret.decoding import PriorWeights, TransformersEngine, search_prior
    from genret.model_store import StoredModel

    query = "a rocket on a launch pad"
    code, out, _ = run(capsys, "search", str(tiny_model_dir), query, "-k", "2", "--beam-hubness-weight", "20")
    stored = StoredModel.open(tiny_model_dir)
    [expected] = TransformersEngine(stored, device="cpu").search([query], k=2,
                                                                 prior=search_prior(stored, PriorWeights(hubness=20)))
    assert code == 0 and [line.split()[1] for line in out.strip().splitlines()] == [h.key for h in expected]
    queries = tmp_path / "queries.csv"
    queries.write_text("image,caption\n" + "".join(f"{img.key},{img.captions[1]}\n" for img in tiny_catalog))
    code, out, _ = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(queries), "--beams", "2",
                       "--beam-hubness-weight", "20", "--out", str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0 and result["beam_hubness_weight"] == 20.0 and 0 <= result["R@1"] <= 1
    with pytest.raises(SystemExit) as exited:
        main(["search", str(tiny_model_dir), "a rocket", "--beam-hubness-weight", "-3"])
    assert exited.value.code == 2 and "is not a weight" in capsys.readouterr().err


def test_evaluate_also_scores_describing_and_asking_against_the_query_captions(capsys, tiny_model_dir, tiny_catalog,
                                                                               tmp_path):
    from genret.decoding import TransformersEngine
    from genret.evaluation import evaluate_describe_and_ask
    from genret.model_store import StoredModel

    queries = tmp_path / "queries.csv"
    keys = tiny_catalog.keys()[:4]
    queries.write_text("image,caption\n" + "".join(f"{k},{c}\n" for k in keys for c in tiny_catalog[k].captions[:2]))
    code, _, _ = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(queries), "--describe-and-ask",
                     "--out", str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    expected = evaluate_describe_and_ask(TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu"),
                                         {k: tiny_catalog[k].captions[:2] for k in keys}, progress=False)
    assert code == 0 and 0 <= result["R@10"] <= 1 and result["describe_and_ask"]["images"] == 4
    assert result["describe_and_ask"] == pytest.approx(expected)
    search_only = tmp_path / "search-only"  # refused before any search
    shutil.copytree(tiny_model_dir, search_only)
    manifest = json.loads((search_only / "manifest.json").read_text())
    manifest["train_config"].update(describe=False, ask=False)
    (search_only / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "evaluate", str(search_only), "--queries", str(queries), "--describe-and-ask")
    assert code == 2 and "was not trained to describe" in err and out == ""


def test_evaluate_reports_recall_at_each_rerank_weight(capsys, tiny_model_dir, tiny_catalog, tmp_path):
    queries = tmp_path / "queries.csv"
    queries.write_text("image,caption\n" + "".join(f"{img.key},{img.captions[1]}\n" for img in tiny_catalog))
    code, out, _ = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(queries), "--beams", "4",
                       "--rerank-weights", "0", "20", "--out", str(tmp_path / "result.json"))
    assert code == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["reranked_by_weight"]) == {"0,0", "20,0"}
    assert result["reranked"]["weight"] == 10.0 and result["reranked"]["hubness_weight"] == 0.0
    code, out, _ = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(queries), "--beams", "4",
                       "--rerank-weights", "0", "20", "--hubness-weights", "0", "100", "--hubness-weight", "5",
                       "--out", str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0 and set(result["reranked_by_weight"]) == {"0,0", "0,100", "20,0", "20,100"}
    assert result["reranked"]["hubness_weight"] == 5.0


@pytest.mark.parametrize("argv,says", [
    (["search", "{model}", "  "], "argument query: it is empty"),
    (["search", "{model}", "a rocket", "-k", "0"], "'0' is not a count"),  # was a ZeroDivisionError
    (["search", "{model}", "a rocket", "--beams", "-2"], "'-2' is not a count"),
    (["ask", "{model}", "rocket.jpg", ""], "argument question: it is empty"),
    (["search", "{model}", "\u200b\x01"], "argument query: it has no visible characters"),
    # a byte the locale cannot decode reaches argv as a lone surrogate (was the tokenizer's TypeError)
    (["search", "{model}", "a rocket \udcff"], "argument query: it is not valid UTF-8 text"),
    (["ask", "{model}", "rocket.jpg", "is it \udcff?"], "argument question: it is not valid UTF-8 text"),
    (["evaluate", "{model}", "--queries", "{queries}", "--limit", "0"], "'0' is not a count"),
    (["train", "--time-budget", "nan"], "'nan' is not a time budget"),  # no clock passed it: it never stopped
    (["train", "--time-budget", "-5"], "'-5' is not a time budget"),
], ids=["blank query", "k 0", "negative beams", "blank question", "zero-width query", "undecodable query",
        "undecodable question", "limit 0", "nan time budget", "negative time budget"])
def test_counts_and_texts_are_checked_before_loading_the_model(capsys, tiny_model_dir, tmp_path, argv, says):
    with pytest.raises(SystemExit) as exited:
        main([a.format(model=tiny_model_dir, queries=tmp_path / "q.csv") for a in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and says in err and "Traceback" not in err


def test_evaluate_names_what_is_wrong_with_its_files(capsys, tiny_model_dir, tiny_catalog, tmp_path):
    key = tiny_catalog.keys()[0]
    files = {"empty.csv": "image,caption\n", "blank.csv": f"image,caption\n{key},a photo\n{key},  \n",
             "queries.csv": f"image,caption\n{key},a photo\n", "unknown.txt": f"{key}\nnot-an-image.jpg\n",
             "none.txt": "", "latin1.csv": f"image,caption\n{key},caf\xe9\n", "latin1.txt": f"{key}\ncaf\xe9.jpg\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="latin-1")
    for out, says in [(tmp_path, "a folder; name the JSON file to write"),
                      (tmp_path / "nope" / "r.json", "its folder does not exist")]:
        code, _, err = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(tmp_path / "queries.csv"),
                           "--out", str(out))
        assert code == 2 and f"--out {out}: {says}" in err
    for queries, candidates, says in [("empty.csv", None, "empty.csv: no queries"),
                                      ("latin1.csv", None, "latin1.csv: line 2: not UTF-8 text"),
                                      ("queries.csv", "latin1.txt", "latin1.txt: line 2: not UTF-8 text"),
                                      ("blank.csv", None, "blank.csv: row 3 has an empty image or caption"),
                                      ("queries.csv", "unknown.txt", "1 keys are not in model"),  # was a KeyError
                                      ("queries.csv", "none.txt", "none.txt: no keys")]:
        code, _, err = run(capsys, "evaluate", str(tiny_model_dir), "--queries", str(tmp_path / queries),
                           *(["--candidates", str(tmp_path / candidates)] if candidates else []))
        assert code == 2 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["train", "--name", "x", "--images", "i", "--captions", "c"], ["demo"]],
                         ids=["train", "demo"])
def test_the_cli_offers_every_identifier_scheme(capsys, argv):
    from genret.identifiers import SCHEMES

    with pytest.raises(SystemExit) as exit:
        main([*argv, "--scheme", "nope"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(f"'{name}'" in err for name in SCHEMES)


def test_demo_retrain_trains_anew(capsys, tmp_path, monkeypatch):
    """`genret demo --retrain` starts over, with another config too: it used to resume the demo's
    finished run, so it saved the old checkpoint again, or refused the new config."""
    import genret.cli

    monkeypatch.setattr(genret.cli, "MODEL_STORE", tmp_path / "store")
    monkeypatch.setattr(genret.cli, "RUNS", tmp_path / "runs")
    short = ["--set", "memorize_epochs=1", "--set", "retrieve_epochs=1", "--set", "align_epochs=2"]
    assert run(capsys, "demo", *short)[0] == 0
    code, out, err = run(capsys, "demo", *short, "--set", "seed=1", "--retrain")
    assert code == 0, err
    assert "training the demo model" in out
    assert json.loads((tmp_path / "store" / "demo" / "manifest.json").read_text())["train_config"]["seed"] == 1


def test_hold_out_keys_missing_from_the_catalog_are_named(capsys, tmp_path):
    from genret.demo_catalog import write_demo_catalog

    images, captions = write_demo_catalog(tmp_path / "demo")
    (tmp_path / "held.txt").write_text("moon.jpg\nnot-in-the-catalog.jpg\n")
    code, out, err = run(capsys, "train", "--images", str(images), "--captions", str(captions), "--name", "x",
                         "--preset", "tiny", "--set", "align_epochs=1", "--hold-out", str(tmp_path / "held.txt"),
                         "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--time-budget", "0")
    assert code == 0 and "stopped at the time budget" in out
    assert "1 of the 2 keys in" in err and "not-in-the-catalog.jpg" in err and "the other 1 are held out" in err


def test_ctrl_c_while_training_says_how_to_resume(tmp_path):
    """Ctrl-C printed a traceback, from inside torch.save, which had cut the checkpoint off."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from genret.demo_catalog import write_demo_catalog

    images, captions = write_demo_catalog(tmp_path / "demo")
    run_dir = tmp_path / "run"
    # Ctrl-C in a terminal: a test run started in the background (`pytest &`, nohup) ignores SIGINT,
    # and its children would inherit that, so the child restores Python's own handler first
    ctrl_c = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'genret'; runpy.run_module('genret.cli', run_name='__main__')")
    training = subprocess.Popen(
        [sys.executable, "-c", ctrl_c, "train", "--images", str(images), "--captions", str(captions),
         "--name", "x", "--preset", "tiny", "--set", "align_epochs=1", "--run-dir", str(run_dir),
         "--out", str(tmp_path / "model")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint.pt").exists() and training.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    training.send_signal(signal.SIGINT)
    _, err = training.communicate(timeout=120)
    assert training.returncode == 130, err
    assert err.rstrip().endswith("genret train: interrupted; run the same command to resume after the last "
                                 "finished epoch") and "Traceback" not in err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epochs_done"] >= 1
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("reranked", [False, True], ids=["beam only", "re-ranked"])
def test_the_settings_evaluate_recommends_are_the_ones_the_service_reads(reranked, monkeypatch):
    """genret does not import the service, so `genret evaluate` spells its variables itself: the
    service must read each one, as the value evaluated."""
    from genret.cli import serving_settings
    from service.settings import load_settings

    chosen = {"beam_hubness_weight": 0.5, "added_bonus": 2.0, **({"rerank_weight": 4.0, "hubness_weight": 1.5}
                                                                  if reranked else {})}
    line = serving_settings(chosen, beams=7)
    for assignment in line.split():
        name, value = assignment.split("=")
        monkeypatch.setenv(name, value)
    settings = load_settings()
    expected = {"beam_hubness_weight": 0.5, "added_id_bonus": 2.0,
                **({"rerank_beams": 7, "rerank_weight": 4.0, "hubness_weight": 1.5} if reranked else {"beams": 7})}
    assert {name: settings.search[name] for name in expected} == expected and len(line.split()) == len(expected)


def test_training_never_deletes_what_is_not_a_model_or_a_run(capsys, tmp_path):
    """A model is swapped into its folder whole, and --fresh deletes a run folder: pointed at a
    folder that holds anything else (a mistyped --out or --run-dir), training refuses at once."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a black square\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not a model")
    train = ["train", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.csv")]
    code, _, err = run(capsys, *train, "--name", "x", "--run-dir", str(tmp_path / "run"), "--out", str(photos))
    assert code == 2 and f"{photos} is not a trained model (no manifest.json) and holds files (holiday.jpg)" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, _, err = run(capsys, *train, "--name", "x", "--run-dir", str(photos), "--fresh",
                       "--out", str(tmp_path / "model"))
    assert code == 2 and "holds files a training run does not write (holiday.jpg)" in err
    assert (photos / "holiday.jpg").read_bytes() == b"not a model"
    code, _, err = run(capsys, *train, "--name", "x", "--run-dir", str(photos / "holiday.jpg"),
                       "--out", str(tmp_path / "model"))  # an OSError, one line like the rest (was a traceback)
    assert code == 2 and "File exists" in err and "holiday.jpg" in err and "Traceback" not in err
    for name in ("..", ".", "", "team/model", ".hidden"):  # model_store/.. is the repository
        with pytest.raises(SystemExit) as exited:
            main([*train, "--name", name])
        assert exited.value.code == 2 and f"{name!r} is not a model name" in capsys.readouterr().err


def test_models_lists_the_store_with_what_each_model_holds(capsys, tiny_model_dir, tmp_path, monkeypatch):
    import genret.cli
    from genret.model_store import StoredModel

    store = tmp_path / "store"
    monkeypatch.setattr(genret.cli, "MODEL_STORE", store)
    assert run(capsys, "models") == (0, f"no models in {store}: train one with `genret train` (or `genret demo`)\n", "")
    shutil.copytree(tiny_model_dir, store / "alpha")
    shutil.copytree(tiny_model_dir, store / ".alpha-x1y2")  # a model being written: not one yet
    (store / "notes").mkdir()
    (store / "current").symlink_to(store / "alpha")  # a deployment's alias
    trained = StoredModel.open(store / "alpha")
    assert run(capsys, "remove", "alpha", trained.keys[0])[0] == 0
    n = len(trained.keys)

    code, out, err = run(capsys, "models")
    header, row, alias = out.splitlines()
    assert code == 0 and header.split() == ["name", "scheme", "images", "tasks", "created", "changed", "size"]
    assert alias.split()[:3] == ["current", "->", "alpha"] and alias.split()[3:] == row.split()[1:]
    name, scheme, images, *trained_count, tasks, created, changed, size, unit = row.split()
    assert (name, scheme, images, trained_count, tasks) == ("alpha", trained.manifest["scheme"], str(n - 1),
                                                            [f"({n}", "trained)"], "search,describe,ask")
    assert created == trained.manifest["created"] and changed >= created and unit == "MB"
    assert err == f"not a model: {store / 'notes'}: not a trained model (no manifest.json); train one with " \
                  "`genret train`\n"

    code, out, _ = run(capsys, "models", "--json")
    alpha, current, notes = json.loads(out)
    assert (current["name"], current["folder"], current["path"]) == ("alpha", "current", str(store / "current"))
    assert code == 0 and alpha["name"] == "alpha" and (alpha["images"], alpha["trained_images"]) == (n - 1, n)
    assert alpha["bytes"] > 0 and alpha["path"] == str(store / "alpha")
    assert notes["path"] == str(store / "notes") and "no manifest.json" in notes["error"]
