"""Triton fused rotate + norm + quantize + pack of whole pages, and the page dequantizer.

`quantize_pages_kernel` writes pages byte-identical to `oscar_kv.ref.quantize_kv` (given the
pinned norm reduction order, see `oscar_kv.ref.quant.token_norms`). One program handles one
(page, KV head, K group of tokens); for norm="token" every program recomputes its tokens'
norms over all heads, which costs H-fold FWHT work but needs no cross-program reduction.
GPU launches must pass ``enable_fp_fusion=False``: a fused x*x + y would change the norms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from oscar_kv.triton.common import codes_of, fwht_rows, group_params, pack_rows, tree_sum_rows

NORM_NONE = tl.constexpr(0)
NORM_TOKEN = tl.constexpr(1)
NORM_HEAD = tl.constexpr(2)


@triton.jit
def _load_rows(ptr, row, hh, t, s0, s1, s2, s3, D: tl.constexpr):
    c = tl.arange(0, D)
    # 64-bit scalar base, 32-bit tile offsets (a 64-bit tile doubles its registers).
    base = ptr + (row * s0 + hh * s2)
    return tl.load(base + (t[:, None] * s1 + c[None, :] * s3)).to(tl.float32)


@triton.jit
def quantize_pages_kernel(
    k_ptr,
    v_ptr,
    src_ptr,
    page_ids_ptr,
    pool_ptr,
    page_stride,
    ks0,
    ks1,
    ks2,
    ks3,
    vs0,
    vs1,
    vs2,
    vs3,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    ROT_K: tl.constexpr,
    ROT_V: tl.constexpr,
):
    # One program = one K group of KG tokens of one head: groups are independent, so the
    # page spreads over H * 128 / KG programs and each holds a [KG, D] tile.
    T: tl.constexpr = 128
    QMAX: tl.constexpr = (1 << BITS) - 1
    RB: tl.constexpr = D * BITS // 8
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG

    i = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    page = tl.load(page_ids_ptr + i).to(tl.int64)
    if page < 0:  # a fixed grid over requests: entries without a completed page write nothing
        return
    row = tl.load(src_ptr + i).to(tl.int64)
    base = pool_ptr + page * page_stride
    t = g * KG + tl.arange(0, KG)
    c = tl.arange(0, D)

    # ---- K: rotate, scale by the norm, per-channel min/max over the group's tokens.
    k = _load_rows(k_ptr, row, h, t, ks0, ks1, ks2, ks3, D)
    if ROT_K:
        k = fwht_rows(k, KG, D, LOG2D)
    if NORM == NORM_TOKEN:
        # Pinned order: per-head halves tree, then heads summed left to right.
        n2 = tl.zeros([KG], dtype=tl.float32)
        for hh in tl.range(H):
            kh = _load_rows(k_ptr, row, hh, t, ks0, ks1, ks2, ks3, D)
            if ROT_K:
                kh = fwht_rows(kh, KG, D, LOG2D)
            n2 = n2 + tree_sum_rows(kh * kh, KG, D, LOG2D)  # 0 + s0 == s0 exactly
        n = tl.sqrt_rn(n2)
    elif NORM == NORM_HEAD:
        n = tl.sqrt_rn(tree_sum_rows(k * k, KG, D, LOG2D))
    if NORM != NORM_NONE:
        nb = n[:, None]
        k = tl.where(nb > 0, tl.div_rn(k, tl.where(nb > 0, nb, 1.0)), 0.0)
        if NORM == NORM_TOKEN:
            if h == 0:
                tl.store((base + OFF_N).to(tl.pointer_type(tl.float32)) + t, n)
        else:
            tl.store((base + OFF_N).to(tl.pointer_type(tl.float32)) + h * T + t, n)

    zero, zero_f, scale, scale_f = group_params(tl.min(k, axis=0), tl.max(k, axis=0), QMAX)
    codes = codes_of(k, zero_f[None, :], scale_f[None, :], QMAX)
    packed = pack_rows(codes, KG, D, BITS)
    j = tl.arange(0, RB)
    tl.store(base + OFF_KC + (h * T + t[:, None]) * RB + j[None, :], packed)
    soff = (h * NGK + g) * D + c
    tl.store((base + OFF_KS).to(tl.pointer_type(tl.float16)) + soff, scale)
    tl.store((base + OFF_KZ).to(tl.pointer_type(tl.float16)) + soff, zero)

    # ---- V: per-token groups of VG channels.
    v = _load_rows(v_ptr, row, h, t, vs0, vs1, vs2, vs3, D)
    if ROT_V:
        v = fwht_rows(v, KG, D, LOG2D)
    vg = tl.reshape(v, [KG, NVG, VG])
    zero, zero_f, scale, scale_f = group_params(tl.min(vg, axis=2), tl.max(vg, axis=2), QMAX)
    codes = codes_of(vg, zero_f[:, :, None], scale_f[:, :, None], QMAX)
    packed = pack_rows(tl.reshape(codes, [KG, D]), KG, D, BITS)
    tl.store(base + OFF_VC + (h * T + t[:, None]) * RB + j[None, :], packed)
    gv = tl.arange(0, NVG)
    soff = (h * T + t[:, None]) * NVG + gv[None, :]
    tl.store((base + OFF_VS).to(tl.pointer_type(tl.float16)) + soff, scale)
    tl.store((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + soff, zero)


@triton.jit
def dequantize_pages_kernel(
    pool_ptr,
    page_stride,
    page_ids_ptr,
    k_out_ptr,
    v_out_ptr,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    ROT_K: tl.constexpr,
    ROT_V: tl.constexpr,
):
    """Pages back to K and V in the model's basis: out [n, 128, H, D] (contiguous).

    Grid (page, head, 32-token chunk), so a program holds a [32, D] tile.
    """
    T: tl.constexpr = 128
    QMAX: tl.constexpr = (1 << BITS) - 1
    PB: tl.constexpr = 8 // BITS
    RB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    TC: tl.constexpr = 32
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(page_ids_ptr + i).to(tl.int64)
    base = pool_ptr + page * page_stride
    t = tl.program_id(2) * TC + tl.arange(0, TC)
    c = tl.arange(0, D)
    byte = (h * T + t[:, None]) * RB + c[None, :] // PB
    shift = (c[None, :] % PB) * BITS

    kc = ((tl.load(base + OFF_KC + byte).to(tl.int32) >> shift) & QMAX).to(tl.float32)
    kofs = (h * NGK + t[:, None] // KG) * D + c[None, :]
    ks = tl.load((base + OFF_KS).to(tl.pointer_type(tl.float16)) + kofs).to(tl.float32)
    kz = tl.load((base + OFF_KZ).to(tl.pointer_type(tl.float16)) + kofs).to(tl.float32)
    k = kc * ks + kz
    if NORM == NORM_TOKEN:
        k = k * tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + t)[:, None]
    elif NORM == NORM_HEAD:
        k = k * tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + h * T + t)[:, None]
    if ROT_K:
        k = fwht_rows(k, TC, D, LOG2D)

    vc = ((tl.load(base + OFF_VC + byte).to(tl.int32) >> shift) & QMAX).to(tl.float32)
    vofs = (h * T + t[:, None]) * NVG + c[None, :] // VG
    vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
    vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
    v = vc * vs + vz
    if ROT_V:
        v = fwht_rows(v, TC, D, LOG2D)

    first = (i.to(tl.int64) * T * H + h) * D
    out = t[:, None] * (H * D) + c[None, :]
    tl.store(k_out_ptr + first + out, k.to(k_out_ptr.dtype.element_ty))
    tl.store(v_out_ptr + first + out, v.to(v_out_ptr.dtype.element_ty))


@triton.jit
def fwht_kernel(x_ptr, out_ptr, n_rows, ROWS: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Rows of a contiguous [n_rows, D] tensor -> fwht, output in out's dtype."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, D)
    mask = (r < n_rows)[:, None]
    off = r[:, None].to(tl.int64) * D + c[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = fwht_rows(x, ROWS, D, LOG2D)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)
