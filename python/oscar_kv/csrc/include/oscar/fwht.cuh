// Fast Walsh-Hadamard transform and the pinned sum-of-squares tree, one warp per row.
//
// A row of D channels lives in a warp with E = D / 32 contiguous channels per lane (lane l
// holds channels l*E .. l*E+E-1). The butterfly stages run in the reference's order (pair
// distance 1, 2, 4, ...: first inside a lane, then across lanes with shfl_xor), so the
// result is bit-identical to oscar_kv.ref.hadamard.fwht. A tensor-core Hadamard (H as an
// MMA operand) sums in a different order and so cannot produce the reference's bits; it
// would only pay off for the query rotation, which is a negligible cost here.
#pragma once

#include "oscar/common.cuh"

namespace oscar {

template <int D>
__device__ __forceinline__ void warp_fwht(float (&x)[D / 32]) {
  constexpr int E = D / 32;
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if ((i & h) == 0) {
        const float a = x[i], b = x[i + h];
        x[i] = __fadd_rn(a, b);
        x[i + h] = __fsub_rn(a, b);
      }
    }
  }
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {  // pair distance m * E: partner lane is lane ^ m
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float other = __shfl_xor_sync(kFullMask, x[i], m);
      // lower lane holds a, upper lane holds b: (a + b, a - b)
      x[i] = upper ? __fsub_rn(other, x[i]) : __fadd_rn(x[i], other);
    }
  }
  constexpr float inv = inv_sqrt_dim<D>();
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = __fmul_rn(x[i], inv);
}

// Sum of squares of a warp's row by the pinned halves tree (x[:L/2] + x[L/2:] until one
// element is left; oscar_kv.ops.pinned_token_norms). The first halvings pair lanes l and
// l ^ 16, ^ 8, ... (IEEE addition commutes, so both partners hold the same sum), the last
// ones run inside a lane. Every lane returns the total.
template <int D>
__device__ __forceinline__ float warp_sum_squares(const float (&x)[D / 32]) {
  constexpr int E = D / 32;
  float s[E];
#pragma unroll
  for (int i = 0; i < E; ++i) s[i] = __fmul_rn(x[i], x[i]);
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
#pragma unroll
    for (int i = 0; i < E; ++i) s[i] = __fadd_rn(s[i], __shfl_xor_sync(kFullMask, s[i], m));
  }
#pragma unroll
  for (int half = E / 2; half >= 1; half >>= 1) {
#pragma unroll
    for (int i = 0; i < half; ++i) s[i] = __fadd_rn(s[i], s[i + half]);
  }
  return s[0];
}

// In-place FWHT of `rows` rows of D floats in shared memory by a whole block (not
// bit-exact with the reference: used where only accuracy matters, e.g. un-rotating a
// decode output). Caller synchronizes before and after.
template <int D>
__device__ __forceinline__ void block_fwht_smem(float* x, int rows) {
  for (int h = 1; h < D; h <<= 1) {
    for (int idx = threadIdx.x; idx < rows * D / 2; idx += blockDim.x) {
      const int r = idx / (D / 2), p = idx % (D / 2);
      const int i = (p / h) * 2 * h + (p % h);
      const float a = x[r * D + i], b = x[r * D + i + h];
      x[r * D + i] = a + b;
      x[r * D + i + h] = a - b;
    }
    __syncthreads();
  }
  constexpr float inv = inv_sqrt_dim<D>();
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) x[idx] *= inv;
  __syncthreads();
}

}  // namespace oscar
