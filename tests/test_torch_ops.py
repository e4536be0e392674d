"""The "torch" backend (`oscar_kv.torchops`, the CPU default) against the reference.

Pages must be the reference's bytes; dequantized pages its exact floats; attention within fp32
rounding of `oscar_kv.ref.attention` over each request's own pages and tail.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import KINDS, build_cache, make_kv
from oscar_kv import OscarConfig, ops, torchops
from oscar_kv.layout import PageLayout
from oscar_kv.ref import attention, quantize_kv
from oscar_kv.ref.quant import QuantizedKV

CPU = torch.device("cpu")
CONFIGS = [
    OscarConfig(),
    OscarConfig(bits=4, norm="head"),
    OscarConfig.kivi(),
    OscarConfig.direct_scaling(bits=4, k_group=64),
    OscarConfig.rotation_only(k_group=128),
    OscarConfig(fold_v=True, v_group=16),
]
IDS = [c.label + ("-fold" if c.fold_v else "") for c in CONFIGS]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def reference_decode(q: torch.Tensor, qkvs: list[QuantizedKV]) -> torch.Tensor:
    return torch.cat([attention(q[b : b + 1], qkv) for b, qkv in enumerate(qkvs)])


# ---------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_quantize_pages_are_reference_bytes(cfg):
    heads, dim = 3, 64
    i = CONFIGS.index(cfg)
    k, v = make_kv(4 * 128, heads, dim, KINDS[i % 3], torch.Generator().manual_seed(i))
    blocks_k, blocks_v = k.view(4, 128, heads, dim), v.view(4, 128, heads, dim)
    lay = PageLayout.of(cfg, heads, dim)
    # One layer of a [layers, pages, bytes] allocation: rows strided past page_bytes.
    layers = torch.zeros(2, 6, lay.page_bytes + 32, dtype=torch.uint8)
    pool = layers[1, :, : lay.page_bytes]
    src, dst = torch.tensor([3, 0, 2]), torch.tensor([5, 1, 2], dtype=torch.int32)
    ops.quantize_page(blocks_k, blocks_v, pool, dst, cfg, src_index=src, backend="torch")
    want = quantize_kv(blocks_k[src].flatten(0, 1), blocks_v[src].flatten(0, 1), cfg)
    assert torch.equal(pool[dst.long()], want.packed_pages())
    assert not pool[[0, 3, 4]].any() and not layers[0].any() and not layers[1, :, -32:].any()
    ref_pool = torch.zeros_like(pool)
    ops.quantize_page(blocks_k, blocks_v, ref_pool, dst, cfg, src_index=src, backend="ref")
    assert torch.equal(pool, ref_pool)


def test_quantize_single_block_default_backend_and_empty_call():
    cfg = OscarConfig()
    k, v = make_kv(128, 2, 128, "outlier", torch.Generator().manual_seed(1))
    lay = PageLayout.of(cfg, 2, 128)
    pool = lay.alloc_pool(2)
    ops.quantize_page(k, v, pool, torch.tensor([1]), cfg)  # [128, H, D], default backend
    assert torch.equal(pool[1], quantize_kv(k, v, cfg).packed_pages()[0])
    none = torch.zeros(0, 128, 2, 128)
    ops.quantize_page(none, none, pool, torch.tensor([], dtype=torch.int32), cfg)
    assert not pool[0].any()


def test_quantize_bad_input_errors_match_reference():
    cfg = OscarConfig()
    lay = PageLayout.of(cfg, 2, 64)
    k = torch.randn(1, 128, 2, 64)
    bad = k.clone()
    bad[0, 5, 1, 3] = float("nan")
    for backend in ("torch", "ref"):
        with pytest.raises(ValueError, match="k contains NaN or inf"):
            ops.quantize_page(bad, k, lay.alloc_pool(1), torch.tensor([0]), cfg, backend=backend)
        with pytest.raises(ValueError, match="same dtype"):
            ops.quantize_page(k, k.double(), lay.alloc_pool(1), torch.tensor([0]), cfg,
                              backend=backend)  # fmt: skip


# ---------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_dequantize_pages_bit_equal_to_reference(cfg):
    cache = build_cache(cfg, [300, 129], 2, 128, kind="outlier", seed=5, device=CPU)
    ids = torch.tensor([3, 0, 1, 2], dtype=torch.int32)  # includes the two unused pages
    got = ops.dequantize_pages(cache.pool, ids, cfg, 2, 128, backend="torch")
    want = ops.dequantize_pages(cache.pool, ids, cfg, 2, 128, backend="ref")
    for g, w in zip(got, want, strict=True):
        assert g.shape == (4, 128, 2, 128) and g.dtype == torch.float32
        assert torch.equal(g, w)
    k, _ = ops.dequantize_pages(cache.pool, ids[:0], cfg, 2, 128, backend="torch")
    assert k.shape == (0, 128, 2, 128)


# ---------------------------------------------------------------------------- decode

DECODE_CASES = [
    # (config, lens, kv_heads, group, head_dim, kind)
    (OscarConfig(), [1, 127, 128, 129, 300], 2, 4, 64, "outlier"),
    (OscarConfig(bits=4, norm="head"), [300, 5], 1, 8, 128, "tiny"),
    (OscarConfig.kivi(), [256, 40], 4, 1, 256, "random"),
    (OscarConfig(fold_v=True, k_group=64), [129, 1], 3, 3, 64, "outlier"),
    (OscarConfig.direct_scaling(), [384], 2, 2, 128, "tiny"),
    (OscarConfig.rotation_only(bits=4), [200, 70, 1], 2, 4, 64, "random"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[str(i) for i in range(len(DECODE_CASES))])
def test_decode_matches_reference(case):
    cfg, lens, heads, group, dim, kind = case
    cache = build_cache(cfg, lens, heads, dim, kind=kind, seed=len(lens), device=CPU)
    q = torch.randn(len(lens), heads * group, dim, generator=torch.Generator().manual_seed(7))
    q[:, :, 1] *= 30.0  # a query outlier channel, which the rotation spreads
    want = reference_decode(q, cache.qkvs)
    got = ops.decode_attention(q, cache.paged_kv(), backend="torch")
    assert got.dtype == torch.float32 and got.shape == q.shape
    close(got, want)
    scale = 0.3 / math.sqrt(dim)
    got = ops.decode_attention(q.bfloat16(), cache.paged_kv(), scale=scale)
    assert got.dtype == torch.bfloat16
    want = torch.cat([attention(q[b : b + 1].bfloat16(), x, scale=scale)
                      for b, x in enumerate(cache.qkvs)])  # fmt: skip
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_decode_mixed_batch_with_a_pageless_request_and_garbage_padding():
    """Padding must never be read: stale page ids, NaN bytes in unused pages, NaN past tails."""
    cfg = OscarConfig()
    lens = [700, 3, 128, 257]  # 5 pages + tail, no pages, one page + empty tail, ...
    cache = build_cache(cfg, lens, 2, 64, kind="outlier", seed=11, device=CPU)
    q = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(3))
    want = reference_decode(q, cache.qkvs)
    pool, table = cache.pool.clone(), cache.page_table.clone()
    used = set(table[0, :5].tolist()) | {int(table[2, 0])} | set(table[3, :2].tolist())
    for p in set(range(pool.shape[0])) - used:
        pool[p] = 0xFF  # fp16 NaN scales if ever dequantized
    for b, n in enumerate(lens):
        table[b, n // 128 :] = 10**6  # out of range: reading it would raise
    k_tail, v_tail = cache.k_tail.clone(), cache.v_tail.clone()
    for b, n in enumerate(lens):
        k_tail[cache.tail_index[b], n % 128 :] = float("nan")
        v_tail[cache.tail_index[b], n % 128 :] = float("nan")
    # q as SGLang hands it over: a strided view into a fused projection output.
    q_view = torch.cat((q.flatten(1), torch.randn(4, 100)), dim=1)[:, :512].view(4, 8, 64)
    kv = cache.paged_kv(pool=pool, page_table=table, k_tail=k_tail, v_tail=v_tail)
    got = ops.decode_attention(q_view, kv)
    close(got, want)


def test_decode_bad_inputs():
    cfg = OscarConfig()
    cache = build_cache(cfg, [130, 3], 2, 64, device=CPU)
    kv = cache.paged_kv()
    q = torch.randn(2, 4, 64)
    for backend in ("torch", "ref", "cpu"):
        bad = q.clone()
        bad[1, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="q contains NaN or inf"):
            ops.decode_attention(bad, kv, backend=backend)
        with pytest.raises(ValueError, match="cannot exceed the cached tokens"):
            ops.decode_attention(q, cache.paged_kv(tail_len=torch.tensor([2, 0])),
                                 backend=backend)  # fmt: skip
        with pytest.raises(ValueError, match="kv_heads"):
            ops.decode_attention(torch.randn(2, 3, 64), cache.paged_kv(tail_index=None),
                                 backend=backend)  # fmt: skip
    narrow = cache.paged_kv(page_table=cache.page_table[:, :1], num_pages=torch.tensor([2, 0]),
                            tail_index=None)  # fmt: skip
    with pytest.raises(ValueError, match="page_table"):
        ops.decode_attention(q, narrow)


# ---------------------------------------------------------------------------- extend


def run_extend(cfg, lens, new, heads=2, group=2, dim=64, kind="outlier"):
    cache = build_cache(cfg, lens, heads, dim, kind=kind, seed=3, device=CPU)
    gen = torch.Generator().manual_seed(4)
    n = sum(new)
    k_new, v_new = make_kv(n, heads, dim, "random", gen)
    q = torch.randn(n, heads * group, dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    want = torch.zeros(q.shape)
    for b, qkv in enumerate(cache.qkvs):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi > lo:
            ext = QuantizedKV(**{**qkv.__dict__, "k_tail": torch.cat((qkv.k_tail, k_new[lo:hi])),
                                 "v_tail": torch.cat((qkv.v_tail, v_new[lo:hi]))})  # fmt: skip
            want[lo:hi] = attention(q[lo:hi], ext)
    # Strided views, as SGLang passes slices of its fused qkv output.
    qkv = torch.cat((q.flatten(1), k_new.float().flatten(1), v_new.float().flatten(1)), dim=1)
    qv, kv, vv = qkv.split([q[0].numel(), k_new[0].numel(), v_new[0].numel()], dim=1)
    got = ops.extend_attention(qv.view(q.shape), kv.view(k_new.shape), vv.view(v_new.shape), cu,
                               cache.paged_kv(), backend="torch")  # fmt: skip
    assert got.shape == q.shape and got.dtype == q.dtype
    close(got, want)


EXTEND_CASES = [
    # A request with pages and a tail, one with an empty tail, one brand new, one idle.
    (OscarConfig(), [300, 256, 0, 40], [5, 130, 3, 0], 2, 2, 64),
    (OscarConfig.kivi(), [129], [17], 1, 8, 64),
    (OscarConfig(bits=4, norm="head", fold_v=True), [200, 1], [2, 127], 2, 1, 128),
    (OscarConfig.direct_scaling(k_group=128), [127, 128], [1, 1], 3, 4, 256),
    (OscarConfig.rotation_only(), [0, 0], [129, 1], 2, 4, 64),
]


@pytest.mark.parametrize("padding_limit", [math.inf, 0.0], ids=["padded", "per-request"])
@pytest.mark.parametrize("case", EXTEND_CASES, ids=[str(i) for i in range(len(EXTEND_CASES))])
def test_extend_matches_reference(case, padding_limit, monkeypatch):
    monkeypatch.setattr(torchops, "PADDING_WORK_LIMIT", padding_limit)
    cfg, lens, new, heads, group, dim = case
    run_extend(cfg, lens, new, heads, group, dim)


def test_extend_all_idle_and_bad_query():
    cfg = OscarConfig()
    cache = build_cache(cfg, [130], 2, 64, device=CPU)
    cached = cache.paged_kv(tail_index=None)
    empty = torch.zeros(0, 2, 64)
    out = ops.extend_attention(torch.zeros(0, 4, 64), empty, empty, torch.tensor([0, 0]), cached)
    assert out.shape == (0, 4, 64)
    q = torch.randn(2, 4, 64)
    q[0, 0, 0] = float("nan")
    kv = torch.randn(2, 2, 64)
    for backend in ("torch", "ref"):
        with pytest.raises(ValueError, match="q contains NaN or inf"):
            ops.extend_attention(q, kv, kv, torch.tensor([0, 2]), cached, backend=backend)


# ---------------------------------------------------------------------------- dispatch


def test_torch_is_the_cpu_fallback_and_ref_stays_selectable(monkeypatch):
    monkeypatch.delenv("OSCAR_KV_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_cpu_ops", lambda: None)  # what a machine without g++ gets
    assert ops.resolve_backend(None, CPU) == "torch"
    assert ops.resolve_backend("ref", CPU) == "ref"
    monkeypatch.setenv("OSCAR_KV_BACKEND", "ref")
    assert ops.resolve_backend(None, CPU) == "ref"
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    assert ops.resolve_backend(None, CPU) == "torch"
