"""Exact prefix trie over every catalog SID, with dense per-level tables for constrained decoding.

The trie is built from ALL SIDs of a ``sid_version`` (the whole catalog), never from the test
items: a candidate set made of test targets leaks the answer into the search (REFERENCE.md §6).
It is exact at every level, so a path that the tables allow always ends at a real item.

Layout. Level ``l`` (0-based) has ``n_l`` nodes, the distinct prefixes of length ``l`` (level 0
holds only the root, node 0). Nodes are numbered in lexicographic order of their prefix.

* ``next_node[l]``: ``int32`` tensor ``(n_l, sizes[l])``; entry ``[node, code]`` is the node at
  level ``l + 1`` reached by appending ``code``, or ``-1`` when no catalog SID has that prefix.
  At the last level the "node" is a leaf index (the full SID).
* ``leaf_item``: ``int64`` tensor ``(num_items,)``; ``leaf_item[leaf]`` is the row of that SID in
  :attr:`SidTrie.sids` (the order the SIDs were given in).

Memory. The tables hold ``4 * sum_l n_l * sizes[l]`` bytes. Beauty (12,101 items, LETTER SIDs,
4 x 256 codes) has n = (1, 256, ~5k, ~12k): ~17 MB, built in well under a second. At 10M items
and 256 codes the last two levels alone are ~(2 x 10M) x 256 x 4 B = ~20 GB, which does not fit:
use a CSR layout instead (per level: ``indptr (n_l + 1,)``, sorted ``codes (n_edges,)`` and
``child (n_edges,)``, ~12 bytes per edge, so ~0.5 GB for 10M items x 4 levels). Decoding then
builds the ``(beams, size)`` mask of the *active* nodes only, by scattering each node's CSR slice
(``torch.repeat_interleave`` over the slice lengths) into a ``-1``-filled block; the per-step cost
becomes proportional to the edges of the active nodes rather than ``beams x size``. Only the dense
layout is implemented here; its interface (``next_node[l][nodes]`` -> children) is what a CSR
version would emulate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Sid = tuple[int, ...]


class SidTrie:
    """Prefix trie of a set of distinct, equal-length SIDs (see the module docstring).

    Build with :meth:`from_sids`. Every query (``contains``, ``allowed``, ``row_of``) walks the
    same tables the decoder uses, so the tests of one check the other.
    """

    def __init__(self, sids: list[Sid], sizes: tuple[int, ...], next_node: list, leaf_item) -> None:
        self.sids = sids
        self.sizes = sizes
        self.next_node = next_node
        self.leaf_item = leaf_item
        self._np = [t.numpy() for t in next_node]
        self._leaf_np = leaf_item.numpy()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_sids(cls, sids: Iterable[Sequence[int]], sizes: Sequence[int]) -> SidTrie:
        """Trie of ``sids`` (e.g. every catalog item's SID) with ``sizes[l]`` codes at level ``l``.

        Raises:
            ValueError: a SID of the wrong length, a code outside ``0..sizes[l]-1``, duplicate
                SIDs (two items would be indistinguishable), or no SIDs at all.
        """
        import torch

        sizes = tuple(int(s) for s in sizes)
        rows = [tuple(int(c) for c in s) for s in sids]
        n_levels = len(sizes)
        if not rows:
            raise ValueError("SidTrie.from_sids: no SIDs given (the catalog has no assigned SIDs?)")
        if n_levels == 0 or any(s < 1 for s in sizes):
            raise ValueError(f"SidTrie.from_sids: sizes must be >= 1 per level, got {sizes}")
        bad_len = [s for s in rows if len(s) != n_levels]
        if bad_len:
            raise ValueError(
                f"SidTrie.from_sids: {len(bad_len)} SIDs do not have {n_levels} levels, "
                f"e.g. {bad_len[0]} (sizes={sizes}; is the SID config the model's?)"
            )
        arr = np.asarray(rows, dtype=np.int64)
        over = (arr < 0) | (arr >= np.asarray(sizes, dtype=np.int64))
        if over.any():
            i, lvl = map(int, np.argwhere(over)[0])
            raise ValueError(
                f"SidTrie.from_sids: SID {rows[i]} has code {rows[i][lvl]} at level {lvl}, "
                f"outside 0..{sizes[lvl] - 1}"
            )
        order = np.lexsort(arr.T[::-1])  # lexicographic by level 0, 1, ...
        srt = arr[order]
        if len(srt) > 1:
            same = np.all(srt[1:] == srt[:-1], axis=1)
            if same.any():
                j = int(np.argmax(same))
                raise ValueError(
                    f"SidTrie.from_sids: duplicate SID {tuple(srt[j].tolist())} (rows "
                    f"{int(order[j])} and {int(order[j + 1])}); SIDs must be unique per item"
                )
        # node id at level l of every sorted row: count of distinct prefixes of length l so far
        node = np.zeros(len(srt), dtype=np.int64)  # level 0: the root
        next_node = []
        for lvl in range(n_levels):
            if len(srt) > 1:
                changed = np.any(srt[1:, : lvl + 1] != srt[:-1, : lvl + 1], axis=1)
                child = np.concatenate([[0], np.cumsum(changed)])
            else:
                child = np.zeros(1, dtype=np.int64)
            n_nodes = int(node[-1]) + 1
            table = np.full((n_nodes, sizes[lvl]), -1, dtype=np.int32)
            table[node, srt[:, lvl]] = child
            next_node.append(torch.from_numpy(table))
            node = child
        leaf_item = torch.from_numpy(order.astype(np.int64))  # leaf i = i-th sorted SID
        return cls(rows, sizes, next_node, leaf_item)

    # -- queries ------------------------------------------------------------------------

    @property
    def num_items(self) -> int:
        return len(self.sids)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def nodes_per_level(self) -> list[int]:
        """``n_l`` for every level (level 0 = 1, the root)."""
        return [int(t.shape[0]) for t in self.next_node]

    def memory_bytes(self) -> int:
        """Bytes held by the decoding tables (``next_node`` + ``leaf_item``)."""
        return sum(t.numel() * t.element_size() for t in self.next_node) + (
            self.leaf_item.numel() * self.leaf_item.element_size()
        )

    def node_of(self, prefix: Sequence[int]) -> int:
        """Node index of ``prefix`` at level ``len(prefix)`` (a leaf index for a full SID); -1 if absent."""
        if len(prefix) > self.num_levels:
            return -1
        node = 0
        for lvl, code in enumerate(prefix):
            code = int(code)
            if not 0 <= code < self.sizes[lvl]:
                return -1
            node = int(self._np[lvl][node, code])
            if node < 0:
                return -1
        return node

    def contains(self, sid: Sequence[int]) -> bool:
        """True iff ``sid`` is a full SID of the catalog."""
        return len(sid) == self.num_levels and self.node_of(sid) >= 0

    def row_of(self, sid: Sequence[int]) -> int:
        """Row of ``sid`` in :attr:`sids` (the input order), or -1 if it is not in the catalog."""
        if len(sid) != self.num_levels:
            return -1
        leaf = self.node_of(sid)
        return int(self._leaf_np[leaf]) if leaf >= 0 else -1

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Codes that may follow ``prefix`` (sorted); ``[]`` for a full SID or an absent prefix."""
        if len(prefix) >= self.num_levels:
            return []
        node = self.node_of(prefix)
        if node < 0:
            return []
        return np.flatnonzero(self._np[len(prefix)][node] >= 0).tolist()

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"SidTrie(items={self.num_items}, sizes={self.sizes}, "
                f"nodes={self.nodes_per_level()}, bytes={self.memory_bytes()})")

    def tables(self, device) -> list:
        """``next_node`` on ``device`` (copied once per device, then cached)."""
        key = str(device)
        cache = self.__dict__.setdefault("_device_tables", {})
        if key not in cache:
            cache[key] = [t.to(device) for t in self.next_node]
        return cache[key]
