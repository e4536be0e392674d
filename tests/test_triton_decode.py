"""Triton split-KV decode attention over packed pages matches `oscar_kv.ref.attention`.

``precise`` runs the kernel's dots in fp32 (tight tolerance: checks indexing, norms,
rotation, LSE merge); the default path feeds fp16 operands to tensor cores (looser), whose
code unpacking (`oscar_kv.triton.paged.codes_f16`) is checked exact on every byte value.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernel_cases import DECODE_CONFIGS, DEVICE, build_cache, config_id
from oscar_kv import OscarConfig, ops
from oscar_kv import triton as tri
from oscar_kv.ref import attention
from oscar_kv.ref.quant import unpack_codes
from oscar_kv.triton._env import scope
from oscar_kv.triton.paged import codes_f16

with scope():

    @triton.jit
    def _codes_kernel(src, dst, R: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr):
        D: tl.constexpr = NB * 8 // BITS
        r = tl.arange(0, R)
        b = tl.load(src + r[:, None] * NB + tl.arange(0, NB)[None, :])
        tl.store(dst + r[:, None] * D + tl.arange(0, D)[None, :], codes_f16(b, R, NB, BITS))


def reference(cache, q: torch.Tensor) -> torch.Tensor:
    return torch.cat([attention(q[b : b + 1], qkv) for b, qkv in enumerate(cache.qkvs)])


def check(cfg, lens, h, group, d, kind="random", splits=(1, 2), seed=0, fp16=True, bt=64):
    cache = build_cache(cfg, lens, h, d, kind=kind, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(len(lens), h * group, d, generator=gen)
    if kind == "outlier":
        q[:, :, 3] *= 10.0
    want = reference(cache, q)
    big = max(1.0, float(want.abs().max()))
    for ns in splits:
        kv = cache.paged_kv(num_splits=ns)
        got = tri.decode_attention(q.to(DEVICE), kv, 0, d**-0.5, True, bt)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * big)
    if fp16:
        got = ops.decode_attention(
            q.to(DEVICE), cache.paged_kv(), num_splits=splits[-1], backend="triton"
        )
        torch.testing.assert_close(got.cpu(), want, rtol=5e-3, atol=5e-3 * big)


# lengths: several pages + tail, exactly one page (empty tail), one token (no pages),
# tail of 127, one page + 1.
LENS = [300, 128, 1, 127, 129]


@pytest.mark.parametrize("bits", [2, 4])
def test_codes_f16_unpacks_every_byte_exactly(bits):
    """The fp16 path's bit-trick unpacking equals the reference unpacking on all 256 bytes."""
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    out = torch.empty(16, 16 * 8 // bits, dtype=torch.float16, device=DEVICE)
    with scope():
        _codes_kernel[(1,)](packed.to(DEVICE), out, R=16, NB=16, BITS=bits)
    assert torch.equal(out.cpu(), unpack_codes(packed, bits).to(torch.float16))


def test_decode_oscar_default():
    check(OscarConfig(), LENS, 2, 2, 64, splits=(1, 2, 5))


@pytest.mark.parametrize("group", [1, 4, 8, 16])
def test_decode_gqa(group):
    check(OscarConfig(), [260, 1], 1 if group >= 8 else 2, group, 64, splits=(2,))


@pytest.mark.parametrize("cfg", DECODE_CONFIGS, ids=config_id)
def test_decode_configs(cfg):
    check(cfg, [257, 40], 2, 2, 64, splits=(2,))


@pytest.mark.parametrize("kind", ["outlier", "tiny"])
def test_decode_adversarial(kind):
    check(OscarConfig(), [384, 70], 2, 4, 64, kind=kind, splits=(3,), seed=7)


@pytest.mark.parametrize(("bt", "k_group"), [(32, 32), (32, 128), (128, 64)])
def test_decode_block_tokens(bt, k_group):
    """Sub-block walks of a page: groups inside a block and a block inside a group."""
    check(OscarConfig(k_group=k_group, norm="head"), [300], 2, 2, 64, splits=(2,), bt=bt,
          fp16=False)  # fmt: skip


@pytest.mark.parametrize(("bt", "k_group", "bits"), [(32, 32, 2), (128, 32, 2), (64, 128, 4)])
def test_decode_f16_block_tokens(bt, k_group, bits):
    """The fp16 path at every block size: several K groups per block, a block in a group."""
    cache = build_cache(OscarConfig(bits=bits, k_group=k_group), [300, 3], 2, 64, seed=bt)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(bt))
    want = reference(cache, q)
    got = tri.decode_attention(q.to(DEVICE), cache.paged_kv(num_splits=2), 0, 64**-0.5,
                               False, bt)  # fmt: skip
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.cpu(), want, rtol=5e-3, atol=5e-3 * big)


@pytest.mark.parametrize("d", [128, 256])
def test_decode_head_dims(d):
    check(OscarConfig(), [200], 1, 2, d, splits=(1,), fp16=d == 128)


def test_decode_single_token_and_empty_pages_everywhere():
    """Every request lives in its tail only (no pages; page table of zeros)."""
    check(OscarConfig(), [1, 5, 127], 2, 2, 64, splits=(1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_sweep(bits, d, group):
    check(OscarConfig(bits=bits), [640, 129, 3], 2, group, d, splits=(1, 4), seed=bits + d)


def test_bf16_triton_baseline_matches_sdpa():
    gen = torch.Generator().manual_seed(0)
    lens, h, group, d, page = [200, 64, 1], 2, 4, 64, 64
    n_pages = sum(-(-n // page) for n in lens)
    perm = torch.randperm(n_pages + 2, generator=gen)[:n_pages]
    k_cache = torch.randn(n_pages + 2, page, h, d, generator=gen).bfloat16()
    v_cache = torch.randn(n_pages + 2, page, h, d, generator=gen).bfloat16()
    q = torch.randn(len(lens), h * group, d, generator=gen).bfloat16()
    pt = torch.zeros(len(lens), max(-(-n // page) for n in lens), dtype=torch.int32)
    want = []
    used = 0
    for b, n in enumerate(lens):
        m = -(-n // page)
        ids = perm[used : used + m]
        used += m
        pt[b, :m] = ids.int()
        k = k_cache[ids].reshape(-1, h, d)[:n].float().transpose(0, 1)
        v = v_cache[ids].reshape(-1, h, d)[:n].float().transpose(0, 1)
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        o = torch.nn.functional.scaled_dot_product_attention(q[b].float()[:, None], k, v)
        want.append(o[:, 0])
    seq = torch.tensor(lens, dtype=torch.int32)
    got = tri.bf16_decode_attention(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), pt.to(DEVICE), seq.to(DEVICE),
        num_splits=2,
    )  # fmt: skip
    torch.testing.assert_close(got.cpu().float(), torch.stack(want), rtol=2e-2, atol=2e-2)


def test_decode_bf16_query_and_output():
    """What a GPU server hands over: a bf16 query; the output comes back in bf16."""
    cfg = OscarConfig()
    cache = build_cache(cfg, [300, 5], 2, 64, kind="outlier", seed=2)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = reference(cache, q.float())
    got = ops.decode_attention(q.to(DEVICE), cache.paged_kv(), backend="triton")
    assert got.dtype == torch.bfloat16
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-2, atol=1e-2 * big)
