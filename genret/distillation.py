"""The two-tower as a teacher for retrieval's first id token.

A retrieve example's hard label names one image; the two-tower knows how plausible every
other catalog image is for the same caption, uncaptioned ones included. Distillation trains
the LM's first id-token distribution towards the tower's: softmax over the catalog at the
tower's own learned temperature, each image's share given to the token its id starts with
(for atomic ids that is the image itself; for hierarchical ids, its top-level cluster).
"""

from __future__ import annotations

import numpy as np
import torch


class DenseTeacher:
    def __init__(self, text_embeddings: np.ndarray, image_embeddings: np.ndarray, first_tokens: list[int],
                 scale: float, device: torch.device | str = "cpu"):
        """`text_embeddings[r]`: the aligned embedding of the text the examples with teacher row r
        ask for; `first_tokens[i]`: the token image i's id starts with."""
        self.texts = torch.from_numpy(np.ascontiguousarray(text_embeddings)).float().to(device)
        self.images = torch.from_numpy(np.ascontiguousarray(image_embeddings)).float().to(device)
        self.first_tokens = torch.tensor(first_tokens, dtype=torch.long, device=device)
        self.scale = float(scale)

    @torch.no_grad()
    def targets(self, rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(len(rows), vocab_size): for each teacher row, the tower's distribution over the
        catalog gathered onto the ids' first tokens (zero elsewhere)."""
        shares = torch.softmax(self.scale * self.texts[rows] @ self.images.T, dim=-1)
        out = torch.zeros(len(rows), vocab_size, device=shares.device)
        return out.index_add_(1, self.first_tokens, shares)
