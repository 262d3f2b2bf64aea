"""Generative cross-modal retrieval: a multimodal LM that memorizes a catalog of images
under identifiers and retrieves them by generating those identifiers.

From Python:

    import genret
    model = genret.load("demo")                  # a name under model_store/, or a model folder
    model.search(["a cat on a sofa"], k=5)       # [[Hit(key='chelsea.jpg', score=-0.01), ...]]
    model.describe("chelsea.jpg")
    model.ask("chelsea.jpg", "What animal is this?")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decoding import TransformersEngine

# where a model's name is looked up, and `genret train --name` writes
MODEL_STORE = Path(os.environ.get("GENRET_MODEL_STORE", Path(__file__).resolve().parents[1] / "model_store"))


def load(model: str | Path, device: str | None = None) -> TransformersEngine:
    """A trained model, loaded to search, describe and ask (genret.decoding.TransformersEngine);
    device: cuda where there is one, else cpu, unless given."""
    from .decoding import TransformersEngine
    from .model_store import StoredModel

    return TransformersEngine(StoredModel.find(model), device=device)
