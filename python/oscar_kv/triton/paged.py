"""Device functions that walk packed pages and bf16 tiles with an online softmax.

Shared by the decode and the extend kernels. A program holds R query rows of one KV head
(decode: the G heads of one token; extend: BM tokens x G heads) and folds blocks of BT keys
into its running (m, l, acc) state, in exp2 space (logits pre-multiplied by log2(e)).

Page logits are taken in the rotated, unit-scaled basis: (H q) . (code * scale + zero), then
times the stored fp32 norm and the softmax scale (as `oscar_kv.ref.attention`). Page values
are summed in the stored basis; the caller un-rotates the page part when V was rotated
online, before bf16 keys (already in the model's basis) are folded in.

`page_step` (the decode's PRECISE path, and extend) dequantizes in fp32 and keeps the codes
in their packed "planes" instead of unpacking them to channel order: for 2 bits, plane k of
a [BT, D/4] byte tile holds channels 4j + k, so q is split into the same planes once per
program and each block costs per-plane dots.

`page_step_f16` (the decode's fast path) unpacks the codes to channel order as exact fp16
integers without conversion instructions (`codes_f16`: one integer multiply copies a byte
into both halves of a 32-bit word, shifted so that one field pair of adjacent channels sits
at bit 0 of each half; AND plus OR 0x6400 makes each half the fp16 1024 + code, one packed
fp16 subtract with an immediate leaves the code), so every 32-bit instruction serves two
channels and the K scale/zero rows, contiguous [D] fp16 rows, line up with the codes without
shuffles. The fp16 dequantization (code * scale + zero, one rounding) feeds the tensor cores.
The value dot is taken transposed, acc^T [D, R] += V^T P^T, which puts the head dimension in
the M slot of the MMA: at D >= 64 with 4 warps Triton issues one warpgroup MMA (sm_90a) per
16 tokens instead of per-warp MMAs with operand register shuffles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def planes_of(x, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
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
def from_planes(p0, p1, p2, p3, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    if BITS == 2:
        y = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    else:
        y = tl.join(p0, p1)
    return tl.reshape(y, [R, D])


@triton.jit
def dot(a, b, PRECISE: tl.constexpr):
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
    """q plane [R, NB] . dequantized K plane K of a [NGKB * KGB, NB] code tile -> [R, BT]."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    ks = tl.load(ksp + K).to(tl.float32)
    kz = tl.load(kzp + K).to(tl.float32)
    code = tl.reshape(((kb >> (K * BITS)) & QMAX).to(tl.float32), [NGKB, KGB, NB])
    k = tl.reshape(code * ks[:, None, :] + kz[:, None, :], [NGKB * KGB, NB])
    return dot(qp, tl.trans(k), PRECISE)


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
def softmax_step(qk, m, l_sum):
    """Fold logits qk [R, BT] (exp2 space, -inf = masked) into (m, l); -> p, alpha, m, l.

    A row whose keys are all masked so far keeps m = -inf and gets p = 0, alpha = 0.
    """
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    return p, alpha, m_new, l_sum * alpha + tl.sum(p, axis=1)


@triton.jit
def page_step(
    q0,
    q1,
    q2,
    q3,
    base,
    hk,
    t0,
    m,
    l_sum,
    a0,
    a1,
    a2,
    a3,
    qk_scale,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    PRECISE: tl.constexpr,
    BT: tl.constexpr,
):
    """Fold tokens [t0, t0 + BT) of the page at ``base`` (KV head hk) into the state.

    q planes [R, NB] are the rotated queries; a0..a3 [R, NB] the value planes' accumulators.
    """
    T: tl.constexpr = 128
    PB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    KGB: tl.constexpr = KG if KG < BT else BT  # noqa: FURB136 (constexpr, not builtin min)
    NGKB: tl.constexpr = BT // KGB  # K groups per block
    tt = t0 + tl.arange(0, BT)
    j = tl.arange(0, NB)
    gk = tl.arange(0, NGKB)
    gv = tl.arange(0, NVG)
    row = (hk * T + tt[:, None]) * NB + j[None, :]
    kb = tl.load(base + OFF_KC + row).to(tl.int32)
    # K params of the block's groups; plane k reads channel PB * j + k.
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
    p, alpha, m, l_sum = softmax_step(qk * qk_scale, m, l_sum)

    vb = tl.load(base + OFF_VC + row).to(tl.int32)
    vofs = (hk * T + tt[:, None]) * NVG + gv[None, :]
    vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
    vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs).to(tl.float32)
    a0 = a0 * alpha[:, None] + dot(p, _v_plane(vb, vs, vz, 0, BITS, BT, NVG, NB), PRECISE)
    a1 = a1 * alpha[:, None] + dot(p, _v_plane(vb, vs, vz, 1, BITS, BT, NVG, NB), PRECISE)
    if BITS == 2:
        a2 = a2 * alpha[:, None] + dot(p, _v_plane(vb, vs, vz, 2, BITS, BT, NVG, NB), PRECISE)
        a3 = a3 * alpha[:, None] + dot(p, _v_plane(vb, vs, vz, 3, BITS, BT, NVG, NB), PRECISE)
    return m, l_sum, a0, a1, a2, a3


@triton.jit
def codes_f16(b, R: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr):
    """Code bytes [R, NB] -> the codes as exact fp16 integers [R, NB * 8 / BITS], channel order.

    A field's channel c sits at bit (c * BITS) % 8 of byte c * BITS / 8. The byte w goes to
    32-bit words whose low/high halves hold adjacent channels (c, c + 1) at bits 0..BITS-1:
    w | w << (16 - BITS) puts w in the low half and w >> BITS in the high half; for 2 bits
    the second pair is that word >> 4. Masking the field and OR-ing 0x6400 (fp16 1024, ulp 1)
    gives 1024 + code in each half; subtracting 1024 is exact.
    """
    PB: tl.constexpr = 8 // BITS
    D: tl.constexpr = NB * PB
    w = b.to(tl.int32)
    if BITS == 2:
        w2 = w | (w << 14)
        lo_pair = (w2 & 0x30003) | 0x64006400
        hi_pair = ((w2 >> 4) & 0x30003) | 0x64006400
        x = tl.reshape(tl.join(lo_pair, hi_pair), [R, D // 2])
    else:
        x = ((w | (w << 12)) & 0xF000F) | 0x64006400
    lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), [R, D]) - 1024.0


@triton.jit
def page_step_f16(
    q,
    base,
    hk,
    t0,
    m,
    l_sum,
    acc_t,
    qk_scale,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KZ: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VZ: tl.constexpr,
    OFF_N: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    KG: tl.constexpr,
    VG: tl.constexpr,
    NORM: tl.constexpr,
    BT: tl.constexpr,
):
    """`page_step` on fp16 tensor-core operands in channel order (the decode's fast path).

    q [R, D] fp16 (rotated); acc_t [D, R] fp32 is the value accumulator transposed. Codes
    become exact fp16 integers (`codes_f16`) and are dequantized by fp16 FMAs (code * scale
    + zero, one rounding: what the fp32 path rounds to fp16 before its dot).
    """
    T: tl.constexpr = 128
    PB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // PB
    NGK: tl.constexpr = T // KG
    NVG: tl.constexpr = D // VG
    KGB: tl.constexpr = KG if KG < BT else BT  # noqa: FURB136 (constexpr, not builtin min)
    NGKB: tl.constexpr = BT // KGB  # K groups per block
    tt = t0 + tl.arange(0, BT)
    j = tl.arange(0, NB)
    c = tl.arange(0, D)
    gk = tl.arange(0, NGKB)
    gv = tl.arange(0, NVG)
    row = (hk * T + tt[:, None]) * NB + j[None, :]
    kb = tl.load(base + OFF_KC + row)
    pofs = (hk * NGK + t0 // KG + gk[:, None]) * D + c[None, :]
    ks = tl.load((base + OFF_KS).to(tl.pointer_type(tl.float16)) + pofs)
    kz = tl.load((base + OFF_KZ).to(tl.pointer_type(tl.float16)) + pofs)
    kc = tl.reshape(codes_f16(kb, BT, NB, BITS), [NGKB, KGB, D])
    k = tl.reshape(kc * ks[:, None, :] + kz[:, None, :], [BT, D])
    qk = tl.dot(q, tl.trans(k))
    # The softmax scale rides on the per-token norms: one multiply per logit.
    if NORM == 1:
        nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + tt)
        qk = qk * (nrm * qk_scale)[None, :]
    elif NORM == 2:
        nrm = tl.load((base + OFF_N).to(tl.pointer_type(tl.float32)) + hk * T + tt)
        qk = qk * (nrm * qk_scale)[None, :]
    else:
        qk = qk * qk_scale
    p, alpha, m, l_sum = softmax_step(qk, m, l_sum)

    vb = tl.load(base + OFF_VC + row)
    vofs = (hk * T + tt[:, None]) * NVG + gv[None, :]
    vs = tl.load((base + OFF_VS).to(tl.pointer_type(tl.float16)) + vofs)
    vz = tl.load((base + OFF_VZ).to(tl.pointer_type(tl.float16)) + vofs)
    vc = tl.reshape(codes_f16(vb, BT, NB, BITS), [BT, NVG, VG])
    v = tl.reshape(vc * vs[:, :, None] + vz[:, :, None], [BT, D])
    acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), tl.trans(p.to(tl.float16)))
    return m, l_sum, acc_t


@triton.jit
def bf16_step(q, k, v, valid, m, l_sum, acc, qk_scale, PRECISE: tl.constexpr):
    """Fold a bf16 block (k, v [BT, D], valid [R, BT] or [1, BT]) into (m, l, acc [R, D])."""
    qk = dot(q, tl.trans(k.to(tl.float32)), PRECISE) * qk_scale
    qk = tl.where(valid, qk, float("-inf"))
    p, alpha, m, l_sum = softmax_step(qk, m, l_sum)
    acc = acc * alpha[:, None] + dot(p, v.to(tl.float32), PRECISE)
    return m, l_sum, acc
