"""`oscar_kv.ops`: pool layout, backend dispatch, the CPU backends (ref, torch), input checks."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv import _native as native
from oscar_kv.layout import PageLayout
from oscar_kv.ref import attention, dequantize_kv, quantize_kv


def test_layout_matches_native_sections():
    for cfg, h, d in [(OscarConfig(), 8, 128), (OscarConfig(bits=4, norm="head"), 3, 64)]:
        lay = PageLayout.of(cfg, h, d)
        secs = native.page_sections(h, d, cfg.bits, cfg.k_group, cfg.v_group, cfg.norm)
        assert [(n, o) for n, o, _ in secs] == list(lay.offsets.items())
        assert lay.page_bytes == native.page_bytes(h, d, cfg.bits, cfg.k_group, cfg.v_group,
                                                   cfg.norm)  # fmt: skip
        assert all(n % 16 == 0 for n in lay.nbytes.values()), "sections must stay aligned"


def test_pool_rows_are_reference_pages_and_round_trip():
    cfg = OscarConfig(norm="head")
    k, v = make_kv(3 * 128 + 7, 3, 64, "outlier", torch.Generator().manual_seed(0))
    qkv = quantize_kv(k, v, cfg)
    lay = PageLayout.of(cfg, 3, 64)
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
    lay = PageLayout.of(cfg, 2, 64)
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
    got = ops.decode_attention(q, cache.paged_kv(), backend=backend)
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
    lay = PageLayout.of(cfg, 2, 64)
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
        ops.decode_attention(q, cache.paged_kv(tail_index=None))
    # The cache's own checks (PagedKV.check, run when the cache is built) name the field.
    with pytest.raises(ValueError, match=r"tail_len must be 1-D of length 1, got \(0,\)"):
        cache.paged_kv(tail_len=cache.tail_len[:0], tail_index=None)
    with pytest.raises(ValueError, match=r"tail_index must be int32, got torch.float32"):
        cache.paged_kv().with_batch(tail_index=torch.tensor([0.5])).check()
    with pytest.raises(ValueError, match="index tensors must be int32 or int64, got torch.float32"):
        cache.paged_kv(tail_index=torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"k_tail must be \[slots, 128, 2, 64\]"):
        cache.paged_kv(k_tail=cache.k_tail[..., :32])
    with pytest.raises(ValueError, match="q holds 2 queries for a batch of 1"):
        ops.decode_attention(torch.randn(2, 4, 64), cache.paged_kv())


@pytest.mark.parametrize("backend", ["torch", "ref", "triton"])
def test_quantize_page_skips_negative_page_ids(backend):
    """page_ids[i] < 0 writes nothing (a fixed grid over requests, only the completed pages
    named); the other entries are written exactly as in a call without it."""
    cfg = OscarConfig()
    dev = DEVICE if backend == "triton" else torch.device("cpu")
    k, v = make_kv(3 * 128, 2, 64, "outlier", torch.Generator().manual_seed(5))
    k, v = k.view(3, 128, 2, 64).to(dev), v.view(3, 128, 2, 64).to(dev)
    lay = PageLayout.of(cfg, 2, 64)
    # Garbage, not zeros, so a stray write of anything shows; row 4 is where -1 would wrap.
    base = torch.randint(0, 256, (5, lay.page_bytes), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(6)).to(dev)  # fmt: skip

    def quantize(kk, vv, ids, src=None):
        pool = base.clone()
        ids = torch.tensor(ids, dtype=torch.int32, device=dev)
        src = None if src is None else torch.tensor(src, dtype=torch.int32, device=dev)
        ops.quantize_page(kk, vv, pool, ids, cfg, src_index=src, backend=backend)
        return pool

    want = quantize(k[[0, 2]], v[[0, 2]], [3, 1])
    assert torch.equal(want[[0, 2, 4]], base[[0, 2, 4]])
    ref = quantize_kv(k[[0, 2]].flatten(0, 1).cpu(), v[[0, 2]].flatten(0, 1).cpu(), cfg)
    assert torch.equal(want[[3, 1]].cpu(), ref.packed_pages())
    assert torch.equal(quantize(k, v, [3, -1, 1]), want)
    assert torch.equal(quantize(k, v, [-1, 3, -1, 1], src=[1, 0, 0, 2]), want)
    assert torch.equal(quantize(k, v, [-1, -1, -1]), base)


def test_gpu_decode_defaults_to_triton(monkeypatch):
    """On a GPU with the CUDA extension built, decode defaults to Triton (the static model's
    far faster kernel), the other ops to CUDA; an explicit choice wins."""
    monkeypatch.delenv("OSCAR_KV_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_cuda_ops", lambda: object())
    gpu = torch.device("cuda")
    assert ops.resolve_backend(None, gpu) == "cuda"
    assert ops.resolve_decode_backend(None, gpu) == "triton"
    assert ops.resolve_decode_backend("cuda", gpu) == "cuda"
    monkeypatch.setenv("OSCAR_KV_BACKEND", "cuda")
    assert ops.resolve_decode_backend(None, gpu) == "cuda"
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    assert ops.resolve_decode_backend(None, torch.device("cpu")) == "torch"
