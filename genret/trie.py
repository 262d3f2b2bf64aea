"""Prefix tree that constrains decoding to identifiers that exist in the catalog.

It is queried every decoding step for every beam and must hold up to ~1M identifiers, so:
  * nodes are plain dicts keyed by token id (a dict subclass only to carry a cached answer);
  * a position whose only continuation is the end token is stored as the bare key string
    instead of a one-entry node; most ids end that way, which saves one dict per id;
  * `allowed_next` returns a list cached on the node (built on first use, never rebuilt).
Returned lists are shared: callers must not mutate them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["IdTrie"]


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
        self._keys = frozenset(sequences)
        self._max_len = 0
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
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    @property
    def first_tokens(self) -> list[int]:
        return self.allowed_next(())

    def max_depth(self) -> int:
        """Tokens in the longest id INCLUDING the end token: the most decoding steps needed."""
        return self._max_len + 1
