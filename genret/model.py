"""The multimodal LM: image features become a short prefix of soft tokens (LLaVA-style).

The language model stays a plain HF `LlamaForCausalLM` so that its checkpoint loads unchanged
in transformers and vLLM; only the visual prefix (a small MLP from EfficientNet's 1280-d
features to `n_tokens` embeddings) lives beside it. Serving needs no image: retrieval,
describe and ask are text-only prompts, the prefix is used while memorizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

IGNORE = -100


class VisualPrefix(nn.Module):
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


@dataclass
class Example:
    """One training sequence: [visual prefix] + prompt -> target (loss on the target only)."""

    prompt: list[int]
    target: list[int]
    image: int | None = None  # row in the image-feature table when the prompt starts with the image


class MultimodalLM(nn.Module):
    def __init__(self, lm: LlamaForCausalLM, prefix: VisualPrefix):
        super().__init__()
        self.lm, self.prefix = lm, prefix

    def _embed(self, tokens: torch.Tensor, images: torch.Tensor, has_image: torch.Tensor, features):
        embeds = self.lm.get_input_embeddings()(tokens)
        if has_image.any():
            n = self.prefix.n_tokens
            visual = self.prefix(features[images[has_image]]).to(embeds.dtype)
            embeds = embeds.clone()
            embeds[has_image, :n] = visual
        return embeds

    def collate(self, examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
        """Right-padded batch; image examples get `n_tokens` placeholder slots at the start."""
        n = self.prefix.n_tokens
        rows, labels = [], []
        for ex in examples:
            lead = [pad_id] * n if ex.image is not None else []
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
        batch = dict(tokens=tokens, labels=label_t, mask=mask, images=images, has_image=has_image)
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """Mean over examples of each example's mean target-token loss.

        Averaging over all target tokens instead would let long captions (describe, ask)
        outweigh the two or three tokens of an identifier, which is what retrieval needs most.
        """
        embeds = self._embed(batch["tokens"], batch["images"], batch["has_image"], features)
        logits = self.lm(inputs_embeds=embeds, attention_mask=batch["mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        token_loss = nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
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
