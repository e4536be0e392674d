// Fused rotate + norm + quantize + pack of whole pages, the page dequantizer, and the
// row-wise FWHT used to rotate decode queries.
//
// quantize_pages_kernel: grid (pages, kv_heads, 128 / k_group), one warp per token row at
// a time. The rotated, norm-scaled K group [k_group, D] is staged in shared memory (fp32),
// per-channel min/max run over it, then the codes are packed in the page layout. Every
// fp32 step uses the *_rn intrinsics: the bytes must equal the reference's.
#pragma once

#include "oscar/common.cuh"
#include "oscar/fwht.cuh"

namespace oscar {

struct QuantizeArgs {
  const void* k;
  const void* v;
  const int32_t* src_index;  // block of k/v read for output i
  const int32_t* page_ids;   // pool row written for output i
  uint8_t* pool;
  int64_t page_stride;  // bytes between pool rows
  int64_t k_stride[3];  // elements: block, token, head (channel stride is 1)
  int64_t v_stride[3];
  PageLayout layout;
  int rot_k, rot_v;
};

// code = clamp(rint((x - zero) / scale), 0, qmax), 0 where scale == 0 (the reference's).
__device__ __forceinline__ int quant_code(float x, float zero_f, float scale_f, int qmax) {
  if (!(scale_f > 0.f)) return 0;
  const float c = rintf(__fdiv_rn(__fsub_rn(x, zero_f), scale_f));
  return int(fminf(fmaxf(c, 0.f), float(qmax)));
}

__device__ __forceinline__ void group_params(float mn, float mx, int qmax, __half& zero,
                                             float& zero_f, __half& scale, float& scale_f) {
  zero = __float2half_rn(mn);
  zero_f = __half2float(zero);
  scale = __float2half_rn(__fdiv_rn(__fsub_rn(mx, zero_f), float(qmax)));
  scale_f = __half2float(scale);
}

template <typename T, int D>
__device__ __forceinline__ void load_row(const T* base, float (&x)[D / 32]) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < E; ++e) x[e] = to_float(base[lane * E + e]);
}

// Packs codes (stored as floats in smem rows of D) into bytes, lowest bits first.
template <int D, int BITS>
__device__ __forceinline__ void pack_rows(const float* codes, int rows, uint8_t* out,
                                          int64_t row_bytes_stride) {
  constexpr int PB = 8 / BITS, RB = D * BITS / 8;
  for (int idx = threadIdx.x; idx < rows * RB; idx += blockDim.x) {
    const int r = idx / RB, j = idx % RB;
    int byte = 0;
#pragma unroll
    for (int p = 0; p < PB; ++p) byte |= int(codes[r * D + j * PB + p]) << (p * BITS);
    out[r * row_bytes_stride + j] = uint8_t(byte);
  }
}

template <typename T, int D, int BITS>
__global__ void quantize_pages_kernel(QuantizeArgs a) {
  constexpr int E = D / 32;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr int RB = D * BITS / 8;
  extern __shared__ float smem[];  // [k_group][D]: rotated+scaled K, then codes; then V
  const PageLayout& L = a.layout;
  const int KG = L.k_group, NGK = kBlockTokens / L.k_group, H = L.kv_heads;
  const int i = blockIdx.x, h = blockIdx.y, g = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nwarps = blockDim.x / 32;
  const int64_t row = a.src_index[i];
  // A fixed grid over requests: an entry without a completed page (id < 0) writes nothing.
  // The whole block leaves before its first barrier, so no thread waits on it.
  if (a.page_ids[i] < 0) return;
  uint8_t* page = a.pool + int64_t(a.page_ids[i]) * a.page_stride;
  const T* k = static_cast<const T*>(a.k) + row * a.k_stride[0];
  const T* v = static_cast<const T*>(a.v) + row * a.v_stride[0];
  float* norms = reinterpret_cast<float*>(page + L.off_norms);

  // ---- K rows of this group: rotate, norm (pinned order), divide.
  for (int tt = warp; tt < KG; tt += nwarps) {
    const int t = g * KG + tt;
    float x[E];
    load_row<T, D>(k + t * a.k_stride[1] + h * a.k_stride[2], x);
    if (a.rot_k) warp_fwht<D>(x);
    if (L.norm != kNormNone) {
      float n;
      if (L.norm == kNormHead) {
        n = __fsqrt_rn(warp_sum_squares<D>(x));
      } else {
        float n2 = 0.f;  // heads summed left to right
        for (int hh = 0; hh < H; ++hh) {
          float y[E];
          load_row<T, D>(k + t * a.k_stride[1] + hh * a.k_stride[2], y);
          if (a.rot_k) warp_fwht<D>(y);
          n2 = __fadd_rn(n2, warp_sum_squares<D>(y));
        }
        n = __fsqrt_rn(n2);
      }
#pragma unroll
      for (int e = 0; e < E; ++e) x[e] = n > 0.f ? __fdiv_rn(x[e], n) : 0.f;
      if (lane == 0) {
        if (L.norm == kNormHead) norms[h * kBlockTokens + t] = n;
        else if (h == 0) norms[t] = n;
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) smem[tt * D + lane * E + e] = x[e];
  }
  __syncthreads();

  // ---- per-channel min/max over the group's tokens, codes in place.
  __half* k_scale = reinterpret_cast<__half*>(page + L.off_k_scale);
  __half* k_zero = reinterpret_cast<__half*>(page + L.off_k_zero);
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float mn = smem[c], mx = smem[c];
    for (int tt = 1; tt < KG; ++tt) {
      mn = fminf(mn, smem[tt * D + c]);
      mx = fmaxf(mx, smem[tt * D + c]);
    }
    __half zero, scale;
    float zero_f, scale_f;
    group_params(mn, mx, QMAX, zero, zero_f, scale, scale_f);
    k_scale[(h * NGK + g) * D + c] = scale;
    k_zero[(h * NGK + g) * D + c] = zero;
    for (int tt = 0; tt < KG; ++tt)
      smem[tt * D + c] = float(quant_code(smem[tt * D + c], zero_f, scale_f, QMAX));
  }
  __syncthreads();
  pack_rows<D, BITS>(smem, KG, page + L.off_k_codes + int64_t(h * kBlockTokens + g * KG) * RB,
                     RB);
  __syncthreads();

  // ---- V: per-token groups of v_group channels (a group spans VG / E adjacent lanes).
  const int VG = L.v_group, NVG = D / L.v_group;
  const int lanes_per_group = VG / E;  // >= 2: v_group >= 16 and E <= 8
  __half* v_scale = reinterpret_cast<__half*>(page + L.off_v_scale);
  __half* v_zero = reinterpret_cast<__half*>(page + L.off_v_zero);
  for (int tt = warp; tt < KG; tt += nwarps) {
    const int t = g * KG + tt;
    float x[E];
    load_row<T, D>(v + t * a.v_stride[1] + h * a.v_stride[2], x);
    if (a.rot_v) warp_fwht<D>(x);
    float mn = x[0], mx = x[0];
#pragma unroll
    for (int e = 1; e < E; ++e) {
      mn = fminf(mn, x[e]);
      mx = fmaxf(mx, x[e]);
    }
    for (int m = 1; m < lanes_per_group; m <<= 1) {
      mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, m));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, m));
    }
    __half zero, scale;
    float zero_f, scale_f;
    group_params(mn, mx, QMAX, zero, zero_f, scale, scale_f);
    if (lane % lanes_per_group == 0) {
      const int grp = lane / lanes_per_group;
      v_scale[(h * kBlockTokens + t) * NVG + grp] = scale;
      v_zero[(h * kBlockTokens + t) * NVG + grp] = zero;
    }
#pragma unroll
    for (int e = 0; e < E; ++e)
      smem[tt * D + lane * E + e] = float(quant_code(x[e], zero_f, scale_f, QMAX));
  }
  __syncthreads();
  pack_rows<D, BITS>(smem, KG, page + L.off_v_codes + int64_t(h * kBlockTokens + g * KG) * RB,
                     RB);
}

// Unpacked channel c of a packed row.
template <int BITS>
__device__ __forceinline__ int code_at(const uint8_t* row, int c) {
  return (row[c * BITS / 8] >> ((c * BITS) % 8)) & ((1 << BITS) - 1);
}

// Pages -> fp32 K, V [n, 128, H, D] in the model's basis. Grid (pages, heads, 4), one warp
// per token row (32 rows per block).
template <int D, int BITS>
__global__ void dequantize_pages_kernel(const uint8_t* pool, int64_t page_stride,
                                        const int32_t* page_ids, float* k_out, float* v_out,
                                        PageLayout L, int rot_k, int rot_v) {
  constexpr int E = D / 32, RB = D * BITS / 8;
  const int i = blockIdx.x, h = blockIdx.y, H = L.kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const uint8_t* page = pool + int64_t(page_ids[i]) * page_stride;
  const __half* ks = reinterpret_cast<const __half*>(page + L.off_k_scale);
  const __half* kz = reinterpret_cast<const __half*>(page + L.off_k_zero);
  const __half* vs = reinterpret_cast<const __half*>(page + L.off_v_scale);
  const __half* vz = reinterpret_cast<const __half*>(page + L.off_v_zero);
  const float* norms = reinterpret_cast<const float*>(page + L.off_norms);
  const int NGK = kBlockTokens / L.k_group, NVG = D / L.v_group;
  for (int t = blockIdx.z * 32 + warp; t < (blockIdx.z + 1) * 32; t += nwarps) {
    const uint8_t* kr = page + L.off_k_codes + int64_t(h * kBlockTokens + t) * RB;
    const uint8_t* vr = page + L.off_v_codes + int64_t(h * kBlockTokens + t) * RB;
    const int grp = h * NGK + t / L.k_group;
    float n = 1.f;
    if (L.norm == kNormToken) n = norms[t];
    if (L.norm == kNormHead) n = norms[h * kBlockTokens + t];
    float x[E], y[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int c = lane * E + e;
      x[e] = (code_at<BITS>(kr, c) * __half2float(ks[grp * D + c]) + __half2float(kz[grp * D + c])) * n;
      const int vi = (h * kBlockTokens + t) * NVG + c / L.v_group;
      y[e] = code_at<BITS>(vr, c) * __half2float(vs[vi]) + __half2float(vz[vi]);
    }
    if (rot_k) warp_fwht<D>(x);
    if (rot_v) warp_fwht<D>(y);
    const int64_t out = ((int64_t(i) * kBlockTokens + t) * H + h) * D;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      k_out[out + lane * E + e] = x[e];
      v_out[out + lane * E + e] = y[e];
    }
  }
}

// Rows of a contiguous [rows, D] tensor -> normalized FWHT in fp32 (bit-identical to the
// reference). One warp per row.
template <typename T, int D>
__global__ void fwht_rows_kernel(const T* x, float* out, int64_t rows) {
  constexpr int E = D / 32;
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps exit together
  float v[E];
  load_row<T, D>(x + r * D, v);
  warp_fwht<D>(v);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < E; ++e) out[r * D + lane * E + e] = v[e];
}

}  // namespace oscar
