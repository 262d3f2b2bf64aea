"""Prefix tree that constrains decoding to identifiers that exist in the catalog.

It is queried every decoding step for every beam and must hold up to ~1M identifiers, so:
  * nodes are plain dicts keyed by token id (a dict subclass only to carry a cached answer);
  * a position whose only continuation is the end token is stored as the bare key string
    instead of a one-entry node; most ids end that way, which saves one dict per id;
  * `allowed_next` returns a list cached on the node (built on first use, never rebuilt).
  * a trie less a few ids (`without`: a search's next page, images a user hid) copies the nodes
    on their paths alone and shares every other node with the trie it came from.
Returned lists are shared: callers must not mutate them.
"""

from __future__ import annotations

import math
from collections import ChainMap
from typing import Mapping, Sequence

__all__ = ["IdPrior", "IdTrie"]


class _Node(dict):
    """token id -> child. A child is a _Node, or a key string meaning "only the end token may
    follow". Under the end token the value is the key whose id ends here."""

    __slots__ = ("allowed",)

    def __init__(self):
        super().__init__()
        self.allowed: list[int] | None = None


class IdTrie:
    """Prefix tree over identifier token sequences; each sequence ends with `end_token`."""

    def __init__(self, sequences: Mapping[str, Sequence[int]], end_token: int):
        self.end_token = end = int(end_token)
        self._end_only = [end]
        self._root = _Node()
        self._keys: frozenset[str] | None = frozenset(sequences)
        self._left_out: frozenset[str] = frozenset()  # the base's keys this one lacks
        self._max_len = 0
        self.base: IdTrie | None = None  # the trie this one leaves some ids of out (see `without`)
        self.copied: set[tuple[int, ...]] = set()  # the prefixes whose node is not the base's
        self.removed: dict[tuple[int, ...], list[int]] = {}  # prefix -> base tokens that no longer continue it
        self._copies: list[_Node] = []  # the copied nodes, each after the node above it
        for key, seq in sequences.items():
            seq = [int(t) for t in seq]
            if not seq:
                raise ValueError(f"empty identifier sequence for key {key!r}")
            if end in seq:
                raise ValueError(f"identifier of {key!r} contains the end token {end}")
            self._insert(key, seq)
            self._max_len = max(self._max_len, len(seq))

    def _insert(self, key: str, seq: list[int]) -> None:
        node = self._root
        for t in seq[:-1]:
            child = node.get(t)
            if child is None:
                child = node[t] = _Node()
            elif isinstance(child, str):  # an id ended here; a longer one now passes through
                expanded = node[t] = _Node()
                expanded[self.end_token] = child
                child = expanded
            node = child
        last = seq[-1]
        child = node.get(last)
        if child is None:
            node[last] = key
            return
        other = child if isinstance(child, str) else child.get(self.end_token)
        if other is not None:
            raise ValueError(f"keys {other!r} and {key!r} have the same identifier sequence {seq}")
        child[self.end_token] = key

    def _walk(self, tokens: Sequence[int]):
        """Follow tokens from the root: a _Node, a key string (only end may follow), ("end", key)
        once the end token was consumed, or None when the path leaves the trie."""
        node = self._root
        end = self.end_token
        for t in tokens:
            if not isinstance(node, _Node):
                return None  # past the end of an id (or after the end token)
            t = int(t)
            child = node.get(t)
            if child is None:
                return None
            node = ("end", child) if t == end else child
        return node

    def without(self, sequences: Mapping[str, Sequence[int]]) -> IdTrie:
        """This trie less some ids (key -> its token sequence, as the trie holds it). The nodes on
        their paths are copied and every other node is shared with this trie, so leaving 10 ids out
        of a million costs their paths, not a rebuild. The result records what differs from this
        trie (`base`, `copied`, `removed`): an engine whose own process holds this trie alone
        (vLLM's worker) needs only that much to search the rest."""
        pruned = object.__new__(IdTrie)
        pruned.end_token, pruned._end_only, pruned._max_len = self.end_token, self._end_only, self._max_len
        pruned.base, pruned.copied, pruned.removed, pruned._copies = self, {()}, {}, []
        pruned._root = pruned._copy(self._root)
        left_out = set()
        for key, seq in sequences.items():
            seq = tuple(int(t) for t in seq)
            if key in left_out:
                continue
            if self.key_for(seq) != key:
                raise ValueError(f"{key!r} is not in the trie under the id {list(seq)}")
            left_out.add(key)
            path = [pruned._root]  # path[i]: the node after seq[:i], copied
            for i, t in enumerate(seq[:-1]):
                child = path[-1][t]
                if seq[: i + 1] not in pruned.copied:
                    child = path[-1][t] = pruned._copy(child)
                    pruned.copied.add(seq[: i + 1])
                path.append(child)
            last = path[-1][seq[-1]]
            if isinstance(last, _Node):  # longer ids pass through this one's end
                if seq not in pruned.copied:
                    last = path[-1][seq[-1]] = pruned._copy(last)
                    pruned.copied.add(seq)
                del last[self.end_token]
                pruned.removed.setdefault(seq, []).append(self.end_token)
                if last:
                    continue
            for depth in range(len(seq) - 1, -1, -1):  # the emptied nodes leave their parents too
                del path[depth][seq[depth]]
                pruned.removed.setdefault(seq[:depth], []).append(seq[depth])
                if path[depth] or depth == 0:
                    break
        pruned._keys, pruned._left_out = None, frozenset(left_out)  # the keys: built if asked (~30 ms at 1M)
        return pruned

    def _copy(self, node: _Node) -> _Node:
        copy = _Node()
        copy.update(node)
        self._copies.append(copy)
        return copy

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        node = self._walk(prefix)
        if isinstance(node, _Node):
            if node.allowed is None:
                node.allowed = list(node)
            return node.allowed
        if isinstance(node, str):
            return self._end_only
        return []

    def key_for(self, sequence: Sequence[int]) -> str | None:
        seq = list(sequence)
        if seq and int(seq[-1]) == self.end_token:
            seq.pop()
        node = self._walk(seq)
        if isinstance(node, str):
            return node
        if isinstance(node, _Node):
            return node.get(self.end_token)
        return None

    def __len__(self) -> int:
        return len(self._keys) if self._keys is not None else len(self.base) - len(self._left_out)

    @property
    def keys(self) -> frozenset[str]:
        if self._keys is None:
            self._keys = self.base.keys - self._left_out
        return self._keys

    def __contains__(self, key: object) -> bool:
        if self._keys is None:
            return key in self.base and key not in self._left_out
        return key in self._keys

    @property
    def first_tokens(self) -> list[int]:
        return self.allowed_next(())

    def max_depth(self) -> int:
        """Tokens in the longest id INCLUDING the end token: the most decoding steps needed."""
        return self._max_len + 1


class IdPrior:
    """Per-id offsets added to the scores inside beam search, not after it.

    Added after the search, an offset can only reorder the ids the beam kept; an id the model
    scores low but the offset favours was pruned at its first token. Here each step adds the
    change in the best offset reachable below the prefix, so a prefix carries its best
    descendant's offset from the first token on (for atomic ids the whole offset lands on the
    one id token), and an id's steps add up to exactly its own offset."""

    def __init__(self, trie: IdTrie, offsets: Mapping[str, float]):
        missing = [k for k in trie.keys if k not in offsets]
        if missing:
            raise ValueError(f"no prior offset for {len(missing)} ids, e.g. {sorted(missing)[:3]}")
        self.trie = trie
        self._offsets = {k: float(offsets[k]) for k in trie.keys}
        self._best: dict[int, float] = {}  # id(node) -> the best offset of an id below it
        self._steps: dict[int, list[float]] = {}  # id(node) -> the offset of each allowed_next token
        self._fill(trie._root)

    def _best_below(self, child) -> float:
        return self._offsets[child] if isinstance(child, str) else self._best[id(child)]

    def _fill(self, node: _Node) -> None:
        for child in node.values():  # ids are a few tokens deep: recursion is fine
            if isinstance(child, _Node):
                self._fill(child)
        self._best[id(node)] = max((self._best_below(c) for c in node.values()), default=-math.inf)

    def step_offsets(self, prefix: Sequence[int]) -> list[float]:
        """The offset of each token of `trie.allowed_next(prefix)`, in its order."""
        node = self.trie._walk(prefix)
        if not isinstance(node, _Node):
            return [0.0] * len(self.trie.allowed_next(prefix))  # the end token, or nothing
        steps = self._steps.get(id(node))
        if steps is None:
            above = 0.0 if node is self.trie._root else self._best[id(node)]
            steps = self._steps[id(node)] = [self._best_below(node[t]) - above for t in self.trie.allowed_next(prefix)]
        return steps

    def offset(self, key: str) -> float:
        return self._offsets[key]

    def over(self, trie: IdTrie) -> IdPrior:
        """The same offsets over `trie`, a trie of some of these ids (a search within them): each
        prefix then carries the best offset among those ids alone. Over this trie less some ids
        (IdTrie.without) only the copied nodes are recomputed; the shared ones read this prior."""
        if trie.base is not self.trie:
            return IdPrior(trie, self._offsets)
        prior = object.__new__(IdPrior)
        prior.trie, prior._offsets = trie, self._offsets
        prior._best, prior._steps = ChainMap({}, self._best), ChainMap({}, self._steps)
        for node in reversed(trie._copies[1:]):  # each below the node it hangs from; the root's best is never read
            prior._best[id(node)] = max((prior._best_below(c) for c in node.values()), default=-math.inf)
        return prior
