"""The Rust cache manager through ``oscar_kv._native``: allocator, radix tree, prefix cache,
pool layout; input types, typed errors, and bad input leaving the state unchanged."""

import random
import threading
from array import array

import numpy as np
import pytest

from oscar_kv import _native as n

PS = 4


def toks(*pages: int) -> list[int]:
    """Tokens of whole pages, page i filled with pages[i]."""
    return [t for p in pages for t in [p] * PS]


def snapshot(obj) -> tuple:
    state = (obj.nodes(), obj.evictable_pages, obj.protected_pages, obj.total_pages)
    if isinstance(obj, n.PrefixCache):
        state += (obj.available, [obj.refcount(p) for p in range(obj.num_pages)])
    return state


def test_module_exports():
    for name in ["OutOfPages", "InvalidPage", "InvalidNode", "LockUnderflow"]:
        exc = getattr(n, name)
        assert exc.__module__ == "oscar_kv._native"
    assert issubclass(n.OutOfPages, RuntimeError)
    for name in ["InvalidPage", "InvalidNode", "LockUnderflow"]:
        assert issubclass(getattr(n, name), ValueError)
    assert n.ROOT_NODE == 2**64 - 1


def test_tree_match_insert_lock_evict():
    t = n.RadixTree(32, page_size=PS)
    prefix, dups, node = t.insert(toks(1, 2, 3), [10, 11, 12])
    assert (prefix, list(dups)) == (0, [])
    pages, matched, m = t.match_prefix(toks(1, 2, 3) + [9])  # partial last page ignored
    assert (list(pages), matched, m) == ([10, 11, 12], 12, node)
    pages, matched, m = t.match_prefix(toks(1, 2, 7))
    assert (list(pages), matched) == ([10, 11], 8)
    assert list(t.path_pages(m)) == [10, 11]
    assert list(t.path_token_indices(m)) == [40, 41, 42, 43, 44, 45, 46, 47]
    assert t.depth_tokens(m) == 8
    assert t.lock(m) == 2
    assert (t.evictable_pages, t.protected_pages, t.total_pages) == (1, 2, 3)
    assert list(t.evict(10)) == [12]
    assert list(t.evict(10)) == []
    assert t.unlock(m) == 2
    assert sorted(t.evict(1)) == [10, 11]
    t.check_invariants()
    # The caller's copies of cached pages come back as duplicates.
    t.insert(toks(1, 2), [0, 1])
    prefix, dups, _ = t.insert(toks(1, 2, 3), [0, 5, 6])
    assert (prefix, list(dups)) == (8, [5])


def test_match_len_and_limit():
    t = n.RadixTree(8, page_size=PS)
    t.insert(toks(1, 2, 3), [0, 1, 2])
    assert t.match_len(toks(1, 2, 3))[0] == 12
    assert t.match_len(toks(1, 2, 3), limit=11)[0] == 8
    assert t.match_prefix(toks(1, 2, 3), limit=0)[1:] == (0, n.ROOT_NODE)
    # limit cuts the key before the page count is checked
    prefix, _, node = t.insert(toks(5, 6), [3], limit=PS)
    assert prefix == 0 and list(t.path_pages(node)) == [3]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        t.match_len(toks(1), limit=-1)


def sorted_state(t) -> tuple:
    nodes, *sizes = snapshot(t)
    return (sorted(nodes, key=lambda d: d["node"]), *sizes)


def test_checkpoint_row_is_the_checkpoint_steps_in_one_call():
    """checkpoint_row == insert_locations, the prompt-split re-insert, touch_path, unlock of
    the old node and lock of the new one: same returns, tree, stamps and locks."""
    rng = random.Random(3)
    steps, one = n.RadixTree(4096, page_size=PS), n.RadixTree(4096, page_size=PS)
    next_page = 1
    locks: list[int] = []
    for i in range(200):
        syms = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        key = np.array(toks(*syms) + [7] * rng.randrange(PS), dtype=np.int64)
        ns = rng.choice([None, "lora"])
        matched, node = steps.match_len(key, ns)
        assert (matched, node) == one.match_len(key, ns)
        pages = list(steps.path_pages(node))
        if pages and rng.random() < 0.2:
            pages.pop()  # the request's own copy of a cached page: a duplicate
        while len(pages) < len(syms):
            pages.append(next_page)
            next_page += 1
        row = np.repeat(np.array(pages, dtype=np.int32) * PS, PS)
        for t in (steps, one):
            t.lock(node)
        split = rng.randrange(len(key) + 1)
        whole = len(key) // PS * PS
        a = steps.insert_locations(key, row, ns, whole)
        if 0 < split // PS * PS < whole:
            steps.insert_locations(key, row, ns, split // PS * PS)
        steps.touch_path(a[2])
        steps.unlock(node)
        steps.lock(a[2])
        b = one.checkpoint_row(key, row, ns, whole, split_at=split, unlock=node)
        assert (a[0], a[2]) == (b[0], b[2]) and list(a[1] or []) == list(b[1] or [])
        # Sorted: children are listed in hash order, and each tree has its own hash seed.
        assert sorted_state(steps) == sorted_state(one), i
        locks.append(a[2])
        if len(locks) > 4:
            old = locks.pop(rng.randrange(len(locks)))
            steps.unlock(old)
            one.unlock(old)
        if i % 17 == 0:
            assert list(steps.evict(3)) == list(one.evict(3))
    one.check_invariants()
    t = n.RadixTree(16, page_size=PS)
    unlocked = t.insert(toks(1), [1])[2]
    before = snapshot(t)
    with pytest.raises(n.LockUnderflow):
        t.checkpoint_row(toks(1, 2), np.arange(PS, 3 * PS), unlock=unlocked)
    assert snapshot(t) == before


def test_insert_locations_and_location_buffers():
    t = n.RadixTree(16, page_size=PS)
    # Page i of the key is its location i * PS divided by PS; the other locations are unread.
    locs = np.arange(3 * PS, 6 * PS, dtype=np.int64)
    locs[1:PS] = -1
    assert t.insert_locations(toks(1, 2, 3), locs) == (0, None, t.match_len(toks(1, 2, 3))[1])
    node = t.match_len(toks(1, 2, 3))[1]
    assert list(t.path_pages(node)) == [3, 4, 5]
    prefix, dups, _ = t.insert_locations(toks(1, 2, 9), np.arange(10 * PS, 13 * PS), limit=3 * PS)
    assert prefix == 2 * PS and list(dups) == [10, 11]
    # A partial last page of tokens is not inserted; its locations need not be there.
    assert t.insert_locations(toks(1, 2, 3) + [7], locs)[0] == 3 * PS
    with pytest.raises(ValueError, match="locations holds 5 values, 12 are needed"):
        t.insert_locations(toks(1, 2, 7), np.arange(5))
    with pytest.raises(ValueError, match="page id 99 out of range"):
        t.insert_locations(toks(4), np.arange(99 * PS, 100 * PS))
    buf = t.path_token_buffer(node)
    assert isinstance(buf, bytearray)
    assert np.frombuffer(buf, dtype=np.int64).tolist() == list(t.path_token_indices(node))
    assert t.path_token_buffer(n.ROOT_NODE) == bytearray()
    a = n.PageAllocator(8, reserved=1)
    got = np.frombuffer(a.alloc_token_buffer(2, PS), dtype=np.int64)
    assert got.tolist() == list(range(PS, 3 * PS)) and a.available == 5
    t.check_invariants()


@pytest.mark.parametrize(
    "make",
    [
        list,
        tuple,
        lambda x: array("q", x),
        lambda x: array("i", x),
        lambda x: array("L", x),
        lambda x: np.asarray(x, dtype=np.int64),
        lambda x: np.asarray(x, dtype=np.int32),
        lambda x: np.asarray(x, dtype=np.uint32),
        lambda x: np.asarray(x, dtype=np.int16),
        lambda x: memoryview(array("q", x)),
        lambda x: np.repeat(np.asarray(x, dtype=np.int64), 2)[::2],  # non-contiguous
        iter,  # any iterable of ints
    ],
)
def test_token_and_page_input_types(make):
    c = n.PrefixCache(16, page_size=PS)
    pages = c.alloc(2)
    tokens = toks(3, 4)
    assert c.insert(make(tokens), make(list(pages)))[0] == 0
    assert list(c.match_prefix(make(tokens))[0]) == list(pages)
    c.check_all_invariants()


def test_outputs_wrap_without_copy():
    c = n.PrefixCache(16, page_size=PS)
    pages = c.alloc(3)
    assert isinstance(pages, array) and pages.typecode == "q"
    view = np.frombuffer(pages, dtype=np.int64)
    assert view.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("bad", "exc", "message"),
    [
        (np.arange(8, dtype=np.float64), TypeError, "buffer of format 'd'"),
        (np.zeros((2, 4), dtype=np.int64), ValueError, "must be 1-D"),
        (b"\x01" * 8, TypeError, "format 'B'"),
        ("abcd", TypeError, "got str"),
        ([1, 2, "x", 4], TypeError, "element of type str at index 2"),
        ([1, 2, 3.5, 4], TypeError, "element of type float at index 2"),
        (7, TypeError, "object of type int"),
        ([0, 1, -1, 2], ValueError, "got -1 at index 2"),
        ([0, 2**32, 1, 2], ValueError, "got 4294967296 at index 1"),
        (np.array([0, 2**63 + 5, 0, 0], dtype=np.uint64), ValueError, "at index 1"),
    ],
)
def test_bad_tokens_rejected_state_unchanged(bad, exc, message):
    c = n.PrefixCache(16, page_size=PS)
    c.insert(toks(1, 2), c.alloc(2))
    before = snapshot(c)
    with pytest.raises(exc, match=message):
        c.match_prefix(bad)
    with pytest.raises(exc, match=message):
        c.insert(bad, [5])
    assert snapshot(c) == before


def test_bad_pages_rejected_state_unchanged():
    c = n.PrefixCache(8, page_size=PS)
    mine = list(c.alloc(3))
    c.insert(toks(1), mine[:1])
    before = snapshot(c)
    cases = [
        ([mine[1], -1], n.InvalidPage, "page id -1 out of range 0..8"),
        ([mine[1], 8], n.InvalidPage, "page id 8 out of range"),
        ([mine[1], 7], n.InvalidPage, "page 7 is not allocated"),
        ([mine[1], mine[1]], n.InvalidPage, f"page {mine[1]} appears more than once"),
        ([mine[1], mine[0]], n.InvalidPage, f"page {mine[0]} is owned by the radix tree"),
        ([mine[1]], ValueError, "expected 2, got 1"),
        (np.array([1.0, 2.0]), TypeError, "format 'd'"),
    ]
    for pages, exc, message in cases:
        with pytest.raises(exc, match=message):
            c.insert(toks(5, 6), pages)
        assert snapshot(c) == before, pages
    # Freeing: twice, a tree page, out of range.
    c.free(mine[2:])
    before = snapshot(c)
    for pages, message in [
        ([mine[1], mine[2]], f"page {mine[2]} is not allocated"),
        ([mine[1], mine[0]], f"page {mine[0]} is owned by the radix tree"),
        ([mine[1], 100], "out of range"),
    ]:
        with pytest.raises(n.InvalidPage, match=message):
            c.free(pages)
        assert snapshot(c) == before
    c.check_all_invariants()


def test_locks_underflow_and_stale_nodes():
    t = n.RadixTree(8, page_size=PS)
    _, _, node = t.insert(toks(1, 2), [0, 1])
    before = snapshot(t)
    with pytest.raises(n.LockUnderflow, match="unlock below zero"):
        t.unlock(node)
    assert snapshot(t) == before
    t.lock(node)
    t.lock(node)
    assert t.lock_ref(node) == 2
    t.unlock(node)
    t.unlock(node)
    with pytest.raises(n.LockUnderflow):
        t.unlock(node)
    assert sorted(t.evict(8)) == [0, 1]
    for call in (t.lock, t.unlock, t.path_pages, t.lock_ref, t.depth_tokens):
        with pytest.raises(n.InvalidNode, match="does not name a live node"):
            call(node)
    with pytest.raises(n.InvalidNode):
        t.lock(12345)
    with pytest.raises(OverflowError):
        t.lock(-1)
    assert t.lock(n.ROOT_NODE) == 0 and t.unlock(n.ROOT_NODE) == 0
    assert len(t.path_pages(n.ROOT_NODE)) == 0


def test_out_of_pages_and_evicting_alloc():
    c = n.PrefixCache(4, page_size=1)
    pages = c.alloc(3)
    for k in range(1, 4):
        c.insert(list(range(k)), pages[:k])
    _, _, node = c.match_prefix([0, 1, 2])
    c.lock(node)
    before = snapshot(c)
    with pytest.raises(n.OutOfPages, match="requested 2, only 1 free"):
        c.alloc(2)
    with pytest.raises(n.OutOfPages, match="requested 2"):
        c.alloc(2, evict=True)
    assert snapshot(c) == before
    c.unlock(node)
    assert len(c.alloc(2, evict=True)) == 2
    assert c.total_pages == 2
    c.check_all_invariants()


def test_namespaces_never_share():
    c = n.PrefixCache(16, page_size=PS)
    a = c.alloc(2)
    b = c.alloc(2)
    c.insert(toks(1, 2), a)
    c.insert(toks(1, 2), b, namespace="lora:7")
    assert list(c.match_prefix(toks(1, 2))[0]) == list(a)
    assert list(c.match_prefix(toks(1, 2), namespace="lora:7")[0]) == list(b)
    assert c.match_len(toks(1, 2), namespace="salt")[0] == 0
    assert {d["namespace"] for d in c.nodes()} == {None, "lora:7"}


def test_admit_and_release():
    c = n.PrefixCache(8, page_size=PS)
    tokens = toks(1, 2) + [9]  # two whole pages and a partial one
    pages, matched, node, evicted = c.admit(tokens, total_tokens=len(tokens))
    assert (len(pages), matched, evicted) == (3, 0, 0)
    assert c.release(tokens, pages, node) == 0
    assert (c.total_pages, c.available) == (2, 6)
    # A follow-up turn: prompt shares both pages, 12 more tokens of output.
    turn = toks(1, 2, 3)
    pages, matched, node, _ = c.admit(turn, total_tokens=len(turn) + 12, limit=len(turn))
    assert (matched, len(pages), c.protected_pages) == (8, 6, 2)
    before = snapshot(c)
    bad = list(pages)
    bad[-1] = bad[-2]
    with pytest.raises(n.InvalidPage, match="appears more than once"):
        c.release(turn, bad, node)
    with pytest.raises(n.InvalidNode):
        c.release(turn, pages, 12345)
    with pytest.raises(TypeError):
        c.release(np.array(turn, dtype=np.float32), pages, node)
    assert snapshot(c) == before
    assert c.release(turn, pages, node) == 8
    assert (c.total_pages, c.protected_pages, c.available) == (3, 0, 5)
    with pytest.raises(n.LockUnderflow):
        c.release(turn, [], node, insert=False)
    # Evicting admission; OutOfPages leaves nothing locked or taken.
    with pytest.raises(n.OutOfPages):
        c.admit(toks(7), total_tokens=100 * PS)
    assert c.protected_pages == 0 and c.available == 5
    _, _, node, evicted = c.admit(toks(7), total_tokens=8 * PS)
    assert evicted == 3
    c.check_all_invariants()


def test_reset():
    c = n.PrefixCache(8, page_size=PS)
    _, _, node = c.insert(toks(1, 2), c.alloc(2))
    held = c.alloc(1)
    c.lock(node)
    c.reset()
    assert c.available == 7 and c.total_pages == 0
    with pytest.raises(n.InvalidNode):
        c.unlock(node)
    c.free(held)
    assert c.available == 8
    t = n.RadixTree(8, page_size=PS)
    t.insert(toks(1), [3])
    assert list(t.reset()) == [3]


def test_constructor_arguments():
    with pytest.raises(ValueError, match="num_pages must be in 1..=268435456, got 0"):
        n.PrefixCache(0)
    with pytest.raises(ValueError, match="num_pages must be >= 0, got -3"):
        n.RadixTree(-3)
    with pytest.raises(ValueError, match="page_size must be in 1..=65536, got 0"):
        n.RadixTree(4, page_size=0)
    assert n.RadixTree(4).page_size == 128
    assert n.PageAllocator(5).available == 5


def test_page_allocator():
    a = n.PageAllocator(3)
    p = a.alloc(2)
    a.retain(p[:1])
    assert a.refcount(p[0]) == 2
    a.free(p)
    assert a.available == 2
    with pytest.raises(n.InvalidPage, match="not allocated"):
        a.free([p[1]])
    with pytest.raises(n.OutOfPages):
        a.alloc(3)
    a.check_invariants()


def test_pool_layout_agrees_with_page_sections():
    pool = n.PoolLayout(8, 128, num_layers=4, num_pages=10)
    assert pool.page_bytes == n.page_bytes(8, 128) == 772 * 128
    assert pool.sections() == n.page_sections(8, 128)
    assert pool.total_bytes == 4 * 10 * 772 * 128
    norms_offset = {name: off for name, off, _ in n.page_sections(8, 128)}["norms"]
    assert pool.section_range(3, "norms") == (3 * pool.page_bytes + norms_offset, 512)
    assert list(pool.section_offsets([0, 2], "k_codes")) == [0, 2 * pool.page_bytes]
    assert pool.global_offset(1, 2) == pool.layer_bytes + 2 * pool.page_bytes
    assert n.PoolLayout.pages_for_budget(pool.total_bytes + 5, 8, 128, 4) == 10
    with pytest.raises(n.InvalidPage):
        pool.page_offset(10)
    with pytest.raises(ValueError, match="section must be one of"):
        pool.section_range(0, "scales")
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        n.PoolLayout(8, 96, 4, 10)


def test_random_against_dict_model():
    """Matches agree with a dict of cached page-prefixes over random inserts and evictions."""
    rng = random.Random(0)
    ps = 2
    c = n.PrefixCache(64, page_size=ps)
    model: dict[tuple, int] = {}
    for _ in range(400):
        seq = [rng.randrange(3) for _ in range(rng.randrange(0, 16))]
        whole = len(seq) // ps
        expect = []
        for k in range(1, whole + 1):
            if tuple(seq[: k * ps]) not in model:
                break
            expect.append(model[tuple(seq[: k * ps])])
        pages, matched, _ = c.match_prefix(seq)
        assert list(pages) == expect and matched == len(expect) * ps
        if rng.random() < 0.6:
            need = whole - len(expect)
            fresh = (
                list(c.alloc(need, evict=True)) if need <= c.available + c.evictable_pages else None
            )
            if fresh is None:
                continue
            # Evictions may have removed part of the matched prefix: re-derive it.
            model = {k: v for k, v in model.items() if c.contains_page(v)}
            cached = []
            for k in range(1, whole + 1):
                if tuple(seq[: k * ps]) not in model:
                    break
                cached.append(model[tuple(seq[: k * ps])])
            mine = cached + fresh[: whole - len(cached)]
            c.insert(seq, mine)
            c.free(fresh[whole - len(cached) :])
            for k in range(1, whole + 1):
                model.setdefault(tuple(seq[: k * ps]), mine[k - 1])
        c.check_all_invariants()


def test_concurrent_callers_are_serialized():
    """Tree walks release the GIL and take the object's mutex: threads sharing one cache are
    serialized (no "Already borrowed" errors) and never corrupt it."""
    c = n.PrefixCache(512, page_size=PS)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                seq = np.array([rng.randrange(3) for _ in range(64)], dtype=np.int64)
                pages, matched, node = c.match_prefix(seq, lock=True)
                fresh = list(c.alloc(16 - matched // PS, evict=True))
                c.insert(seq, list(pages) + fresh)
                c.unlock(node)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    c.check_all_invariants()
    assert c.protected_pages == 0
    assert c.available + c.total_pages == 512, "no page leaked"
