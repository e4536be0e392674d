"""`oscar_kv.ops`: pool layout, backend dispatch, the CPU backends (ref, torch), input checks."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv import _native as native
from oscar_kv.ref import attention, dequantize_kv, quantize_kv


def test_layout_matches_native_sections():
    for cfg, h, d in [(OscarConfig(), 8, 128), (OscarConfig(bits=4, norm="head"), 3, 64)]:
        lay = ops.PageLayout.of(cfg, h, d)
        secs = native.page_sections(h, d, cfg.bits, cfg.k_group, cfg.v_group, cfg.norm)
        assert [(n, o) for n, o, _ in secs] == list(lay.offsets.items())
        assert lay.page_bytes == native.page_bytes(h, d, cfg.bits, cfg.k_group, cfg.v_group,
                                                   cfg.norm)  # fmt: skip
        assert all(n % 16 == 0 for n in lay.nbytes.values()), "sections must stay aligned"


def test_pool_rows_are_reference_pages_and_round_trip():
    cfg = OscarConfig(norm="head")
    k, v = make_kv(3 * 128 + 7, 3, 64, "outlier", torch.Generator().manual_seed(0))
    qkv = quantize_kv(k, v, cfg)
    lay = ops.PageLayout.of(cfg, 3, 64)
    pool = lay.alloc_pool(5)
    ids = torch.tensor([4, 0, 2])
    pool[ids] = qkv.packed_pages()
    back = lay.pages_to_qkv(pool, ids, qkv.k_tail, qkv.v_tail)
    assert torch.equal(back.packed_pages(), qkv.packed_pages())
    for a, b in zip(dequantize_kv(back), dequantize_kv(qkv), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_cpu_backend_quantize_page_writes_reference_bytes(backend):
    cfg = OscarConfig()
    k, v = make_kv(2 * 128, 2, 64, "random", torch.Generator().manual_seed(1))
    lay = ops.PageLayout.of(cfg, 2, 64)
    pool = lay.alloc_pool(3)
    ops.quantize_page(k.view(2, 128, 2, 64), v.view(2, 128, 2, 64), pool, torch.tensor([2, 0]),
                      cfg, backend=backend)  # fmt: skip
    assert torch.equal(pool[[2, 0]], quantize_kv(k, v, cfg).packed_pages())
    assert not pool[1].any()


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_cpu_backend_decode_equals_reference_attention(backend):
    cfg = OscarConfig()
    cache = build_cache(cfg, [300, 1, 128], 2, 64, device=torch.device("cpu"))
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2))
    got = ops.decode_attention(q, *cache.decode_args(), cache.tail_len, cfg,
                               tail_index=cache.tail_index, backend=backend)  # fmt: skip
    want = torch.cat([attention(q[b : b + 1], qkv) for b, qkv in enumerate(cache.qkvs)])
    if backend == "ref":  # the same computation, request by request
        assert torch.equal(got, want)
    else:  # batched, K scale folded into q: fp32 rounding differs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_cpu_tensors_default_to_the_cpu_kernels_and_env_selects(monkeypatch):
    monkeypatch.delenv("OSCAR_KV_BACKEND", raising=False)
    assert ops.resolve_backend(None, torch.device("cpu")) == "cpu"
    monkeypatch.setattr(ops, "_cpu_ops", lambda: None)  # no C++ compiler: the torch ops
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="'cpu' needs CPU tensors and the built"):
        ops.resolve_backend("cpu", torch.device("cpu"))
    monkeypatch.setenv("OSCAR_KV_BACKEND", "ref")
    assert ops.resolve_backend(None, torch.device("cpu")) == "ref"
    monkeypatch.setenv("OSCAR_KV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend(None, torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda"):
        ops.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_rotate_q_cpu_backends(backend):
    q = torch.randn(2, 3, 128)
    assert torch.equal(ops.rotate_q(q, backend=backend), ops.rotate_q(q.double(), backend=backend
                                                                      ).float())  # fmt: skip
    with pytest.raises(ValueError, match="head_dim"):
        ops.rotate_q(torch.randn(2, 96))


def test_input_checks_name_the_argument():
    cfg = OscarConfig()
    lay = ops.PageLayout.of(cfg, 2, 64)
    pool = lay.alloc_pool(2)
    k = torch.randn(1, 128, 2, 64)
    with pytest.raises(ValueError, match="pool"):
        ops.quantize_page(k, k, pool[:, :-16], torch.tensor([0]), cfg)
    with pytest.raises(ValueError, match="k must be"):
        ops.quantize_page(k[:, :100], k[:, :100], pool, torch.tensor([0]), cfg)
    with pytest.raises(ValueError, match="page_ids"):
        ops.quantize_page(k, k, pool, torch.tensor([0, 1]), cfg)
    cache = build_cache(cfg, [130], 2, 64, device=torch.device("cpu"))
    q = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="kv_heads"):
        ops.decode_attention(q, *cache.decode_args(), cache.tail_len, cfg)
    with pytest.raises(ValueError, match="tail_len"):
        ops.decode_attention(torch.randn(1, 4, 64), *cache.decode_args(), cache.tail_len[:0],
                             cfg)  # fmt: skip
    with pytest.raises(ValueError, match="tail_index"):
        ops.decode_attention(torch.randn(1, 4, 64), *cache.decode_args(), cache.tail_len, cfg,
                             tail_index=torch.tensor([0.5]))  # fmt: skip
