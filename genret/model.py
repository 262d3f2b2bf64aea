"""The multimodal LM: vectors become short prefixes of soft tokens (LLaVA-style).

The language model stays a plain HF `LlamaForCausalLM` so that its checkpoint loads unchanged
in transformers and vLLM; the prefixes (small MLPs from a vector to `n_tokens` embeddings)
live beside it:

- the visual prefix turns EfficientNet's 1280-d image features into soft tokens; it is used
  while memorizing (image -> id) and captioning, never at serving time;
- the optional query prefix turns an aligned (two-tower) embedding into soft tokens in front
  of the retrieve prompt. It is trained on caption embeddings (query -> id) and on the
  catalog's image embeddings (image -> id), all in the space the semantic ids come from, so a
  query never seen in training still lands near its image's id (GENIUS feeds its decoder the
  query's CLIP embedding for the same reason). Serving computes it from the query text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

IGNORE = -100


class SoftPrefix(nn.Module):
    """A vector -> `n_tokens` embeddings in the LM's input space."""

    def __init__(self, feature_dim: int, model_dim: int, n_tokens: int = 4, hidden: int = 1024):
        super().__init__()
        self.n_tokens, self.model_dim = n_tokens, model_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, n_tokens * model_dim),
        )
        # start near the scale of token embeddings, so the first steps do not wreck the LM
        nn.init.normal_(self.mlp[-1].weight, std=0.02 / hidden**0.5)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).view(-1, self.n_tokens, self.model_dim)

    @property
    def shape(self) -> dict[str, int]:
        """The constructor's arguments, recorded in a model's manifest."""
        return {"feature_dim": self.mlp[0].normalized_shape[0], "n_tokens": self.n_tokens,
                "model_dim": self.model_dim, "hidden": self.mlp[1].out_features}


class QueryPrefix(SoftPrefix):
    """An aligned embedding -> soft tokens, after removing its modality's mean.

    Two-tower spaces keep captions and images in two separate cones (the "modality gap"): the
    prefix is trained on both, so each is centred on its own mean and re-normalised first, and
    a caption then lands where its image does.
    """

    def __init__(self, feature_dim: int, model_dim: int, n_tokens: int = 4, hidden: int = 1024,
                 noise: float = 0.0):
        super().__init__(feature_dim, model_dim, n_tokens, hidden)
        self.register_buffer("text_mean", torch.zeros(feature_dim))
        self.register_buffer("image_mean", torch.zeros(feature_dim))
        self.noise = noise  # training only, not saved: see forward

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """While training, jitters each (unit) embedding by a random vector of length `noise`:
        a held-out query lands near, not on, the training points, and the prefix should map that
        whole neighbourhood to the same id."""
        if self.training and self.noise:
            jitter = torch.randn_like(embeddings)
            jitter = self.noise * nn.functional.normalize(jitter, dim=-1)
            embeddings = nn.functional.normalize(embeddings + jitter, dim=-1)
        return super().forward(embeddings)

    def centre(self, embeddings: torch.Tensor, modality: str) -> torch.Tensor:
        mean = self.text_mean if modality == "text" else self.image_mean
        return nn.functional.normalize(embeddings.float() - mean, dim=-1)

    @torch.inference_mode()
    def embed_queries(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(Q, dim) aligned query embeddings -> (Q, n_tokens, model_dim) soft tokens."""
        return self(self.centre(text_embeddings.to(self.text_mean.device), "text"))



@dataclass
class Example:
    """One training sequence: [soft prefix] + prompt -> target (loss on the target only)."""

    prompt: list[int]
    target: list[int]
    image: int | None = None  # row in the image-feature table when the prompt starts with the image
    query: int | None = None  # row in the aligned-embedding table when it starts with the query prefix
    teacher: int | None = None  # row of the teacher's text table when its first target token is distilled


class MultimodalLM(nn.Module):
    def __init__(self, lm: LlamaForCausalLM, prefix: SoftPrefix, query_prefix: QueryPrefix | None = None):
        super().__init__()
        self.lm, self.prefix, self.query_prefix = lm, prefix, query_prefix

    def _embed(self, batch: dict[str, torch.Tensor], features, query_table):
        embeds = self.lm.get_input_embeddings()(batch["tokens"])
        for prefix, has, rows, table in ((self.prefix, batch["has_image"], batch["images"], features),
                                         (self.query_prefix, batch["has_query"], batch["queries"], query_table)):
            if has.any():
                soft = prefix(table[rows[has]]).to(embeds.dtype)
                embeds = embeds.clone()
                embeds[has, : prefix.n_tokens] = soft
        return embeds

    def soft_tokens(self, ex: Example) -> int:
        """The placeholder slots an example starts with, for its visual or query prefix."""
        if ex.image is not None and ex.query is not None:
            raise ValueError("an example starts with the image or with the query, not both")
        return self.prefix.n_tokens if ex.image is not None else self.query_prefix.n_tokens if ex.query is not None else 0

    def length(self, ex: Example) -> int:
        """The example's sequence length before padding."""
        return self.soft_tokens(ex) + len(ex.prompt) + len(ex.target)

    def collate(self, examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
        """Right-padded batch; prefixed examples get `n_tokens` placeholder slots at the start."""
        rows, labels = [], []
        for ex in examples:
            lead = [pad_id] * self.soft_tokens(ex)
            rows.append(lead + ex.prompt + ex.target)
            labels.append([IGNORE] * (len(lead) + len(ex.prompt)) + ex.target)
        width = max(map(len, rows))
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            tokens[i, : len(row)] = torch.tensor(row)
            label_t[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(row)] = 1
        images = torch.tensor([ex.image if ex.image is not None else 0 for ex in examples])
        has_image = torch.tensor([ex.image is not None for ex in examples])
        queries = torch.tensor([ex.query if ex.query is not None else 0 for ex in examples])
        has_query = torch.tensor([ex.query is not None for ex in examples])
        teachers = torch.tensor([ex.teacher if ex.teacher is not None else 0 for ex in examples])
        has_teacher = torch.tensor([ex.teacher is not None for ex in examples])
        batch = dict(tokens=tokens, labels=label_t, mask=mask, images=images, has_image=has_image,
                     queries=queries, has_query=has_query, teachers=teachers, has_teacher=has_teacher)
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor], features: torch.Tensor,
             query_table: torch.Tensor | None = None, soft_targets: torch.Tensor | None = None,
             soft_weight: float = 0.0) -> torch.Tensor:
        """Mean over examples of each example's mean target-token loss.

        Averaging over all target tokens instead would let long captions (describe, ask)
        outweigh the two or three tokens of an identifier, which is what retrieval needs most.
        `soft_targets` (one distribution over the vocabulary per example with a teacher, in
        batch order) blend into those examples' first target token: (1 - w) * the hard label's
        loss + w * the cross-entropy against the teacher's distribution.
        """
        embeds = self._embed(batch, features, query_table)
        logits = self.lm(inputs_embeds=embeds, attention_mask=batch["mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        token_loss = nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        if soft_targets is not None and soft_weight:
            rows = batch["has_teacher"].nonzero().squeeze(1)
            first = (labels[rows] != IGNORE).int().argmax(1)
            soft = -(soft_targets * logits[rows, first].float().log_softmax(-1)).sum(-1)
            token_loss = token_loss.index_put((rows, first), (1 - soft_weight) * token_loss[rows, first] + soft_weight * soft)
        counts = (labels != IGNORE).sum(1).clamp(min=1)
        return (token_loss.sum(1) / counts).mean()

    @torch.inference_mode()
    def generate_from_images(
        self, features: torch.Tensor, prompt: list[int], max_new_tokens: int, end_token: int
    ) -> list[list[int]]:
        """Greedy continuation of [visual prefix] + prompt for a batch of images (captioning)."""
        device = features.device
        prompt_t = torch.tensor(prompt, device=device).expand(len(features), -1)
        embeds = torch.cat([self.prefix(features), self.lm.get_input_embeddings()(prompt_t)], dim=1)
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_token,
            pad_token_id=end_token,
        )
        sequences = []
        for row in out.tolist():
            sequences.append(row[: row.index(end_token)] if end_token in row else row)
        return sequences
