"""Add images to a trained model without training it again (`genret add`).

With atomic ids whose rows were placed from the aligned space and then frozen (`genret train`'s
defaults), an id's row is a fixed function of its image's aligned embedding: a + s x (e @ P),
P the training seed's random projection (`genret.training.id_row_projection`), the output head
tied to the rows. Training taught the LM only to bring a query's state near the right row, so a
new image whose row is placed by the same function is searchable at once, with no gradient
step. a and s are read back from the trained rows themselves (a least-squares fit that frozen
rows satisfy to float rounding), which also proves the rows are still where they were placed.

What an added image lacks is what training gives: pseudo-queries (it is ranked by its place in
the aligned space alone) and words for describe and ask. Retraining with the new images
(`genret train`) remains the way to make them first-class; `benchmarks/add_images.py` measures
the difference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .catalog import Catalog
from .model_store import (ATOMIC_TOKEN, HUBNESS_BANK, MANIFEST, REMOVED_TRAINED_CAPTIONS, ModelStoreError,
                          StoredModel, changes_model, copy_unchanged, images_root, staged_model_dir, write_json)
from .prompts import Prompts
from .training import id_row_projection

FIT_SAMPLE = 4096  # trained rows the placement is fit on (two would do; more guard against a moved row)
FIT_TOLERANCE = 1e-4  # relative misfit above which the rows are taken to have moved since they were placed
# what add_images rewrites (the removed images' captions go into the bank); every other file is copied unchanged
REWRITTEN = ("lm", "catalog.json", "identifiers.json", "image_embeddings.npy", "image_hubness.npy",
             REMOVED_TRAINED_CAPTIONS, MANIFEST)


@dataclass(frozen=True)
class Added:
    keys: list[str]  # the images added, in key order
    already_there: list[str]  # the catalog's images the model held before, left as they were
    seconds: float


def check_can_add(stored: StoredModel) -> None:
    """A ModelStoreError saying why images cannot be added to this model without retraining."""
    config = stored.manifest.get("train_config", {})
    retrain = "retrain it with the new images in its catalog (`genret train`)"
    if stored.manifest["scheme"] != "atomic":
        raise ModelStoreError(f"{stored.path}: images can be added without training only to atomic ids, and this "
                              f"model has {stored.manifest['scheme']} ids: {retrain}")
    if config.get("id_embeddings") != "aligned" or not config.get("freeze_id_rows"):
        raise ModelStoreError(f"{stored.path}: its id rows were trained, not placed from the aligned space and "
                              f"frozen (id_embeddings='aligned' with freeze_id_rows, the defaults): {retrain}")
    if not stored.can_rerank:
        raise ModelStoreError(f"{stored.path}: it lacks alignment.safetensors or image_embeddings.npy, which "
                              f"place a new image's id: {retrain}")


def row_placement(stored: StoredModel, rows: torch.Tensor) -> Callable[[np.ndarray], torch.Tensor]:
    """Aligned image embeddings -> their id rows, a + s x (embedding @ P), with a and s fit so
    that every trained id's row in `rows` (the LM's embedding table) follows it; a
    ModelStoreError where the trained rows do not (they moved)."""
    keys = stored.keys
    trained = [k for k in keys if k not in stored.added_keys]
    picks = np.linspace(0, len(trained) - 1, min(FIT_SAMPLE, len(trained))).round().astype(int)
    sample = sorted({trained[i] for i in picks})
    if len(sample) < 2:
        raise ModelStoreError(f"{stored.path}: a model of one trained image cannot place new ids; retrain it")
    position = {k: i for i, k in enumerate(keys)}
    embeddings = stored.image_embeddings()
    projection = id_row_projection(embeddings.shape[1], rows.shape[1], stored.manifest["train_config"]["seed"])
    x = torch.from_numpy(np.asarray(embeddings[[position[k] for k in sample]], dtype=np.float64)) @ projection
    y = rows[[stored.id_tokens[k][0] for k in sample]].double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    scale = ((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum()
    base = y_mean - scale * x_mean
    misfit = ((y - base - scale * x).norm() / (y - y_mean).norm()).item()
    if not misfit <= FIT_TOLERANCE:
        raise ModelStoreError(f"{stored.path}: its id rows no longer follow their images' aligned embeddings "
                              f"(relative misfit {misfit:.2g}); retrain it with the new images in its catalog")
    return lambda new: base + scale * (torch.from_numpy(np.asarray(new, dtype=np.float64)) @ projection)


def hubness_bank(stored: StoredModel, tower, device: str | None, progress: bool) -> np.ndarray:
    """The trained captions' aligned embeddings, which a new image's hubness is measured against.
    Encoding them is most of an addition's cost (MiniLM: about 330 captions/s on 2 CPU cores, so
    90 s for Flickr8k's 30,000), so the first addition keeps them in the model (HUBNESS_BANK,
    1 KB a caption) and later ones read them back; a retrain writes a new folder without it.
    Added images' captions are stored for display, never trained on, so they stay out of it;
    removed images' trained captions stay in (StoredModel.trained_captions)."""
    from .alignment import text_embeddings
    from .encoders import TextEncoder

    path = stored.path / HUBNESS_BANK
    if path.exists():
        return np.load(path)
    return text_embeddings(tower, TextEncoder(device=device).encode(stored.trained_captions(), progress=progress))


@changes_model
def add_images(model_dir: str | Path, images: Catalog, *, device: str | None = None, progress: bool = True) -> Added:
    """Add the catalog's images the model does not hold yet, in place: the model folder is
    rebuilt beside it and swapped in whole, so an interruption leaves the old model intact."""
    from .alignment import hubness, image_embeddings
    from .encoders import ImageEncoder

    started = time.perf_counter()
    stored = StoredModel.open(model_dir)
    check_can_add(stored)
    already = [im.key for im in images if im.key in stored.id_tokens]
    new = [im for im in images if im.key not in stored.id_tokens]
    if not new:
        return Added([], already, time.perf_counter() - started)

    tower = stored.load_two_tower()
    features = ImageEncoder(device=device).encode_paths([im.path for im in new], progress=progress)
    new_embeddings = image_embeddings(tower, features)

    lm, tokenizer = stored.load_lm(), stored.load_tokenizer()
    place = row_placement(stored, lm.get_input_embeddings().weight.detach())
    numbered = [*stored.identifiers.ids.values(), *stored.identifiers.new_tokens]  # removed images' tokens too
    first = 1 + max(int(m.group(1)) for m in map(ATOMIC_TOKEN.fullmatch, numbered) if m)
    tokens = [f"<img_{first + i}>" for i in range(len(new))]
    if any(t in tokenizer.get_vocab() for t in tokens):
        raise ModelStoreError(f"{stored.path}: its tokenizer already holds tokens from {tokens[0]} on")
    tokenizer.add_tokens(tokens)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lm.config.vocab_size = len(tokenizer)
    prompts = Prompts(tokenizer)
    token_ids = [prompts.encode(t) for t in tokens]
    weight = lm.get_input_embeddings().weight
    with torch.no_grad():
        weight[[ids[0] for ids in token_ids]] = place(new_embeddings).to(weight.dtype)

    keys = stored.keys + [im.key for im in new]
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    tables = {"image_embeddings.npy": np.concatenate([stored.image_embeddings(), new_embeddings])}
    if stored.has_image_hubness:
        bank = hubness_bank(stored, tower, device, progress)
        tables["image_hubness.npy"] = np.concatenate([stored.image_hubness(), hubness(new_embeddings, bank)])
    catalog = Catalog(stored.catalog.images + tuple(new))
    root = images_root(catalog)
    identifiers = json.loads((stored.path / "identifiers.json").read_text())
    identifiers["ids"].update((im.key, t) for im, t in zip(new, tokens))
    identifiers["new_tokens"] += tokens
    identifiers["tokens"].update((im.key, ids) for im, ids in zip(new, token_ids))
    manifest = {**stored.manifest, "catalog_size": len(catalog), "images_root": str(root),
                "trained_images": stored.trained_images}
    manifest["additions"] = [*stored.manifest.get("additions", []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "images": len(new),
        "first_token": tokens[0], "seconds": round(time.perf_counter() - started, 1)}]

    dest = Path(model_dir)
    with staged_model_dir(dest) as staging:
        copy_unchanged(dest, staging, REWRITTEN)
        lm.save_pretrained(staging / "lm")
        tokenizer.save_pretrained(staging / "lm")
        for name, table in tables.items():
            np.save(staging / name, table[order].astype(np.float32))
        if "image_hubness.npy" in tables and not (staging / HUBNESS_BANK).exists():
            np.save(staging / HUBNESS_BANK, bank.astype(np.float32))
        write_json(staging / "catalog.json", catalog.to_records(root))
        write_json(staging / "identifiers.json", identifiers)
        write_json(staging / MANIFEST, manifest)
    return Added([im.key for im in new], already, time.perf_counter() - started)  # a Catalog iterates in key order
