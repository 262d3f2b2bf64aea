"""Training: align, name, memorize, retrieve (GRACE's two stages, with GENIUS's lessons).

    catalog --features--> two-tower alignment --aligned image embeddings--> identifiers
            --> LM (SmolLM2, pruned) + visual prefix (+ query prefix, optional)
            --> stage 1, memorize: image -> id   (+ id -> caption, image -> caption)
            --> pseudo-queries for images without captions (optional)
            --> stage 2, retrieve: query -> id   (+ replay of stage 1, describe, ask)
            --> model_store/<name>/

The run folder holds the prepared inputs and a checkpoint after every epoch, so a killed run
(or a GPU call cut at its time limit) resumes where it stopped with the same command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from .alignment import hubness, load_two_tower, save_two_tower, train_two_tower, validated_epochs
from .catalog import Catalog
from .distillation import DenseTeacher
from .encoders import usable_device
from .identifiers import SCHEMES, STOP_WORDS, IdentifierAssignment, make_scheme
from .language_model import add_tokens, keep_first_layers, load_base, prune_vocabulary
from .model import Example, MultimodalLM, QueryPrefix, SoftPrefix
from .model_store import (check_model_destination, folder_lock, save_model, temporary_sibling, write_json,
                          written_atomically)
from .prompts import NO, PROMPT_TEXTS, YES, Prompts, normalize_caption

log = logging.getLogger(__name__)

QUESTIONS_ABOUT_CONTENT = ["What is in this image?", "What does this image show?", "What is happening here?"]


# Options whose default has changed since they were added: a run recorded before they existed
# trained as these values say, not as today's defaults.
UNRECORDED_MEANT = {"id_embeddings": "mean", "freeze_id_rows": False, "describe_per_image": 1}


class TrainConfig(BaseModel):
    """Everything that decides a model; recorded in its manifest."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option must not train the default silently

    # The defaults are the recipe that measured best on Flickr8k (benchmarks/RESULTS.md): atomic
    # ids whose rows start, and stay, where their images sit in the aligned space, the query
    # prefix, and neighbour pseudo-queries for images without captions.
    scheme: str = "atomic"
    scheme_options: dict = Field(default_factory=dict)
    num_layers: int | None = Field(None, ge=1, description="keep the first N decoder layers (None, or more "
                                                           "than it has: all 30)")
    prune_vocab: bool = True
    visual_tokens: int = Field(4, ge=1)
    query_tokens: int = Field(4, ge=0, description="soft tokens carrying the query's aligned embedding before the "
                                             "retrieve prompt (0: the query is text only)")
    query_text_dropout: float = Field(0.0, ge=0.0, le=1.0, description=(
        "with a query prefix: the share of retrieve examples whose prompt leaves the query text out, "
        "so the model leans on the aligned embedding, which generalizes to unseen queries"))
    query_mixing: float = Field(0.0, ge=0.0, le=1.0, description=(
        "with a query prefix: per (caption, image) pair and epoch, the chance of one more retrieve example "
        "whose embedding is a fixed random mix of the two (GENIUS's query augmentation)"))
    query_residuals: int = Field(0, ge=0, description=(
        "with a query prefix: per image and retrieve epoch, this many extra retrieve examples whose embedding "
        "is the image's own plus a random training caption's offset from its image: realistic queries for "
        "every image, captioned or not"))
    query_noise: float = Field(0.0, ge=0.0, description=(
        "with a query prefix: while training, each aligned embedding is moved by a random vector of this "
        "length (they have length 1) before the prefix reads it, so neighbourhoods, not points, map to ids"))
    id_embeddings: Literal["mean", "aligned"] = Field("aligned", description=(
        "how new id tokens' rows (input embedding and, tied to it, output head) start: all at the vocabulary's "
        "mean, or 'aligned': each carries where its images sit in the aligned space (the mean residual of its "
        "images at its position, through a fixed random projection), so ids start with the geometry queries have"))
    freeze_id_rows: bool | None = Field(None, description=(
        "keep the new id tokens' rows (and the output head tied to them) where they start, while the "
        "ordinary words' rows train at embedding_lr: with id_embeddings='aligned', training can then only "
        "move a query's state towards its image's direction. None: for atomic ids with aligned rows, each "
        "one image's own direction; codes that several images share must train to fit them all"))
    distill_weight: float = Field(0.0, ge=0.0, le=1.0, description=(
        "retrieve examples of real captions blend this share of the two-tower's distribution over the "
        "catalog into their first id token's target (genret.distillation), so the LM also learns which "
        "other images, uncaptioned ones included, fit the caption"))
    align_epochs: int = Field(30, ge=1, description=(
        "the two-tower's epochs; with align_validation, the most it may train"))
    align_validation: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "this share of the captioned images has its captions held out of a first two-tower run, which "
        "picks the epoch count at which they are best retrieved (genret.alignment.validated_epochs); the "
        "two-tower then trains on every caption for that many. 0, or a share under 10 images: align_epochs"))
    align_dim: int = Field(256, ge=1)
    memorize_epochs: int = Field(4, ge=0)
    retrieve_epochs: int = Field(8, ge=0)
    pseudo_queries: Literal["none", "captioner", "neighbors"] = Field("neighbors", description=(
        "queries for images without captions (held-out ones too), so retrieval trains on every image: "
        "their nearest training captions in the aligned space, or the model's own descriptions"))
    pseudo_per_image: int = Field(3, ge=1)
    describe_pseudo: bool = Field(False, description=(
        "describe and ask also train on images without captions, with their pseudo-queries standing in "
        "for captions (pseudo_queries='captioner' always does)"))
    describe: bool = True
    describe_per_image: int = Field(3, ge=1, description=(
        "describe examples per image and epoch, each with another of its captions (as many as it has, at most): "
        "on Flickr8k's reduced setting 3 instead of 1 took the content-word F1 of descriptions from 0.40 to "
        "0.94, for 11% more training time and no loss of recall"))
    ask: bool = True
    ask_per_image: int = Field(1, ge=1, description=(
        "yes/no question pairs per image and retrieve epoch (yes_no_questions), each about another word its "
        "captions mention: when the 'no' words were drawn from the whole vocabulary, mostly rare, 4 lifted yes/no "
        "by 0.07-0.13, as much for images never captioned: it taught which words are common (benchmarks/RESULTS.md)"))
    ask_from_description: bool = Field(False, description=(
        "ask examples put one of the image's captions between its id and the question, and the engines "
        "describe the image before they ask: answers then read a description the model has memorized "
        "instead of recalling each answer from the id alone, and yes/no asks about that caption's words"))
    ask_descriptions: int = Field(1, ge=1, description=(
        "with ask_from_description, how many descriptions precede a question: training joins that many of the "
        "image's captions, and the engines join their that many best descriptions by beam search (describe still "
        "answers the best alone). One description says only part of what the captions do: on the demo 3 lifted "
        "yes/no from 0.62-0.66 to 0.74-0.76, but Flickr8k's reduced setting (2 layers) stopped reading the longer "
        "context, with 3 and with 2 (benchmarks/RESULTS.md)"))
    reading_pairs_per_epoch: int | None = Field(None, ge=0, description=(
        "with ask_from_description, the fewest yes/no pairs a retrieve epoch asks (unset: 400): while there are "
        "fewer, every image is asked again after another of its captions. Reading is one skill for the whole "
        "catalog, learnt from a few thousand pairs, so a small catalog needs many per image: on the 18-image demo "
        "1 seed in 4 learnt it from ~140 pairs per epoch, 4 in 4 from 400; Flickr8k's reduced setting (2 layers, "
        "busier epochs) needed 2000 (benchmarks/RESULTS.md)"))
    caption_chars: int = Field(256, ge=16, description=(
        "a caption longer than this is cut at a word boundary before training reads it (as a query, a description, "
        "a context to ask about): one 25,000-character product description made every batch it joined pad to ~6,000 "
        "tokens, a step of 2 minutes instead of 1 s on the CPU. Flickr8k's longest caption has 199 characters"))
    batch_size: int = Field(32, ge=1)
    length_slices: int = Field(1, ge=1, description=(
        "each batch runs as this many forward and backward passes over its examples sorted by length, "
        "their gradients summed: the same update with less padding (a batch pads to its longest example, "
        "and 9-token memorize examples share batches with 30-token captions)"))
    lr: float = Field(5e-4, ge=0)
    prefix_lr: float = Field(1e-3, ge=0)
    # New id tokens start far from what the query states predict; a faster embedding/head
    # escapes the "predict the id prior" plateau in tens of steps instead of hundreds.
    embedding_lr: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(20, ge=0)
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _query_options_need_the_prefix(self):
        if not self.query_tokens:
            options = ("query_text_dropout", "query_mixing", "query_residuals", "query_noise")
            used = [f for f in options if getattr(self, f)]
            if used:
                raise ValueError(f"{', '.join(used)} shape(s) the query prefix: set query_tokens > 0 or leave them out")
        return self

    @model_validator(mode="after")
    def _frozen_id_rows_by_scheme(self):
        if self.freeze_id_rows is None:  # recorded resolved, so a manifest says what trained
            self.freeze_id_rows = self.scheme == "atomic" and self.id_embeddings == "aligned"
        return self

    @model_validator(mode="after")
    def _frozen_id_rows_need_a_start(self):
        scheme = SCHEMES.get(self.scheme)
        frozen_by = "embedding_lr=0" if self.embedding_lr == 0 else "freeze_id_rows" if self.freeze_id_rows else None
        if frozen_by and scheme is not None and scheme.adds_tokens and self.id_embeddings == "mean":
            raise ValueError(f"{frozen_by} freezes the new id tokens' rows, and with id_embeddings='mean' they would "
                             "all stay the same: set id_embeddings='aligned', or let them train")
        return self

    @model_validator(mode="after")
    def _describe_pseudo_needs_pseudo_queries(self):
        if self.describe_pseudo and (self.pseudo_queries == "none" or not (self.describe or self.ask)):
            raise ValueError("describe_pseudo trains describe/ask on pseudo-queries: set pseudo_queries and describe or ask")
        return self

    @model_validator(mode="after")
    def _asking_from_a_description(self):
        if self.ask_from_description and not (self.ask and self.describe):
            raise ValueError("ask_from_description asks after the model's own description: set ask and describe")
        if self.reading_pairs_per_epoch is not None and not self.ask_from_description:
            raise ValueError("reading_pairs_per_epoch counts questions asked after a description: "
                             "set ask_from_description")
        if self.ask_descriptions > 1 and not self.ask_from_description:
            raise ValueError("ask_descriptions counts the descriptions a question follows: set ask_from_description")
        if self.ask_from_description and self.reading_pairs_per_epoch is None:
            self.reading_pairs_per_epoch = 400
        return self

    def differences(self, recorded: dict) -> list[str]:
        """The fields on which a run folder's recorded config differs from this one. A field it
        does not record (an option added since that run began) counts as at its default, so a
        run resumes under a newer version that only added options."""
        defaults = {name: field.get_default(call_default_factory=True) for name, field in type(self).model_fields.items()}
        defaults.update(UNRECORDED_MEANT)
        current, defaults = (json.loads(json.dumps(d)) for d in (self.model_dump(), defaults))
        return sorted(name for name, value in current.items() if recorded.get(name, defaults[name]) != value)


def id_token_vectors(ids: list[list[int]], tokens: set[int], embeddings: np.ndarray) -> dict[int, np.ndarray]:
    """Where each id token's images sit in the aligned space. Position by position, a token's
    vector is the mean of what its images' centred embeddings leave unexplained by their earlier
    tokens: for RQ codes exactly the codebook entries (the first level's less the mean), for
    atomic ids the image itself. `ids[i]` is image i's id; only `tokens` get a vector (one used
    at several positions gets the mean of its vectors there)."""
    residual = (embeddings - embeddings.mean(0)).astype(np.float64)
    vectors: dict[int, list[np.ndarray]] = {}
    for position in range(max(map(len, ids), default=0)):
        members: dict[int, list[int]] = {}
        for i, id_tokens in enumerate(ids):
            if position < len(id_tokens) and id_tokens[position] in tokens:
                members.setdefault(id_tokens[position], []).append(i)
        for token, images in members.items():
            mean = residual[images].mean(0)
            vectors.setdefault(token, []).append(mean)
            residual[images] -= mean
    return {t: np.mean(v, axis=0) for t, v in vectors.items()}


def id_row_projection(dim: int, width: int, seed: int) -> torch.Tensor:
    """The fixed random map from the aligned space to the LM's width that aligned id rows go
    through; the seed alone makes it again (genret.adding places new images' rows with it)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, width, generator=generator, dtype=torch.double) / width**0.5  # keeps lengths


def presence_question(word: str) -> str:
    """The yes/no question training asks about a word a caption does (or does not) mention."""
    return f"Is there a {word} in this image?"


def yes_no_questions(rng: random.Random, mentioned: Mapping[str, Collection[str]], n: int,
                     asked: Mapping[str, Collection[str]] | None = None) -> list[tuple[str, str, bool]]:
    """Yes/no questions as (image key, word, answer), in training and in evaluation alike: up to n
    about words each image's captions mention (words of `asked[key]`, a part of them, when given),
    each paired with the same word asked of another image whose captions do not mention it. Every
    word is then asked as often with "yes" as with "no", so how common a word is cannot answer;
    only knowing the image can. (Drawn from the whole vocabulary, the "no" words were mostly rare
    ones, and word frequency alone beat every model: benchmarks/RESULTS.md.)"""
    keys = list(mentioned)
    out = []
    for key in keys:
        pool = sorted(mentioned[key] if asked is None else asked[key])
        for word in rng.sample(pool, min(len(pool), n)):
            other = next((k for k in (rng.choice(keys) for _ in range(100)) if word not in mentioned[k]), None)
            if other is not None:  # a word every image mentions has no "no"
                out += [(key, word, True), (other, word, False)]
    return out


def content_words(text: str) -> list[str]:
    words = [w for w in text.lower().replace(".", " ").replace(",", " ").split() if w.isalpha()]
    return [w for w in words if w not in STOP_WORDS and len(w) > 2]


def length_slices(batch: list[Example], slices: int, length: Callable[[Example], int]) -> list[list[Example]]:
    """The batch's examples sorted by `length` and cut into `slices` runs of near-equal size, each
    then padded only to its own longest example; one slice is the batch as it is."""
    if slices <= 1:
        return [batch]
    ordered = sorted(batch, key=length)
    size = math.ceil(len(ordered) / slices)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


LOSS_EVERY = 20  # steps between the progress bar's loss readings


def train_step(model: MultimodalLM, optimizer: torch.optim.Optimizer, batch: list[Example], pad: int,
               features: torch.Tensor, query_table: torch.Tensor | None = None, slices: int = 1,
               teacher: DenseTeacher | None = None, distill_weight: float = 0.0) -> torch.Tensor:
    """One optimizer step on a batch; returns its loss still on the device (reading it would make
    the CPU wait for the GPU, which then idles while the next batch is collated)."""
    device = features.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()
    vocabulary = model.lm.get_input_embeddings().weight.shape[0]
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=device)
    for part in length_slices(batch, slices, model.length):
        collated = model.collate(part, pad, device)
        soft_targets = None
        if teacher is not None and collated["has_teacher"].any():
            soft_targets = teacher.targets(collated["teachers"][collated["has_teacher"]], vocabulary)
        with autocast:  # the batch's loss is the mean over its examples: each part weighs its share
            part_loss = model.loss(collated, features, query_table, soft_targets, distill_weight)
            part_loss = part_loss * (len(part) / len(batch))
        part_loss.backward()
        loss = loss + part_loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


class Trainer:
    def __init__(self, catalog: Catalog, config: TrainConfig, run_dir: Path, *, image_features: np.ndarray | None = None,
                 caption_features: dict[str, np.ndarray] | None = None, progress: bool = True):
        self.catalog, self.config, self.run_dir, self.progress = catalog, config, Path(run_dir), progress
        self.keys = catalog.keys()
        self.captions = {k: [normalize_caption(c, config.caption_chars) for c in cs]
                         for k, cs in catalog.captions().items()}
        cut = sum(normalize_caption(c) != short for k, cs in catalog.captions().items()
                  for c, short in zip(cs, self.captions[k]))
        if cut:
            log.warning("%d of %d captions are longer than %d characters: training reads them cut at a word "
                        "boundary (--set caption_chars=N to change it)", cut, sum(map(len, self.captions.values())),
                        config.caption_chars)
        self.device = torch.device(usable_device(config.device))
        self._image_features, self._caption_features = image_features, caption_features

    # ---- preparation: features, alignment, identifiers, the initial LM (cached in the run dir)

    @property
    def prepared(self) -> Path:
        return self.run_dir / "prepared"

    def image_features(self) -> np.ndarray:
        if self._image_features is None:
            path = self.prepared / "image_features.npy"
            if path.exists():
                self._image_features = np.load(path)
            else:
                from .encoders import ImageEncoder

                feats = ImageEncoder(device=str(self.device)).encode_paths(
                    [self.catalog[k].path for k in self.keys], progress=self.progress)
                with written_atomically(path) as tmp:
                    np.save(tmp, feats)
                self._image_features = feats
        return self._image_features

    def caption_pairs(self) -> tuple[list[str], np.ndarray]:
        """Every training caption with the row of its image."""
        texts, rows = [], []
        for i, key in enumerate(self.keys):
            for caption in self.captions.get(key, []):
                texts.append(caption)
                rows.append(i)
        return texts, np.array(rows, dtype=np.int64)

    def caption_features(self, texts: list[str]) -> np.ndarray:
        path = self.prepared / "caption_features.npy"
        if path.exists():
            return np.load(path)
        from .encoders import TextEncoder

        feats = TextEncoder(device=str(self.device)).encode(texts, progress=self.progress)
        with written_atomically(path) as tmp:
            np.save(tmp, feats)
        return feats

    def align(self):
        """Two-tower on the catalog's own captions: the aligned space the semantic ids need."""
        path = self.prepared / "alignment.safetensors"
        if path.exists():
            return load_two_tower(path)
        texts, rows = self.caption_pairs()
        if not texts:
            raise ValueError("the catalog has no captions: nothing to learn retrieval from")
        options = dict(dim=self.config.align_dim, seed=self.config.seed, device=str(self.device),
                       progress=self.progress)
        image_feats, text_feats = self.image_features(), self.caption_features(texts)
        chosen = validated_epochs(image_feats, text_feats, rows, max_epochs=self.config.align_epochs,
                                  held_out_share=self.config.align_validation, **options)
        epochs = chosen["epochs"] if chosen else self.config.align_epochs
        tower = train_two_tower(image_feats, text_feats, rows, epochs=epochs, **options)
        write_json(self.prepared / "alignment.json", {"epochs": epochs, "validation": chosen})
        with written_atomically(path) as tmp:
            save_two_tower(tower, tmp)
        return tower

    def alignment_record(self) -> dict | None:
        """How the two-tower's epochs were chosen (None for a tower trained before this was recorded)."""
        path = self.prepared / "alignment.json"
        return json.loads(path.read_text()) if path.exists() else None

    def aligned_image_embeddings(self, tower) -> np.ndarray:
        with torch.inference_mode():
            feats = torch.from_numpy(self.image_features()).to(next(tower.parameters()).device)
            return tower.embed_images(feats).float().cpu().numpy()

    def assign_identifiers(self, embeddings: np.ndarray) -> IdentifierAssignment:
        path = self.prepared / "identifiers.json"
        if path.exists():
            return IdentifierAssignment.from_json(json.loads(path.read_text()))
        scheme = make_scheme(self.config.scheme, **self.config.scheme_options)
        assignment = scheme.assign(self.keys, self.captions, embeddings)
        write_json(path, assignment.to_json())
        return assignment

    def initial_lm(self, identifiers: IdentifierAssignment):
        from transformers import AutoTokenizer, LlamaForCausalLM

        path = self.prepared / "lm_init"
        if not (path / "config.json").exists():
            lm, tokenizer = load_base()
            lm = keep_first_layers(lm, self.config.num_layers)
            if self.config.prune_vocab:
                corpus = PROMPT_TEXTS + QUESTIONS_ABOUT_CONTENT + [YES, NO, " " + YES, " " + NO, "Is there a in this image?"]
                corpus += [" " + c for cs in self.captions.values() for c in cs]
                corpus += [c for cs in self.captions.values() for c in cs]
                corpus += [t for t in identifiers.ids.values() if not t.startswith("<")]
                lm, tokenizer = prune_vocabulary(lm, tokenizer, corpus)
            self.seed_torch("id_rows")  # resizing draws the new rows (mean_resizing)
            lm, tokenizer = add_tokens(lm, tokenizer, identifiers.new_tokens)
            lm.save_pretrained(path)
            tokenizer.save_pretrained(path)
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)

    def aligned_text_embeddings(self, tower, texts: list[str]) -> np.ndarray:
        """Two-tower embeddings of any texts (training captions come from the feature cache)."""
        known, _ = self.caption_pairs()
        known_feats = self.caption_features(known)
        row = {t: i for i, t in enumerate(known)}
        missing = sorted({t for t in texts if t not in row})
        if missing:
            from .encoders import TextEncoder

            extra = TextEncoder(device=str(self.device)).encode(missing, progress=False)
            row.update({t: len(known) + i for i, t in enumerate(missing)})
            known_feats = np.concatenate([known_feats, extra])
        feats = known_feats[[row[t] for t in texts]] if texts else known_feats[:0]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(feats)).to(next(tower.parameters()).device)
            return tower.embed_texts(x).float().cpu().numpy()

    def query_table(self, tower, query_prefix: QueryPrefix, embeddings: np.ndarray,
                    pseudo: dict[str, list[str]]) -> tuple[torch.Tensor, dict]:
        """Centred aligned embeddings the query prefix reads, and where each one is: the images
        (row i = image i), every text a retrieve example uses (by text), with query mixing
        one mix per (image key, text) pair, a random point between the two (by that pair), and
        with query residuals the synthetic queries (by ("residual", key, epoch, j))."""
        pairs = [(k, c) for k, cs in {**pseudo, **self.captions}.items() for c in cs]
        texts = sorted({c for _, c in pairs})
        text_emb = torch.from_numpy(self.aligned_text_embeddings(tower, texts)).to(self.device)
        images = query_prefix.centre(torch.from_numpy(embeddings).to(self.device), "image")
        table = [images, query_prefix.centre(text_emb, "text")]
        rows: dict = {t: len(images) + i for i, t in enumerate(texts)}
        if self.config.query_mixing and pairs:
            image_row = {k: i for i, k in enumerate(self.keys)}
            weights = torch.rand(len(pairs), 1, generator=torch.Generator().manual_seed(self.config.seed))
            mixed_text = table[1][[rows[c] - len(images) for _, c in pairs]]
            mixed_image = images[[image_row[k] for k, _ in pairs]]
            weights = weights.to(self.device)
            table.append(torch.nn.functional.normalize(weights * mixed_text + (1 - weights) * mixed_image, dim=-1))
            start = len(images) + len(texts)
            rows.update({pair: start + i for i, pair in enumerate(pairs)})
        if self.config.query_residuals:  # the training captions are among the texts above
            start, n = sum(map(len, table)), self.config.query_residuals
            captions = table[1][[rows[c] - len(images) for c in self.caption_pairs()[0]]]
            table.append(self.residual_queries(images, captions))
            rows.update({("residual", k, e, j): start + (i * self.config.retrieve_epochs + e) * n + j
                         for i, k in enumerate(self.keys) for e in range(self.config.retrieve_epochs) for j in range(n)})
        return torch.cat(table), rows

    def residual_queries(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Each image's own (centred) embedding moved by how far real captions sit from their
        images: held-out queries scatter around their image the same way, in the directions
        captions vary in, which isotropic noise does not know. Image-major, then epoch, then j."""
        _, caption_rows = self.caption_pairs()
        offsets = captions - images[torch.from_numpy(caption_rows).to(self.device)]
        count = len(images) * self.config.retrieve_epochs * self.config.query_residuals
        generator = torch.Generator().manual_seed(self.config.seed)
        picked = offsets[torch.randint(len(offsets), (count,), generator=generator).to(self.device)]
        owners = torch.arange(len(images), device=self.device).repeat_interleave(count // len(images))
        return torch.nn.functional.normalize(images[owners] + picked, dim=-1)

    def align_id_embeddings(self, lm, ids: dict[str, list[int]], new_tokens: set[int], embeddings: np.ndarray):
        """Rows for the new id tokens that say where their images are (see `id_token_vectors`),
        through a fixed random projection to the LM's width, scaled to the spread of ordinary
        token rows. With the head tied to the embedding, a query state near an image then
        already scores that image's tokens high."""
        vectors = id_token_vectors([ids[k] for k in self.keys], new_tokens, embeddings)
        if not vectors:
            return
        weight = lm.get_input_embeddings().weight
        projection = id_row_projection(embeddings.shape[1], weight.shape[1], self.config.seed)
        tokens = sorted(vectors)
        projected = torch.from_numpy(np.stack([vectors[t] for t in tokens])) @ projection
        old = [t for t in range(weight.shape[0]) if t not in new_tokens]
        with torch.no_grad():
            spread = (weight[old] - weight[old].mean(0)).norm(dim=1).median().double()
            scale = spread / projected.norm(dim=1).max().clamp(min=1e-12)
            weight[tokens] = (weight[old].mean(0) + scale * projected).to(weight.dtype)

    def seed_torch(self, step: str):
        """Seed torch's global generator for one step of training from the run's seed and the step's
        name, so what the step draws never depends on what ran before it in this process: a base
        LM converted on first use, a tower trained here or loaded from an earlier call, a resume."""
        torch.manual_seed(zlib.crc32(f"{self.config.seed}/{step}/torch".encode()))

    # ---- tasks

    def id_tokens(self, prompts: Prompts, identifiers: IdentifierAssignment) -> dict[str, list[int]]:
        return {k: prompts.encode(identifiers.ids[k]) for k in self.keys}

    def examples(self, stage: str, epoch: int, prompts: Prompts, ids: dict[str, list[int]],
                 pseudo: dict[str, list[str]], query_rows: dict | None = None,
                 teacher_rows: dict[str, int] | None = None) -> list[Example]:
        """One epoch's examples. `query_rows` (text -> row of the aligned-embedding table, images
        first) is given when the model has a query prefix; `teacher_rows` (training caption -> row
        of the teacher's table) when retrieval is distilled. Pseudo-queries get no teacher: the
        tower would point them back at the captioned image they were borrowed from."""
        rng = random.Random(zlib.crc32(f"{self.config.seed}/{stage}/{epoch}".encode()))
        cfg = self.config
        memorize = [Example(prompts.memorize(), ids[k] + [prompts.end], image=i) for i, k in enumerate(self.keys)]
        out = list(memorize)
        if query_rows is not None:  # the image's own aligned embedding, in the query's place
            out += [Example(prompts.retrieve(""), ids[k] + [prompts.end], query=i) for i, k in enumerate(self.keys)]
        described = {**pseudo, **self.captions} if cfg.pseudo_queries == "captioner" or cfg.describe_pseudo \
            else self.captions
        if cfg.describe:
            out += [Example(prompts.describe(ids[k]), prompts.answer(c))
                    for k, cs in described.items() if cs for c in rng.sample(cs, min(len(cs), cfg.describe_per_image))]
        if cfg.pseudo_queries == "captioner":
            out += [Example(prompts.caption(), prompts.answer(rng.choice(self.captions[k])), image=i)
                    for i, k in enumerate(self.keys) if self.captions.get(k)]
        if stage == "retrieve":
            for k, cs in {**pseudo, **self.captions}.items():
                for c in cs:
                    teacher = teacher_rows[c] if teacher_rows is not None and k in self.captions else None
                    if query_rows is None:
                        out.append(Example(prompts.retrieve(c), ids[k] + [prompts.end], teacher=teacher))
                    else:
                        text = "" if cfg.query_text_dropout and rng.random() < cfg.query_text_dropout else c
                        out.append(Example(prompts.retrieve(text), ids[k] + [prompts.end], query=query_rows[c],
                                           teacher=teacher))
                        if (k, c) in query_rows and rng.random() < cfg.query_mixing:
                            out.append(Example(prompts.retrieve(""), ids[k] + [prompts.end], query=query_rows[k, c]))
            if query_rows is not None:
                out += [Example(prompts.retrieve(""), ids[k] + [prompts.end], query=query_rows["residual", k, epoch, j])
                        for k in self.keys for j in range(cfg.query_residuals)]
            if cfg.ask:
                out += self.ask_examples(rng, prompts, ids, described)
        rng.shuffle(out)
        return out

    def ask_examples(self, rng, prompts, ids, described) -> list[Example]:
        """Questions built from the captions: an open one answered by a caption, and yes/no pairs
        (`yes_no_questions`). With ask_from_description each image's questions follow one of its
        captions (ask_descriptions of them, joined), as the descriptions the engines generate first,
        and it is asked "yes" about their words, so the answer can be read there; rounds after other
        captions follow until the epoch has reading_pairs_per_epoch pairs."""
        cfg = self.config

        def joined(first: dict[str, str]) -> dict[str, str]:  # each image's caption, then others after it
            if cfg.ask_descriptions == 1:
                return first
            return {k: " ".join([c, *rng.sample(others := [o for o in described[k] if o != c],
                                                min(cfg.ask_descriptions - 1, len(others)))])
                    for k, c in first.items()}

        captioned = [k for k, captions in described.items() if captions]
        chosen = {k: rng.choice(described[k]) for k in captioned}
        context = joined(chosen) if cfg.ask_from_description else dict.fromkeys(captioned)
        out = [Example(prompts.ask(ids[k], rng.choice(QUESTIONS_ABOUT_CONTENT), context[k]), prompts.answer(chosen[k]))
               for k in captioned]
        mentioned = {k: {w for c in described[k] for w in content_words(c)} for k in captioned}
        pairs = 0
        while True:
            asked = {k: set(content_words(c)) for k, c in context.items()} if cfg.ask_from_description else None
            questions = yes_no_questions(rng, mentioned, cfg.ask_per_image, asked)
            out += [Example(prompts.ask(ids[k], presence_question(word), context[k]),
                            prompts.answer(YES if yes else NO)) for k, word, yes in questions]
            pairs += len(questions) // 2
            if not cfg.ask_from_description or pairs >= cfg.reading_pairs_per_epoch or not questions:
                return out
            context = joined({k: rng.choice(described[k]) for k in captioned})  # another round, after other captions

    def pseudo_queries(self, model: MultimodalLM, prompts: Prompts, tower, embeddings) -> dict[str, list[str]]:
        """Queries for images without captions, so retrieval is trained for every image."""
        uncaptioned = [i for i, k in enumerate(self.keys) if not self.captions.get(k)]
        mode = self.config.pseudo_queries
        if mode == "none" or not uncaptioned:
            return {}
        path = self.prepared / f"pseudo_queries_{mode}.json"
        if path.exists():
            return json.loads(path.read_text())
        out: dict[str, list[str]] = {}
        if mode == "neighbors":
            # the training captions nearest to the image in the aligned space
            texts, rows = self.caption_pairs()
            with torch.inference_mode():
                feats = torch.from_numpy(self.caption_features(texts)).to(next(tower.parameters()).device)
                text_emb = tower.embed_texts(feats).float().cpu().numpy()
            sims = embeddings[uncaptioned] @ text_emb.T
            for row, i in enumerate(uncaptioned):
                best = np.argsort(-sims[row])[: self.config.pseudo_per_image]
                out[self.keys[i]] = [texts[j] for j in best]
        else:
            model.eval()
            feats = torch.from_numpy(self.image_features()).to(self.device)
            for start in tqdm(range(0, len(uncaptioned), 64), desc="pseudo-captions", disable=not self.progress):
                batch = uncaptioned[start : start + 64]
                seqs = model.generate_from_images(feats[batch], prompts.caption(), 40, prompts.end)
                for i, seq in zip(batch, seqs):
                    text = prompts.decode_answer(seq)
                    if text:
                        out[self.keys[i]] = [normalize_caption(text)]
            model.train()
        write_json(path, out)
        return out

    # ---- the loop

    def catalog_record(self) -> dict:
        """What the run folder's caches (features, two-tower, ids, checkpoint) were computed from:
        the keys and the captions training reads, not the pixels (a GPU machine given the image
        features holds empty files). Resumed on another catalog, a run would fail on a new key
        or, with the same keys, silently pair cached caption features with other captions."""
        digest = hashlib.sha256()
        for key in self.keys:
            digest.update(json.dumps([key, self.captions.get(key, [])]).encode() + b"\n")
        return {"images": len(self.keys), "captions": sum(len(c) for c in self.captions.values()),
                "sha256": digest.hexdigest()}

    def schedule(self) -> list[tuple[str, int]]:
        cfg = self.config
        return [("memorize", e) for e in range(cfg.memorize_epochs)] + [("retrieve", e) for e in range(cfg.retrieve_epochs)]

    def train(self, dest: Path, time_budget_s: float | None = None) -> Path | None:
        """Train (or resume) and save the model to `dest`.

        With a time budget, training stops at the first epoch boundary past it, leaving the
        checkpoint, and returns None: the same call later resumes (GPU calls have time limits).
        One run folder serves one training at a time: a second would resume from the first's
        checkpoints while the first overwrote them.
        """
        with folder_lock(self.run_dir, busy=run_in_use(self.run_dir)):
            return self._train(dest, time_budget_s)

    def _train(self, dest: Path, time_budget_s: float | None) -> Path | None:
        started = time.monotonic()
        check_model_destination(Path(dest))  # now, not after hours of training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prepared.mkdir(exist_ok=True)
        config_path, catalog_path = self.run_dir / "config.json", self.run_dir / "catalog.json"
        if config_path.exists():
            changed = self.config.differences(json.loads(config_path.read_text()))
            if changed:
                raise ValueError(f"{self.run_dir} holds a run with another config ({', '.join(changed)} differ); "
                                 "use another run dir or --fresh")
        catalog = self.catalog_record()
        if catalog_path.exists() and (begun := json.loads(catalog_path.read_text())) != catalog:
            raise ValueError(f"{self.run_dir} holds a run on another catalog ({begun['images']} images and "
                             f"{begun['captions']} captions then, {catalog['images']} and {catalog['captions']} now, "
                             "or other keys or captions); use another run dir or --fresh")
        write_json(config_path, self.config.model_dump())
        write_json(catalog_path, catalog)

        tower = self.align().to(self.device).eval()
        embeddings = self.aligned_image_embeddings(tower)
        identifiers = self.assign_identifiers(embeddings)
        lm, tokenizer = self.initial_lm(identifiers)
        prompts = Prompts(tokenizer)
        ids = self.id_tokens(prompts, identifiers)
        new_tokens = sorted(tokenizer.convert_tokens_to_ids(list(identifiers.new_tokens)))
        if self.config.id_embeddings == "aligned":
            self.align_id_embeddings(lm, ids, set(new_tokens), embeddings)
        self.seed_torch("prefixes")
        prefix = SoftPrefix(self.image_features().shape[1], lm.config.hidden_size, self.config.visual_tokens)
        captions, _ = self.caption_pairs()  # the query prefix's text mean, the teacher's texts, the hubness bank
        caption_embeddings = self.aligned_text_embeddings(tower, captions)
        query_prefix = None
        if self.config.query_tokens:
            query_prefix = QueryPrefix(embeddings.shape[1], lm.config.hidden_size, self.config.query_tokens,
                                       noise=self.config.query_noise)
            query_prefix.text_mean.copy_(torch.from_numpy(caption_embeddings.mean(0)))
            query_prefix.image_mean.copy_(torch.from_numpy(embeddings.mean(0)))
        model = MultimodalLM(lm, prefix, query_prefix).to(self.device)
        features = torch.from_numpy(self.image_features()).to(self.device)
        query_table, query_rows = (self.query_table(tower, query_prefix, embeddings, {})
                                   if query_prefix is not None else (None, None))

        teacher, teacher_rows = None, None
        if self.config.distill_weight:
            teacher = DenseTeacher(caption_embeddings, embeddings, [ids[k][0] for k in self.keys],
                                   tower.scale().item(), self.device)
            teacher_rows = {t: i for i, t in enumerate(captions)}

        schedule = self.schedule()
        steps_per_epoch = {stage: math.ceil(len(self.examples(stage, 0, prompts, ids, {}, query_rows))
                                            / self.config.batch_size) for stage in ("memorize", "retrieve")}
        total_steps = sum(steps_per_epoch[s] for s, _ in schedule)
        embedding = model.lm.get_input_embeddings().weight  # tied with the output head
        if self.config.freeze_id_rows and new_tokens:  # Adam never moves a row whose gradient is always zero
            frozen = torch.tensor(new_tokens, device=self.device)
            embedding.register_hook(lambda grad: grad.index_fill(0, frozen, 0.0))
        optimizer = torch.optim.AdamW([
            {"params": [p for p in model.lm.parameters() if p is not embedding], "lr": self.config.lr},
            {"params": [embedding], "lr": self.config.embedding_lr},
            {"params": [*model.prefix.parameters(), *(query_prefix.parameters() if query_prefix else [])],
             "lr": self.config.prefix_lr},
        ], weight_decay=0.0, fused=self.device.type == "cuda")
        base_lrs = [g["lr"] for g in optimizer.param_groups]

        checkpoint = self.run_dir / "checkpoint.pt"
        done, step, history = 0, 0, []
        if checkpoint.exists():
            try:
                state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            except Exception as e:  # cut off mid-write by a version that wrote it in place
                raise ValueError(f"{checkpoint} is unreadable ({type(e).__name__}): delete it to train from the "
                                 "prepared inputs again, or start over with --fresh") from None
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            done, step, history = state["epochs_done"], state["step"], state["history"]
            log.info("resuming %s after %d of %d epochs", self.run_dir, done, len(schedule))

        pseudo: dict[str, list[str]] = {}
        pseudo_ready = self.config.pseudo_queries == "none"  # made once, at the first retrieve epoch
        pad = prompts.end
        model.train()
        for index, (stage, epoch) in enumerate(schedule):
            if stage == "retrieve" and not pseudo_ready:
                pseudo, pseudo_ready = self.pseudo_queries(model, prompts, tower, embeddings), True
                if query_prefix is not None:
                    query_table, query_rows = self.query_table(tower, query_prefix, embeddings, pseudo)
            if index < done:
                continue
            examples = self.examples(stage, epoch, prompts, ids, pseudo, query_rows, teacher_rows)
            self.seed_torch(f"{stage}/{epoch}")  # resumable noise
            losses = []
            bar = tqdm(range(0, len(examples), self.config.batch_size), desc=f"{stage} {epoch + 1}", disable=not self.progress)
            for start in bar:
                scale = min(1.0, (step + 1) / max(1, self.config.warmup_steps))
                scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * max(scale, 0.05)
                losses.append(train_step(model, optimizer, examples[start : start + self.config.batch_size], pad,
                                         features, query_table, self.config.length_slices, teacher,
                                         self.config.distill_weight))
                step += 1
                if step % LOSS_EVERY == 0:  # reading a loss waits for the GPU: not every step
                    bar.set_postfix(loss=f"{torch.stack(losses[-LOSS_EVERY:]).mean().item():.3f}")
            history.append({"stage": stage, "epoch": epoch, "loss": torch.stack(losses).mean().item(),
                            "examples": len(examples)})
            with written_atomically(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epochs_done": index + 1, "step": step, "history": history}, tmp)
            if time_budget_s is not None and time.monotonic() - started > time_budget_s and index + 1 < len(schedule):
                log.warning("time budget spent after %d of %d epochs; run again to resume", index + 1, len(schedule))
                return None

        model.eval()
        dest = Path(dest)
        manifest = {
            "end_token": prompts.end,
            "train_config": self.config.model_dump(),
            "history": history,
            "uncaptioned_images": sum(1 for k in self.keys if not self.captions.get(k)),
            "pseudo_queries": {"mode": self.config.pseudo_queries, "images": len(pseudo)},
            # how long a generated description may run: the longest text trained as one, its end token included
            "answer_tokens": max((len(prompts.answer(c)) for cs in [*self.captions.values(), *pseudo.values()]
                                  for c in cs), default=1),
            "alignment": self.alignment_record(),
            "versions": _versions(),
        }
        return save_model(dest, lm=model.lm, tokenizer=tokenizer, prefix=model.prefix, query_prefix=query_prefix,
                          catalog=self.catalog,
                          identifiers=identifiers, id_tokens=ids, two_tower=tower.cpu(), image_embeddings=embeddings,
                          image_hubness=hubness(embeddings, caption_embeddings), manifest=manifest)


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


RUN_FILES = {"config.json", "catalog.json", "checkpoint.pt", "prepared"}  # all a run folder holds
RUN_FILES |= {temporary_sibling(Path(name)).name for name in RUN_FILES if name != "prepared"}  # a killed run's


def run_in_use(run_dir: Path) -> str:
    return (f"{run_dir} is in use by another training run (the same --name or --run-dir): let it finish, "
            "or train into another --run-dir")


def clear_run(run_dir: Path) -> None:
    """Delete a training run's files (--fresh, --retrain), refusing a folder that holds anything
    else (a mistyped --run-dir, or --name .., must not delete what is there) or one that a
    training is using."""
    if not run_dir.exists():
        return
    with folder_lock(run_dir, busy=run_in_use(run_dir)):
        _clear_run(run_dir)


def _clear_run(run_dir: Path) -> None:
    if not run_dir.is_dir() or (others := sorted({p.name for p in run_dir.iterdir()} - RUN_FILES)):
        what = "is a file" if not run_dir.is_dir() else f"holds files a training run does not write ({', '.join(others[:3])})"
        raise ValueError(f"{run_dir} {what}: it is not a run folder, so it is not deleted; choose another --run-dir")
    for name in RUN_FILES:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
