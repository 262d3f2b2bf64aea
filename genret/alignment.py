"""A small two-tower model that puts image and caption features into one shared space.

There is no CLIP here: the image and text encoders (genret.encoders) were trained apart, so
their spaces do not line up. Semantic identifiers (structured k-means, RQ codes) only group
images that a caption would also group if they are computed in an aligned space; the same
two-tower is the dense-retrieval baseline the generative model is compared with, and it
re-ranks beam-search candidates. It is trained CLIP-style on the catalog's own captions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "TwoTower",
    "QueryEncoder",
    "train_two_tower",
    "validated_epochs",
    "save_two_tower",
    "load_two_tower",
    "image_embeddings",
    "text_embeddings",
    "dense_rank",
    "hubness",
    "recall_at_k",
]

HUBNESS_NEIGHBORS = 5  # a captioned image's own captions (five in Flickr8k and COCO)


class Head(nn.Module):
    """LayerNorm, then an MLP plus a linear shortcut.

    The LayerNorm puts EfficientNet's unnormalised activations and MiniLM's unit vectors on
    one scale; the shortcut lets a small catalog learn a near-linear map without fighting the MLP.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
        self.shortcut = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.shortcut(x) + self.mlp(x)


class TwoTower(nn.Module):
    def __init__(self, image_dim: int = 1280, text_dim: int = 384, dim: int = 256, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.config = dict(image_dim=image_dim, text_dim=text_dim, dim=dim, hidden=hidden, dropout=dropout)
        self.image_head = Head(image_dim, hidden, dim, dropout)
        self.text_head = Head(text_dim, hidden, dim, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_images(self, feats: Tensor) -> Tensor:
        return F.normalize(self.image_head(feats.float()), dim=-1)

    def embed_texts(self, feats: Tensor) -> Tensor:
        return F.normalize(self.text_head(feats.float()), dim=-1)

    def scale(self) -> Tensor:
        # Clamped as in CLIP: an unbounded scale makes the loss spiky late in training.
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def contrastive_loss(self, text_feats: Tensor, image_feats: Tensor, image_ids: Tensor) -> Tensor:
        """Symmetric InfoNCE over a batch of (caption, its image) pairs.

        Two captions of the same image in one batch must not count as each other's negatives
        (the image is the right answer for both), so those off-diagonal pairs are masked out.
        """
        t, i = self.embed_texts(text_feats), self.embed_images(image_feats)
        logits = self.scale() * t @ i.T
        same = image_ids[:, None] == image_ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_two_tower(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    text_image_index: np.ndarray,
    *,
    dim: int = 256,
    hidden: int = 1024,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    after_epoch: Callable[[TwoTower], bool] | None = None,
) -> TwoTower:
    """Train on caption i paired with image row text_image_index[i]; an epoch visits every caption once.
    `after_epoch(model)` runs after each epoch (in eval mode); returning False stops training."""
    if len(text_feats) != len(text_image_index):
        raise ValueError(f"{len(text_feats)} text rows but {len(text_image_index)} text->image indices")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.as_tensor(np.asarray(image_feats), dtype=torch.float32, device=device)
    texts = torch.as_tensor(np.asarray(text_feats), dtype=torch.float32, device=device)
    owner = torch.as_tensor(np.asarray(text_image_index), dtype=torch.long, device=device)
    if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
        raise ValueError("text_image_index points outside image_feats")

    model = TwoTower(images.shape[1], texts.shape[1], dim=dim, hidden=hidden).to(device)
    # No weight decay on biases, norms and the temperature: shrinking them only hurts.
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    steps = epochs * math.ceil(len(texts) / batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )

    model.train()
    bar = tqdm(range(epochs), desc="two-tower", unit="epoch", disable=not progress)
    for _ in bar:
        total, count = 0.0, 0
        for batch in torch.randperm(len(texts), generator=gen).to(device).split(batch_size):
            if len(batch) < 2:  # a single pair has no negatives
                continue
            ids = owner[batch]
            loss = model.contrastive_loss(texts[batch], images[ids], ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", scale=f"{model.scale().item():.1f}")
        if after_epoch is not None:
            keep_going = after_epoch(model.eval())
            model.train()
            if keep_going is False:
                break
    return model.eval()


def validated_epochs(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    text_image_index: np.ndarray,
    *,
    max_epochs: int,
    held_out_share: float = 0.1,
    patience: int = 3,
    min_held_out: int = 10,
    seed: int = 0,
    **train_options,
) -> dict | None:
    """How many epochs the two-tower should train: the count at which the captions of held-out
    images (a seeded `held_out_share` of the captioned ones) best find their image among all
    images, by mean R@1/5/10; training stops `patience` epochs after the best.

    The heads fit their training captions in a few epochs and then pull those images towards
    every query (trained on Flickr8k's train split, the test captions' R@10 over the test images
    was 0.63 after 3 epochs and 0.49 after 40). None when the share comes to fewer than
    `min_held_out` images: too few to choose by (a small catalog's queries are its own captions)."""
    captioned = np.unique(text_image_index)
    held_count = round(held_out_share * len(captioned))
    if held_count < max(1, min_held_out) or held_count >= len(captioned):
        return None
    held = np.random.default_rng(seed).choice(captioned, size=held_count, replace=False)
    is_held = np.isin(text_image_index, held)
    scores: list[float] = []

    def measure(model: TwoTower) -> bool:
        images = image_embeddings(model, image_feats)
        queries = text_embeddings(model, text_feats[is_held])
        ranked, _ = dense_rank(queries, images, k=10)
        scores.append(float(np.mean(list(recall_at_k(ranked, text_image_index[is_held]).values()))))
        return len(scores) - 1 - int(np.argmax(scores)) < patience

    train_two_tower(image_feats, text_feats[~is_held], text_image_index[~is_held], epochs=max_epochs, seed=seed,
                    after_epoch=measure, **train_options)
    return {"epochs": int(np.argmax(scores)) + 1, "held_out_images": held_count,
            "held_out_mean_recall": [round(x, 4) for x in scores]}


@torch.inference_mode()
def _embed(model: TwoTower, feats: np.ndarray, embed, batch_size: int) -> np.ndarray:
    device = next(model.parameters()).device
    model.eval()
    out = [np.zeros((0, model.config["dim"]), np.float32)]
    for start in range(0, len(feats), batch_size):
        x = torch.as_tensor(np.asarray(feats[start : start + batch_size]), dtype=torch.float32, device=device)
        out.append(embed(x).cpu().numpy())
    return np.concatenate(out)


def image_embeddings(model: TwoTower, feats: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Encoder features (N, image_dim) -> unit vectors (N, dim) in the shared space."""
    return _embed(model, feats, model.embed_images, batch_size)


def text_embeddings(model: TwoTower, feats: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Encoder features (N, text_dim) -> unit vectors (N, dim) in the shared space."""
    return _embed(model, feats, model.embed_texts, batch_size)


class QueryEncoder:
    """Query text -> its aligned embedding: MiniLM, then the two-tower's text head.

    Serving needs it to re-rank beams and, for models with a query prefix, to build the prompt.
    """

    def __init__(self, tower: TwoTower, device: str = "cpu"):
        from .encoders import TextEncoder

        self.tower, self.device = tower.to(device).eval(), device
        self.text = TextEncoder(device=device)

    @torch.inference_mode()
    def __call__(self, queries: list[str]) -> Tensor:
        feats = torch.from_numpy(self.text.encode(queries)).to(self.device)
        return self.tower.embed_texts(feats).float()


def save_two_tower(model: TwoTower, path: str | os.PathLike) -> None:
    """One .safetensors file; the constructor arguments ride along in its metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"two_tower_config": json.dumps(model.config)})


def load_two_tower(path: str | os.PathLike, device: str | None = None) -> TwoTower:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {})["two_tower_config"])
    model = TwoTower(**config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device or "cpu").eval()


def _float_tensor(array) -> torch.Tensor:
    """Shares memory where it can; a read-only array (a stored model's memory-mapped embeddings)
    is copied, since torch tensors cannot be read-only."""
    array = np.asarray(array, dtype=np.float32)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@torch.inference_mode()
def dense_rank(
    query_emb: np.ndarray, image_emb: np.ndarray, k: int, batch_size: int = 1024,
    penalty: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k images per query by cosine (inputs are unit vectors), less each image's `penalty`
    if given (e.g. a multiple of its hubness): (Q,k) int64 indices, (Q,k) float32 scores."""
    k = min(k, len(image_emb))
    images = _float_tensor(image_emb)
    offset = 0.0 if penalty is None else _float_tensor(penalty)
    idx, scores = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for start in range(0, len(query_emb), batch_size):
        q = _float_tensor(query_emb[start : start + batch_size])
        top = (q @ images.T - offset).topk(k, dim=1)
        idx.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(idx), np.concatenate(scores)


def hubness(image_emb: np.ndarray, query_bank: np.ndarray, neighbors: int = HUBNESS_NEIGHBORS,
            batch_size: int = 1024) -> np.ndarray:
    """Each image's mean similarity to its `neighbors` nearest training queries (CSLS, QB-Norm).

    The two-tower is fit to the captioned images, so they sit close to many queries and outrank
    uncaptioned images for queries that are not theirs. Subtracting a multiple of this evens
    that out."""
    if len(query_bank) == 0:
        return np.zeros(len(image_emb), np.float32)
    _, nearest = dense_rank(image_emb, query_bank, k=neighbors, batch_size=batch_size)  # images as the queries
    return nearest.mean(1)


def recall_at_k(ranked_indices: np.ndarray, targets: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries whose target image is among the first k ranked (the standard R@k)."""
    ranked = np.asarray(ranked_indices)
    hits = ranked == np.asarray(targets)[:, None]
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0 for k in ks}
