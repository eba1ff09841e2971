"""SidTrie: exact prefixes over the whole catalog, dense tables agree with the Python queries."""

from __future__ import annotations

import itertools

import pytest

from onerec_prod.sid.trie import SidTrie

SIDS = [(0, 1, 2), (0, 1, 3), (0, 2, 0), (1, 0, 0), (3, 3, 3)]
SIZES = (4, 4, 4)


@pytest.fixture
def trie() -> SidTrie:
    return SidTrie.from_sids(SIDS, SIZES)


def test_contains_exactly_the_given_sids(trie):
    every = list(itertools.product(range(4), repeat=3))
    assert [s for s in every if trie.contains(s)] == sorted(SIDS)
    assert trie.num_items == 5 and len(trie) == 5
    assert not trie.contains((0, 1))          # a prefix is not an item
    assert not trie.contains((0, 1, 2, 0))    # too long
    assert not trie.contains((0, 1, 9))       # code outside the level size


def test_allowed_per_prefix(trie):
    assert trie.allowed(()) == [0, 1, 3]
    assert trie.allowed((0,)) == [1, 2]
    assert trie.allowed((0, 1)) == [2, 3]
    assert trie.allowed((2,)) == []           # absent prefix
    assert trie.allowed((0, 1, 2)) == []      # full SID: nothing follows
    # the public code's position-only map would allow (1, 1, x) because (0, 1, .) exists
    assert trie.allowed((1,)) == [0]


def test_tables_shapes_and_leaves(trie):
    assert trie.nodes_per_level() == [1, 3, 4]  # root; prefixes 0,1,3; prefixes 01,02,10,33
    for lvl, t in enumerate(trie.next_node):
        assert t.dtype.is_floating_point is False and str(t.dtype) == "torch.int32"
        assert tuple(t.shape) == (trie.nodes_per_level()[lvl], SIZES[lvl])
    # walking the tables from the root reaches a leaf whose row holds that SID
    for row, sid in enumerate(SIDS):
        node = 0
        for lvl, code in enumerate(sid):
            node = int(trie.next_node[lvl][node, code])
            assert node >= 0
        assert int(trie.leaf_item[node]) == row
        assert trie.row_of(sid) == row
    assert trie.row_of((2, 2, 2)) == -1
    # every -1 entry is a prefix no SID has
    valid_edges = sum(int((t >= 0).sum()) for t in trie.next_node)
    assert valid_edges == 3 + 4 + 5


def test_input_order_is_kept_and_single_item():
    t = SidTrie.from_sids([(3, 0), (0, 0)], (4, 1))
    assert t.sids == [(3, 0), (0, 0)] and t.row_of((0, 0)) == 1
    one = SidTrie.from_sids([(2, 1)], (4, 4))
    assert one.contains((2, 1)) and one.allowed(()) == [2] and one.nodes_per_level() == [1, 1]


@pytest.mark.parametrize(
    "sids, sizes, message",
    [
        ([], (4, 4), "no SIDs"),                          # empty catalog
        ([(0, 1), (0, 1)], (4, 4), "duplicate SID"),      # two items, one SID
        ([(0, 1, 2)], (4, 4), "do not have 2 levels"),    # wrong length
        ([(0, 4)], (4, 4), "outside 0..3"),               # code too large
        ([(0, -1)], (4, 4), "outside 0..3"),              # negative code
    ],
)
def test_rejects_bad_input(sids, sizes, message):
    with pytest.raises(ValueError, match=message):
        SidTrie.from_sids(sids, sizes)


def test_scales_to_beauty_size():
    import random

    rng = random.Random(0)
    sids = set()
    while len(sids) < 12_000:
        sids.add(tuple(rng.randrange(256) for _ in range(4)))
    sids = sorted(sids)
    t = SidTrie.from_sids(sids, (256,) * 4)
    assert t.num_items == 12_000 and all(t.contains(s) for s in sids[:500])
    assert t.memory_bytes() < 40 * 2**20  # random SIDs are the worst case (~12k nodes at 2 levels)
