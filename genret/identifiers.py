"""Identifier schemes: what text the LM writes to name each catalog image.

GRACE (Li et al. 2024) compares five ways of naming an image (string, numeric, semantic,
structured, atomic); GENIUS (CVPR 2025) uses residual-quantization codes. Every scheme maps each
image key to a unique identifier text and lists the new tokens the tokenizer must learn, so that
training, the decoding trie and evaluation all agree on one assignment (stored as JSON).
"""

from __future__ import annotations

import math
import re
import warnings
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import PurePath
from typing import ClassVar, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "IdentifierAssignment",
    "IdentifierScheme",
    "StringIds",
    "NumericIds",
    "SemanticIds",
    "StructuredIds",
    "AtomicIds",
    "ResidualQuantizationIds",
    "SCHEMES",
    "make_scheme",
    "STOP_WORDS",
]


@dataclass(frozen=True)
class IdentifierAssignment:
    """The result of a scheme: key -> identifier text, plus tokens to add to the tokenizer."""

    scheme: str
    ids: dict[str, str]
    new_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here so no assignment that the trie would reject can ever be built or loaded.
        if len(set(self.ids.values())) != len(self.ids):
            dupes = [v for v, n in Counter(self.ids.values()).items() if n > 1]
            raise ValueError(f"identifiers are not unique, e.g. {dupes[:5]}")
        object.__setattr__(self, "new_tokens", tuple(self.new_tokens))

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "ids": dict(self.ids), "new_tokens": list(self.new_tokens)}

    @classmethod
    def from_json(cls, d: Mapping) -> "IdentifierAssignment":
        return cls(scheme=d["scheme"], ids=dict(d["ids"]), new_tokens=tuple(d.get("new_tokens", ())))


class IdentifierScheme(ABC):
    name: ClassVar[str]
    needs_embeddings: ClassVar[bool] = False
    # whether its ids are spelled with tokens it adds to the LM's vocabulary (rows that start
    # untrained, so how they start and whether they train matters)
    adds_tokens: ClassVar[bool] = False

    @abstractmethod
    def assign(
        self,
        keys: Sequence[str],
        captions: Mapping[str, Sequence[str]],
        embeddings: np.ndarray | None = None,
    ) -> IdentifierAssignment:
        """keys: all catalog image keys (order = rows of embeddings); captions: key -> training
        captions (may be missing/empty); embeddings: (len(keys), d) L2-normalised image embeddings
        in an image-text aligned space."""


# --------------------------------------------------------------------------- helpers


def _check_keys(keys: Sequence[str]) -> list[str]:
    keys = list(keys)
    if not keys:
        raise ValueError("empty catalog: nothing to assign identifiers to")
    if len(set(keys)) != len(keys):
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        raise ValueError(f"duplicate image keys, e.g. {dupes[:5]}")
    return keys


def _check_embeddings(scheme: str, keys: list[str], embeddings: np.ndarray | None) -> np.ndarray:
    if embeddings is None:
        raise ValueError(f"identifier scheme {scheme!r} needs image embeddings, got None")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(keys) or emb.shape[1] == 0:
        raise ValueError(
            f"identifier scheme {scheme!r} needs embeddings of shape ({len(keys)}, d), "
            f"got {emb.shape}"
        )
    emb = emb.astype(np.float32)
    if not np.isfinite(emb).all():
        raise ValueError(f"identifier scheme {scheme!r}: embeddings contain NaN or inf")
    return emb


# k-means fits on at most this many points per centroid (FAISS's default), then every point goes
# to its nearest centroid: past it, more points barely move the centroids, and the fit's cost
# stops growing with the catalog (sklearn on all of 100K points at k=256 took 124 s here).
MAX_POINTS_PER_CENTROID = 256


class Clusters(NamedTuple):
    labels: np.ndarray  # (N,) the centroid each point is nearest to
    centroids: np.ndarray  # (k, d)


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> Clusters:
    """Fit k-means quietly (duplicate rows legitimately give fewer distinct clusters than k), on
    a seeded sample when the points outnumber k * MAX_POINTS_PER_CENTROID."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    sample = x
    if len(x) > k * MAX_POINTS_PER_CENTROID:
        rows = np.random.default_rng(seed).choice(len(x), k * MAX_POINTS_PER_CENTROID, replace=False)
        sample = x[np.sort(rows)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(sample)
    labels = km.labels_ if sample is x else km.predict(x)
    return Clusters(labels, km.cluster_centers_)


# --------------------------------------------------------------------------- schemes


class StringIds(IdentifierScheme):
    """The file stem: free for the LM to spell with its own vocabulary, no new tokens."""

    name = "string"

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        stems = {k: PurePath(k).stem or k for k in keys}
        counts = Counter(stems.values())
        ids = {k: (stems[k] if counts[stems[k]] == 1 else k) for k in keys}
        if len(set(ids.values())) != len(ids):
            clash = [v for v, n in Counter(ids.values()).items() if n > 1]
            raise ValueError(f"string ids ambiguous even with full keys, e.g. {clash[:5]}")
        return IdentifierAssignment(self.name, ids, ())


class NumericIds(IdentifierScheme):
    """A random number per image: carries no content, GRACE's content-free baseline."""

    name = "numeric"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        perm = np.random.default_rng(self.seed).permutation(len(keys))
        return IdentifierAssignment(self.name, {k: str(int(p)) for k, p in zip(keys, perm)}, ())


STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are around as at be been
    before being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers him his how i if in into is it its
    itself just me more most my near next no nor not of off on once one only or other our out
    over own same she should so some such than that the their them then there these they this
    those through to too under until up very was we were what when where which while who whom
    why will with would you your""".split()
)

_WORD = re.compile(r"[a-z]+")


def _content_words(texts: Sequence[str]) -> Counter:
    words = (w for t in texts for w in _WORD.findall(t.lower()))
    return Counter(w for w in words if len(w) > 1 and w not in STOP_WORDS)


class SemanticIds(IdentifierScheme):
    """A few caption words that set the image apart (TF-IDF), so the id itself hints at content."""

    name = "semantic"

    def __init__(self, words: int = 3, neighbours: int = 5, fallback: str = "image"):
        if words < 1:
            raise ValueError("words must be >= 1")
        self.words = words
        self.neighbours = neighbours
        self.fallback = fallback

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        emb = None if embeddings is None else _check_embeddings(self.name, keys, embeddings)

        counts = [_content_words(captions.get(k, ())) for k in keys]
        has_words = np.array([bool(c) for c in counts])
        n_docs = int(has_words.sum())
        df = Counter(w for c in counts for w in c)
        # Smoothed idf (as sklearn's): never zero, so a word shared by all images still counts.
        idf = {w: math.log((1 + n_docs) / (1 + n)) + 1.0 for w, n in df.items()}

        # Images without usable captions borrow their nearest captioned neighbours' words.
        missing = np.flatnonzero(~has_words)
        if emb is not None and n_docs and len(missing):
            donors = np.flatnonzero(has_words)
            unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            top = min(self.neighbours, len(donors))
            for start in range(0, len(missing), 1024):  # chunked: keeps the similarity matrix small
                rows = missing[start : start + 1024]
                sims = unit[rows] @ unit[donors].T
                nearest = np.argpartition(-sims, top - 1, axis=1)[:, :top]
                for row, nbrs in zip(rows, nearest):
                    pooled = Counter()
                    for j in nbrs:
                        pooled.update(counts[donors[j]])
                    counts[row] = pooled

        ids, seen = {}, Counter()
        for key, c in zip(keys, counts):
            ranked = sorted(c, key=lambda w: (-c[w] * idf[w], w))[: self.words]
            base = "-".join(ranked) if ranked else self.fallback
            seen[base] += 1
            # Bases are alphabetic, so a numeric suffix can never recreate another base.
            ids[key] = base if seen[base] == 1 else f"{base}-{seen[base]}"
        return IdentifierAssignment(self.name, ids, ())


class StructuredIds(IdentifierScheme):
    """Hierarchical k-means path: similar images share id prefixes, so the trie groups them."""

    name = "structured"
    adds_tokens = True
    needs_embeddings = True

    def __init__(self, branching: int = 32, seed: int = 0, n_init: int = 1):
        if branching < 2:
            raise ValueError("branching must be >= 2")
        self.branching = branching
        self.seed = seed
        self.n_init = n_init

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        emb = _check_embeddings(self.name, keys, embeddings)
        k = self.branching
        paths: dict[int, tuple[tuple[int, int], ...]] = {}
        stack = [(np.arange(len(keys)), ())]  # explicit stack: unbalanced splits may go deep
        while stack:
            members, path = stack.pop()
            level = len(path)
            if len(members) <= k:
                for pos, i in enumerate(members):
                    paths[int(i)] = path + ((level, pos),)
                continue
            labels = _kmeans(emb[members], k, self.seed, self.n_init).labels
            groups = [members[labels == c] for c in np.unique(labels)]
            if len(groups) < 2:
                # All points identical (or k-means collapsed): split in key order so we progress.
                groups = np.array_split(members, k)
            for c, g in enumerate(groups):
                stack.append((g, path + ((level, c),)))

        ids = {key: "".join(f"<s{l}_{c}>" for l, c in paths[i]) for i, key in enumerate(keys)}
        used = sorted({t for p in paths.values() for t in p})
        return IdentifierAssignment(self.name, ids, tuple(f"<s{l}_{c}>" for l, c in used))


class AtomicIds(IdentifierScheme):
    """One dedicated token per image: a single decoding step, but the vocabulary grows with N."""

    name = "atomic"
    adds_tokens = True

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        tokens = tuple(f"<img_{i}>" for i in range(len(keys)))
        return IdentifierAssignment(self.name, dict(zip(keys, tokens)), tokens)


class ResidualQuantizationIds(IdentifierScheme):
    """GENIUS-style codes: each level quantizes what the previous levels left unexplained.

    After `assign`, `codebooks` holds one (K, d) array per level and `codes` the (N, levels)
    code matrix, so new images can later be encoded with the same codebooks.
    """

    name = "rq"
    adds_tokens = True
    needs_embeddings = True

    def __init__(self, levels: int = 3, codebook_size: int = 256, seed: int = 0, n_init: int = 1):
        if levels < 1 or codebook_size < 1:
            raise ValueError("levels and codebook_size must be >= 1")
        self.levels = levels
        self.codebook_size = codebook_size
        self.seed = seed
        self.n_init = n_init
        self.codebooks: list[np.ndarray] | None = None
        self.codes: np.ndarray | None = None

    def assign(self, keys, captions, embeddings=None):
        keys = _check_keys(keys)
        emb = _check_embeddings(self.name, keys, embeddings)
        size = min(self.codebook_size, len(keys))
        residual = emb.copy()
        codebooks, codes = [], np.zeros((len(keys), self.levels), dtype=np.int64)
        for level in range(self.levels):
            clusters = _kmeans(residual, size, self.seed + level, self.n_init)
            codes[:, level] = clusters.labels
            codebooks.append(clusters.centroids.astype(np.float32))
            residual = residual - codebooks[-1][clusters.labels]
        self.codebooks, self.codes = codebooks, codes

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, row in enumerate(map(tuple, codes.tolist())):
            groups[row].append(i)
        ids, extra = {}, 0
        for row, members in groups.items():
            base = "".join(f"<q{l}_{c}>" for l, c in enumerate(row))
            if len(members) == 1:
                ids[keys[members[0]]] = base
            else:  # every member gets a disambiguation token, so a group's ids share one length
                for j, i in enumerate(members):
                    ids[keys[i]] = f"{base}<q{self.levels}_{j}>"
                extra = max(extra, len(members))
        ids = {key: ids[key] for key in keys}
        # The full codebooks' tokens, not just the used ones: re-encoding new images must not
        # need tokens the LM was never given.
        tokens = [f"<q{l}_{c}>" for l in range(self.levels) for c in range(size)]
        tokens += [f"<q{self.levels}_{j}>" for j in range(extra)]
        return IdentifierAssignment(self.name, ids, tuple(tokens))


SCHEMES: dict[str, type[IdentifierScheme]] = {
    cls.name: cls
    for cls in (StringIds, NumericIds, SemanticIds, StructuredIds, AtomicIds, ResidualQuantizationIds)
}


def make_scheme(name: str, **options) -> IdentifierScheme:
    try:
        cls = SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown identifier scheme {name!r}; valid: {sorted(SCHEMES)}") from None
    return cls(**options)
