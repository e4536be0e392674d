"""bf16 split-KV paged decode in Triton: the benchmark's same-toolchain baseline.

Same structure as the packed kernel (grid over batch, KV head and split, GQA heads sharing
every page, log-sum-exp merge by `merge_kernel`), reading a plain bf16 paged cache
k_cache/v_cache [num_pages, PAGE, H_kv, D] instead of packed pages, so the speedup measured
against it isolates the bytes saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oscar_kv.triton._env import INTERPRETED, in_scope
from oscar_kv.triton.decode import merge_kernel

_LOG2E = 1.4426950408889634


@triton.jit
def bf16_split_kernel(
    q_ptr,
    qs0,
    qs1,
    k_ptr,
    v_ptr,
    cs0,
    cs1,
    cs2,
    pt_ptr,
    pt_stride,
    seq_lens_ptr,
    mid_o_ptr,
    mid_m_ptr,
    mid_l_ptr,
    pages_per_split,
    qk_scale,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    INTERP: tl.constexpr,
    BT: tl.constexpr,
):
    NSUB: tl.constexpr = PAGE // BT
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    nsplit = tl.num_programs(2)
    gq = tl.arange(0, GP)
    qmask = gq < G
    c = tl.arange(0, D)
    hq = hk * G + gq
    q = tl.load(
        q_ptr + b.to(tl.int64) * qs0 + (hq[:, None] * qs1 + c[None, :]),
        mask=qmask[:, None],
        other=0.0,
    ).to(tl.bfloat16)
    seq_len = tl.load(seq_lens_ptr + b)
    start = s * pages_per_split
    end = tl.minimum(start + pages_per_split, tl.cdiv(seq_len, PAGE))
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for it in range(start * NSUB, end * NSUB):
        i = it // NSUB
        tt = (it % NSUB) * BT + tl.arange(0, BT)
        page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + i).to(tl.int64)
        tmask = i * PAGE + tt < seq_len
        # Scalar (64-bit) page base first, so the tile offsets stay 32-bit.
        row = page * cs0 + hk * cs2
        off = tt[:, None] * cs1 + c[None, :]
        k = tl.load(k_ptr + row + off, mask=tmask[:, None], other=0.0)
        if INTERP:
            # The interpreter's dot multiplies bf16 as raw 16-bit integers.
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(qk - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row + off, mask=tmask[:, None], other=0.0)
        if INTERP:
            pv = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(tl.bfloat16), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    mid = (b * HKV * G + hq) * nsplit + s
    tl.store(mid_m_ptr + mid, m, mask=qmask)
    tl.store(mid_l_ptr + mid, l_sum, mask=qmask)
    tl.store(mid_o_ptr + mid[:, None].to(tl.int64) * D + c[None, :], acc, mask=qmask[:, None])


@in_scope
def bf16_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    block_tokens: int = 32,
) -> torch.Tensor:
    """q [B, Hq, D] over a bf16 paged cache [num_pages, PAGE, H_kv, D]; out like q.

    ``block_tokens`` per inner step (divides PAGE): 32 compiles to 128 registers on sm_90a,
    64 to 242.
    """
    batch, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    max_pages = page_table.shape[1]
    if num_splits is None:
        num_splits = 1
        if q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = max(1, min(max_pages, triton.cdiv(2 * sms, batch * hkv)))
    pps = max(1, triton.cdiv(max_pages, num_splits))
    ns = max(1, triton.cdiv(max_pages, pps))
    mid_o = torch.empty((batch, hq, ns, d), dtype=torch.float32, device=q.device)
    mid_m = torch.empty((batch, hq, ns), dtype=torch.float32, device=q.device)
    mid_l = torch.empty((batch, hq, ns), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = d**-0.5 if scale is None else scale
    bf16_split_kernel[(batch, hkv, ns)](
        q,
        q.stride(0),
        q.stride(1),
        k_cache,
        v_cache,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        page_table,
        page_table.stride(0),
        seq_lens,
        mid_o,
        mid_m,
        mid_l,
        pps,
        scale * _LOG2E,
        HKV=hkv,
        G=group,
        GP=max(16, triton.next_power_of_2(group)),
        D=d,
        PAGE=page,
        INTERP=INTERPRETED,
        BT=min(page, block_tokens),
        num_warps=4,
    )
    # The merge treats its last split specially only for un-rotation, which is off here.
    merge_kernel[(batch, hkv)](
        mid_o,
        mid_m,
        mid_l,
        out,
        out.stride(0),
        out.stride(1),
        out,
        0,
        0,
        ns - 1,
        HKV=hkv,
        G=group,
        GP=triton.next_power_of_2(group),
        D=d,
        LOG2D=max(1, d.bit_length() - 1),
        ROT_V=False,
        HAS_LSE=False,
        num_warps=4,
    )
    return out
