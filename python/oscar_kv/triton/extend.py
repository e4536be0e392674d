"""Triton extend (prefill-with-prefix) attention over packed pages, the bf16 tail, and the
new tokens themselves, fused: the prefix is dequantized in registers, never in a workspace.

Grid (work item, kv_head): a work item is one block of BM new tokens of one request (the
host lists them). Its program holds R = BM * GP rows (token m, query head g of the KV head)
so GQA heads share every loaded page, and walks, in position order:
  1. the request's pages, all visible (they precede every new token), with rotated queries;
  2. the V part so far is un-rotated when V was rotated online (linear, so the running
     softmax rescaling commutes with it);
  3. the bf16 tail, all visible;
  4. the new tokens up to the block's last one, causally masked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from oscar_kv.triton.common import fwht_rows
from oscar_kv.triton.paged import bf16_step, from_planes, page_step, planes_of


@triton.jit
def extend_kernel(
    q_ptr,
    qs0,
    qs1,
    kn_ptr,
    kns0,
    kns1,
    vn_ptr,
    vns0,
    vns1,
    out_ptr,
    os0,
    os1,
    cu_ptr,
    work_req_ptr,
    work_q0_ptr,
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
    qk_scale,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BM: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    ROT_Q: tl.constexpr,
    ROT_V: tl.constexpr,
    PRECISE: tl.constexpr,
    BT: tl.constexpr,
):
    T: tl.constexpr = 128
    R: tl.constexpr = BM * GP
    NB: tl.constexpr = D * BITS // 8
    NSUB: tl.constexpr = T // BT
    w = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.load(work_req_ptr + w)
    q0 = tl.load(work_q0_ptr + w)
    lo = tl.load(cu_ptr + b).to(tl.int64)
    n_new = tl.load(cu_ptr + b + 1) - lo
    r = tl.arange(0, R)
    mi = q0 + r // GP  # the row's new-token index within its request
    g = r % GP
    rmask = (g < G) & (mi < n_new)
    c = tl.arange(0, D)
    hq = hk * G + g
    qrow = (lo + mi) * qs0 + hq * qs1
    q = tl.load(q_ptr + qrow[:, None] + c[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(tl.float32)

    m = tl.full([R], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([R], dtype=tl.float32)
    if ROT_Q:
        qr = fwht_rows(q, R, D, LOG2D)
    else:
        qr = q
    p0, p1, p2, p3 = planes_of(qr, R, D, BITS)
    a0 = tl.zeros([R, NB], dtype=tl.float32)
    a1 = tl.zeros([R, NB], dtype=tl.float32)
    a2 = tl.zeros([R, NB], dtype=tl.float32)
    a3 = tl.zeros([R, NB], dtype=tl.float32)
    n_pages = tl.load(npages_ptr + b)
    for it in range(n_pages * NSUB):
        page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + it // NSUB).to(tl.int64)
        m, l_sum, a0, a1, a2, a3 = page_step(
            p0, p1, p2, p3, pool_ptr + page * page_stride, hk, (it % NSUB) * BT,
            m, l_sum, a0, a1, a2, a3, qk_scale,
            OFF_KC, OFF_VC, OFF_KS, OFF_KZ, OFF_VS, OFF_VZ, OFF_N,
            D, BITS, KG, VG, NORM, PRECISE, BT,
        )  # fmt: skip
    acc = from_planes(a0, a1, a2, a3, R, D, BITS)
    if ROT_V:
        acc = fwht_rows(acc, R, D, LOG2D)

    slot = tl.load(tidx_ptr + b).to(tl.int64)
    n_tail = tl.load(tlen_ptr + b)
    for t0 in range(0, n_tail, BT):
        tt = t0 + tl.arange(0, BT)
        tmask = tt < n_tail
        kt = tl.load(
            kt_ptr + (slot * kts0 + hk * kts2) + (tt[:, None] * kts1 + c[None, :]),
            mask=tmask[:, None],
            other=0.0,
        )
        vt = tl.load(
            vt_ptr + (slot * vts0 + hk * vts2) + (tt[:, None] * vts1 + c[None, :]),
            mask=tmask[:, None],
            other=0.0,
        )
        m, l_sum, acc = bf16_step(q, kt, vt, tmask[None, :], m, l_sum, acc, qk_scale, PRECISE)

    kv_end = tl.minimum(n_new, q0 + BM)
    for j0 in range(0, kv_end, BT):
        jj = j0 + tl.arange(0, BT)
        jmask = jj < n_new
        krow = (lo + jj) * kns0 + hk * kns1
        kn = tl.load(kn_ptr + krow[:, None] + c[None, :], mask=jmask[:, None], other=0.0)
        vrow = (lo + jj) * vns0 + hk * vns1
        vn = tl.load(vn_ptr + vrow[:, None] + c[None, :], mask=jmask[:, None], other=0.0)
        valid = jmask[None, :] & (jj[None, :] <= mi[:, None])
        m, l_sum, acc = bf16_step(q, kn, vn, valid, m, l_sum, acc, qk_scale, PRECISE)

    # Padding rows (g >= G or past the request's tokens) are not stored.
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    orow = (lo + mi) * os0 + hq * os1
    tl.store(
        out_ptr + orow[:, None] + c[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None],
    )
