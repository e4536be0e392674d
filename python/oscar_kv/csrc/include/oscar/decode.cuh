// Split-KV decode attention over packed pages plus the bf16 tail, and the LSE merge.
//
// decode_split_kernel: grid (batch, kv_heads, splits + 1), 128 threads. Split s < splits
// walks pages [s * pps, (s + 1) * pps) of its request; split `splits` takes the exact tail.
// All G query heads of the KV head are served by one block, so every page is read once per
// KV head. Per page:
//   K: thread t owns token t. With qs[g][c] = (H q)[g][c] * k_scale[group(t)][c] and
//      qz[g] = sum_c (H q)[g][c] * k_zero[group(t)][c] precomputed per page in shared
//      memory, logit[g][t] = (sum_c qs[g][c] * code[t][c] + qz[g]) * norm[t] * scale.
//   V: thread c owns channel c (the page's V codes and params staged in shared memory):
//      acc[g][c] += sum_t p[g][t] * (code[t][c] * v_scale[t] + v_zero[t]).
// Page values stay in the stored (rotated) basis; the merge un-rotates them when V was
// rotated online, before adding the tail split, which is in the model's basis.
//
// This is the straightforward CUDA-core formulation (fp32 FMAs); a tensor-core version
// (mma.sync with codes dequantized into fragments) is the next step for bandwidth-bound
// speed at GQA >= 4.
#pragma once

#include "oscar/common.cuh"
#include "oscar/fwht.cuh"

namespace oscar {

struct DecodeArgs {
  const void* q;  // [B, Hq, D], channel stride 1
  int64_t q_stride[2];
  const uint8_t* pool;
  int64_t page_stride;
  const int32_t* page_table;  // [B, max_pages]
  int64_t pt_stride;
  const int32_t* num_pages;  // [B]
  const void* k_tail;        // [slots, 128, H, D], channel stride 1
  const void* v_tail;
  int64_t kt_stride[3];
  int64_t vt_stride[3];
  const int32_t* tail_index;  // [B]
  const int32_t* tail_len;    // [B]
  float* mid_o;               // [B, Hq, splits + 1, D]
  float* mid_m;               // [B, Hq, splits + 1]  (log2 domain)
  float* mid_l;
  int pages_per_split;
  float qk_scale;  // softmax scale * log2(e)
  int group;       // q heads per KV head
  PageLayout layout;
  int rot_q;
};

constexpr int kDecodeThreads = 128;

// Shared memory plan of decode_split_kernel, in floats; every part starts 16-byte aligned
// (the V codes are filled with uint4 stores).
struct DecodeSmem {
  int vcodes, vpar, q, qr, qs, qz, p, m, l, alpha, total;
};

__host__ __device__ inline int align4(int n) { return (n + 3) & ~3; }

__host__ __device__ inline DecodeSmem decode_smem(int D, int G, int ngk, int v_row_bytes,
                                                  int nvg) {
  DecodeSmem s{};
  s.vcodes = 0;                                            // uint8 [128][RB]
  s.vpar = s.vcodes + align4(kBlockTokens * v_row_bytes / 4);  // half2 [128][NVG]
  s.q = s.vpar + align4(kBlockTokens * nvg);               // [G][D] model basis
  s.qr = s.q + align4(G * D);                              // [G][D] rotated
  s.qs = s.qr + align4(G * D);                             // [NGK][G][D]
  s.qz = s.qs + align4(ngk * G * D);                       // [NGK][G]
  s.p = s.qz + align4(ngk * G);                            // [G][128]
  s.m = s.p + align4(G * kBlockTokens);                    // [G]
  s.l = s.m + align4(G);
  s.alpha = s.l + align4(G);
  s.total = s.alpha + align4(G);
  return s;
}

// Softmax bookkeeping over the 128 (or n_valid) logits of each head in p[g][*]: updates
// m, l, writes alpha and turns logits into probabilities. Warp w handles heads w, w+4, ...
__device__ __forceinline__ void page_softmax(float* p, float* m, float* l, float* alpha, int G,
                                             int n_valid) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int g = warp; g < G; g += kDecodeThreads / 32) {
    float mx = -INFINITY;
    for (int t = lane; t < n_valid; t += 32) mx = fmaxf(mx, p[g * kBlockTokens + t]);
    mx = warp_max(mx);
    const float m_new = fmaxf(m[g], mx);
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    float sum = 0.f;
    for (int t = lane; t < kBlockTokens; t += 32) {
      const float e = t < n_valid ? exp2f(p[g * kBlockTokens + t] - m_ref) : 0.f;
      p[g * kBlockTokens + t] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const float a = exp2f(m[g] - m_ref);
      alpha[g] = a;
      l[g] = l[g] * a + sum;
      m[g] = m_new;
    }
  }
}

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(DecodeArgs a) {
  constexpr int RB = D * BITS / 8;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr int CPT = D > kDecodeThreads ? D / kDecodeThreads : 1;  // channels per thread
  const PageLayout& L = a.layout;
  const int G = a.group, KG = L.k_group, NGK = kBlockTokens / KG, VG = L.v_group;
  const int NVG = D / VG;
  const int b = blockIdx.x, hk = blockIdx.y, s = blockIdx.z, nsplit = gridDim.z - 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31;

  extern __shared__ __align__(16) float sm[];
  const DecodeSmem plan = decode_smem(D, G, NGK, RB, NVG);
  uint32_t* vcodes = reinterpret_cast<uint32_t*>(sm + plan.vcodes);
  __half2* vpar = reinterpret_cast<__half2*>(sm + plan.vpar);
  float* q = sm + plan.q;
  float* qr = sm + plan.qr;
  float* qs = sm + plan.qs;
  float* qz = sm + plan.qz;
  float* p = sm + plan.p;
  float* m = sm + plan.m;
  float* l = sm + plan.l;
  float* alpha = sm + plan.alpha;

  const T* qg = static_cast<const T*>(a.q) + b * a.q_stride[0];
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int g = idx / D, c = idx % D;
    q[idx] = to_float(qg[(hk * G + g) * a.q_stride[1] + c]);
  }
  if (tid < G) {
    m[tid] = -INFINITY;
    l[tid] = 0.f;
  }
  __syncthreads();

  float acc[kMaxGroup][CPT];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[g][j] = 0.f;

  if (s == nsplit) {
    // ---- exact tail, model basis.
    const int n_tail = a.tail_len[b];
    const int64_t slot = a.tail_index[b];
    const T* kt = static_cast<const T*>(a.k_tail) + slot * a.kt_stride[0] + hk * a.kt_stride[2];
    const T* vt = static_cast<const T*>(a.v_tail) + slot * a.vt_stride[0] + hk * a.vt_stride[2];
    if (n_tail > 0) {
      const int t = tid;
      if (t < n_tail) {
        float dot[kMaxGroup] = {};
        for (int c = 0; c < D; ++c) {
          const float kv = to_float(kt[t * a.kt_stride[1] + c]);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < G) dot[g] += q[g * D + c] * kv;
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < G) p[g * kBlockTokens + t] = dot[g] * a.qk_scale;
      }
      __syncthreads();
      page_softmax(p, m, l, alpha, G, n_tail);
      __syncthreads();
      for (int j = 0; j < CPT; ++j) {
        const int c = tid + j * kDecodeThreads;
        if (c >= D) break;
        for (int t = 0; t < n_tail; ++t) {
          const float vv = to_float(vt[t * a.vt_stride[1] + c]);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < G) acc[g][j] += p[g * kBlockTokens + t] * vv;
        }
      }
    }
  } else {
    // ---- packed pages, rotated basis.
    if (a.rot_q) {
      for (int g = warp; g < G; g += kDecodeThreads / 32) {
        float x[D / 32];
#pragma unroll
        for (int e = 0; e < D / 32; ++e) x[e] = q[g * D + lane * (D / 32) + e];
        warp_fwht<D>(x);
#pragma unroll
        for (int e = 0; e < D / 32; ++e) qr[g * D + lane * (D / 32) + e] = x[e];
      }
    } else {
      for (int idx = tid; idx < G * D; idx += kDecodeThreads) qr[idx] = q[idx];
    }
    __syncthreads();
    const int n_pages = a.num_pages[b];
    const int start = s * a.pages_per_split;
    const int end = min(start + a.pages_per_split, n_pages);
    for (int pi = start; pi < end; ++pi) {
      const uint8_t* page = a.pool + int64_t(a.page_table[b * a.pt_stride + pi]) * a.page_stride;
      const __half* ks = reinterpret_cast<const __half*>(page + L.off_k_scale) + hk * NGK * D;
      const __half* kz = reinterpret_cast<const __half*>(page + L.off_k_zero) + hk * NGK * D;
      // qs, qz for the page's K groups; V codes and params to shared memory.
      for (int idx = tid; idx < NGK * G * D; idx += kDecodeThreads) {
        const int grp = idx / (G * D), g = (idx / D) % G, c = idx % D;
        qs[idx] = qr[g * D + c] * __half2float(ks[grp * D + c]);
      }
      for (int pair = warp; pair < NGK * G; pair += kDecodeThreads / 32) {
        const int grp = pair / G, g = pair % G;
        float z = 0.f;
        for (int c = lane; c < D; c += 32) z += qr[g * D + c] * __half2float(kz[grp * D + c]);
        z = warp_sum(z);
        if (lane == 0) qz[pair] = z;
      }
      const uint4* vsrc =
          reinterpret_cast<const uint4*>(page + L.off_v_codes + int64_t(hk) * kBlockTokens * RB);
      for (int idx = tid; idx < kBlockTokens * RB / 16; idx += kDecodeThreads)
        reinterpret_cast<uint4*>(vcodes)[idx] = vsrc[idx];
      const __half* vsg = reinterpret_cast<const __half*>(page + L.off_v_scale) + hk * kBlockTokens * NVG;
      const __half* vzg = reinterpret_cast<const __half*>(page + L.off_v_zero) + hk * kBlockTokens * NVG;
      for (int idx = tid; idx < kBlockTokens * NVG; idx += kDecodeThreads)
        vpar[idx] = __halves2half2(vsg[idx], vzg[idx]);
      __syncthreads();

      // K: thread t = token t.
      {
        const int t = tid, grp = t / KG;
        const uint4* krow = reinterpret_cast<const uint4*>(
            page + L.off_k_codes + int64_t(hk * kBlockTokens + t) * RB);
        float dot[kMaxGroup] = {};
#pragma unroll 1
        for (int w16 = 0; w16 < RB / 16; ++w16) {
          const uint4 v4 = krow[w16];
          const uint32_t words[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
          for (int w = 0; w < 4; ++w) {
#pragma unroll
            for (int ci = 0; ci < 32 / BITS; ++ci) {
              const int c = (w16 * 4 + w) * (32 / BITS) + ci;
              const float code = float((words[w] >> (ci * BITS)) & QMAX);
              // Fixed trip count keeps dot[] in registers (a runtime bound spills it).
#pragma unroll
              for (int g = 0; g < kMaxGroup; ++g)
                if (g < G) dot[g] += qs[(grp * G + g) * D + c] * code;
            }
          }
        }
        float nrm = 1.f;
        const float* norms = reinterpret_cast<const float*>(page + L.off_norms);
        if (L.norm == kNormToken) nrm = norms[t];
        if (L.norm == kNormHead) nrm = norms[hk * kBlockTokens + t];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < G) p[g * kBlockTokens + t] = (dot[g] + qz[grp * G + g]) * nrm * a.qk_scale;
      }
      __syncthreads();
      page_softmax(p, m, l, alpha, G, kBlockTokens);
      __syncthreads();

      // V: thread c = channel c (and c + 128 for D = 256).
      const uint8_t* vbytes = reinterpret_cast<const uint8_t*>(vcodes);
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = tid + j * kDecodeThreads;
        if (c < D) {
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < G) acc[g][j] *= alpha[g];
          const int grp = c / VG, byte = c * BITS / 8, shift = (c * BITS) % 8;
          for (int t = 0; t < kBlockTokens; ++t) {
            const float2 sz = __half22float2(vpar[t * NVG + grp]);
            const float vv = float((vbytes[t * RB + byte] >> shift) & QMAX) * sz.x + sz.y;
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g)
              if (g < G) acc[g][j] += p[g * kBlockTokens + t] * vv;
          }
        }
      }
      __syncthreads();
    }
  }

  // ---- partials.
  const int hq0 = hk * G;
  for (int j = 0; j < CPT; ++j) {
    const int c = tid + j * kDecodeThreads;
    if (c >= D) break;
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= G) break;
      const int64_t r = (int64_t(b) * gridDim.y * G + hq0 + g) * (nsplit + 1) + s;
      a.mid_o[r * D + c] = acc[g][j];
    }
  }
  if (tid < G) {
    const int64_t r = (int64_t(b) * gridDim.y * G + hq0 + tid) * (nsplit + 1) + s;
    a.mid_m[r] = m[tid];
    a.mid_l[r] = l[tid];
  }
}

// Log-sum-exp merge of the page splits, un-rotation of the page part (rot_v), then the
// tail split. Grid (batch, kv_heads), 128 threads; out [B, Hq, D]; lse [B, Hq] (natural
// log of the sum of exp(scale * q . k) over every key; nullptr: not written).
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads)
    merge_kernel(const float* mid_o, const float* mid_m, const float* mid_l, T* out,
                 int64_t out_s0, int64_t out_s1, int nsplit, int group, int rot_v, float* lse,
                 int64_t lse_s0, int64_t lse_s1) {
  extern __shared__ float acc[];  // [G][D]
  __shared__ float ms[kMaxGroup], ls[kMaxGroup];
  const int b = blockIdx.x, hk = blockIdx.y, G = group, Hq = gridDim.y * G;
  const int tid = threadIdx.x;
  auto row = [&](int g) { return (int64_t(b) * Hq + hk * G + g) * (nsplit + 1); };
  // Every thread tracks m, l of every head (cheap, avoids a barrier per split).
  for (int g = 0; g < G; ++g) {
    float mm = -INFINITY, ll = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float m2 = mid_m[row(g) + s], l2 = mid_l[row(g) + s];
      const float m_new = fmaxf(mm, m2), m_ref = m_new == -INFINITY ? 0.f : m_new;
      ll = ll * exp2f(mm - m_ref) + l2 * exp2f(m2 - m_ref);
      mm = m_new;
    }
    for (int c = tid; c < D; c += kDecodeThreads) {
      const float m_ref = mm == -INFINITY ? 0.f : mm;
      float x = 0.f;
      for (int s = 0; s < nsplit; ++s)
        x += mid_o[(row(g) + s) * D + c] * exp2f(mid_m[row(g) + s] - m_ref);
      acc[g * D + c] = x;
    }
    if (tid == 0) {
      ms[g] = mm;
      ls[g] = ll;
    }
  }
  __syncthreads();
  if (rot_v) block_fwht_smem<D>(acc, G);
  for (int g = 0; g < G; ++g) {
    const float m1 = ms[g], l1 = ls[g];
    const float m2 = mid_m[row(g) + nsplit], l2 = mid_l[row(g) + nsplit];
    const float m_new = fmaxf(m1, m2), m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float w1 = exp2f(m1 - m_ref), w2 = exp2f(m2 - m_ref);
    const float denom = l1 * w1 + l2 * w2;
    for (int c = tid; c < D; c += kDecodeThreads) {
      const float x = acc[g * D + c] * w1 + mid_o[(row(g) + nsplit) * D + c] * w2;
      out[b * out_s0 + (hk * G + g) * out_s1 + c] = from_float<T>(denom > 0.f ? x / denom : 0.f);
    }
    // m is in the log2 domain (qk_scale carries log2(e)).
    if (lse != nullptr && tid == 0)
      lse[b * lse_s0 + (hk * G + g) * lse_s1] =
          denom > 0.f ? (m_ref + log2f(denom)) * 0.69314718055994531f : -INFINITY;
  }
}

}  // namespace oscar
