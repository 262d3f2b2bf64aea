"""A trained model's directory under `model_store/<name>/`: everything serving needs.

    manifest.json          what this is: scheme, training config, catalog size, metrics, versions
    lm/                    plain HF checkpoint + tokenizer with the id tokens (transformers and vLLM load it)
    visual_prefix.safetensors   image features -> soft tokens (used for memorizing and captioning)
    query_prefix.safetensors    aligned query embedding -> soft tokens before the retrieve prompt
                                (only models trained with query_tokens > 0)
    identifiers.json       key -> identifier text and its token ids (the trie is built from these)
    catalog.json           key -> image path (relative to the manifest's images_root) and captions
    alignment.safetensors  two-tower heads (query/image embeddings for re-ranking beams)
    image_embeddings.npy   aligned image embeddings, row order = identifiers order
    image_hubness.npy      each image's mean similarity to its nearest training captions, same order
                           (re-ranking subtracts a multiple: see genret.alignment.hubness)
    hubness_bank.npy       the trained captions' aligned embeddings (kept by the first `genret add`)
    removed_trained_captions.json   removed images' trained captions, until that bank is kept

A model is written into a hidden staging folder and renamed into place, so a crash never
leaves a half-written model and a re-train replaces the old one in one step.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .catalog import Catalog
from .identifiers import IdentifierAssignment
from .model import QueryPrefix, SoftPrefix
from .prompts import normalize_caption
from .trie import IdTrie

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HUBNESS_BANK = "hubness_bank.npy"  # the trained captions' aligned embeddings, kept by the first `genret add`
# the trained captions of images `genret remove` took out before that bank was kept (genret.adding.hubness_bank)
REMOVED_TRAINED_CAPTIONS = "removed_trained_captions.json"
DEFAULT_ANSWER_TOKENS = 48  # Flickr8k's longest caption is 43 tokens with its end
FORMAT_VERSION = 1
ATOMIC_TOKEN = re.compile(r"<img_(\d+)>")  # the atomic scheme's id token (genret.identifiers)


# tokenizer_config.json keys about the files or the class, not the tokenizer (tokenizer.json
# holds its added tokens; older transformers also listed them all here).
_TOKENIZER_FILE_KEYS = ("tokenizer_class", "backend", "auto_map", "is_local", "local_files_only",
                        "added_tokens_decoder", "name_or_path")


class ModelStoreError(RuntimeError):
    pass


class UnknownImage(ModelStoreError, KeyError):
    """An image key the model has no id for (never memorized, or removed since)."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0])


class UntrainedTask(ModelStoreError):
    """Describe or ask of a model trained without it (`--set describe=false`): its answer would
    be the base LM's guess about an id it never learnt to speak of, so it is refused instead."""


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{path.suffix}")  # np.save would add a missing .npy


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A hidden sibling of `path` to write, renamed over it when the block ends: a run killed
    mid-write (Ctrl-C, a GPU call's time limit) leaves the old file or the new one, never half of
    one, which the next run would fail to read (a checkpoint cut off so lost every epoch)."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    with written_atomically(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def save_model(
    dest: Path,
    *,
    lm,
    tokenizer,
    prefix: SoftPrefix,
    query_prefix: QueryPrefix | None = None,
    catalog: Catalog,
    identifiers: IdentifierAssignment,
    id_tokens: dict[str, list[int]],
    two_tower=None,
    image_embeddings: np.ndarray | None = None,
    image_hubness: np.ndarray | None = None,
    manifest: dict,
) -> Path:
    from .alignment import save_two_tower

    dest = Path(dest)
    with folder_lock(dest), staged_model_dir(dest) as staging:
        lm.save_pretrained(staging / "lm")
        tokenizer.save_pretrained(staging / "lm")
        _save_module(prefix, staging / "visual_prefix.safetensors")
        if query_prefix is not None:
            _save_module(query_prefix, staging / "query_prefix.safetensors")
        root = images_root(catalog)
        write_json(staging / "catalog.json", catalog.to_records(root))
        write_json(staging / "identifiers.json", {**identifiers.to_json(), "tokens": id_tokens})
        if two_tower is not None:
            save_two_tower(two_tower, staging / "alignment.safetensors")
        if image_embeddings is not None:
            np.save(staging / "image_embeddings.npy", image_embeddings.astype(np.float32))
        if image_hubness is not None:
            np.save(staging / "image_hubness.npy", image_hubness.astype(np.float32))
        full_manifest = {
            "format_version": FORMAT_VERSION,
            "name": dest.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scheme": identifiers.scheme,
            "catalog_size": len(catalog),
            "images_root": str(root),
            "prefix": prefix.shape,
            "query_prefix": query_prefix.shape if query_prefix is not None else None,
            **manifest,
        }
        write_json(staging / MANIFEST, full_manifest)
    return dest


@contextmanager
def folder_lock(folder: Path, busy: str | None = None) -> Iterator[None]:
    """Held while a process changes a folder: a model (training saving it, `genret add`, `genret
    remove`) or a training run. Changes to a model then follow one another, each reading what the
    one before wrote: without it, two `genret add` at once each wrote the model they had read plus
    their own images, and the one that finished last lost the other's. A folder in use is waited
    for, or with `busy` refused at once (ValueError(busy)). An flock, so a killed process never
    leaves it held; its file is deleted on release, and a waiter then holding a deleted file
    takes a new one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path, warned = folder.parent / f".{folder.name}.lock", False
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                lock.close()
                raise ValueError(busy) from None
            if not warned:
                log.warning("waiting for another process that is changing %s ...", folder)
                warned = True
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: whoever waits on this file then takes a new one
        lock.close()


def changes_model(change: Callable) -> Callable:
    """`change(model_dir, ...)`, run holding the model's lock: its read and its write are one step."""

    @functools.wraps(change)
    def locked(model_dir, *args, **kwargs):
        with folder_lock(Path(model_dir)):
            return change(model_dir, *args, **kwargs)

    return locked


def check_model_destination(dest: Path) -> None:
    """A ModelStoreError where a model written to `dest` would replace something that is not a
    model: it is swapped in whole, so what the folder held would be deleted (`--out ~/photos`)."""
    if not dest.exists() or (dest / MANIFEST).is_file():
        return
    if not dest.is_dir():
        raise ModelStoreError(f"{dest} is a file, and a model is a folder: choose another destination")
    if held := sorted(p.name for p in dest.iterdir()):
        raise ModelStoreError(f"{dest} is not a trained model (no {MANIFEST}) and holds files ({', '.join(held[:3])}"
                              f"{' ...' if len(held) > 3 else ''}), which a model written there would replace: "
                              "choose a new or empty folder, or a model to replace")


@contextmanager
def staged_model_dir(dest: Path) -> Iterator[Path]:
    """A hidden folder beside `dest` to write a model into. When the block ends it replaces
    `dest` (if any) by renames, so readers see the old model or the new one, never a mix; if the
    block raises, it is removed and `dest` is left as it was."""
    check_model_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        yield staging
        _permissions_from_umask(staging)
        if dest.exists():
            old = dest.with_name(f".{dest.name}-old-{int(time.time())}")
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _permissions_from_umask(folder: Path) -> None:
    """Give a written model the permissions a plain mkdir and open would have given it. mkdtemp
    makes its folder owner-only, and safetensors writes owner-only files, so a server running as
    another user (the container's, reading the host's model_store) could not read the model."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (folder, *folder.rglob("*")):
        if path.is_symlink() or stat.S_IMODE(path.stat().st_mode) == (want := (0o777 if path.is_dir() else 0o666) & ~mask):
            continue
        try:
            path.chmod(want)
        except PermissionError:  # a file hard-linked from the old model that another user owns keeps theirs
            pass


def copy_unchanged(model: Path, staging: Path, rewritten: Iterable[str]) -> None:
    """Copy a model's files into the staging folder that replaces it, all but those the caller
    writes anew (`genret add` and `genret remove` change a model in place this way). Files are
    hard-linked where the file system allows: no model file is ever written in place (every
    write goes to a new staging folder), and `genret remove` then copies no weights at all."""
    for path in model.iterdir():
        if path.name not in rewritten:
            if path.is_dir():
                shutil.copytree(path, staging / path.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(path, staging / path.name)


def _link_or_copy(source, dest) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def images_root(catalog: Catalog) -> Path:
    """The folder holding every catalog image: paths are stored relative to it, so a server that
    finds the images elsewhere (a container's mount) only needs to be told the new folder."""
    return Path(os.path.commonpath([str(image.path.resolve().parent) for image in catalog]))


def _save_module(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous().cpu() for k, v in module.state_dict().items()}, path)


def list_models(store: Path) -> list[tuple[Path, StoredModel | ModelStoreError]]:
    """Every folder in the store with its model, or the error that keeps it from opening. Hidden
    folders (a staging folder being written, a replaced model being deleted) are left out."""
    folders = sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.is_dir() else []
    found: list[tuple[Path, StoredModel | ModelStoreError]] = []
    for folder in folders:
        try:
            found.append((folder, StoredModel.open(folder)))
        except ModelStoreError as e:
            found.append((folder, e))
    return found


def folder_bytes(path: Path) -> int:
    """The bytes of every file under `path` (a model's size on disk, hard links counted in full)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def key_set(name: str, keys: Iterable[str] | None) -> set[str] | None:
    """Image keys given as a collection, as a set; a TypeError for one string (it would be its
    characters) or for a key that is not a string (a None would read as an unknown image)."""
    if keys is None:
        return None
    if isinstance(keys, str):
        raise TypeError(f"{name} takes a collection of image keys, not one string: {name}=[{keys!r}]")
    keys = list(keys)
    require_strings(name, "image keys", keys)
    return set(keys)


def require_strings(call: str, what: str, values: list) -> None:
    """A TypeError naming the call and the items, where a None or a number would otherwise fail
    deep inside with an AttributeError."""
    if wrong := [i for i, value in enumerate(values) if not isinstance(value, str)]:
        raise TypeError(f"{call} takes {what} as strings: {what} {wrong[:5]} are not, e.g. {values[wrong[0]]!r}")


@dataclass
class StoredModel:
    """A model directory, read lazily: the id map is cheap, the weights are loaded on demand.
    `images_dir` is where the catalog's images are now, when not where training found them."""

    path: Path
    manifest: dict = field(repr=False)
    images_dir: Path | None = None

    @classmethod
    def open(cls, path: str | Path, images_dir: str | Path | None = None) -> "StoredModel":
        path = Path(path)
        manifest_path = path / MANIFEST
        try:
            if not manifest_path.exists():
                raise ModelStoreError(f"{path}: not a trained model (no {MANIFEST}); train one with `genret train`")
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelStoreError(f"{manifest_path}: unreadable manifest ({e})") from e
        except PermissionError as e:  # models written before its permissions followed the umask were owner-only
            raise ModelStoreError(f"{path}: this user (uid {os.getuid()}) may not read the model ({e.strerror}); "
                                  f"its owner can allow it: chmod -R a+rX {path}") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ModelStoreError(f"{manifest_path}: format {manifest.get('format_version')} is not {FORMAT_VERSION}")
        return cls(path, manifest, Path(images_dir) if images_dir is not None else None)

    @classmethod
    def find(cls, name_or_path: str | Path, store: Path | None = None) -> "StoredModel":
        """A model by path, or by name under the model store (GENRET_MODEL_STORE, else model_store/)."""
        from . import MODEL_STORE  # read when called, so it can be pointed elsewhere

        path = Path(name_or_path)
        return cls.open(path if path.exists() else (store or MODEL_STORE) / name_or_path)

    @property
    def name(self) -> str:
        """The model's folder name, which is how it is found and served: a copy under another name
        is that other model (the manifest's `name` records the folder it was trained into)."""
        return self.path.resolve().name

    def summary(self) -> dict:
        """A model at a glance (`genret models`), from its manifest and file sizes: no weights read."""
        changes = [entry["at"] for entry in (*self.manifest.get("additions", []), *self.manifest.get("removals", []))]
        return {"name": self.name, "scheme": self.manifest["scheme"], "images": self.manifest["catalog_size"],
                "trained_images": self.trained_images, "tasks": self.tasks, "created": self.manifest.get("created"),
                "changed": max(changes, default=self.manifest.get("created")), "bytes": folder_bytes(self.path),
                "path": str(self.path), "folder": self.path.name}

    @property
    def lm_path(self) -> Path:
        return self.path / "lm"

    @cached_property
    def catalog(self) -> Catalog:
        # models written before images_root was recorded hold absolute paths, which it leaves alone
        root = self.images_dir or self.manifest.get("images_root")
        return Catalog.from_records(json.loads((self.path / "catalog.json").read_text()), root=root)

    @cached_property
    def _identifiers_json(self) -> dict:
        return json.loads((self.path / "identifiers.json").read_text())

    @cached_property
    def identifiers(self) -> IdentifierAssignment:
        return IdentifierAssignment.from_json(self._identifiers_json)

    @property
    def id_tokens(self) -> dict[str, list[int]]:
        return self._identifiers_json["tokens"]

    def image_id_tokens(self, key: str) -> list[int]:
        """The id tokens of one image, or UnknownImage naming the model."""
        if not isinstance(key, str):  # a list would be "unhashable", a None an unknown image
            raise TypeError(f"an image key is a string, not {type(key).__name__}: {key!r}")
        try:
            return self.id_tokens[key]
        except KeyError:
            raise UnknownImage(f"unknown image {key!r} in model {self.name}") from None

    @cached_property
    def keys(self) -> list[str]:
        """The catalog's keys in its (sorted) order, the row order of image_embeddings.npy and
        image_hubness.npy. Every catalog image has one id, so they come from identifiers.json,
        which the trie reads anyway: parsing catalog.json takes seconds at a million images."""
        keys = sorted(self.id_tokens)
        if len(keys) != self.manifest.get("catalog_size", len(keys)):
            raise ModelStoreError(f"{self.path}: identifiers.json has {len(keys)} ids for a catalog of "
                                  f"{self.manifest['catalog_size']} images")
        return keys

    @property
    def tasks(self) -> list[str]:
        """What training taught: search always, describe and ask unless its config left them out
        (every model from before those options was taught both)."""
        config = self.manifest.get("train_config", {})
        return ["search", *(task for task in ("describe", "ask") if config.get(task, True))]

    @property
    def answer_tokens(self) -> int:
        """The most tokens a description or answer is generated for: 48, or the longest caption
        training taught with its end token where that is longer (up to caption_chars characters,
        ~50 tokens of English and ~95 of German), so a memorized description is never cut."""
        return max(DEFAULT_ANSWER_TOKENS, int(self.manifest.get("answer_tokens", 0)))

    @property
    def asks_from_description(self) -> bool:
        """Whether an ask follows the model's own description of the image (ask_from_description)."""
        return bool(self.manifest.get("train_config", {}).get("ask_from_description", False))

    @property
    def ask_descriptions(self) -> int:
        """How many of its own descriptions, joined, an ask follows (ask_descriptions; 1 before it)."""
        return int(self.manifest.get("train_config", {}).get("ask_descriptions", 1))

    def require_trained_to(self, task: str) -> None:
        if task not in self.tasks:
            raise UntrainedTask(f"model {self.name!r} was not trained to {task} (its training config "
                                f"has {task}=false): retrain it without --set {task}=false")

    @property
    def trained_images(self) -> int:
        """How many images training saw: the manifest records it once `genret add` or `genret
        remove` changes the catalog."""
        return self.manifest.get("trained_images", self.manifest["catalog_size"])

    @property
    def has_added_images(self) -> bool:
        """Whether the catalog holds images `genret add` put there after training."""
        return bool(self.added_keys)

    @cached_property
    def added_keys(self) -> frozenset[str]:
        """The images added after training (`genret add`: their atomic ids are numbered past the
        trained ones). Read once: every search with an added-id bonus asks about every key."""
        if not self.manifest.get("additions"):
            return frozenset()
        trained = self.trained_images
        return frozenset(key for key, id_ in self.identifiers.ids.items()
                         if (match := ATOMIC_TOKEN.fullmatch(id_)) and int(match.group(1)) >= trained)

    @cached_property
    def trained_caption_keys(self) -> frozenset[str]:
        """The images whose captions training read: those with stored captions, less the ones added
        after training (whose captions are stored for display only). The model and its two-tower
        pull queries towards these, so recall differs for queries that seek them and for the rest."""
        return frozenset(image.key for image in self.catalog if image.captions and image.key not in self.added_keys)

    def trained_captions(self) -> list[str]:
        """Every caption training read, as it read them (normalized, a long one cut), those of images
        removed since included: the queries the model was pulled towards, which hubness is measured
        against (genret.adding.hubness_bank)."""
        trained = self.trained_caption_keys
        limit = self.manifest.get("train_config", {}).get("caption_chars")  # None: trained before captions were cut
        captions = [c for image in self.catalog if image.key in trained for c in image.captions]
        return [normalize_caption(c, limit) for c in captions + self.removed_trained_captions()]

    def removed_trained_captions(self) -> list[str]:
        """The trained captions of images `genret remove` took out before the hubness bank was kept."""
        path = self.path / REMOVED_TRAINED_CAPTIONS
        return json.loads(path.read_text()) if path.exists() else []

    @property
    def end_token(self) -> int:
        return self.manifest["end_token"]

    def trie(self, within=None, exclude=None) -> IdTrie:
        """The catalog's id trie, built once and shared (an engine and a prior over it must hold
        the same one), or a new one over the keys `within` alone: a search that may only return those
        images. An unknown key is an UnknownImage naming the first few. `exclude`: leave these images
        out (of the catalog, or of `within`); the catalog less a few shares all but their paths
        (IdTrie.without). Keys the model lacks are already left out, so they are no error there
        (a page of hits to skip may name an image removed since)."""
        within, exclude = key_set("within", within), key_set("exclude", exclude)
        excluded = set() if exclude is None else exclude.intersection(self.id_tokens)
        if within is None and not excluded:
            return self._catalog_trie
        if within is None:
            if len(excluded) == len(self.id_tokens):
                raise ValueError(f"exclude leaves out all {len(excluded)} images of model {self.name}: none to search")
            return self._catalog_trie.without({k: self.id_tokens[k] for k in excluded})
        if not within:
            raise ValueError("no image keys: a trie of none could return nothing")
        if unknown := sorted(within.difference(self.id_tokens)):
            raise UnknownImage(f"{len(unknown)} of {len(within)} image keys are not in model {self.name}, "
                               f"e.g. {unknown[:5]}")
        if within <= excluded:
            raise ValueError(f"exclude leaves out all {len(within)} images searched within: none to search")
        return IdTrie({k: self.id_tokens[k] for k in within - excluded}, end_token=self.end_token)

    @cached_property
    def _catalog_trie(self) -> IdTrie:
        return IdTrie(self.id_tokens, end_token=self.end_token)

    def load_tokenizer(self):
        """The checkpoint's tokenizer, built straight from its tokenizer.json. AutoTokenizer copies
        every added token through Python several times: 40 s at a million atomic ids, against 10 s
        this way (benchmarks/SCALE.md). Both tokenize and decode alike (tests/test_memorization.py)."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        file, config = self.lm_path / "tokenizer.json", self.lm_path / "tokenizer_config.json"
        if not file.exists():
            return AutoTokenizer.from_pretrained(self.lm_path)
        options = json.loads(config.read_text()) if config.exists() else {}
        options = {k: v for k, v in options.items() if k not in _TOKENIZER_FILE_KEYS}
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file), name_or_path=str(self.lm_path), **options)
        template = self.lm_path / "chat_template.jinja"
        if template.exists() and tokenizer.chat_template is None:
            tokenizer.chat_template = template.read_text()
        return tokenizer

    def load_lm(self, device: str = "cpu", dtype=torch.float32):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(self.lm_path, dtype=dtype).to(device).eval()

    def _load_prefix(self, cls, shape: dict, filename: str, device: str):
        prefix = cls(**shape)  # the manifest records the constructor's arguments (SoftPrefix.shape)
        prefix.load_state_dict(load_file(self.path / filename))
        return prefix.to(device).eval()

    def load_prefix(self, device: str = "cpu") -> SoftPrefix:
        return self._load_prefix(SoftPrefix, self.manifest["prefix"], "visual_prefix.safetensors", device)

    @property
    def uses_query_prefix(self) -> bool:
        """Whether retrieval prompts start with the query's aligned embedding (see genret.model)."""
        return bool(self.manifest.get("query_prefix"))

    def load_query_prefix(self, device: str = "cpu") -> QueryPrefix | None:
        if not self.uses_query_prefix:
            return None
        return self._load_prefix(QueryPrefix, self.manifest["query_prefix"], "query_prefix.safetensors", device)

    def load_query_soft_prefix(self, device: str = "cpu") -> Callable[[list[str]], torch.Tensor] | None:
        """Query texts -> the query prefix's soft tokens (Q, n_tokens, dim); None for a text-only model."""
        prefix = self.load_query_prefix(device)
        if prefix is None:
            return None
        encoder = self.load_query_encoder(device)
        return lambda queries: prefix.embed_queries(encoder(queries))

    def load_two_tower(self):
        from .alignment import load_two_tower

        path = self.path / "alignment.safetensors"
        return load_two_tower(path) if path.exists() else None

    def load_query_encoder(self, device: str = "cpu"):
        from .alignment import QueryEncoder

        tower = self.load_two_tower()
        if tower is None:
            raise ModelStoreError(f"{self.path} has no alignment model (alignment.safetensors) to embed queries with")
        return QueryEncoder(tower, device)

    @property
    def can_rerank(self) -> bool:
        """Whether the model holds what re-ranking reads: the two-tower and the images' embeddings."""
        return (self.path / "alignment.safetensors").exists() and (self.path / "image_embeddings.npy").exists()

    def image_embeddings(self) -> np.ndarray | None:
        """Read-only and memory-mapped: re-ranking reads the rows of a beam's hits, not the whole
        table (1 GB at a million images of 256 dimensions)."""
        path = self.path / "image_embeddings.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None

    @property
    def has_image_hubness(self) -> bool:
        """Whether re-ranking can subtract hubness (models saved before it existed lack it)."""
        return (self.path / "image_hubness.npy").exists()

    def image_hubness(self) -> np.ndarray | None:
        path = self.path / "image_hubness.npy"
        return np.load(path) if path.exists() else None

    def check_image_hubness(self, purpose: str) -> None:
        """A ModelStoreError saying the model must be retrained to `purpose`, if it lacks image_hubness.npy."""
        if not self.has_image_hubness:
            raise ModelStoreError(f"{self.path} lacks image_hubness.npy (models trained before it existed): "
                                  f"retrain it to {purpose}")

    def required_image_hubness(self, purpose: str) -> np.ndarray:
        """The images' hubness (see check_image_hubness)."""
        self.check_image_hubness(purpose)
        return self.image_hubness()
