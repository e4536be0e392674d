"""Device functions shared by the Triton kernels.

Everything on the quantize path must reproduce the reference bit for bit, so these helpers
spell out the exact fp32 operation order of `oscar_kv.ref` (butterfly stage order, a pinned
sum-of-squares tree, IEEE division and square root, round-half-to-even) instead of leaning
on tl.sum / tl.dot, whose accumulation order differs between the interpreter and GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 1.5 * 2^23: adding and subtracting it rounds an fp32 |x| < 2^22 to an integer with the
# FPU's round-half-to-even, the same rounding as torch.round. libdevice.rint would do, but
# the interpreter cannot run libdevice calls.
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def rint(x):
    y = x + _RINT_MAGIC
    return y - _RINT_MAGIC


@triton.jit
def fwht_rows(x, ROWS: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Normalized Walsh-Hadamard transform of each row of fp32 x [ROWS, D].

    Stage order (bit 0 first) and the final multiply by fp32(1/sqrt(D)) match
    `oscar_kv.ref.hadamard.fwht`, so the result is bit-identical to it.
    """
    # Stage s pairs channel i with i + 2^s (shapes written inline: a constexpr may not be
    # re-assigned in a compiled loop).
    for s in tl.static_range(LOG2D):
        y = tl.reshape(x, [ROWS, D >> (s + 1), 2, 1 << s])
        y = tl.permute(y, [0, 1, 3, 2])
        a, b = tl.split(y)
        y = tl.join(a + b, a - b)
        y = tl.permute(y, [0, 1, 3, 2])
        x = tl.reshape(y, [ROWS, D])
    inv: tl.constexpr = 1.0 / (D**0.5)
    return x * inv


@triton.jit
def tree_sum_rows(x, ROWS: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Sum of each row of fp32 x [ROWS, D] by the pinned halves tree: x[:L/2] + x[L/2:].

    Same tree as `oscar_kv.ref.quant.token_norms` (and the CUDA warp xor-reduction).
    """
    for s in tl.static_range(LOG2D):
        y = tl.reshape(x, [ROWS, 2, D >> (s + 1)])
        y = tl.permute(y, [0, 2, 1])
        a, b = tl.split(y)
        x = a + b
    return tl.reshape(x, [ROWS])


@triton.jit
def group_params(mn, mx, QMAX: tl.constexpr):
    """fp16 zero/scale of asymmetric min/max groups, plus their fp32 values.

    zero = fp16(min), scale = fp16((max - float(zero)) / QMAX), as in the reference.
    """
    zero = mn.to(tl.float16)
    zero_f = zero.to(tl.float32)
    scale = tl.div_rn(mx - zero_f, QMAX * 1.0).to(tl.float16)
    scale_f = scale.to(tl.float32)
    return zero, zero_f, scale, scale_f


@triton.jit
def codes_of(x, zero_f, scale_f, QMAX: tl.constexpr):
    """clamp(round_half_even((x - zero) / scale), 0, QMAX), 0 where scale == 0; int32."""
    safe = tl.where(scale_f > 0, scale_f, 1.0)
    c = rint(tl.div_rn(x - zero_f, safe))
    c = tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0)
    c = tl.where(scale_f > 0, c, 0.0)
    return c.to(tl.int32)


@triton.jit
def pack_rows(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, D] -> uint8 [ROWS, D * BITS / 8], channel c at bit (c * BITS) % 8."""
    PB: tl.constexpr = 8 // BITS
    c = tl.reshape(codes, [ROWS, D // PB, PB])
    shift = tl.arange(0, PB) * BITS
    packed = tl.sum(c << shift[None, None, :], axis=2)
    return packed.to(tl.uint8)
