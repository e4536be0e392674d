"""Triton quantize_page writes pages byte-identical to the reference (interpreter on CPU).

The reference pins the norm's fp32 summation order and its sqrt rounding
(`oscar_kv.ref.quant.token_norms`), so pages are compared with the reference byte for byte.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernel_cases import DEVICE, KINDS, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv.layout import PageLayout
from oscar_kv.ref import fwht, quantize_kv

SECTIONS = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "norms")


def reference_pages(k: torch.Tensor, v: torch.Tensor, cfg: OscarConfig) -> torch.Tensor:
    """Reference pages of blocks k, v [n, 128, H, D]."""
    n, t, h, d = k.shape
    return quantize_kv(k.reshape(n * t, h, d), v.reshape(n * t, h, d), cfg).packed_pages()


def triton_pages(
    k: torch.Tensor, v: torch.Tensor, cfg: OscarConfig, shuffle: bool = True
) -> torch.Tensor:
    """Quantize through ops (Triton) into shuffled pool rows; return them in block order."""
    n, _, h, d = k.shape
    layout = PageLayout.of(cfg, h, d)
    pool = layout.alloc_pool(n + 2, DEVICE)
    ids = torch.randperm(n + 2)[:n] if shuffle else torch.arange(n)
    ops.quantize_page(k.to(DEVICE), v.to(DEVICE), pool, ids.to(DEVICE), cfg, backend="triton")
    return pool[ids.to(DEVICE)].cpu()


def assert_same_pages(got: torch.Tensor, want: torch.Tensor, cfg: OscarConfig, h: int, d: int):
    if torch.equal(got, want):
        return
    layout = PageLayout.of(cfg, h, d)
    bad = []
    for name in SECTIONS:
        off, size = layout.offsets[name], layout.nbytes[name]
        diff = int((got[:, off : off + size] != want[:, off : off + size]).sum())
        if diff:
            bad.append(f"{name}: {diff}/{got.shape[0] * size} bytes differ")
    raise AssertionError("; ".join(bad))


def run_case(h, d, bits, k_group, norm, rotation, kind="random", fold_v=False, blocks=2, seed=0):
    cfg = OscarConfig(bits=bits, k_group=k_group, norm=norm, rotation=rotation, fold_v=fold_v)
    gen = torch.Generator().manual_seed(seed)
    k, v = make_kv(blocks * 128, h, d, kind, gen)
    k, v = k.view(blocks, 128, h, d), v.view(blocks, 128, h, d)
    assert_same_pages(triton_pages(k, v, cfg), reference_pages(k, v, cfg), cfg, h, d)


# Every bits x k_group x norm at D=64 with rotation, then each head_dim with and without it.
FAST = [
    (2, 64, bits, kg, norm, "hadamard")
    for bits, kg, norm in itertools.product((2, 4), (32, 64, 128), ("token", "head", "none"))
] + [
    (2, 128, 2, 32, "token", "none"),
    (1, 128, 4, 64, "head", "hadamard"),
    (1, 256, 2, 128, "token", "hadamard"),
    (1, 256, 4, 32, "none", "none"),
]


@pytest.mark.parametrize(("h", "d", "bits", "k_group", "norm", "rotation"), FAST)
def test_quantize_page_byte_identical(h, d, bits, k_group, norm, rotation):
    run_case(h, d, bits, k_group, norm, rotation)


@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("norm", ["token", "head"])
def test_quantize_page_adversarial(kind, norm):
    run_case(3, 64, 2, 32, norm, "hadamard", kind=kind, seed=1)


def test_quantize_page_fold_v_and_odd_heads():
    """fold_v: V is stored as given (not rotated); 3 KV heads (norm sums a non-power-of-2)."""
    run_case(3, 64, 2, 32, "token", "hadamard", fold_v=True, blocks=1)


def test_quantize_page_src_index_and_strided_input():
    """A tail buffer [slots, 128, H, D] passed whole, the completed slots picked by index."""
    cfg = OscarConfig()
    gen = torch.Generator().manual_seed(3)
    k, v = make_kv(4 * 128, 2, 64, "random", gen)
    # Strided: a [slots, 128, H, 2D] buffer sliced to its first D channels.
    kb = torch.zeros(4, 128, 2, 128, dtype=torch.bfloat16)
    kb[..., :64] = k.view(4, 128, 2, 64)
    kbuf, vbuf = kb[..., :64], v.view(4, 128, 2, 64)
    layout = PageLayout.of(cfg, 2, 64)
    pool = layout.alloc_pool(5, DEVICE)
    src = torch.tensor([2, 0], dtype=torch.int32)
    ids = torch.tensor([4, 1])
    ops.quantize_page(
        kbuf.to(DEVICE), vbuf.to(DEVICE), pool, ids.to(DEVICE), cfg,
        src_index=src.to(DEVICE), backend="triton",
    )  # fmt: skip
    want = reference_pages(kbuf[[2, 0]].contiguous(), vbuf[[2, 0]], cfg)
    assert_same_pages(pool[ids.to(DEVICE)].cpu(), want, cfg, 2, 64)
    assert not pool[[0, 2, 3]].any(), "pages outside page_ids were written"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "bits", "k_group", "norm", "rotation"),
    list(
        itertools.product(
            (64, 128, 256), (2, 4), (32, 64, 128), ("token", "head", "none"), ("hadamard", "none")
        )
    ),
)
def test_quantize_page_full_sweep(d, bits, k_group, norm, rotation):
    run_case(2, d, bits, k_group, norm, rotation, kind="outlier", seed=d + bits)


def test_rotate_q_bit_identical():
    gen = torch.Generator().manual_seed(0)
    for d in (64, 128, 256):
        q = torch.randn(3, 5, d, generator=gen)
        got = ops.rotate_q(q.to(DEVICE), backend="triton").cpu()
        assert torch.equal(got, fwht(q))


def test_dequantize_pages_matches_reference():
    cfg = OscarConfig(norm="head")
    gen = torch.Generator().manual_seed(2)
    k, v = make_kv(2 * 128, 2, 64, "outlier", gen)
    qkv = quantize_kv(k, v, cfg)
    pool = qkv.packed_pages().to(DEVICE)
    kd, vd = ops.dequantize_pages(pool, torch.arange(2, device=DEVICE), cfg, 2, 64,
                                  backend="triton")  # fmt: skip
    kr, vr = ops.dequantize_pages(pool.cpu(), torch.arange(2), cfg, 2, 64, backend="ref")
    torch.testing.assert_close(kd.cpu(), kr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vd.cpu(), vr, rtol=1e-5, atol=1e-5)
