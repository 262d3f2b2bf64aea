"""Remove images from a trained model without training it again (`genret remove`): a takedown,
a product withdrawn from the catalog.

The search is constrained to the trie of the catalog's ids, so an id left out of it can never be
generated again, whatever the weights still remember; describe and ask refuse an image the
catalog no longer holds, and the service no longer maps it to a URL. That is what removal
changes: the catalog, the ids and the per-image tables, in every identifier scheme. The LM is
kept unchanged (hard-linked into the new folder), its tokens included, so `genret add` numbers
new atomic ids past the removed ones and an old id never comes to name another image. To take
an image out of the weights as well, retrain without it (`genret train`).

The removed images' trained captions stay, as the LM's memory of them does: the first `genret add`
measures new images' hubness against every caption training read (`genret.adding.hubness_bank`),
so until that bank is kept, removal keeps them aside (REMOVED_TRAINED_CAPTIONS).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model_store import (HUBNESS_BANK, MANIFEST, REMOVED_TRAINED_CAPTIONS, ModelStoreError, StoredModel,
                          changes_model, copy_unchanged, staged_model_dir, write_json)

# what remove_images rewrites; every other file of the model (the LM among them) is linked unchanged
REWRITTEN = ("catalog.json", "identifiers.json", "image_embeddings.npy", "image_hubness.npy",
             REMOVED_TRAINED_CAPTIONS, MANIFEST)


@dataclass(frozen=True)
class Removed:
    keys: list[str]  # the images removed, in key order
    not_there: list[str]  # keys asked for that the model does not hold (removed before, or never added)
    seconds: float


def removed_trained_captions(stored: StoredModel, gone: list[str]) -> list[str]:
    """The trained captions the hubness bank would lose with these images, added to those kept
    aside by earlier removals."""
    gone_trained = [stored.catalog[key] for key in gone if key in stored.trained_caption_keys]
    return stored.removed_trained_captions() + [c for image in gone_trained for c in image.captions]


@changes_model
def remove_images(model_dir: str | Path, keys: Iterable[str]) -> Removed:
    """Remove these images from the model, in place: the model folder is rebuilt beside it and
    swapped in whole, so an interruption leaves the old model intact. Keys it lacks are
    reported, not refused, so a list of takedowns can be applied twice."""
    started = time.perf_counter()
    stored = StoredModel.open(model_dir)
    asked = set(keys)
    gone = sorted(asked & stored.id_tokens.keys())
    not_there = sorted(asked - set(gone))
    if not gone:
        return Removed([], not_there, time.perf_counter() - started)
    if len(gone) == len(stored.keys):
        raise ModelStoreError(f"{stored.path}: removing all {len(gone)} of its images would leave nothing to search")

    kept = [row for row, key in enumerate(stored.keys) if key not in asked]  # the tables' rows, in key order
    tables = {name: table[kept] for name, table in (("image_embeddings.npy", stored.image_embeddings()),
                                                     ("image_hubness.npy", stored.image_hubness())) if table is not None}
    # the stored records filtered as they are: their paths stay relative to the same images_root
    records = [r for r in json.loads((stored.path / "catalog.json").read_text()) if r["key"] not in asked]
    identifiers = json.loads((stored.path / "identifiers.json").read_text())
    for key in gone:  # its tokens stay in new_tokens, as in the tokenizer: they are never reused
        del identifiers["ids"][key], identifiers["tokens"][key]
    # trained_images: how many training saw, not how many are left (see StoredModel.added_keys)
    manifest = {**stored.manifest, "catalog_size": len(records), "trained_images": stored.trained_images}
    manifest["removals"] = [*stored.manifest.get("removals", []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "images": len(gone),
        "seconds": round(time.perf_counter() - started, 1)}]

    dest = Path(model_dir)
    with staged_model_dir(dest) as staging:
        copy_unchanged(dest, staging, REWRITTEN)
        for name, table in tables.items():
            np.save(staging / name, table.astype(np.float32))
        write_json(staging / "catalog.json", records)
        write_json(staging / "identifiers.json", identifiers)
        write_json(staging / MANIFEST, manifest)
        if stored.has_image_hubness and not (dest / HUBNESS_BANK).exists() and \
                (aside := removed_trained_captions(stored, gone)):
            write_json(staging / REMOVED_TRAINED_CAPTIONS, aside)
    return Removed(gone, not_there, time.perf_counter() - started)
