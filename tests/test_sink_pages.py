"""Sink pages in the paged pool (`oscar_kv.sink`): placement over companion rows, bytes equal
to the reference quantizer's at the sink width, exact 16-bit sink pages, and the
log-sum-exp merge the attention over a sink page relies on."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import bf16_round, make_kv
from oscar_kv import OscarConfig
from oscar_kv.ref import dequantize_kv, quantize_kv
from oscar_kv.sink import SinkLayout, attend_decode, attend_extend, merge

T = 128


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_a_4bit_sink_page_spans_two_rows_and_16bit_more(heads, dim):
    s4 = SinkLayout.of(OscarConfig(bits=2, sink_bits=4), heads, dim, torch.bfloat16)
    assert s4.companions == 1 and s4.page.page_bytes < s4.sink_bytes <= 2 * s4.page.page_bytes
    s16 = SinkLayout.of(OscarConfig(bits=2, sink_bits=16), heads, dim, torch.bfloat16)
    assert s16.sink_bytes == 2 * T * heads * dim * 2
    assert (s16.rows - 1) * s16.page.page_bytes < s16.sink_bytes <= s16.rows * s16.page.page_bytes
    assert SinkLayout.of(OscarConfig(bits=2), heads, dim, torch.bfloat16) is None


def _pool_with_companions(sl: SinkLayout, pages: int, firsts: list[int], seed: int = 0):
    """A pool whose first pages ``firsts`` got companions among the other rows (shuffled)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (pages + 1, sl.page.page_bytes), dtype=torch.uint8, generator=g)
    table = torch.zeros((pages + 1, sl.companions), dtype=torch.int32)
    others = [p for p in torch.randperm(pages, generator=g).add(1).tolist() if p not in firsts]
    for i, f in enumerate(firsts):
        table[f] = torch.tensor(others[i * sl.companions : (i + 1) * sl.companions])
    return pool, table


@pytest.mark.parametrize("sink_bits", [4, 16])
def test_scatter_then_gather_round_trips_and_touches_only_its_rows(sink_bits):
    sl = SinkLayout.of(OscarConfig(bits=2, sink_bits=sink_bits), 2, 64, torch.bfloat16)
    pool, table = _pool_with_companions(sl, 20, [3, 9])
    before = pool.clone()
    first = torch.tensor([3, 9])
    rows = sl.row_ids(first, table)
    data = torch.randint(0, 256, (2, sl.sink_bytes), dtype=torch.uint8)
    sl.scatter(pool, rows, data)
    assert torch.equal(sl.gather(pool, rows), data)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[rows.flatten()] = False
    assert torch.equal(pool[untouched], before[untouched])
    # an entry < 0 writes only to the padding page 0
    sl.scatter(pool, sl.row_ids(torch.tensor([-1]), table), data[:1])
    untouched[0] = False
    assert torch.equal(pool[untouched], before[untouched])


# The Triton interpreter is slow: one kind covers its code path.
@pytest.mark.parametrize(
    ("backend", "kind"),
    [(b, k) for b in ("ref", "torch") for k in ("random", "outlier", "tiny")]
    + [("triton", "random")],
)
def test_4bit_sink_pages_are_the_reference_pages_at_4_bits(backend, kind):
    cfg = OscarConfig(bits=2, sink_bits=4)
    h, d = 2, 64
    sl = SinkLayout.of(cfg, h, d, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    k, v = make_kv(3 * T, h, d, kind, g)
    kb, vb = k.view(3, T, h, d), v.view(3, T, h, d)
    pool, table = _pool_with_companions(sl, 12, [2, 5])
    # blocks 2 and 0 of k go to first pages 2 and 5; entry -1 writes nothing read
    first = torch.tensor([2, -1, 5], dtype=torch.int32)
    src = torch.tensor([2, 1, 0])
    sl.quantize(kb, vb, pool, first, table, src_index=src, backend=backend)
    got = sl.gather(pool, sl.row_ids(first[[0, 2]], table))
    for row, block in zip(got, (2, 0), strict=True):
        want = quantize_kv(kb[block], vb[block], cfg.sink_config).packed_pages()[0]
        assert torch.equal(row, want)
    k_dq, v_dq = sl.dequantize(pool, first[[0, 2]], table, backend=backend)
    for i, block in enumerate((2, 0)):
        kw, vw = dequantize_kv(quantize_kv(kb[block], vb[block], cfg.sink_config))
        torch.testing.assert_close(k_dq[i], kw.reshape(T, h, d), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_dq[i], vw.reshape(T, h, d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_sink_pages_hold_the_tokens_exactly(dtype):
    sl = SinkLayout.of(OscarConfig(bits=2, sink_bits=16), 2, 64, dtype)
    k, v = torch.randn(2, 2, T, 2, 64).unbind(0)
    pool, table = _pool_with_companions(sl, 40, [7, 30])
    first = torch.tensor([30, 7], dtype=torch.int32)
    sl.quantize(k, v, pool, first, table)
    k_dq, v_dq = sl.dequantize(pool, first, table)
    assert torch.equal(k_dq, k.to(dtype).float()) and torch.equal(v_dq, v.to(dtype).float())


def _lse_attention(q, k, v, scale):
    """Exact attention of q [n, Hq, D] over all of k, v [t, H, D] with its log-sum-exp."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = torch.einsum("nhd,thd->nht", q, kk) * scale
    return torch.einsum("nht,thd->nhd", logits.softmax(-1), vv), logits.logsumexp(-1)


@pytest.mark.parametrize("group", [1, 4, 8, 16])
def test_merge_of_sink_part_and_rest_equals_attention_over_both(group):
    torch.manual_seed(0)
    h, d, scale = 2, 64, 1 / 8
    q = torch.randn(3, h * group, d) * 3
    k_sink, v_sink = torch.randn(2, 3, T, h, d).unbind(0)
    k_rest, v_rest = torch.randn(2, 3, 70, h, d).unbind(0)
    k_sink[:, :2] *= 20  # sink tokens that take most of the attention
    has = torch.tensor([True, False, True])
    o_s, l_s = attend_decode(q, k_sink, v_sink, has, scale)
    for b in range(3):
        o_r, l_r = _lse_attention(q[b : b + 1], k_rest[b], v_rest[b], scale)
        got = merge(o_r, l_r, o_s[b : b + 1], l_s[b : b + 1])
        if has[b]:
            k_all, v_all = torch.cat((k_sink[b], k_rest[b])), torch.cat((v_sink[b], v_rest[b]))
            want, _ = _lse_attention(q[b : b + 1], k_all, v_all, scale)
        else:
            want = o_r
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_extend_sink_part_reads_each_rows_own_request(monkeypatch):
    monkeypatch.setattr("oscar_kv.sink.EXTEND_CHUNK", 3)  # several chunks, one mid-request
    torch.manual_seed(1)
    h, d, scale = 2, 64, 1 / 8
    k_sink, v_sink = bf16_round(torch.randn(2, 2, T, h, d)).unbind(0)
    row_req = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    q = torch.randn(7, 2 * h, d)
    out, lse = attend_extend(q, row_req, k_sink, v_sink, torch.tensor([True, True]), scale)
    for i, b in enumerate(row_req.tolist()):
        want, want_lse = _lse_attention(q[i : i + 1], k_sink[b], v_sink[b], scale)
        torch.testing.assert_close(out[i : i + 1], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i : i + 1], want_lse, atol=1e-5, rtol=1e-5)
    _, lse = attend_extend(q, row_req, k_sink, v_sink, torch.tensor([True, False]), scale)
    assert torch.isinf(lse[2:]).all() and bool((lse[:2] > -math.inf).all())
