"""`genret remove`: images taken out of a trained model are never returned again, and the rest of
the model searches exactly as before over the images left."""

from __future__ import annotations

import asyncio
import filecmp
import json
import shutil

import numpy as np
import pytest

from genret.adding import add_images
from genret.cli import main
from genret.decoding import PriorWeights, TransformersEngine, search_prior
from genret.model_store import HUBNESS_BANK, REMOVED_TRAINED_CAPTIONS, ModelStoreError, StoredModel
from genret.removing import remove_images

from .conftest import TINY_IMAGES

GONE = ["chelsea.jpg", "moon.jpg"]


@pytest.fixture(params=["tiny_model_dir", "tiny_default_model_dir"], ids=["structured ids", "atomic ids"])
def removed(request, tmp_path):
    """A copy of a tiny model with GONE removed, and the model it was copied from."""
    source = request.getfixturevalue(request.param)
    dest = tmp_path / "model"
    shutil.copytree(source, dest)
    result = remove_images(dest, [*GONE, "never-there.jpg"])
    return StoredModel.open(dest), StoredModel.open(source), result


def test_removed_images_are_never_returned_and_the_rest_rank_as_before(removed, demo_catalog):
    after, before, result = removed
    kept = [k for k in TINY_IMAGES if k not in GONE]
    assert (result.keys, result.not_there) == (GONE, ["never-there.jpg"])
    assert after.keys == kept and after.catalog.keys() == kept and set(after.identifiers.ids) == set(kept)
    assert (after.manifest["catalog_size"], after.manifest["trained_images"]) == (len(kept), len(TINY_IMAGES))
    assert [r["images"] for r in after.manifest["removals"]] == [len(GONE)]
    records = lambda stored: json.loads((stored.path / "catalog.json").read_text())
    assert records(after) == [r for r in records(before) if r["key"] not in GONE]  # paths as stored, same root
    assert after.manifest["images_root"] == before.manifest["images_root"]
    # every query, those seeking the removed images first, over the whole (smaller) catalog
    queries = [c for k in GONE + kept for c in demo_catalog[k].captions[:2]]
    hits = TransformersEngine(after).search(queries, k=len(kept), beams=len(kept))
    assert all(len(row) == len(kept) and not {h.key for h in row} & set(GONE) for row in hits)
    # removal is the old model's search restricted to the images left: the same ids, the same scores
    expected = TransformersEngine(before).search(queries, k=len(kept), beams=len(kept), trie=before.trie(kept))
    assert [[h.key for h in row] for row in hits] == [[h.key for h in row] for row in expected]
    assert [h.score for row in hits for h in row] == pytest.approx([h.score for row in expected for h in row], abs=1e-4)
    # each image's tables are its own, and the LM is untouched
    for table in ("image_embeddings", "image_hubness"):
        old = dict(zip(before.keys, getattr(before, table)()))
        assert np.array_equal(getattr(after, table)(), np.stack([old[k] for k in kept]))
    assert filecmp.cmp(after.lm_path / "model.safetensors", before.lm_path / "model.safetensors", shallow=False)


def test_the_service_no_longer_knows_a_removed_image(removed):
    from service.app import create_app
    from service.settings import Settings
    from tests.service_helpers import serve

    after, _, _ = removed

    async def calls():
        async with serve(create_app(Settings(model=str(after.path), engine="transformers", device="cpu",
                                             beams=3))) as client:
            search = await client.post("/search", json={"query": "a tabby cat with green eyes", "k": 6})
            return (search, await client.post(f"/describe/{GONE[0]}"),
                    await client.post("/ask", json={"image_id": GONE[1], "question": "What is in this image?"}),
                    await client.get(f"/images/{GONE[0]}"))

    search, describe, ask, image = asyncio.run(calls())
    assert search.status_code == 200 and not {hit["image_id"] for hit in search.json()["results"]} & set(GONE)
    assert [r.status_code for r in (describe, ask, image)] == [404, 404, 404]


def test_removing_again_changes_nothing_and_removing_everything_is_refused(removed):
    after, _, _ = removed
    written = {p.name: p.stat().st_mtime_ns for p in after.path.iterdir()}
    again = remove_images(after.path, GONE)
    assert (again.keys, again.not_there) == ([], GONE)
    with pytest.raises(ModelStoreError, match="would leave nothing to search"):
        remove_images(after.path, after.keys)
    assert {p.name: p.stat().st_mtime_ns for p in after.path.iterdir()} == written


def test_an_id_freed_by_removal_never_names_another_image(tiny_default_model_dir, demo_catalog, tmp_path):
    """Added atomic ids are numbered past every token the LM holds, the removed images' too; the
    added-id bonus still finds exactly the added images that are left."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    add_images(dest, demo_catalog.subset(["brick.jpg", "clock.jpg"]), progress=False)  # <img_8>, <img_9>
    remove_images(dest, ["clock.jpg", "astronaut.jpg"])
    stored = StoredModel.open(dest)
    assert stored.added_keys == {"brick.jpg"} and stored.trained_images == len(TINY_IMAGES)
    add_images(dest, demo_catalog.subset(["clock.jpg", "grass.jpg"]), progress=False)
    stored = StoredModel.open(dest)
    assert [stored.identifiers.ids[k] for k in ("brick.jpg", "clock.jpg", "grass.jpg")] == \
           ["<img_8>", "<img_10>", "<img_11>"]
    assert stored.added_keys == {"brick.jpg", "clock.jpg", "grass.jpg"} and "astronaut.jpg" not in stored.id_tokens
    remove_images(dest, sorted(stored.added_keys))
    stored = StoredModel.open(dest)
    assert not stored.has_added_images and search_prior(stored, PriorWeights(added_bonus=3.0)) is None


def test_images_added_after_a_removal_measure_hubness_against_every_trained_caption(tiny_default_model_dir,
                                                                                  demo_catalog, tmp_path):
    """The removed images' captions were trained on, and the model still leans towards them: the
    first addition after a removal measures hubness as it would have without the removal."""
    removed_first, untouched = tmp_path / "removed first", tmp_path / "untouched"
    for dest in (removed_first, untouched):
        shutil.copytree(tiny_default_model_dir, dest)
    trained = StoredModel.open(untouched).catalog
    remove_images(removed_first, GONE[:1])
    remove_images(removed_first, GONE[1:])  # the second removal adds to what the first kept aside
    aside = json.loads((removed_first / REMOVED_TRAINED_CAPTIONS).read_text())
    assert sorted(aside) == sorted(c for k in GONE for c in trained[k].captions)
    new = demo_catalog.subset(["brick.jpg", "clock.jpg"])
    for dest in (removed_first, untouched):
        add_images(dest, new, progress=False)
    assert not (removed_first / REMOVED_TRAINED_CAPTIONS).exists()  # in the bank now
    banks = [np.load(dest / HUBNESS_BANK) for dest in (removed_first, untouched)]
    assert len(banks[0]) == len(banks[1]) == sum(len(trained[k].captions) for k in TINY_IMAGES)
    hubness = [dict(zip(s.keys, s.image_hubness())) for s in map(StoredModel.open, (removed_first, untouched))]
    assert [hubness[0][k] for k in new.keys()] == pytest.approx([hubness[1][k] for k in new.keys()], abs=1e-6)
    remove_images(removed_first, ["brick.jpg", "coffee.jpg"])  # with the bank kept, nothing is set aside
    assert not (removed_first / REMOVED_TRAINED_CAPTIONS).exists()


def test_the_cli_removes_keys_given_and_listed(tiny_model_dir, tmp_path, capsys):
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    (tmp_path / "takedowns.txt").write_text("moon.jpg\nnever-there.jpg\n\nmoon.jpg\n")  # lists get concatenated
    weights = (dest / "lm" / "model.safetensors").stat().st_ino
    assert main(["remove", str(dest), "chelsea.jpg", "--keys-file", str(tmp_path / "takedowns.txt")]) == 0
    assert (dest / "lm" / "model.safetensors").stat().st_ino == weights  # linked into the new folder, not copied
    out = capsys.readouterr().out
    assert "removed 2 images" in out and "1 not in it: never-there.jpg" in out and "restart its server" in out
    assert json.loads((dest / "manifest.json").read_text())["catalog_size"] == len(TINY_IMAGES) - 2
    assert main(["remove", str(dest), "moon.jpg"]) == 0 and "nothing to remove" in capsys.readouterr().out
    assert main(["remove", str(dest)]) == 2 and "name the images to remove" in capsys.readouterr().err
    assert main(["remove", str(dest), "--keys-file", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: no such keys file" in capsys.readouterr().err


def test_a_change_waits_for_the_one_in_progress_and_keeps_it(tiny_default_model_dir, demo_catalog, tmp_path, caplog):
    """Two changes at once (a takedown while images are added): the second waits for the model's
    lock, then reads what the first wrote. Each used to write the model it had read plus its own
    change, so the one that finished last undid the other."""
    import threading

    from genret.model_store import folder_lock

    dest = tmp_path / "model"
    shutil.copytree(tiny_default_model_dir, dest)
    waiting = threading.Thread(target=remove_images, args=(dest, ["moon.jpg"]))
    with folder_lock(dest):  # as another process holds it, mid-change
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive(), "the removal went ahead during another change"
        add_images.__wrapped__(dest, demo_catalog.subset(["brick.jpg"]), progress=False)  # that change
    waiting.join(timeout=60)
    assert not waiting.is_alive()
    stored = StoredModel.open(dest)
    assert "brick.jpg" in stored.id_tokens and "moon.jpg" not in stored.id_tokens
    assert f"waiting for another process that is changing {dest}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the lock file goes with the lock


def test_the_folder_lock_serializes_read_modify_write_even_as_its_file_comes_and_goes(tmp_path):
    import threading

    from genret.model_store import folder_lock

    counter = tmp_path / "model" / "count"
    counter.parent.mkdir()
    counter.write_text("0")

    def bump():
        for _ in range(25):
            with folder_lock(counter.parent):
                value = int(counter.read_text())
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "100" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
