"""Identifier schemes and the decoding trie, on a small synthetic catalog (no mocks)."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genret.identifiers import (
    SCHEMES,
    IdentifierAssignment,
    ResidualQuantizationIds,
    SemanticIds,
    StringIds,
    StructuredIds,
    make_scheme,
)
from genret.trie import IdPrior, IdTrie

N, DIM, N_CLUSTERS = 300, 16, 10
TOPICS = [
    ["dog", "frisbee", "grass"],
    ["cat", "sofa", "pillow"],
    ["surfer", "wave", "ocean"],
    ["skier", "snow", "mountain"],
    ["pizza", "table", "cheese"],
    ["train", "station", "platform"],
    ["horse", "field", "fence"],
    ["boat", "harbor", "dock"],
    ["child", "kite", "beach"],
    ["bicycle", "street", "rider"],
]
COMMON = ["man", "woman", "red", "blue", "small", "large", "playing", "standing"]
UNCAPTIONED = set(range(280, 300))  # last 20 images have no captions
DUPLICATES = {i: i - 100 for i in range(250, 260)}  # rows 250..259 copy rows 150..159


@functools.cache
def catalog():
    """300 keys in 10 embedding clusters with topic captions, exact duplicate embeddings and
    some uncaptioned images. Cached: hypothesis tests must not rebuild it per example."""
    rng = np.random.default_rng(123)
    keys = tuple(f"{1000000 + i}_{i:04x}.jpg" for i in range(N))
    cluster = np.arange(N) % N_CLUSTERS
    centres = rng.normal(size=(N_CLUSTERS, DIM))
    emb = centres[cluster] + 0.3 * rng.normal(size=(N, DIM))
    for dst, src in DUPLICATES.items():
        emb[dst] = emb[src]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    captions = {}
    for i, key in enumerate(keys):
        if i in UNCAPTIONED:
            continue
        topic = TOPICS[cluster[i]]
        captions[key] = [
            f"A {rng.choice(COMMON)} {rng.choice(topic)} with the {rng.choice(topic)} "
            f"and {rng.choice(COMMON)} {rng.choice(COMMON)}."
            for _ in range(rng.integers(1, 4))
        ]
    return keys, captions, emb


@functools.cache
def assignment(name: str) -> IdentifierAssignment:
    keys, captions, emb = catalog()
    return make_scheme(name).assign(keys, captions, emb)


PIECE = re.compile(r"<[^>]+>|.", re.S)


def tokenize(ids: dict[str, str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Special tokens whole, everything else one character per token."""
    vocab: dict[str, int] = {}
    seqs = {k: [vocab.setdefault(p, len(vocab)) for p in PIECE.findall(v)] for k, v in ids.items()}
    return seqs, vocab


@functools.cache
def trie_for(name: str) -> tuple[IdTrie, dict[str, list[int]], int]:
    seqs, vocab = tokenize(assignment(name).ids)
    end = len(vocab)
    return IdTrie(seqs, end), seqs, end


ALL = sorted(SCHEMES)


# --------------------------------------------------------------------------- every scheme


@pytest.mark.parametrize("name", ALL)
def test_ids_unique_and_complete(name):
    keys, _, _ = catalog()
    a = assignment(name)
    assert a.scheme == name
    assert list(a.ids) == list(keys)
    assert len(set(a.ids.values())) == len(keys)
    assert all(isinstance(v, str) and v for v in a.ids.values())


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    keys, captions, emb = catalog()
    again = make_scheme(name).assign(keys, captions, emb)
    assert again == assignment(name)


@pytest.mark.parametrize("name", ALL)
def test_new_tokens_cover_special_tokens(name):
    a = assignment(name)
    used = {t for v in a.ids.values() for t in re.findall(r"<[^>]+>", v)}
    assert used <= set(a.new_tokens)
    assert len(set(a.new_tokens)) == len(a.new_tokens)
    assert bool(a.new_tokens) == SCHEMES[name].adds_tokens  # what the trainer's config checks rely on


@pytest.mark.parametrize("name", ALL)
def test_json_round_trip(name):
    a = assignment(name)
    assert IdentifierAssignment.from_json(json.loads(json.dumps(a.to_json()))) == a


@pytest.mark.parametrize("name", ALL)
def test_trie_builds_and_resolves_every_key(name):
    trie, seqs, end = trie_for(name)
    assert len(trie) == N
    for key, seq in seqs.items():
        assert key in trie
        assert trie.key_for(seq) == key
        assert trie.key_for(seq + [end]) == key
        assert end in trie.allowed_next(seq)
        for i in range(len(seq)):
            assert seq[i] in trie.allowed_next(seq[:i])
    assert trie.max_depth() == max(map(len, seqs.values())) + 1


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_random_walk_ends_in_real_key(name, data):
    trie, seqs, end = trie_for(name)
    prefix: list[int] = []
    while True:
        allowed = trie.allowed_next(prefix)
        assert allowed, f"dead end at {prefix}"
        token = data.draw(st.sampled_from(allowed))
        prefix.append(token)
        if token == end:
            break
        assert len(prefix) < trie.max_depth()
    key = trie.key_for(prefix)
    assert key is not None and seqs[key] == prefix[:-1]
    assert trie.allowed_next(prefix) == []


@pytest.mark.parametrize("name", [n for n, c in SCHEMES.items() if c.needs_embeddings])
def test_embedding_schemes_reject_missing_or_bad_embeddings(name):
    keys, captions, emb = catalog()
    with pytest.raises(ValueError, match="embeddings"):
        make_scheme(name).assign(keys, captions, None)
    with pytest.raises(ValueError, match="shape"):
        make_scheme(name).assign(keys, captions, emb[:-1])
    with pytest.raises(ValueError, match="shape"):
        make_scheme(name).assign(keys, captions, emb[:, 0])


def test_make_scheme_bad_name():
    with pytest.raises(ValueError, match="numeric"):
        make_scheme("nope")


def test_duplicate_keys_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        make_scheme("atomic").assign(["a.jpg", "a.jpg"], {})


# --------------------------------------------------------------------------- per scheme


def test_string_ids():
    a = assignment("string")
    assert a.ids["1000000_0000.jpg"] == "1000000_0000"
    keys = ["x/1000268201_693b08cb0e.jpg", "a/dup.jpg", "b/dup.jpg", "c.png"]
    ids = StringIds().assign(keys, {}).ids
    assert ids == {
        keys[0]: "1000268201_693b08cb0e",
        "a/dup.jpg": "a/dup.jpg",
        "b/dup.jpg": "b/dup.jpg",
        "c.png": "c",
    }
    with pytest.raises(ValueError, match="ambiguous"):
        StringIds().assign(["x.jpg", "y/x.jpg", "x.jpg.png"], {})


def test_numeric_ids_are_a_seeded_permutation():
    a = assignment("numeric")
    assert sorted(int(v) for v in a.ids.values()) == list(range(N))
    keys, captions, _ = catalog()
    other = make_scheme("numeric", seed=1).assign(keys, captions)
    assert other.ids != a.ids


def test_semantic_ids_use_distinctive_caption_words():
    keys, captions, emb = catalog()
    a = assignment("semantic")
    for i, key in enumerate(keys):
        words = re.sub(r"-\d+$", "", a.ids[key]).split("-")
        assert 1 <= len(words) <= 3
        # Uncaptioned images borrow from their cluster's neighbours, so the topic shows for all.
        assert set(words) & set(TOPICS[i % N_CLUSTERS]), (key, a.ids[key])
        assert not set(words) & {"a", "the", "with", "and"}


def test_semantic_ids_without_embeddings_fall_back_and_suffix():
    keys, captions, _ = catalog()
    a = SemanticIds().assign(keys, captions)
    fallback = [a.ids[keys[i]] for i in sorted(UNCAPTIONED)]
    assert fallback == ["image"] + [f"image-{j}" for j in range(2, len(UNCAPTIONED) + 1)]


def test_semantic_collisions_suffixed_in_key_order():
    caps = {"k1": ["dog on grass"], "k2": ["a dog on the grass"], "k3": ["dog grass"]}
    ids = SemanticIds(words=2).assign(["k1", "k2", "k3"], caps).ids
    assert ids == {"k1": "dog-grass", "k2": "dog-grass-2", "k3": "dog-grass-3"}


def test_semantic_tfidf_prefers_rare_words():
    caps = {
        "a": ["a dog in the park"],
        "b": ["a dog with a ball"],
        "c": ["a dog near a tree"],
    }
    ids = SemanticIds(words=1).assign(["a", "b", "c"], caps).ids
    assert ids == {"a": "park", "b": "ball", "c": "tree"}


def test_structured_ids_share_prefixes_within_clusters():
    keys, captions, emb = catalog()
    a = StructuredIds(branching=4).assign(keys, captions, emb)
    parts = {k: re.findall(r"<s(\d+)_(\d+)>", v) for k, v in a.ids.items()}
    for p in parts.values():
        assert [int(level) for level, _ in p] == list(range(len(p)))
        assert all(int(c) < 4 for _, c in p)
    # Clusters are well separated: images of one cluster agree on their first token.
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(i % N_CLUSTERS, set()).add(a.ids[key].split(">")[0])
    assert sum(len(s) == 1 for s in first.values()) >= N_CLUSTERS // 2


@pytest.mark.parametrize("n, k", [(1, 4), (4, 4), (50, 4), (200, 32)])
def test_structured_ids_terminate_on_identical_embeddings(n, k):
    keys = [f"k{i}" for i in range(n)]
    emb = np.tile(np.eye(1, 8), (n, 1))
    ids = StructuredIds(branching=k).assign(keys, {}, emb).ids
    assert len(set(ids.values())) == n


def test_rq_codebooks_and_collisions():
    keys, captions, emb = catalog()
    scheme = ResidualQuantizationIds(levels=2, codebook_size=16)
    a = scheme.assign(keys, captions, emb)
    assert len(scheme.codebooks) == 2
    assert all(cb.shape == (16, DIM) for cb in scheme.codebooks)
    assert scheme.codes.shape == (N, 2)
    tokens = {k: re.findall(r"<q(\d+)_(\d+)>", v) for k, v in a.ids.items()}
    for key, toks in tokens.items():
        assert [int(level) for level, _ in toks][:2] == [0, 1]
    # Exact duplicates necessarily collide, so they get the extra token, all of one length.
    for dst, src in DUPLICATES.items():
        t_dst, t_src = tokens[keys[dst]], tokens[keys[src]]
        assert len(t_dst) == len(t_src) == 3
        assert t_dst[:2] == t_src[:2] and t_dst[2] != t_src[2]
    by_code: dict = {}
    for key, toks in tokens.items():
        by_code.setdefault(tuple(toks[:2]), set()).add(len(toks))
    assert all(len(lengths) == 1 for lengths in by_code.values())


def test_rq_codebook_clamped_to_catalog_size():
    keys = [f"k{i}" for i in range(5)]
    emb = np.random.default_rng(0).normal(size=(5, 4))
    scheme = ResidualQuantizationIds()
    a = scheme.assign(keys, {}, emb / np.linalg.norm(emb, axis=1, keepdims=True))
    assert all(cb.shape[0] == 5 for cb in scheme.codebooks)
    assert len(set(a.ids.values())) == 5


def test_kmeans_past_the_sample_cap_fits_a_sample_and_assigns_every_point(monkeypatch):
    """A large catalog's k-means fits on a seeded sample (its cost stops growing with N), and
    every point still goes to its nearest centroid; the schemes built on it stay valid."""
    import genret.identifiers as identifiers

    keys, captions, emb = catalog()
    monkeypatch.setattr(identifiers, "MAX_POINTS_PER_CENTROID", 4)  # 300 points > 16 * 4
    clusters = identifiers._kmeans(emb.astype(np.float32), 16, 0, 1)
    assert clusters.labels.shape == (N,) and clusters.centroids.shape == (16, DIM)
    distances = ((emb[:, None, :] - clusters.centroids[None]) ** 2).sum(-1)
    assert (clusters.labels == distances.argmin(1)).all()
    again = identifiers._kmeans(emb.astype(np.float32), 16, 0, 1)
    assert (again.labels == clusters.labels).all()  # the sample is seeded
    for scheme in (ResidualQuantizationIds(levels=2, codebook_size=16), StructuredIds(branching=4)):
        a = scheme.assign(keys, captions, emb)
        assert len(set(a.ids.values())) == N


def test_atomic_ids():
    keys, _, _ = catalog()
    a = assignment("atomic")
    assert a.ids[keys[7]] == "<img_7>"
    assert a.new_tokens == tuple(f"<img_{i}>" for i in range(N))


def test_assignment_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        IdentifierAssignment("x", {"a": "1", "b": "1"})


# --------------------------------------------------------------------------- trie


def test_trie_duplicate_sequence_rejected():
    with pytest.raises(ValueError, match="same identifier"):
        IdTrie({"a": [1, 2], "b": [1, 2]}, end_token=0)
    with pytest.raises(ValueError, match="same identifier"):
        IdTrie({"a": [1, 2, 3], "b": [1, 2], "c": [1, 2]}, end_token=0)


def test_trie_rejects_end_token_and_empty_ids():
    with pytest.raises(ValueError, match="end token"):
        IdTrie({"a": [1, 0, 2]}, end_token=0)
    with pytest.raises(ValueError, match="empty"):
        IdTrie({"a": []}, end_token=0)


def test_trie_allowed_next_and_key_for():
    trie = IdTrie({"a": [5, 6], "b": [5, 7, 8], "c": [5, 7], "d": [9]}, end_token=0)
    assert sorted(trie.first_tokens) == [5, 9]
    assert sorted(trie.allowed_next([5])) == [6, 7]
    assert sorted(trie.allowed_next([5, 7])) == [0, 8]  # "c" ends here, "b" continues
    assert trie.allowed_next([5, 6]) == [0]
    assert trie.allowed_next([5, 6, 0]) == []
    assert trie.allowed_next([4]) == []
    assert trie.allowed_next([5, 6, 7]) == []
    assert trie.key_for([5, 7]) == "c"
    assert trie.key_for([5, 7, 0]) == "c"
    assert trie.key_for([5, 7, 8, 0]) == "b"
    assert trie.key_for([5]) is None
    assert trie.key_for([5, 0, 7]) is None
    assert trie.key_for([]) is None
    assert trie.key_for([1, 2]) is None
    assert len(trie) == 4 and "b" in trie and "z" not in trie
    assert trie.max_depth() == 4
    assert trie.allowed_next(np.array([5, 7])) == trie.allowed_next([5, 7])


def test_trie_prefix_inserted_after_longer_id():
    # The shorter id arrives first, then a longer one must pass through its leaf.
    trie = IdTrie({"short": [1, 2], "long": [1, 2, 3]}, end_token=0)
    assert sorted(trie.allowed_next([1, 2])) == [0, 3]
    assert trie.key_for([1, 2]) == "short" and trie.key_for([1, 2, 3]) == "long"


# distinct token sequences over a small alphabet, so ids share prefixes and end inside each other
ID_SEQUENCES = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=5), min_size=1, max_size=30, unique_by=tuple)


@settings(max_examples=100, deadline=None)
@given(seqs=ID_SEQUENCES, data=st.data())
def test_trie_property_random_sequences(seqs, data):
    trie = IdTrie({f"k{i}": s for i, s in enumerate(seqs)}, end_token=0)
    for i, s in enumerate(seqs):
        assert trie.key_for(s) == f"k{i}"
        assert 0 in trie.allowed_next(s)
    prefix: list[int] = []
    while not prefix or prefix[-1] != 0:
        prefix.append(data.draw(st.sampled_from(trie.allowed_next(prefix))))
    key = trie.key_for(prefix)
    assert key is not None and seqs[int(key[1:])] == prefix[:-1]


@settings(max_examples=100, deadline=None)
@given(seqs=ID_SEQUENCES, data=st.data())
def test_trie_mask_allows_exactly_each_beams_next_tokens(seqs, data):
    """The batched mask beam search uses gives every row what `allowed_next` says for its own
    prefix (a finished one: the end token only), beams at one node sharing one write."""
    import torch

    from genret.decoding import TrieMask

    trie = IdTrie({f"k{i}": s for i, s in enumerate(seqs)}, end_token=0)
    depth = data.draw(st.integers(0, 6))
    prompt_width = 2
    rows = []
    for _ in range(data.draw(st.integers(1, 12))):
        prefix: list[int] = []
        while len(prefix) < depth:  # a walk down the trie, then past its end, as beams go
            prefix.append(data.draw(st.sampled_from(trie.allowed_next(prefix) or [0])))
        rows.append([7, 7] + prefix)
    scores = torch.randn(len(rows), 8).log_softmax(-1)
    tensors: dict = {}  # as the engine keeps them from one search to the next
    masked = TrieMask(trie, prompt_width, tensors=tensors)(torch.tensor(rows), scores)
    assert torch.equal(TrieMask(trie, prompt_width, tensors=tensors)(torch.tensor(rows), scores), masked)
    for row, out, before in zip(rows, masked, scores):
        allowed = set(trie.allowed_next(row[prompt_width:]) or [0])
        assert {t for t in range(8) if torch.isfinite(out[t])} == allowed
        assert all(out[t] == before[t] for t in allowed)


@settings(max_examples=100, deadline=None)
@given(seqs=ID_SEQUENCES, data=st.data())
def test_prior_steps_add_up_to_each_ids_offset_and_lead_with_the_best_below(seqs, data):
    """Walking down to an id and its end token adds exactly its offset; after each step a prefix
    carries the best offset of any id below it, so the search meets an offset at its first token."""
    trie = IdTrie({f"k{i}": s for i, s in enumerate(seqs)}, end_token=0)
    offsets = {f"k{i}": data.draw(st.floats(-5, 5)) for i in range(len(seqs))}
    prior = IdPrior(trie, offsets)
    for i, s in enumerate(seqs):
        walked, prefix = 0.0, []
        for token in [*s, 0]:
            allowed = trie.allowed_next(prefix)
            walked += prior.step_offsets(prefix)[allowed.index(token)]
            prefix.append(token)
            below = [offsets[f"k{j}"] for j, other in enumerate(seqs) if other[:len(prefix)] == prefix
                     or (token == 0 and other == prefix[:-1])]
            assert walked == pytest.approx(max(below))
        assert walked == pytest.approx(offsets[f"k{i}"])
    assert prior.step_offsets([4, 4, 4, 4, 4, 4, 4]) == []  # off the trie: nothing is allowed


def _paths(trie: IdTrie, prefix: tuple = ()) -> dict[str, tuple]:
    """Every id the trie can produce, by walking allowed_next from the root."""
    found = {}
    for token in trie.allowed_next(prefix):
        found.update({trie.key_for(prefix): prefix} if token == 0 else _paths(trie, prefix + (token,)))
    return found


@settings(max_examples=150, deadline=None)
@given(seqs=ID_SEQUENCES, data=st.data())
def test_a_trie_less_some_ids_is_the_trie_of_the_rest_and_shares_the_other_nodes(seqs, data):
    """IdTrie.without gives what a trie built over the other ids gives (what each prefix allows,
    and a prior's step offsets over it), leaves the trie it came from whole, and says where it
    differs: the prefixes whose nodes were copied, and the tokens each no longer allows."""
    ids = {f"k{i}": tuple(s) for i, s in enumerate(seqs)}
    trie = IdTrie(ids, end_token=0)
    offsets = {key: data.draw(st.floats(-5, 5)) for key in ids}
    prior = IdPrior(trie, offsets)
    _ = [prior.step_offsets(s[:i]) for s in ids.values() for i in range(len(s) + 1)]  # cached, as a search leaves them
    left_out = data.draw(st.sets(st.sampled_from(sorted(ids)), min_size=1, max_size=len(ids) - 1)) if len(ids) > 1 else set()
    if not left_out:
        return
    pruned = trie.without({key: ids[key] for key in left_out})
    rest = IdTrie({k: s for k, s in ids.items() if k not in left_out}, end_token=0)
    assert pruned.keys == rest.keys and len(pruned) == len(rest)
    assert _paths(pruned) == _paths(rest) and _paths(trie) == ids
    over, rebuilt = prior.over(pruned), IdPrior(rest, offsets)
    for s in _paths(rest).values():
        for i in range(len(s) + 1):
            allowed = pruned.allowed_next(s[:i])
            assert sorted(allowed) == sorted(rest.allowed_next(s[:i]))
            expected = dict(zip(rest.allowed_next(s[:i]), rebuilt.step_offsets(s[:i])))
            assert over.step_offsets(s[:i]) == pytest.approx([expected[t] for t in allowed])
            if s[:i] in pruned.copied:
                assert set(trie.allowed_next(s[:i])) - set(allowed) == set(pruned.removed.get(s[:i], []))
            else:
                assert pruned._walk(s[:i]) is trie._walk(s[:i]) and s[:i] not in pruned.removed
    assert pruned.key_for(ids[min(left_out)]) is None


def test_a_trie_less_an_id_it_lacks_says_so():
    trie = IdTrie({"a": [1, 2], "b": [1, 3]}, end_token=0)
    with pytest.raises(ValueError, match="'c' is not in the trie"):
        trie.without({"c": [1, 4]})
    with pytest.raises(ValueError, match="'a' is not in the trie"):
        trie.without({"a": [1, 3]})
    assert trie.without({"a": [1, 2], "b": [1, 3]}).first_tokens == []


def test_prior_needs_an_offset_for_every_id():
    with pytest.raises(ValueError, match="no prior offset for 1 ids"):
        IdPrior(IdTrie({"a": [1], "b": [2]}, end_token=0), {"a": 0.0})


@settings(max_examples=50, deadline=None)
@given(seqs=ID_SEQUENCES, data=st.data())
def test_trie_mask_with_a_prior_adds_each_tokens_step_offset(seqs, data):
    import torch

    from genret.decoding import TrieMask

    trie = IdTrie({f"k{i}": s for i, s in enumerate(seqs)}, end_token=0)
    prior = IdPrior(trie, {f"k{i}": data.draw(st.floats(-5, 5)) for i in range(len(seqs))})
    depth, rows = data.draw(st.integers(0, 6)), []
    for _ in range(data.draw(st.integers(1, 8))):
        prefix: list[int] = []
        while len(prefix) < depth:
            prefix.append(data.draw(st.sampled_from(trie.allowed_next(prefix) or [0])))
        rows.append([7] + prefix)
    scores = torch.randn(len(rows), 8, dtype=torch.float64).log_softmax(-1)
    tensors: dict = {}
    masked = TrieMask(trie, 1, prior, tensors)(torch.tensor(rows), scores)
    assert torch.equal(TrieMask(trie, 1, prior, tensors)(torch.tensor(rows), scores), masked)
    for row, out, before in zip(rows, masked, scores):
        allowed = trie.allowed_next(row[1:])
        steps = prior.step_offsets(row[1:]) if allowed else [0.0]
        for token, step in zip(allowed or [0], steps):
            assert out[token].item() == pytest.approx(before[token].item() + step)
        assert {t for t in range(8) if torch.isfinite(out[t])} == set(allowed or [0])
