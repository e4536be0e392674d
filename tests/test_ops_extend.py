"""extend_attention: new tokens attend causally to packed pages, the tail, and themselves.

The fused Triton kernel is checked with fp32 dots (``precise``: tight tolerance, catches
indexing, masking, norms, rotations) and through `ops` with its default fp16 operands.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernel_cases import DEVICE, build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv import triton as tri
from oscar_kv.ops import _extend_via_workspace
from oscar_kv.ref import attention
from oscar_kv.ref.quant import QuantizedKV


def inputs(cfg, lens, new, h, group, d, kind="outlier", seed=3):
    cache = build_cache(cfg, lens, h, d, kind=kind, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n = sum(new)
    k_new, v_new = make_kv(n, h, d, kind, gen)
    q = torch.randn(n, h * group, d, generator=gen)
    if kind == "outlier":
        q[:, :, 3] *= 10.0
    q = q.bfloat16().float()  # what a model hands over: bf16 values, exact in fp16 too
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    want = torch.zeros(q.shape)
    for b, qkv in enumerate(cache.qkvs):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi > lo:
            ext = QuantizedKV(**{**qkv.__dict__, "k_tail": torch.cat((qkv.k_tail, k_new[lo:hi])),
                                 "v_tail": torch.cat((qkv.v_tail, v_new[lo:hi]))})  # fmt: skip
            want[lo:hi] = attention(q[lo:hi], ext)
    return cache, q.to(DEVICE), k_new.to(DEVICE), v_new.to(DEVICE), cu.to(DEVICE), want


def close(got, want, tol):
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * big)


def check_fused(cfg, lens, new, h=2, group=2, d=64, kind="outlier", bt=32, fp16=True):
    cache, q, k_new, v_new, cu, want = inputs(cfg, lens, new, h, group, d, kind)
    kv = cache.paged_kv()
    got = tri.extend_attention(q, k_new, v_new, cu, kv, 0, d**-0.5, True, bt)
    close(got, want, 1e-4)
    if fp16:
        got = ops.extend_attention(q, k_new, v_new, cu, kv, backend="triton")
        close(got, want, 5e-3)


def test_extend_fused_mixed_requests():
    # Pages + tail, exactly two pages (empty tail), brand new, idle, tail only.
    check_fused(OscarConfig(), [300, 256, 0, 40, 5], [5, 130, 3, 0, 1])


def test_extend_fused_planned_work_list():
    """The work list planned on the host from new-token counts (`ops.plan_extend`, once per
    forward; no read-back of cu_seqlens) gives what the per-call one gives."""
    new = [5, 130, 3, 0, 1]
    cache, q, k_new, v_new, cu, want = inputs(OscarConfig(), [300, 256, 0, 40, 5], new, 2, 2, 64)
    kv = ops.plan_extend(cache.paged_kv(), new, q.shape[1])
    assert kv.extend_work.dtype == torch.int32 and kv.extend_work.device == kv.device
    close(tri.extend_attention(q, k_new, v_new, cu, kv, 0, 64**-0.5, True), want, 1e-4)
    close(ops.extend_attention(q, k_new, v_new, cu, kv, backend="triton"), want, 5e-3)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_fused_gqa(group):
    # 70 new tokens: more than one block of BM tokens for every group size.
    check_fused(OscarConfig(), [129, 0], [70, 9], h=1 if group == 8 else 2, group=group)


@pytest.mark.parametrize(
    "cfg",
    [
        OscarConfig.kivi(),
        OscarConfig.rotation_only(),
        OscarConfig.direct_scaling(k_group=128),
        OscarConfig(bits=4, k_group=64, norm="head"),
        OscarConfig(fold_v=True),
    ],
    ids=lambda c: f"{c.label}{'-foldv' if c.fold_v else ''}",
)
def test_extend_fused_configs(cfg):
    check_fused(cfg, [257, 3], [17, 40])


@pytest.mark.parametrize("kind", ["random", "tiny"])
def test_extend_fused_inputs(kind):
    check_fused(OscarConfig(), [384, 1], [33, 2], group=4, kind=kind)


@pytest.mark.parametrize("d", [128, 256])
def test_extend_fused_head_dims(d):
    check_fused(OscarConfig(), [200], [20], h=1, group=2, d=d, fp16=d == 128)


@pytest.mark.parametrize(("bt", "k_group"), [(64, 32), (128, 64)])
def test_extend_fused_block_tokens(bt, k_group):
    check_fused(OscarConfig(k_group=k_group), [300], [70], bt=bt, fp16=False)


@pytest.mark.parametrize("which", ["triton", "ref"])
def test_extend_workspace_path(which):
    """The dequantize-then-SDPA route (CUDA's extend, the benchmark's baseline)."""
    cfg = OscarConfig()
    cache, q, k_new, v_new, cu, want = inputs(cfg, [300, 0, 40], [5, 3, 0], 2, 2, 64)
    got = _extend_via_workspace(which, q, k_new, v_new, cu, cache.paged_kv(), 64**-0.5)
    close(got, want, 1e-4)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_extend_cpu_backends(backend):
    cfg = OscarConfig()
    cache, q, k_new, v_new, cu, want = inputs(cfg, [130, 7], [3, 4], 2, 2, 64)
    got = ops.extend_attention(
        q.cpu(), k_new.cpu(), v_new.cpu(), cu.cpu(), cache.paged_kv(torch.device("cpu")),
        backend=backend,
    )  # fmt: skip
    close(got, want, 1e-4)


def test_extend_fused_no_new_tokens():
    cfg = OscarConfig()
    cache, q, k_new, v_new, cu, _ = inputs(cfg, [130], [0], 2, 2, 64)
    got = ops.extend_attention(q, k_new, v_new, cu, cache.paged_kv(), backend="triton")
    assert got.shape == (0, 4, 64)
    planned = ops.plan_extend(cache.paged_kv(), [0], 4)
    got = ops.extend_attention(q, k_new, v_new, cu, planned, backend="triton")
    assert got.shape == (0, 4, 64)


def test_extend_fused_bf16_tensors():
    """What a GPU server hands over: bf16 q, k_new, v_new; the output comes back in bf16."""
    cfg = OscarConfig()
    cache, q, k_new, v_new, cu, want = inputs(cfg, [300, 3], [20, 9], 2, 4, 64)
    got = ops.extend_attention(q.bfloat16(), k_new, v_new, cu, cache.paged_kv(), backend="triton")
    assert got.dtype == torch.bfloat16
    close(got, want, 1e-2)


@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_is_exact_causal_attention(group, dtype):
    """A prefill with no cached prefix (ops.prefill_attention): each request's tokens attend
    causally to themselves only, exactly (the reference with every token in the exact tail)."""
    torch.manual_seed(0)
    hk, d, lens = 2, 64, [0, 1, 130, 257]
    n = sum(lens)
    q = torch.randn(n, hk * group, d, dtype=dtype)
    k, v = torch.randn(n, hk, d, dtype=dtype), torch.randn(n, hk, d, dtype=dtype)
    cu = [0]
    for t in lens:
        cu.append(cu[-1] + t)
    out = ops.prefill_attention(q, k, v, cu, scale=0.125)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for lo, hi in itertools.pairwise(cu):
        if hi == lo:
            continue
        # Naive softmax attention, query head j on KV head j // group.
        qq, kk, vv = q[lo:hi].double(), k[lo:hi].double(), v[lo:hi].double()
        kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
        logits = torch.einsum("qhd,khd->hqk", qq, kk) * 0.125
        t = hi - lo
        logits = logits.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", logits.softmax(-1), vv)
        torch.testing.assert_close(out[lo:hi].double(), ref, atol=tol, rtol=tol)


def test_prefill_attention_rejects_bad_shapes():
    q, kv = torch.randn(4, 4, 64), torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to 4"):
        ops.prefill_attention(q, kv, kv, [0, 3])
    with pytest.raises(ValueError, match="not a multiple"):
        ops.prefill_attention(torch.randn(4, 3, 64), kv, kv, [0, 4])
    with pytest.raises(ValueError, match="as many tokens"):
        ops.prefill_attention(q[:3], kv, kv, [0, 3])
