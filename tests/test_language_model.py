"""SmolLM2 from its GGUF, cut and pruned, keeps its tokenization; every scheme yields a valid trie."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from genret.identifiers import SCHEMES, make_scheme
from genret.language_model import add_tokens, keep_first_layers, load_base, prune_vocabulary
from genret.prompts import PROMPT_TEXTS, Prompts
from genret.trie import IdTrie


@pytest.fixture(scope="module")
def base():
    return load_base()


def one_layer_copy(lm: LlamaForCausalLM) -> LlamaForCausalLM:
    """A fresh 1-layer model of the same shape: cheap, and leaves the shared base untouched."""
    config = copy.deepcopy(lm.config)
    config.num_hidden_layers = 1
    config.layer_types = None
    return keep_first_layers(LlamaForCausalLM(config), 1)


def test_pruned_vocabulary_tokenizes_the_corpus_exactly_as_before(base, tiny_catalog):
    lm, tokenizer = base
    corpus = PROMPT_TEXTS + [c for img in tiny_catalog for c in img.captions]
    before = [tokenizer.tokenize(t) for t in corpus]
    small, pruned = prune_vocabulary(one_layer_copy(lm), tokenizer, corpus)
    assert [pruned.tokenize(t) for t in corpus] == before
    assert len(pruned) < 2000 < len(tokenizer)
    assert small.get_input_embeddings().weight.shape[0] == len(pruned)
    # text outside the corpus still tokenizes (down to bytes) and decodes losslessly
    unseen = "Zebras jump over 42 quixotic ü-umlauts!"
    assert pruned.decode(pruned.encode(unseen, add_special_tokens=False)) == unseen


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_builds_a_valid_trie_with_the_real_tokenizer(base, tiny_catalog, scheme, tmp_path):
    lm, tokenizer = base
    keys = tiny_catalog.keys()
    captions = tiny_catalog.captions()
    embeddings = np.random.default_rng(0).normal(size=(len(keys), 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    options = {"structured": {"branching": 3}, "rq": {"levels": 2, "codebook_size": 4}}.get(scheme, {})
    assignment = make_scheme(scheme, **options).assign(keys, captions, embeddings)
    corpus = PROMPT_TEXTS + [t for t in assignment.ids.values() if not t.startswith("<")]
    small, pruned = prune_vocabulary(one_layer_copy(lm), tokenizer, corpus)
    small, pruned = add_tokens(small, pruned, assignment.new_tokens)
    small.save_pretrained(tmp_path)
    pruned.save_pretrained(tmp_path)
    reloaded = Prompts(AutoTokenizer.from_pretrained(tmp_path))
    sequences = {k: reloaded.encode(assignment.ids[k]) for k in keys}
    trie = IdTrie(sequences, end_token=reloaded.end)  # raises on two keys with one sequence
    assert len(trie) == len(keys)
    for key, seq in sequences.items():
        assert trie.key_for(seq + [reloaded.end]) == key
        assert reloaded.tokenizer.decode(seq) == assignment.ids[key]
