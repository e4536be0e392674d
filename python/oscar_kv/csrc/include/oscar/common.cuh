// Shared definitions of the oscar-kv device code (torch-free; needs only the CUDA toolkit).
//
// Bit-exact parts (the quantize path) use the *_rn intrinsics for every fp32 operation so
// that nvcc's default FMA contraction (-fmad=true) cannot fuse a square into the following
// add, and so fast-math flags cannot change division or square root: the stored bytes must
// equal the reference's (oscar_kv.ref.quant with oscar_kv.ops.pinned_token_norms).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "oscar/layout.h"

namespace oscar {

// GQA ratio (q heads per KV head) supported by decode: the per-thread dot[kMaxGroup] and
// acc[kMaxGroup][CPT] stay in registers (ptxas -v: <= 112 registers, <= 8 bytes spilled at
// D = 256), and decode_smem(256, 16, ngk = 4, 4-bit rows, v_group 16) is 131,520 bytes,
// under the opt-in limit of sm_80 (166,912) and sm_90 (232,448) the launcher asks for. Not
// under sm_86/sm_89's 101,376: there D = 256 with G > 8 needs k_group >= 64.
constexpr int kMaxGroup = 16;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// fp32(1 / sqrt(D)) exactly as torch rounds the double 1.0 / math.sqrt(D).
template <int D>
__host__ __device__ constexpr float inv_sqrt_dim() {
  return D == 64 ? 0.125f : D == 128 ? float(0.08838834764831843) : 0.0625f;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, m));
  return x;
}

__device__ __forceinline__ float warp_min(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = fminf(x, __shfl_xor_sync(kFullMask, x, m));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(kFullMask, x, m);
  return x;
}

}  // namespace oscar
