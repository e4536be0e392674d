"""Triton split-KV decode attention over packed pages plus the bf16 tail.

Grid (batch, kv_head, split): split s < NS walks pages [s * pps, (s + 1) * pps) of its request
through the page table; the last split (s == NS) takes the bf16 tail. Every program serves
all G query heads of its KV head, so each page is read once per KV head (GQA sharing).
Partials (m, l, acc) go to a workspace and `merge_kernel` combines them by log-sum-exp.

The per-block work is `oscar_kv.triton.paged`'s: `page_step_f16` (fp16 tensor-core operands
in channel order, codes turned into fp16 by bit tricks instead of int-to-float converts, the
value accumulator transposed) or, with PRECISE, `page_step` (fp32 dequantization in planes,
IEEE dots). The merge un-rotates the page part when V was rotated online, before adding the
tail part, which is already in the model's basis.
"""

from __future__ import annotations

import triton
import triton.language as tl

from oscar_kv.triton.common import fwht_rows
from oscar_kv.triton.paged import bf16_step, from_planes, page_step, page_step_f16, planes_of


@triton.jit
def decode_split_kernel(
    q_ptr,
    qs0,
    qs1,
    pool_ptr,
    page_stride,
    pt_ptr,
    pt_stride,
    npages_ptr,
    kt_ptr,
    kts0,
    kts1,
    kts2,
    vt_ptr,
    vts0,
    vts1,
    vts2,
    tidx_ptr,
    tlen_ptr,
    mid_o_ptr,
    mid_m_ptr,
    mid_l_ptr,
    pages_per_split,
    qk_scale,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    ROT_Q: tl.constexpr,
    PRECISE: tl.constexpr,
    BT: tl.constexpr,
):
    T: tl.constexpr = 128
    NB: tl.constexpr = D * BITS // 8
    NSUB: tl.constexpr = T // BT
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    nsplit = tl.num_programs(2) - 1
    gq = tl.arange(0, GP)
    qmask = gq < G
    c = tl.arange(0, D)
    hq = hk * G + gq
    q = tl.load(
        q_ptr + b.to(tl.int64) * qs0 + (hq[:, None] * qs1 + c[None, :]),
        mask=qmask[:, None],
        other=0.0,
    ).to(tl.float32)
    mid = (b * HKV * G + hq) * (nsplit + 1) + s

    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GP], dtype=tl.float32)
    if s == nsplit:
        # bf16 tail, exact, in the model's basis; BT tokens per step like the pages.
        slot = tl.load(tidx_ptr + b).to(tl.int64)
        n_tail = tl.load(tlen_ptr + b)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        for t0 in range(0, n_tail, BT):
            tt = t0 + tl.arange(0, BT)
            tmask = tt < n_tail
            off = tt[:, None] * kts1 + c[None, :]  # 32-bit tile offsets off a 64-bit base
            kt = tl.load(kt_ptr + (slot * kts0 + hk * kts2) + off, mask=tmask[:, None], other=0.0)
            voff = tt[:, None] * vts1 + c[None, :]
            vt = tl.load(vt_ptr + (slot * vts0 + hk * vts2) + voff, mask=tmask[:, None], other=0.0)
            m, l_sum, acc = bf16_step(q, kt, vt, tmask[None, :], m, l_sum, acc, qk_scale, PRECISE)
    else:
        n_pages = tl.load(npages_ptr + b)
        start = s * pages_per_split
        end = tl.minimum(start + pages_per_split, n_pages)
        if ROT_Q:
            qr = fwht_rows(q, GP, D, LOG2D)
        else:
            qr = q
        if PRECISE:
            # fp32 dequantization and IEEE dots (tests compare it with the reference tightly).
            q0, q1, q2, q3 = planes_of(qr, GP, D, BITS)
            a0 = tl.zeros([GP, NB], dtype=tl.float32)
            a1 = tl.zeros([GP, NB], dtype=tl.float32)
            a2 = tl.zeros([GP, NB], dtype=tl.float32)
            a3 = tl.zeros([GP, NB], dtype=tl.float32)
            for it in range(start * NSUB, end * NSUB):
                page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + it // NSUB).to(tl.int64)
                m, l_sum, a0, a1, a2, a3 = page_step(
                    q0, q1, q2, q3, pool_ptr + page * page_stride, hk, (it % NSUB) * BT,
                    m, l_sum, a0, a1, a2, a3, qk_scale,
                    OFF_KC, OFF_VC, OFF_KS, OFF_KZ, OFF_VS, OFF_VZ, OFF_N,
                    D, BITS, KG, VG, NORM, PRECISE, BT,
                )  # fmt: skip
            acc = from_planes(a0, a1, a2, a3, GP, D, BITS)
        else:
            # fp16 operands in channel order; the value accumulator is kept transposed.
            qh = qr.to(tl.float16)
            acc_t = tl.zeros([D, GP], dtype=tl.float32)
            # Flattened (page, block) loop: BT tokens per step keeps the code tiles small.
            for it in range(start * NSUB, end * NSUB):
                page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + it // NSUB).to(tl.int64)
                m, l_sum, acc_t = page_step_f16(
                    qh, pool_ptr + page * page_stride, hk, (it % NSUB) * BT,
                    m, l_sum, acc_t, qk_scale,
                    OFF_KC, OFF_VC, OFF_KS, OFF_KZ, OFF_VS, OFF_VZ, OFF_N,
                    D, BITS, KG, VG, NORM, BT,
                )  # fmt: skip
            acc = tl.trans(acc_t)

    tl.store(mid_m_ptr + mid, m, mask=qmask)
    tl.store(mid_l_ptr + mid, l_sum, mask=qmask)
    tl.store(mid_o_ptr + mid[:, None].to(tl.int64) * D + c[None, :], acc, mask=qmask[:, None])


@triton.jit
def _merge_one(mid_o_ptr, mid_m_ptr, mid_l_ptr, r, qmask, c, m, l_sum, acc, D: tl.constexpr):
    ms = tl.load(mid_m_ptr + r, mask=qmask, other=float("-inf"))
    ls = tl.load(mid_l_ptr + r, mask=qmask, other=0.0)
    os_ = tl.load(
        mid_o_ptr + r[:, None].to(tl.int64) * D + c[None, :], mask=qmask[:, None], other=0.0
    )
    m_new = tl.maximum(m, ms)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    wa = tl.exp2(m - m_ref)
    wb = tl.exp2(ms - m_ref)
    return m_new, l_sum * wa + ls * wb, acc * wa[:, None] + os_ * wb[:, None]


@triton.jit
def merge_kernel(
    mid_o_ptr,
    mid_m_ptr,
    mid_l_ptr,
    out_ptr,
    os0,
    os1,
    lse_ptr,
    ls0,
    ls1,
    NSPLIT,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    ROT_V: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    """Log-sum-exp merge of the page splits, un-rotation, then the tail split; with HAS_LSE
    also each head's log-sum-exp of its scaled logits (natural log) to lse [B, Hq]."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    gq = tl.arange(0, GP)
    qmask = gq < G
    c = tl.arange(0, D)
    hq = hk * G + gq
    row = (b * HKV * G + hq) * (NSPLIT + 1)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for s in range(NSPLIT):
        m, l_sum, acc = _merge_one(
            mid_o_ptr, mid_m_ptr, mid_l_ptr, row + s, qmask, c, m, l_sum, acc, D
        )
    if ROT_V:
        # Pages were summed in the rotated basis; the tail split is in the model's basis.
        acc = fwht_rows(acc, GP, D, LOG2D)
    m, l_sum, acc = _merge_one(
        mid_o_ptr, mid_m_ptr, mid_l_ptr, row + NSPLIT, qmask, c, m, l_sum, acc, D
    )
    # Padding rows (qmask false) have l_sum == 0; keep them finite.
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(
        out_ptr + b.to(tl.int64) * os0 + hq[:, None] * os1 + c[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qmask[:, None],
    )
    if HAS_LSE:
        # m is in the log2 domain (qk_scale carries log2(e)); no key at all gives -inf.
        lse = (m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))) * 0.6931471805599453
        lse = tl.where(l_sum > 0, lse, float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * ls0 + hq * ls1, lse, mask=qmask)
