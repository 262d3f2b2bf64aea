"""Adding images to a trained model without training (`genret add`): each new id's row is placed
where training places ids, the trained ids are left exactly as they were, the model stays one
that transformers and vLLM load, and every refusal says why."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from genret.adding import add_images, row_placement
from genret.catalog import load_image_folder
from genret.cli import main
from genret.model_store import ModelStoreError, StoredModel
from tests.conftest import TINY_IMAGES


@pytest.fixture(scope="module")
def grown(tiny_default_model_dir, demo_catalog, tmp_path_factory):
    """The tiny default model (8 images) with the demo catalog's other 10 added, captions and all."""
    dest = tmp_path_factory.mktemp("grown") / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    added = add_images(dest, demo_catalog, progress=False)
    return dest, added


def rows_of(stored: StoredModel, keys) -> torch.Tensor:
    weight = stored.load_lm().get_input_embeddings().weight.detach()
    return weight[[stored.id_tokens[k][0] for k in keys]]


def test_only_the_images_the_model_lacks_are_added(grown, demo_catalog, tiny_default_model_dir):
    dest, added = grown
    new = sorted(set(demo_catalog.keys()) - set(TINY_IMAGES))
    assert added.keys == new and sorted(added.already_there) == sorted(TINY_IMAGES)
    stored, before = StoredModel.open(dest), StoredModel.open(tiny_default_model_dir)
    assert stored.keys == sorted(demo_catalog.keys()) and stored.manifest["catalog_size"] == len(demo_catalog)
    assert stored.manifest["trained_images"] == len(TINY_IMAGES)
    assert [a["images"] for a in stored.manifest["additions"]] == [len(new)]
    assert sorted(stored.added_keys) == new
    assert all(stored.id_tokens[k] == before.id_tokens[k] for k in TINY_IMAGES)
    assert stored.catalog[new[0]].captions == demo_catalog[new[0]].captions  # kept for display


def test_trained_rows_are_unchanged_and_new_rows_sit_where_training_places_ids(grown, tiny_default_model_dir, demo_catalog):
    from genret.alignment import image_embeddings
    from genret.encoders import ImageEncoder

    dest, added = grown
    stored, before = StoredModel.open(dest), StoredModel.open(tiny_default_model_dir)
    assert torch.equal(rows_of(stored, TINY_IMAGES), rows_of(before, TINY_IMAGES))
    place = row_placement(stored, stored.load_lm().get_input_embeddings().weight.detach())
    # the placement read back from the trained rows gives each trained image its own row again ...
    assert torch.allclose(place(before.image_embeddings()).float(), rows_of(before, before.keys), atol=1e-5)
    # ... and puts each added image's row where its own pixels embed
    features = ImageEncoder().encode_paths([demo_catalog[k].path for k in added.keys], progress=False)
    embeddings = image_embeddings(stored.load_two_tower(), features)
    position = {k: i for i, k in enumerate(stored.keys)}
    assert np.allclose(stored.image_embeddings()[[position[k] for k in added.keys]], embeddings, atol=1e-5)
    assert torch.allclose(place(embeddings).float(), rows_of(stored, added.keys), atol=1e-5)
    hubness = stored.image_hubness()
    assert np.array_equal(hubness[[position[k] for k in TINY_IMAGES]], before.image_hubness())
    assert np.isfinite(hubness).all()


def test_the_trained_images_rank_as_before_and_added_ones_are_searchable(grown, tiny_default_model_dir, demo_catalog):
    from genret.decoding import TransformersEngine

    dest, added = grown
    stored, before = StoredModel.open(dest), StoredModel.open(tiny_default_model_dir)
    engine, engine_before = TransformersEngine(stored), TransformersEngine(before)
    queries = [c for k in TINY_IMAGES for c in demo_catalog[k].captions[:1]]
    hits = engine.search(queries, k=5, beams=5, trie=stored.trie(TINY_IMAGES))
    assert [[h.key for h in row] for row in hits] == [[h.key for h in row] for row in engine_before.search(queries, k=5, beams=5)]
    queries = [c for k in added.keys for c in demo_catalog[k].captions[:1]]
    for row in engine.search(queries, k=5, beams=5, trie=stored.trie(added.keys)):
        assert len(row) == 5 and {h.key for h in row} <= set(added.keys)
    assert all(h.key in stored.id_tokens for row in engine.search(queries, k=10, beams=10) for h in row)
    assert engine.describe(added.keys[0])  # it has no words of its own for it, but says something


def test_an_added_id_bonus_raises_exactly_the_added_ids_inside_the_search(grown, demo_catalog, tiny_default_model_dir):
    """With a beam as wide as the catalog nothing is pruned, so searching with the bonus ranks
    exactly as adding it to each added id's plain score; a narrow beam reaches added images it
    missed; and a model with nothing added has no prior to build."""
    from genret.decoding import PriorWeights, TransformersEngine, search_prior

    dest, added = grown
    stored = StoredModel.open(dest)
    engine, n = TransformersEngine(stored), len(stored.keys)
    prior = search_prior(stored, PriorWeights(added_bonus=3.0))
    queries = [demo_catalog[k].captions[0] for k in (*TINY_IMAGES[:2], *added.keys[:2])]
    for plain, favoured in zip(engine.search(queries, k=n, beams=n), engine.search(queries, k=n, beams=n, prior=prior)):
        expected = sorted(((h.key, h.score + 3.0 * (h.key in added.keys)) for h in plain), key=lambda pair: -pair[1])
        assert [h.key for h in favoured] == [key for key, _ in expected]
        assert [h.score for h in favoured] == pytest.approx([score for _, score in expected], abs=1e-4)
    strong = search_prior(stored, PriorWeights(added_bonus=1e4))
    assert all(row[0].key in added.keys for row in engine.search(queries, k=1, beams=1, prior=strong))
    assert search_prior(StoredModel.open(tiny_default_model_dir), PriorWeights(added_bonus=3.0)) is None
    for bad in (-1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match="added_bonus must be a finite number >= 0"):
            PriorWeights(added_bonus=bad)


def test_the_service_searches_with_the_added_id_bonus(grown, demo_catalog, caplog, tiny_default_model_dir):
    """GENRET_ADDED_ID_BONUS: /search returns what the reference decoder returns with the bonus;
    on a model with nothing added it is logged as changing nothing."""
    import asyncio
    import logging

    from pydantic import ValidationError

    from genret.decoding import PriorWeights, TransformersEngine, search_prior
    from service.app import create_app
    from service.settings import Settings
    from tests.service_helpers import serve

    dest, added = grown
    stored = StoredModel.open(dest)
    query = demo_catalog[added.keys[0]].captions[0]
    settings = Settings(model=str(dest), engine="transformers", device="cpu", beams=3, added_id_bonus=2.5)

    async def search() -> list[dict]:
        async with serve(create_app(settings)) as client:
            r = await client.post("/search", json={"query": query, "k": 3})
            assert r.status_code == 200, r.text
            return r.json()["results"]

    results = asyncio.run(search())
    [expected] = TransformersEngine(stored, device="cpu").search(
        [query], k=3, beams=3, prior=search_prior(stored, PriorWeights(added_bonus=2.5)))
    assert [hit["image_id"] for hit in results] == [h.key for h in expected]
    assert [hit["score"] for hit in results] == pytest.approx([h.score for h in expected], abs=1e-4)
    with pytest.raises(ValidationError, match="added_id_bonus"):
        Settings(added_id_bonus=-1)
    with caplog.at_level(logging.WARNING, logger="service"):
        create_app(Settings(model=str(tiny_default_model_dir), engine="transformers", added_id_bonus=2.5))
    assert "GENRET_ADDED_ID_BONUS=2.5 changes nothing" in caplog.text


def test_the_grown_tokenizer_is_the_one_autotokenizer_loads(grown):
    from transformers import AutoTokenizer

    dest, added = grown
    stored = StoredModel.open(dest)
    tokenizer, auto = stored.load_tokenizer(), AutoTokenizer.from_pretrained(stored.lm_path)
    for key in added.keys:
        text = stored.identifiers.ids[key]
        assert tokenizer.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False) \
            == stored.id_tokens[key] and len(stored.id_tokens[key]) == 1
    assert stored.load_lm().config.vocab_size == len(tokenizer)


def test_adding_in_two_steps_gives_what_adding_at_once_does(grown, tiny_default_model_dir, demo_catalog, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    first, second = ["brick.jpg", "clock.jpg"], ["grass.jpg"]
    add_images(dest, demo_catalog.subset(first), progress=False)
    bank = np.load(dest / "hubness_bank.npy")  # the trained captions, kept by the first addition
    assert len(bank) == sum(len(demo_catalog[k].captions) for k in TINY_IMAGES)
    add_images(dest, demo_catalog.subset(second), progress=False)
    assert np.array_equal(np.load(dest / "hubness_bank.npy"), bank)
    stepwise, at_once = StoredModel.open(dest), StoredModel.open(grown[0])
    keys = first + second
    assert [stepwise.identifiers.ids[k] for k in keys] == ["<img_8>", "<img_9>", "<img_10>"]
    assert [a["images"] for a in stepwise.manifest["additions"]] == [2, 1]
    assert stepwise.manifest["trained_images"] == len(TINY_IMAGES)
    # the same rows (their tokens are numbered differently) and the same hubness
    assert torch.allclose(rows_of(stepwise, keys), rows_of(at_once, keys), atol=1e-6)
    position = {k: i for i, k in enumerate(stepwise.keys)}
    position_at_once = {k: i for i, k in enumerate(at_once.keys)}
    assert np.allclose(stepwise.image_hubness()[[position[k] for k in keys]],
                       at_once.image_hubness()[[position_at_once[k] for k in keys]], atol=1e-6)


def test_the_hubness_bank_holds_the_captions_as_training_read_them(tiny_default_model_dir, tiny_catalog, tmp_path):
    from genret.training import TrainConfig, Trainer

    def read_by_training(stored: StoredModel) -> list[str]:
        config = TrainConfig(**stored.manifest["train_config"])
        return sorted(c for cs in Trainer(tiny_catalog, config, tmp_path / "run", progress=False).captions.values()
                      for c in cs)

    stored = StoredModel.open(tiny_default_model_dir)
    assert sorted(stored.trained_captions()) == read_by_training(stored)
    dest = tmp_path / "model"  # as if trained with captions cut at 24 characters
    shutil.copytree(tiny_default_model_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["train_config"]["caption_chars"] = 24
    (dest / "manifest.json").write_text(json.dumps(manifest))
    cut = StoredModel.open(dest)
    assert sorted(cut.trained_captions()) == read_by_training(cut) != read_by_training(stored)
    assert max(map(len, cut.trained_captions())) <= 25


def test_adding_them_again_adds_nothing_and_writes_nothing(grown, demo_catalog):
    dest, _ = grown
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = add_images(dest, demo_catalog, progress=False)
    assert again.keys == [] and len(again.already_there) == len(demo_catalog)
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_a_model_whose_ids_were_trained_is_refused(tiny_model_dir, demo_catalog):
    before = sorted(p.name for p in tiny_model_dir.parent.iterdir())
    with pytest.raises(ModelStoreError, match="only to atomic ids.*structured.*genret train"):
        add_images(tiny_model_dir, demo_catalog, progress=False)
    assert sorted(p.name for p in tiny_model_dir.parent.iterdir()) == before


def test_moved_rows_are_refused(tiny_default_model_dir, demo_catalog, tmp_path):
    from safetensors.torch import load_file, save_file

    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    stored = StoredModel.open(dest)
    [weights] = (dest / "lm").glob("*.safetensors")
    tensors = load_file(weights)
    name = next(n for n in tensors if "embed_tokens" in n)
    tensors[name][stored.id_tokens[TINY_IMAGES[0]][0]] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelStoreError, match="no longer follow"):
        add_images(dest, demo_catalog, progress=False)


def test_an_unreadable_new_image_leaves_the_model_as_it_was(tiny_default_model_dir, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    images = tmp_path / "new"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(Exception):
        add_images(dest, load_image_folder(images, verify_images=False), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]
    assert StoredModel.open(dest).keys == sorted(TINY_IMAGES)


def test_the_cli_adds_a_folder_and_names_what_it_cannot_read(capsys, tiny_default_model_dir, demo_catalog, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    images = tmp_path / "new"
    images.mkdir()
    shutil.copy(demo_catalog["moon.jpg"].path, images / "moon.jpg")  # already in the model
    shutil.copy(demo_catalog["clock.jpg"].path, images / "clock.jpg")
    assert main(["add", str(dest), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert "added 1 images" in out and "1 already there" in out
    assert StoredModel.open(dest).catalog["clock.jpg"].captions == ()
    assert main(["add", str(dest), "--images", str(images)]) == 0
    assert "nothing to add" in capsys.readouterr().out

    (images / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["add", str(dest), "--images", str(images)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "not a readable image" in err and "Traceback" not in err
    assert main(["add", str(dest), "--images", str(tmp_path / "nowhere")]) == 2
    assert "images directory not found" in capsys.readouterr().err
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["catalog_size"] == len(TINY_IMAGES) + 1


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_added_ids_as_transformers_does(grown, demo_catalog):
    pytest.importorskip("vllm")
    import asyncio

    from genret.decoding import PriorWeights
    from service.engine_hf import HFEngine
    from service.engine_vllm import VLLMEngine
    from service.settings import Settings

    dest, added = grown
    stored = StoredModel.open(dest)
    queries = [demo_catalog[k].captions[0] for k in added.keys[:4]] + ["an astronaut in an orange suit"]

    async def compare():
        vllm = VLLMEngine(stored, Settings(gpu_memory_utilization=0.15, max_model_len=512, max_k=8, beams=5))
        hf = HFEngine(stored, device="cpu")
        await vllm.start()
        await hf.start()
        try:
            for query in queries:
                for prior in (PriorWeights(), PriorWeights(hubness=2.0, added_bonus=3.0)):
                    v = await vllm.search(query, k=5, beams=5, prior=prior)
                    h = await hf.search(query, k=5, beams=5, prior=prior)
                    assert [x.key for x in v] == [x.key for x in h], (query, prior)
                    assert [x.score for x in v] == pytest.approx([x.score for x in h], abs=1e-3)
        finally:
            await vllm.close()
            await hf.close()

    asyncio.run(compare())


def test_evaluate_reports_recall_for_each_kind_of_query(grown, demo_catalog, capsys, tmp_path):
    """Added images' captions were never trained on: a model holding both kinds reports each."""
    from genret.decoding import EmbeddingReranker, TransformersEngine
    from genret.evaluation import evaluate_generative, recall

    dest, added = grown
    stored = StoredModel.open(dest)
    assert stored.trained_caption_keys == frozenset(TINY_IMAGES)  # the added images' captions are for display
    queries = [(demo_catalog[k].captions[0], k) for k in demo_catalog.keys()]
    engine = TransformersEngine(stored)
    grid = [(0.0, 0.0), (5.0, 1.0)]
    result = evaluate_generative(engine, queries, beams=5, reranker=EmbeddingReranker(stored), rerank_grid=grid,
                                 progress=False)
    assert result["query_kinds"] == {"captioned": len(TINY_IMAGES), "uncaptioned": len(added.keys)}
    hits = engine.search([q for q, _ in queries], k=10, beams=5)
    for kind, keys in (("captioned", TINY_IMAGES), ("uncaptioned", added.keys)):
        rows = [i for i, (_, k) in enumerate(queries) if k in keys]
        assert result["by_kind"][kind] == {"queries": len(rows), **recall([[h.key for h in hits[i]] for i in rows],
                                                                          [queries[i][1] for i in rows])}
    for part in (result["by_kind"], result["reranked"]["by_kind"], *result["reranked_by_weight_by_kind"].values()):
        assert part["mean"] == {k: pytest.approx((part["captioned"][k] + part["uncaptioned"][k]) / 2)
                                for k in ("R@1", "R@5", "R@10")}
    assert set(result["reranked_by_weight_by_kind"]) == set(result["reranked_by_weight"]) == {"0,0", "5,1"}
    # weight 0: each kind's share of the beam's own order
    assert result["reranked_by_weight_by_kind"]["0,0"]["captioned"] == \
        {k: v for k, v in result["by_kind"]["captioned"].items() if k != "queries"}
    # one kind alone: no split, and the CLI says what weights chosen on it would favour
    only_added = tmp_path / "queries.csv"
    only_added.write_text("image,caption\n" + "".join(f"{k},{demo_catalog[k].captions[0]}\n" for k in added.keys))
    assert main(["evaluate", str(dest), "--queries", str(only_added), "--beams", "3", "--beam-hubness-weight", "5"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert "by_kind" not in result and result["query_kinds"] == {"captioned": 0, "uncaptioned": len(added.keys)}
    assert f"all {len(added.keys)} queries seek images whose captions were never trained on" in err


def test_evaluate_chooses_the_search_weights_best_on_both_kinds(grown, demo_catalog, capsys, tmp_path):
    """Lists of beam priors are one search each; the weights chosen are the best mean of the two
    kinds of query, and the CLI says which settings serve them."""
    from genret.decoding import PriorWeights, TransformersEngine
    from genret.evaluation import evaluate_generative

    dest, added = grown
    queries = tmp_path / "queries.csv"
    queries.write_text("image,caption\n" + "".join(f"{k},{demo_catalog[k].captions[0]}\n" for k in demo_catalog.keys()))
    assert main(["evaluate", str(dest), "--queries", str(queries), "--beams", "5", "--beam-hubness-weights", "0", "5",
                 "--added-bonuses", "0", "3", "--out", str(tmp_path / "result.json")]) == 0
    out, err = capsys.readouterr()
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(out) == result and set(result["by_prior"]) == {"0,0", "0,3", "5,0", "5,3"}
    stored = StoredModel.open(dest)
    bonus = evaluate_generative(TransformersEngine(stored), [(demo_catalog[k].captions[0], k) for k in demo_catalog.keys()],
                                beams=5, prior=PriorWeights(added_bonus=3.0), progress=False)
    assert {k: result["by_prior"]["0,3"][k] for k in ("R@1", "R@10", "by_kind")} == \
        {k: bonus[k] for k in ("R@1", "R@10", "by_kind")}
    mean = {key: r["by_kind"]["mean"] for key, r in result["by_prior"].items()}
    best = max(mean, key=lambda key: (mean[key]["R@10"], mean[key]["R@5"], mean[key]["R@1"],
                                      *(-float(w) for w in key.split(","))))
    h, b = (float(w) for w in best.split(","))
    assert result["chosen"] == {"beam_hubness_weight": h, "added_bonus": b, "on": "mean of captioned and uncaptioned",
                                "by": "R@10", **mean[best]}
    assert f"serve with GENRET_BEAMS=5 GENRET_BEAM_HUBNESS_WEIGHT={h:g} GENRET_ADDED_ID_BONUS={b:g}" in err


def test_the_chosen_weights_are_the_best_mean_of_the_kinds_and_the_smaller_on_a_tie():
    from genret.decoding import PriorWeights
    from genret.evaluation import chosen_weights

    r = lambda r10, r5=0.5, r1=0.1: {"R@1": r1, "R@5": r5, "R@10": r10}
    by_kind = lambda captioned, uncaptioned: {"captioned": captioned, "uncaptioned": uncaptioned}
    # re-ranked grids under two priors: "10,0" is best for captioned queries alone, "10,5" on the mean
    grid = lambda a, b: {"reranked_by_weight": {"10,0": r(0), "10,5": r(0)},
                         "reranked_by_weight_by_kind": {"10,0": by_kind(r(0.9), r(0.1)), "10,5": by_kind(a, b)}}
    chosen = chosen_weights({PriorWeights(): {"by_kind": {}, **grid(r(0.7), r(0.5))},
                             PriorWeights(added_bonus=2): {"by_kind": {}, **grid(r(0.6), r(0.6))}})
    assert chosen == {"beam_hubness_weight": 0.0, "added_bonus": 0.0, "rerank_weight": 10.0, "hubness_weight": 5.0,
                      "on": "mean of captioned and uncaptioned", "by": "R@10", "R@1": pytest.approx(0.1),
                      "R@5": pytest.approx(0.5), "R@10": pytest.approx(0.6)}
    # one kind only, beams' own order: an exact tie goes to the smaller weights
    chosen = chosen_weights({PriorWeights(hubness=20): r(0.8), PriorWeights(hubness=10): r(0.8, 0.6),
                             PriorWeights(hubness=5): r(0.8, 0.6)})
    assert (chosen["beam_hubness_weight"], chosen["on"]) == (5.0, "all queries") and "rerank_weight" not in chosen
    # by R@1 first: the best R@1 wins however it ranks at R@10
    by_r1 = chosen_weights({PriorWeights(added_bonus=6): r(0.9, r1=0.2), PriorWeights(added_bonus=2): r(0.7, r1=0.3)},
                           by="R@1")
    assert (by_r1["added_bonus"], by_r1["by"]) == (2.0, "R@1")
