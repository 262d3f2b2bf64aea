"""`genret.load`: what the README's Python example does, on the tiny model, and the errors a
Python caller gets (a ModelStoreError naming the model or image, never a bare KeyError)."""

from __future__ import annotations

import json
import shutil

import pytest

import genret
from genret.decoding import TransformersEngine
from genret.model_store import ModelStoreError, StoredModel, UnknownImage, UntrainedTask


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return genret.load(tiny_model_dir, device="cpu")


def test_load_searches_describes_and_asks_as_the_engine_does(model, tiny_model_dir, tiny_catalog):
    query = tiny_catalog["rocket.jpg"].captions[0]
    [hits] = model.search([query], k=3)
    [expected] = TransformersEngine(StoredModel.open(tiny_model_dir), device="cpu").search([query], k=3)
    assert hits == expected and len(hits) == 3 and {h.key for h in hits} <= set(tiny_catalog.keys())
    assert isinstance(model.describe("rocket.jpg"), str) and isinstance(model.ask("rocket.jpg", "Is it red?"), str)
    assert model.describe_many([h.key for h in hits]) == [model.describe(h.key) for h in hits]
    answer = model.answer("rocket.jpg", "Is there a rocket in this image?")
    assert answer.text == model.ask("rocket.jpg", "Is there a rocket in this image?")
    assert (answer.yes_probability is None) == (not answer.is_yes_or_no)
    pairs = [("rocket.jpg", "Is there a rocket in this image?"), ("coffee.jpg", "Is there a cup in this image?")]
    assert [a.text for a in model.answer_many(pairs)] == [model.ask(*pair) for pair in pairs]


def test_generation_runs_as_long_as_the_longest_caption_training_taught(model, tiny_model_dir, tiny_catalog, tmp_path):
    from genret.prompts import normalize_caption

    limit = model.stored.manifest["train_config"]["caption_chars"]
    longest = max(len(model.prompts.answer(normalize_caption(c, limit))) for im in tiny_catalog for c in im.captions)
    assert model.stored.manifest["answer_tokens"] == longest < 48 and model.stored.answer_tokens == 48
    longer = tmp_path / "longer"  # as if trained on captions of up to 90 tokens (256 characters of German, say)
    shutil.copytree(tiny_model_dir, longer)
    manifest = json.loads((longer / "manifest.json").read_text())
    manifest["answer_tokens"] = 90
    (longer / "manifest.json").write_text(json.dumps(manifest))
    engine = genret.load(longer, device="cpu")
    asked, generate = [], engine.lm.generate
    engine.lm.generate = lambda **kwargs: (asked.append(kwargs["max_new_tokens"]), generate(**kwargs))[1]
    engine.describe("rocket.jpg")
    engine.generate_beams([engine.prompts.describe(engine.stored.id_tokens["rocket.jpg"])], 2)
    engine.generate([engine.prompts.describe(engine.stored.id_tokens["rocket.jpg"])], max_new_tokens=5)
    assert asked == [90, 90, 5]


def test_load_finds_a_model_by_name_in_the_model_store(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(genret, "MODEL_STORE", tiny_model_dir.parent)
    assert genret.load(tiny_model_dir.name, device="cpu").stored.path == tiny_model_dir
    with pytest.raises(ModelStoreError, match=r"nope: not a trained model \(no manifest.json\)"):
        genret.load("nope")


def test_python_callers_get_errors_that_say_what_is_wrong(model, tiny_model_dir, tmp_path):
    with pytest.raises(UnknownImage, match=r"^unknown image 'nope.jpg' in model model$") as raised:
        model.describe("nope.jpg")
    assert isinstance(raised.value, KeyError)  # what a dict lookup would raise, with a message
    with pytest.raises(UnknownImage, match="nope.jpg"):
        model.ask("nope.jpg", "Is it red?")
    with pytest.raises(UnknownImage, match="nope.jpg"):
        model.describe_many(["rocket.jpg", "nope.jpg"])
    with pytest.raises(TypeError, match=r"not one string: describe_many\(\['rocket.jpg'\]\)"):
        model.describe_many("rocket.jpg")
    assert model.describe_many([]) == []
    with pytest.raises(TypeError, match=r"a list of queries, not one string: search\(\['a rocket'\]\)"):
        model.search("a rocket")  # not 8 searches, one per character
    for bad in (dict(k=0), dict(k=-1), dict(k=3, beams=0)):
        with pytest.raises(ValueError, match="at least one image with at least one beam"):
            model.search(["a rocket"], **bad)
    assert model.search([], k=3) == []
    with pytest.raises(ValueError, match=r"queries \[1\] are blank"):  # it returned the ids the model favours
        model.search(["a rocket", "  "])
    with pytest.raises(ValueError, match=r"queries \[0\] are blank"):  # strip() keeps zero-width and control characters
        model.search(["\u200b\u00ad", "a rocket"])
    with pytest.raises(ValueError, match="the question is blank"):
        model.ask(model.stored.keys[0], "")
    with pytest.raises(ValueError, match=r"questions \[1\] are blank"):
        model.answer_many([("rocket.jpg", "Is it red?"), ("coffee.jpg", " ")])
    with pytest.raises(ValueError, match="the question is blank"):
        model.ask("rocket.jpg", "\x00\u200d")
    with pytest.raises(UnknownImage, match="nope.jpg"):
        model.answer_many([("rocket.jpg", "Is it red?"), ("nope.jpg", "Is it red?")])
    with pytest.raises(TypeError, match=r"not one pair: answer_many\(\[\('rocket.jpg', 'Is it red\?'\)\]\)"):
        model.answer_many(("rocket.jpg", "Is it red?"))
    assert model.answer_many([]) == []
    search_only = tmp_path / "search-only"
    shutil.copytree(tiny_model_dir, search_only)
    manifest = json.loads((search_only / "manifest.json").read_text())
    manifest["train_config"].update(describe=False, ask=False)  # as `--set describe=false --set ask=false` records
    (search_only / "manifest.json").write_text(json.dumps(manifest))
    trained_to_search = genret.load(search_only, device="cpu")
    assert trained_to_search.stored.name == "search-only"  # a copy is named by its folder, not the manifest
    with pytest.raises(UntrainedTask, match="^model 'search-only' was not trained to describe"):
        trained_to_search.describe("rocket.jpg")
    with pytest.raises(UntrainedTask, match="was not trained to ask"):
        trained_to_search.ask("rocket.jpg", "Is it red?")


def test_python_callers_who_pass_the_wrong_type_are_told_which_argument(model):
    """A None or a number where a string belongs failed deep inside (AttributeError: 'NoneType' object
    has no attribute 'strip'; a list key was "unhashable"; k="3" "not supported between instances")."""
    import numpy as np

    cases = [
        (lambda: model.search(["a rocket", None]), r"search takes queries as strings: queries \[1\] are not"),
        (lambda: model.search(["a rocket"], k="3"), r"search's k is a count, not str: k='3'"),
        (lambda: model.search(["a rocket"], k=2.0), r"search's k is a count, not float"),
        (lambda: model.search(["a rocket"], k=3, beams=True), r"search's beams is a count, not bool"),
        (lambda: model.search(["a rocket"], within="rocket.jpg"),
         r"within takes a collection of image keys, not one string: within=\['rocket.jpg'\]"),
        (lambda: model.search(["a rocket"], exclude="rocket.jpg"), r"exclude takes a collection of image keys"),
        (lambda: model.search(["a rocket"], within=["rocket.jpg", None]), r"within takes image keys as strings"),
        (lambda: model.describe(None), r"an image key is a string, not NoneType"),
        (lambda: model.describe(["rocket.jpg"]), r"an image key is a string, not list"),
        (lambda: model.describe_many([3]), r"an image key is a string, not int"),
        (lambda: model.ask("rocket.jpg", None), r"answer_many takes questions as strings"),
        (lambda: model.answer_many(["rocket.jpg"]), r"answer_many takes \(image key, question\) pairs: "
                                                    r"questions \[0\] are not pairs, e.g. 'rocket.jpg'"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    # numpy's integers are counts, and a generator of keys a collection
    [hits] = model.search(["a rocket"], k=np.int64(2), beams=np.int64(3),
                          within=(key for key in ["rocket.jpg", "coffee.jpg", "astronaut.jpg"]), exclude=iter(["coffee.jpg"]))
    assert len(hits) == 2 and {hit.key for hit in hits} == {"rocket.jpg", "astronaut.jpg"}


def test_a_written_model_is_as_readable_as_the_umask_allows(tiny_model_dir, tmp_path):
    """The service's container runs as another user than the one who trained on the host, so a
    model must not keep mkdtemp's owner-only folder or safetensors' owner-only files; nor lose
    that after `genret remove`, which writes the model anew around hard links to its files."""
    import os
    import stat

    from genret.removing import remove_images

    mask = os.umask(0o022)
    os.umask(mask)

    def modes(model):
        return {p: stat.S_IMODE(p.stat().st_mode) for p in (model, *model.rglob("*"))}

    expected = lambda p: (0o777 if p.is_dir() else 0o666) & ~mask
    assert any(p.suffix == ".safetensors" for p in modes(tiny_model_dir))
    assert {p: m for p, m in modes(tiny_model_dir).items() if m != expected(p)} == {}
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    remove_images(copy, [StoredModel.open(copy).keys[0]])
    assert {p: m for p, m in modes(copy).items() if m != expected(p)} == {}


def test_a_model_this_user_may_not_read_says_how_to_allow_it(tiny_model_dir, monkeypatch):
    from pathlib import Path

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "exists", refused)  # as a 0700 folder of another user answers (root reads all)
    with pytest.raises(ModelStoreError, match=rf"may not read the model \(Permission denied\); its owner can allow "
                                              rf"it: chmod -R a\+rX {tiny_model_dir}$"):
        StoredModel.open(tiny_model_dir)
