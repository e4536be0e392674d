"""Triton split-KV decode attention over packed pages plus the bf16 tail.

Grid (batch, kv_head, split): split s < NS walks pages [s * pps, (s + 1) * pps) of its request
through the page table; the last split (s == NS) takes the bf16 tail. Every program serves
all G query heads of its KV head, so each page is read once per KV head (GQA sharing).
Partials (m, l, acc) go to a workspace and `merge_kernel` combines them by log-sum-exp.

Page logits are taken in the rotated, unit-scaled basis: (H q) . (code * scale + zero), then
times the stored fp32 norm and the softmax scale (as `oscar_kv.ref.attention`). Page values
are summed in the stored basis; the merge un-rotates the page part when V was rotated
online, before adding the tail part, which is already in the model's basis.

Codes stay in their packed "planes" instead of being unpacked to channel order: for 2 bits,
plane k of a [128, D/4] byte tile holds channels 4j + k, so q is split into the same planes
once per program and each page costs per-plane dots, without shuffling the big tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from oscar_kv.triton.common import fwht_rows


@triton.jit
def _planes_of(x, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Split x [R, D] into planes: plane k holds channels PB * j + k (PB = 8 / BITS)."""
    NB: tl.constexpr = D * BITS // 8
    if BITS == 2:
        y = tl.reshape(x, [R, NB, 2, 2])  # channel 4j + 2a + b at (j, a, b)
        e, o = tl.split(y)  # b = 0 / 1
        p0, p2 = tl.split(e)
        p1, p3 = tl.split(o)
    else:
        y = tl.reshape(x, [R, NB, 2])
        p0, p1 = tl.split(y)
        p2 = p0
        p3 = p1
    return p0, p1, p2, p3


@triton.jit
def _from_planes(p0, p1, p2, p3, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    if BITS == 2:
        y = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    else:
        y = tl.join(p0, p1)
    return tl.reshape(y, [R, D])


@triton.jit
def _dot(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _k_dot(
    qp,
    kb,
    ksp,
    kzp,
    K: tl.constexpr,
    BITS: tl.constexpr,
    NGKB: tl.constexpr,
    KGB: tl.constexpr,
    NB: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """q plane [GP, NB] . dequantized K plane K of a [NGKB * KGB, NB] code tile -> [GP, BT]."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    ks = tl.load(ksp + K).to(tl.float32)
    kz = tl.load(kzp + K).to(tl.float32)
    code = tl.reshape(((kb >> (K * BITS)) & QMAX).to(tl.float32), [NGKB, KGB, NB])
    k = tl.reshape(code * ks[:, None, :] + kz[:, None, :], [NGKB * KGB, NB])
    return _dot(qp, tl.trans(k), PRECISE)


@triton.jit
def _v_plane(
    vb,
    vs,
    vz,
    K: tl.constexpr,
    BITS: tl.constexpr,
    BT: tl.constexpr,
    NVG: tl.constexpr,
    NB: tl.constexpr,
):
    QMAX: tl.constexpr = (1 << BITS) - 1
    code = ((vb >> (K * BITS)) & QMAX).to(tl.float32)
    code = tl.reshape(code, [BT, NVG, NB // NVG])
    return tl.reshape(code * vs[:, :, None] + vz[:, :, None], [BT, NB])


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
    PB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    NSUB: tl.constexpr = T // BT
    KGB: tl.constexpr = KG if KG < BT else BT  # noqa: FURB136 (constexpr, not builtin min)
    NGKB: tl.constexpr = BT // KGB  # K groups per sub-block
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

    if s == nsplit:
        # bf16 tail, exact, in the model's basis; BT tokens per step like the pages.
        slot = tl.load(tidx_ptr + b).to(tl.int64)
        n_tail = tl.load(tlen_ptr + b)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        for t0 in range(0, n_tail, BT):
            tt = t0 + tl.arange(0, BT)
            tmask = tt < n_tail
            off = tt[:, None] * kts1 + c[None, :]  # 32-bit tile offsets off a 64-bit base
            kt = tl.load(kt_ptr + (slot * kts0 + hk * kts2) + off, mask=tmask[:, None], other=0.0)
            qk = _dot(q, tl.trans(kt.to(tl.float32)), PRECISE) * qk_scale
            qk = tl.where(tmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, axis=1))  # finite: tt[0] < n_tail
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
            voff = tt[:, None] * vts1 + c[None, :]
            vt = tl.load(vt_ptr + (slot * vts0 + hk * vts2) + voff, mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p, vt.to(tl.float32), PRECISE)
    else:
        n_pages = tl.load(npages_ptr + b)
        start = s * pages_per_split
        end = tl.minimum(start + pages_per_split, n_pages)
        if ROT_Q:
            qr = fwht_rows(q, GP, D, LOG2D)
        else:
            qr = q
        q0, q1, q2, q3 = _planes_of(qr, GP, D, BITS)
        j = tl.arange(0, NB)
        gk = tl.arange(0, NGKB)
        gv = tl.arange(0, NVG)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GP], dtype=tl.float32)
        a0 = tl.zeros([GP, NB], dtype=tl.float32)
        a1 = tl.zeros([GP, NB], dtype=tl.float32)
        a2 = tl.zeros([GP, NB], dtype=tl.float32)
        a3 = tl.zeros([GP, NB], dtype=tl.float32)
        # Flattened (page, sub-block) loop: BT tokens per step keeps the code tiles small.
        for it in range(start * NSUB, end * NSUB):
            i = it // NSUB
            t0 = (it % NSUB) * BT
            tt = t0 + tl.arange(0, BT)
            page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + i).to(tl.int64)
            base = pool_ptr + page * page_stride
            row = (hk * T + tt[:, None]) * NB + j[None, :]
            kb = tl.load(base + OFF_KC + row).to(tl.int32)
            # K params of the sub-block's groups; plane k reads channel PB * j + k.
            pofs = (hk * NGK + t0 // KG + gk[:, None]) * D + j[None, :] * PB
            ksp = (base + OFF_KS).to(tl.pointer_type(tl.float16)) + pofs
            kzp = (base + OFF_KZ).to(tl.pointer_type(tl.float16)) + pofs
            qk = _k_dot(q0, kb, ksp, kzp, 0, BITS, NGKB, KGB, NB, PRECISE)
            qk += _k_dot(q1, kb, ksp, kzp, 1, BITS, NGKB, KGB, NB, PRECISE)
            if BITS == 2:
                qk += _k_dot(q2, kb, ksp, kzp, 2, BITS, NGKB, KGB, NB, PRECISE)
                qk += _k_dot(q3, kb, ksp, kzp, 3, BITS, NGKB, KGB, NB, PRECISE)
            if NORM == 1:
                nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + tt)
                qk = qk * nrm[None, :]
            elif NORM == 2:
                nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + hk * T + tt)
                qk = qk * nrm[None, :]
            qk = qk * qk_scale
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new

            vb = tl.load(base + OFF_VC + row).to(tl.int32)
            vofs = (hk * T + tt[:, None]) * NVG + gv[None, :]
            vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
            vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
            a0 = a0 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 0, BITS, BT, NVG, NB), PRECISE)
            a1 = a1 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 1, BITS, BT, NVG, NB), PRECISE)
            if BITS == 2:
                a2 = a2 * alpha[:, None] + _dot(
                    p, _v_plane(vb, vs, vz, 2, BITS, BT, NVG, NB), PRECISE
                )
                a3 = a3 * alpha[:, None] + _dot(
                    p, _v_plane(vb, vs, vz, 3, BITS, BT, NVG, NB), PRECISE
                )
        acc = _from_planes(a0, a1, a2, a3, GP, D, BITS)

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
    NSPLIT,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    ROT_V: tl.constexpr,
):
    """Log-sum-exp merge of the page splits, un-rotation, then the tail split."""
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
