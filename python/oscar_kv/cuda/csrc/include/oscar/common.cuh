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

namespace oscar {

constexpr int kBlockTokens = 128;  // tokens per page = one quantization block
constexpr int kMaxGroup = 8;       // GQA ratio (q heads per KV head) supported by decode
constexpr unsigned kFullMask = 0xffffffffu;

enum NormMode : int { kNormNone = 0, kNormToken = 1, kNormHead = 2 };

// Byte offsets of the seven sections of a packed page, in storage order (the layout of
// oscar_kv.ref.quant; equal to oscar_kv._native.page_sections).
struct PageLayout {
  int kv_heads, head_dim, bits, k_group, v_group, norm;
  int64_t off_k_codes, off_v_codes, off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_norms;
  int64_t page_bytes;
};

__host__ __device__ inline PageLayout make_layout(int kv_heads, int head_dim, int bits,
                                                  int k_group, int v_group, int norm) {
  PageLayout l{};
  l.kv_heads = kv_heads;
  l.head_dim = head_dim;
  l.bits = bits;
  l.k_group = k_group;
  l.v_group = v_group;
  l.norm = norm;
  const int64_t codes = int64_t(kv_heads) * kBlockTokens * head_dim * bits / 8;
  const int64_t k_par = int64_t(kv_heads) * (kBlockTokens / k_group) * head_dim * 2;
  const int64_t v_par = int64_t(kv_heads) * kBlockTokens * (head_dim / v_group) * 2;
  const int64_t norms = norm == kNormToken  ? int64_t(kBlockTokens) * 4
                        : norm == kNormHead ? int64_t(kv_heads) * kBlockTokens * 4
                                            : 0;
  l.off_k_codes = 0;
  l.off_v_codes = codes;
  l.off_k_scale = 2 * codes;
  l.off_k_zero = l.off_k_scale + k_par;
  l.off_v_scale = l.off_k_zero + k_par;
  l.off_v_zero = l.off_v_scale + v_par;
  l.off_norms = l.off_v_zero + v_par;
  l.page_bytes = l.off_norms + norms;
  return l;
}

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
