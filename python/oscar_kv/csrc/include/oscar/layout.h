// The packed page layout, shared by the CUDA device code and the C++ CPU kernels
// (torch-free, CUDA-free: plain C++ where nvcc is not compiling).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define OSCAR_HOST_DEVICE __host__ __device__
#else
#define OSCAR_HOST_DEVICE
#endif

namespace oscar {

constexpr int kBlockTokens = 128;  // tokens per page = one quantization block

enum NormMode : int { kNormNone = 0, kNormToken = 1, kNormHead = 2 };

// Byte offsets of the seven sections of a packed page, in storage order (the layout of
// oscar_kv.ref.quant; equal to oscar_kv._native.page_sections).
struct PageLayout {
  int kv_heads, head_dim, bits, k_group, v_group, norm;
  int64_t off_k_codes, off_v_codes, off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_norms;
  int64_t page_bytes;
};

OSCAR_HOST_DEVICE inline PageLayout make_layout(int kv_heads, int head_dim, int bits,
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

}  // namespace oscar
