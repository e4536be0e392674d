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
def _k_plane(
    kb,
    ks,
    kz,
    K: tl.constexpr,
    BITS: tl.constexpr,
    NGK: tl.constexpr,
    KG: tl.constexpr,
    NB: tl.constexpr,
):
    QMAX: tl.constexpr = (1 << BITS) - 1
    code = ((kb >> (K * BITS)) & QMAX).to(tl.float32)
    code = tl.reshape(code, [NGK, KG, NB])
    return tl.reshape(code * ks[:, None, :] + kz[:, None, :], [NGK * KG, NB])


@triton.jit
def _v_plane(vb, vs, vz, K: tl.constexpr, BITS: tl.constexpr, NVG: tl.constexpr, NB: tl.constexpr):
    QMAX: tl.constexpr = (1 << BITS) - 1
    T: tl.constexpr = 128
    code = ((vb >> (K * BITS)) & QMAX).to(tl.float32)
    code = tl.reshape(code, [T, NVG, NB // NVG])
    return tl.reshape(code * vs[:, :, None] + vz[:, :, None], [T, NB])


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
):
    T: tl.constexpr = 128
    PB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    nsplit = tl.num_programs(2) - 1
    gq = tl.arange(0, GP)
    qmask = gq < G
    t = tl.arange(0, T)
    c = tl.arange(0, D)
    hq = hk * G + gq
    q = tl.load(
        q_ptr + b.to(tl.int64) * qs0 + hq[:, None] * qs1 + c[None, :],
        mask=qmask[:, None],
        other=0.0,
    ).to(tl.float32)
    mid = (b * HKV * G + hq) * (nsplit + 1) + s

    if s == nsplit:
        # bf16 tail, exact, in the model's basis.
        slot = tl.load(tidx_ptr + b).to(tl.int64)
        n_tail = tl.load(tlen_ptr + b)
        tmask = t < n_tail
        kt = tl.load(
            kt_ptr + slot * kts0 + t[:, None] * kts1 + hk * kts2 + c[None, :],
            mask=tmask[:, None],
            other=0.0,
        ).to(tl.float32)
        qk = _dot(q, tl.trans(kt), PRECISE) * qk_scale
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m = tl.max(qk, axis=1)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(qk - m_ref[:, None])
        l_sum = tl.sum(p, axis=1)
        vt = tl.load(
            vt_ptr + slot * vts0 + t[:, None] * vts1 + hk * vts2 + c[None, :],
            mask=tmask[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = _dot(p, vt, PRECISE)
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
        gk = tl.arange(0, NGK)
        gv = tl.arange(0, NVG)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GP], dtype=tl.float32)
        a0 = tl.zeros([GP, NB], dtype=tl.float32)
        a1 = tl.zeros([GP, NB], dtype=tl.float32)
        a2 = tl.zeros([GP, NB], dtype=tl.float32)
        a3 = tl.zeros([GP, NB], dtype=tl.float32)
        for i in range(start, end):
            page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + i).to(tl.int64)
            base = pool_ptr + page * page_stride
            row = (hk * T + t[:, None]) * NB + j[None, :]
            kb = tl.load(base + OFF_KC + row).to(tl.int32)
            # Per-channel K params of plane k live at channel PB * j + k.
            ksp = (base + OFF_KS).to(tl.pointer_type(tl.float16))
            kzp = (base + OFF_KZ).to(tl.pointer_type(tl.float16))
            pofs = (hk * NGK + gk[:, None]) * D + j[None, :] * PB
            qk = _dot(
                q0,
                tl.trans(
                    _k_plane(
                        kb,
                        tl.load(ksp + pofs).to(tl.float32),
                        tl.load(kzp + pofs).to(tl.float32),
                        0,
                        BITS,
                        NGK,
                        KG,
                        NB,
                    )
                ),
                PRECISE,
            )
            qk += _dot(
                q1,
                tl.trans(
                    _k_plane(
                        kb,
                        tl.load(ksp + pofs + 1).to(tl.float32),
                        tl.load(kzp + pofs + 1).to(tl.float32),
                        1,
                        BITS,
                        NGK,
                        KG,
                        NB,
                    )
                ),
                PRECISE,
            )
            if BITS == 2:
                qk += _dot(
                    q2,
                    tl.trans(
                        _k_plane(
                            kb,
                            tl.load(ksp + pofs + 2).to(tl.float32),
                            tl.load(kzp + pofs + 2).to(tl.float32),
                            2,
                            BITS,
                            NGK,
                            KG,
                            NB,
                        )
                    ),
                    PRECISE,
                )
                qk += _dot(
                    q3,
                    tl.trans(
                        _k_plane(
                            kb,
                            tl.load(ksp + pofs + 3).to(tl.float32),
                            tl.load(kzp + pofs + 3).to(tl.float32),
                            3,
                            BITS,
                            NGK,
                            KG,
                            NB,
                        )
                    ),
                    PRECISE,
                )
            if NORM == 1:
                nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + t)
                qk = qk * nrm[None, :]
            elif NORM == 2:
                nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + hk * T + t)
                qk = qk * nrm[None, :]
            qk = qk * qk_scale
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new

            vb = tl.load(base + OFF_VC + row).to(tl.int32)
            vofs = (hk * T + t[:, None]) * NVG + gv[None, :]
            vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
            vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
            a0 = a0 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 0, BITS, NVG, NB), PRECISE)
            a1 = a1 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 1, BITS, NVG, NB), PRECISE)
            if BITS == 2:
                a2 = a2 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 2, BITS, NVG, NB), PRECISE)
                a3 = a3 * alpha[:, None] + _dot(p, _v_plane(vb, vs, vz, 3, BITS, NVG, NB), PRECISE)
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
