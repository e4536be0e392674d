"""Triton extend (prefill-with-prefix) attention over packed pages, the bf16 tail, and the
new tokens themselves.

Grid (work item, kv_head): a work item is one block of BM new tokens of one request (the
host lists them). Its program holds R = BM * GP rows (token m, query head g of the KV head)
so GQA heads share every loaded page, and walks, in position order:
  1. the request's pages, all visible (they precede every new token), with rotated queries;
  2. the V part so far is un-rotated when V was rotated online (linear, so the running
     softmax rescaling commutes with it);
  3. the bf16 tail, all visible;
  4. the new tokens up to the block's last one, causally masked.

Step 1 comes in two forms, so that a prefix page is dequantized at most once per layer and
KV head in a forward:
- `extend_kernel` dequantizes the pages in registers (fused). It serves the requests whose
  new tokens fit one work item (n_new <= BM), i.e. every request when no request has more.
- A request with several work items would have each of them dequantize the whole prefix
  again, so with SPLIT its pages go through a workspace instead: `dequantize_prefix_kernel`
  writes each of its pages once, dequantized in the rotated, unit-scaled basis (K code *
  scale + zero, V likewise: the values the fused path feeds its dots, in fp16, or fp32 for
  PRECISE) for a chunk of page-table columns, and `extend_ws_kernel` walks that chunk for
  every work item (the norms still come from the pages); chunks carry the running softmax
  state through a buffer, and the last one finishes steps 2-4.
"""

from __future__ import annotations

import triton
import triton.language as tl

from oscar_kv.triton.common import fwht_rows
from oscar_kv.triton.paged import bf16_step, dot, from_planes, page_step, planes_of, softmax_step


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
    lse_ptr,
    ls0,
    ls1,
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
    SPLIT: tl.constexpr,
    HAS_LSE: tl.constexpr,
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
    # With SPLIT, requests of several work items belong to extend_ws_kernel: nothing to do.
    if SPLIT:
        own = n_new <= BM
    else:
        own = n_new >= 0
    r = tl.arange(0, R)
    mi = q0 + r // GP  # the row's new-token index within its request
    g = r % GP
    rmask = (g < G) & (mi < tl.where(own, n_new, 0))
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
    n_pages = tl.where(own, tl.load(npages_ptr + b), 0)
    for it in range(n_pages * NSUB):
        page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + it // NSUB).to(tl.int64)
        m, l_sum, a0, a1, a2, a3 = page_step(
            p0, p1, p2, p3, pool_ptr + page * page_stride, hk, (it % NSUB) * BT,
            m, l_sum, a0, a1, a2, a3, qk_scale,
            OFF_KC, OFF_VC, OFF_KS, OFF_KZ, OFF_VS, OFF_VZ, OFF_N,
            D, BITS, KG, VG, NORM, PRECISE, BT,
        )  # fmt: skip
    acc = from_planes(a0, a1, a2, a3, R, D, BITS)
    _finish(
        q, m, l_sum, acc, b, hk, lo, n_new, q0, mi, hq, rmask, own,
        kn_ptr, kns0, kns1, vn_ptr, vns0, vns1, out_ptr, os0, os1,
        kt_ptr, kts0, kts1, kts2, vt_ptr, vts0, vts1, vts2, tidx_ptr, tlen_ptr, qk_scale,
        lse_ptr, ls0, ls1, R, BM, D, LOG2D, ROT_V, PRECISE, BT, HAS_LSE,
    )  # fmt: skip


@triton.jit
def _finish(
    q, m, l_sum, acc, b, hk, lo, n_new, q0, mi, hq, rmask, own,
    kn_ptr, kns0, kns1, vn_ptr, vns0, vns1, out_ptr, os0, os1,
    kt_ptr, kts0, kts1, kts2, vt_ptr, vts0, vts1, vts2, tidx_ptr, tlen_ptr, qk_scale,
    lse_ptr, ls0, ls1,
    R: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
    ROT_V: tl.constexpr, PRECISE: tl.constexpr, BT: tl.constexpr, HAS_LSE: tl.constexpr,
):  # fmt: skip
    """Steps 2-4 after the pages (acc in the stored basis), then the output rows (and with
    HAS_LSE each row's log-sum-exp of its scaled logits, natural log, to lse [N, Hq])."""
    c = tl.arange(0, D)
    if ROT_V:
        acc = fwht_rows(acc, R, D, LOG2D)

    slot = tl.load(tidx_ptr + b).to(tl.int64)
    n_tail = tl.where(own, tl.load(tlen_ptr + b), 0)
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

    kv_end = tl.where(own, tl.minimum(n_new, q0 + BM), 0)
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
    if HAS_LSE:
        # m is in the log2 domain (qk_scale carries log2(e)).
        lse = (m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))) * 0.6931471805599453
        lse = tl.where(l_sum > 0, lse, float("-inf"))
        tl.store(lse_ptr + (lo + mi) * ls0 + hq * ls1, lse, mask=rmask)


@triton.jit
def dequantize_prefix_kernel(
    pool_ptr,
    page_stride,
    pt_ptr,
    pt_stride,
    npages_ptr,
    cu_ptr,
    ws_k_ptr,
    ws_v_ptr,
    col0,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    H: tl.constexpr,
    BM: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    TC: tl.constexpr,
):
    """Page-table column col0 + p of request b, KV head h -> workspace rows [128, D].

    Grid (request, column of the chunk, KV head); the workspace is [B, H, P * 128, D].
    Only requests with several work items (n_new > BM) are written; K and V stay in the
    rotated, unit-scaled basis (no norm), dequantized in fp32 as `page_step` does.
    """
    T: tl.constexpr = 128
    QMAX: tl.constexpr = (1 << BITS) - 1
    PB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    b = tl.program_id(0)
    p = tl.program_id(1)
    h = tl.program_id(2)
    n_cols = tl.num_programs(1)
    n_new = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    ok = (col0 + p < tl.load(npages_ptr + b)) & (n_new > BM)
    page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + col0 + p, mask=ok, other=0)
    base = pool_ptr + page.to(tl.int64) * page_stride
    c = tl.arange(0, D)
    first = ((b * H + h).to(tl.int64) * n_cols + p) * T * D
    n_ok = tl.where(ok, T, 0)
    for t0 in range(0, T, TC):
        t = t0 + tl.arange(0, TC)
        tm = (t < n_ok)[:, None]  # all or nothing
        byte = (h * T + t[:, None]) * NB + c[None, :] // PB
        shift = (c[None, :] % PB) * BITS
        kb = tl.load(base + OFF_KC + byte, mask=tm, other=0).to(tl.int32)
        kofs = (h * NGK + t[:, None] // KG) * D + c[None, :]
        ks = tl.load((base + OFF_KS).to(tl.pointer_type(tl.float16)) + kofs, mask=tm, other=0.0)
        kz = tl.load((base + OFF_KZ).to(tl.pointer_type(tl.float16)) + kofs, mask=tm, other=0.0)
        k = ((kb >> shift) & QMAX).to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32)
        vb = tl.load(base + OFF_VC + byte, mask=tm, other=0).to(tl.int32)
        vofs = (h * T + t[:, None]) * NVG + c[None, :] // VG
        vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs, mask=tm, other=0.0)
        vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs, mask=tm, other=0.0)
        v = ((vb >> shift) & QMAX).to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32)
        out = first + t[:, None] * D + c[None, :]
        tl.store(ws_k_ptr + out, k.to(ws_k_ptr.dtype.element_ty), mask=tm)
        tl.store(ws_v_ptr + out, v.to(ws_v_ptr.dtype.element_ty), mask=tm)


@triton.jit
def extend_ws_kernel(
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
    lse_ptr,
    ls0,
    ls1,
    ws_k_ptr,
    ws_v_ptr,
    n_cols,
    col0,
    st_m_ptr,
    st_l_ptr,
    st_acc_ptr,
    OFF_N: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BM: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    NORM: tl.constexpr,
    ROT_Q: tl.constexpr,
    ROT_V: tl.constexpr,
    PRECISE: tl.constexpr,
    BT: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    """Work items of requests with n_new > BM over one chunk of workspace columns
    [col0, col0 + n_cols); FIRST/LAST: the chunk opens/closes the request's prefix (else the
    running state comes from / goes to st_* [N, Hq(, D)], fp32)."""
    T: tl.constexpr = 128
    R: tl.constexpr = BM * GP
    NSUB: tl.constexpr = T // BT
    w = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.load(work_req_ptr + w)
    q0 = tl.load(work_q0_ptr + w)
    lo = tl.load(cu_ptr + b).to(tl.int64)
    n_new = tl.load(cu_ptr + b + 1) - lo
    own = n_new > BM
    r = tl.arange(0, R)
    mi = q0 + r // GP
    g = r % GP
    rmask = (g < G) & (mi < tl.where(own, n_new, 0))
    c = tl.arange(0, D)
    hq = hk * G + g
    qrow = (lo + mi) * qs0 + hq * qs1
    q = tl.load(q_ptr + qrow[:, None] + c[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(tl.float32)
    if ROT_Q:
        qr = fwht_rows(q, R, D, LOG2D)
    else:
        qr = q
    srow = (lo + mi) * (H * G) + hq  # state row: (new token, query head)
    if FIRST:
        m = tl.full([R], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([R], dtype=tl.float32)
        acc = tl.zeros([R, D], dtype=tl.float32)
    else:
        m = tl.load(st_m_ptr + srow, mask=rmask, other=float("-inf"))
        l_sum = tl.load(st_l_ptr + srow, mask=rmask, other=0.0)
        acc = tl.load(st_acc_ptr + srow[:, None] * D + c[None, :], mask=rmask[:, None], other=0.0)
    cols = tl.minimum(tl.load(npages_ptr + b) - col0, n_cols)
    cols = tl.where(own, tl.maximum(cols, 0), 0)
    ws = ((b * H + hk).to(tl.int64) * n_cols) * T * D
    for it in range(cols * NSUB):
        page = tl.load(pt_ptr + b.to(tl.int64) * pt_stride + col0 + it // NSUB).to(tl.int64)
        tt = (it % NSUB) * BT + tl.arange(0, BT)
        off = ws + (it // NSUB) * T * D + tt[:, None] * D + c[None, :]
        qk = dot(qr, tl.trans(tl.load(ws_k_ptr + off)), PRECISE)
        if NORM == 1:
            nrm = tl.load(
                (pool_ptr + page * page_stride + OFF_N).to(tl.pointer_type(tl.float32)) + tt
            )
            qk = qk * nrm[None, :]
        elif NORM == 2:
            nrm = tl.load(
                (pool_ptr + page * page_stride + OFF_N).to(tl.pointer_type(tl.float32))
                + hk * T
                + tt
            )
            qk = qk * nrm[None, :]
        p, alpha, m, l_sum = softmax_step(qk * qk_scale, m, l_sum)
        acc = acc * alpha[:, None] + dot(p, tl.load(ws_v_ptr + off), PRECISE)
    if LAST:
        _finish(
            q, m, l_sum, acc, b, hk, lo, n_new, q0, mi, hq, rmask, own,
            kn_ptr, kns0, kns1, vn_ptr, vns0, vns1, out_ptr, os0, os1,
            kt_ptr, kts0, kts1, kts2, vt_ptr, vts0, vts1, vts2, tidx_ptr, tlen_ptr, qk_scale,
            lse_ptr, ls0, ls1, R, BM, D, LOG2D, ROT_V, PRECISE, BT, HAS_LSE,
        )  # fmt: skip
    else:
        tl.store(st_m_ptr + srow, m, mask=rmask)
        tl.store(st_l_ptr + srow, l_sum, mask=rmask)
        tl.store(st_acc_ptr + srow[:, None] * D + c[None, :], acc, mask=rmask[:, None])
