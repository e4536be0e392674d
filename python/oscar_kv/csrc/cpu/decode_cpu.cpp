// Decode attention over packed pages + the exact tail on the CPU, fused: codes are unpacked
// one token row at a time into a small buffer and consumed at once, so nothing the size of
// the context is ever materialized (the batched torch ops dequantize whole pages first).
//
// One task per (request, KV head), spread over at::parallel_for; the G query heads of the KV
// head share every unpacked row. Per page, in the rotated unit-scaled basis of the reference
// (oscar_kv.ref.attention):
//   K: for each K group, qs[g][c] = (H q)[g][c] * k_scale[c], qz[g] = (H q)[g] . k_zero;
//      logit[g][t] = (qs[g] . code[t] + qz[g]) * norm[t] * scale
//   V: acc[g] += p[g][t] * (code[t][c] * v_scale[t][grp(c)] + v_zero[t][grp(c)])
// with one online-softmax update per page. After the pages the value part is un-rotated when
// V was rotated online (linear, so it commutes with the softmax rescaling), then the tail
// tokens (model basis, unrotated q) are folded in the same way.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "oscar/layout.h"

namespace oscar_kv_cpu {
namespace {

using oscar::kBlockTokens;
using oscar::PageLayout;

// Code values of every byte: kLut2[b] = the four 2-bit codes of b (channel 4j + k at bits
// 2k), kLut4[b] = its two 4-bit codes.
struct Luts {
  std::array<std::array<float, 4>, 256> two;
  std::array<std::array<float, 2>, 256> four;
  Luts() {
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 4; ++k) two[b][k] = float((b >> (2 * k)) & 3);
      for (int k = 0; k < 2; ++k) four[b][k] = float((b >> (4 * k)) & 15);
    }
  }
};
const Luts kLuts;

inline void unpack_row(const uint8_t* row, int D, int bits, float* out) {
  if (bits == 2) {
    for (int j = 0; j < D / 4; ++j) std::memcpy(out + 4 * j, kLuts.two[row[j]].data(), 16);
  } else {
    for (int j = 0; j < D / 2; ++j) std::memcpy(out + 2 * j, kLuts.four[row[j]].data(), 8);
  }
}

inline float dot(const float* a, const float* b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// Normalized Walsh-Hadamard transform of x[D] (the reference's butterfly order).
inline void fwht(float* x, int D) {
  for (int h = 1; h < D; h *= 2)
    for (int i = 0; i < D; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float inv = 1.f / std::sqrt(float(D));
  for (int i = 0; i < D; ++i) x[i] *= inv;
}

// e^x for x <= 0 (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial;
// within 2 ulp), written so that a loop of it vectorizes: std::exp does not, and a scalar
// exp per logit was a third of the kernel's time. x below -87 (also -inf) gives ~1e-38.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  return e * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// Online softmax over a block of n logits per head (logits[g * 128 + t]): rescales acc,
// updates m and l, and leaves the probabilities in logits.
inline void softmax_block(float* logits, int n, int G, int D, float* m, float* l, float* acc) {
  for (int g = 0; g < G; ++g) {
    float* lg = logits + g * kBlockTokens;
    float mx = m[g];
    for (int t = 0; t < n; ++t) mx = std::max(mx, lg[t]);
    // m = -inf at first: alpha ~0, and acc is 0 anyway.
    const float alpha = m[g] == -std::numeric_limits<float>::infinity()
                            ? 0.f
                            : exp_nonpositive(m[g] - mx);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) {
      lg[t] = exp_nonpositive(lg[t] - mx);
      sum += lg[t];
    }
    l[g] = l[g] * alpha + sum;
    m[g] = mx;
    for (int c = 0; c < D; ++c) acc[g * D + c] *= alpha;
  }
}

inline float half_at(const uint8_t* base, int64_t idx) {
  return float(reinterpret_cast<const c10::Half*>(base)[idx]);
}

struct Args {
  PageLayout L;
  int G, rot_q, rot_v;
  float scale;
  const uint8_t* pool;
  int64_t page_stride;
  const int32_t* page_table;
  int64_t pt_stride;
  const int32_t* num_pages;
  const int32_t* tail_index;
  const int32_t* tail_len;
};

// q and out are fp32; the tails are T (the model's dtype).
template <typename T>
void decode_one(const Args& a, const float* q, int64_t qs0, int64_t qs1, const T* kt,
                const T* vt, std::array<int64_t, 3> kts, std::array<int64_t, 3> vts, float* out,
                int64_t os0, int64_t os1, int b, int hk) {
  const PageLayout& L = a.L;
  const int D = L.head_dim, G = a.G, NB = D * L.bits / 8, KG = L.k_group;
  const int NGK = kBlockTokens / KG, NVG = D / L.v_group, VG = L.v_group;
  std::vector<float> qf(G * D), qr(G * D), qs(G * D), acc(G * D, 0.f), logits(G * kBlockTokens);
  std::vector<float> row(D), vrow(D), qz(G), m(G, -std::numeric_limits<float>::infinity()),
      l(G, 0.f);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < D; ++c) qf[g * D + c] = q[b * qs0 + (hk * G + g) * qs1 + c];
  qr = qf;
  if (a.rot_q)
    for (int g = 0; g < G; ++g) fwht(qr.data() + g * D, D);

  const int n_pages = a.num_pages[b];
  for (int pi = 0; pi < n_pages; ++pi) {
    const uint8_t* page = a.pool + int64_t(a.page_table[b * a.pt_stride + pi]) * a.page_stride;
    const uint8_t* kc = page + L.off_k_codes + int64_t(hk) * kBlockTokens * NB;
    const uint8_t* vc = page + L.off_v_codes + int64_t(hk) * kBlockTokens * NB;
    const float* norms = reinterpret_cast<const float*>(page + L.off_norms);
    if (L.norm == oscar::kNormHead) norms += int64_t(hk) * kBlockTokens;
    for (int grp = 0; grp < NGK; ++grp) {
      const int64_t par = (int64_t(hk) * NGK + grp) * D;
      for (int g = 0; g < G; ++g) {
        float z = 0.f;
        for (int c = 0; c < D; ++c) {
          qs[g * D + c] = qr[g * D + c] * half_at(page + L.off_k_scale, par + c);
          z += qr[g * D + c] * half_at(page + L.off_k_zero, par + c);
        }
        qz[g] = z;
      }
      for (int t = grp * KG; t < (grp + 1) * KG; ++t) {
        unpack_row(kc + int64_t(t) * NB, D, L.bits, row.data());
        const float nrm = L.norm == oscar::kNormNone ? 1.f : norms[t];
        for (int g = 0; g < G; ++g)
          logits[g * kBlockTokens + t] =
              (dot(qs.data() + g * D, row.data(), D) + qz[g]) * nrm * a.scale;
      }
    }
    softmax_block(logits.data(), kBlockTokens, G, D, m.data(), l.data(), acc.data());
    for (int t = 0; t < kBlockTokens; ++t) {
      unpack_row(vc + int64_t(t) * NB, D, L.bits, row.data());
      const int64_t par = (int64_t(hk) * kBlockTokens + t) * NVG;
      for (int gv = 0; gv < NVG; ++gv) {
        const float s = half_at(page + L.off_v_scale, par + gv);
        const float z = half_at(page + L.off_v_zero, par + gv);
        for (int c = gv * VG; c < (gv + 1) * VG; ++c) vrow[c] = row[c] * s + z;
      }
      for (int g = 0; g < G; ++g) axpy(logits[g * kBlockTokens + t], vrow.data(), acc.data() + g * D, D);
    }
  }
  if (a.rot_v && n_pages > 0)
    for (int g = 0; g < G; ++g) fwht(acc.data() + g * D, D);

  const int n_tail = a.tail_len[b];
  if (n_tail > 0) {
    const int64_t slot = a.tail_index[b];
    const T* kb = kt + slot * kts[0] + hk * kts[2];
    const T* vb = vt + slot * vts[0] + hk * vts[2];
    for (int t = 0; t < n_tail; ++t) {
      for (int c = 0; c < D; ++c) row[c] = float(kb[t * kts[1] + c]);
      for (int g = 0; g < G; ++g)
        logits[g * kBlockTokens + t] = dot(qf.data() + g * D, row.data(), D) * a.scale;
    }
    softmax_block(logits.data(), n_tail, G, D, m.data(), l.data(), acc.data());
    for (int t = 0; t < n_tail; ++t) {
      for (int c = 0; c < D; ++c) row[c] = float(vb[t * vts[1] + c]);
      for (int g = 0; g < G; ++g) axpy(logits[g * kBlockTokens + t], row.data(), acc.data() + g * D, D);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int c = 0; c < D; ++c) out[b * os0 + (hk * G + g) * os1 + c] = acc[g * D + c] * inv;
  }
}

void check_index(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                  t.size(0) == n && t.is_contiguous(),
              name, " must be a contiguous CPU int32 tensor of length ", n);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& pool,
                            const at::Tensor& page_table, const at::Tensor& num_pages,
                            const at::Tensor& k_tail, const at::Tensor& v_tail,
                            const at::Tensor& tail_index, const at::Tensor& tail_len,
                            double scale, int64_t kv_heads, int64_t head_dim, int64_t bits,
                            int64_t k_group, int64_t v_group, int64_t norm, int64_t rot_k,
                            int64_t rot_v) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK_VALUE(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  TORCH_CHECK_VALUE(k_group == 32 || k_group == 64 || k_group == 128,
              "k_group must be 32, 64 or 128, got ", k_group);
  TORCH_CHECK_VALUE(v_group >= 1 && head_dim % v_group == 0, "v_group must divide head_dim");
  TORCH_CHECK_VALUE(norm >= 0 && norm <= 2, "norm must be 0 (none), 1 (token) or 2 (head)");
  TORCH_CHECK_VALUE(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 &&
                  q.size(2) == head_dim && q.stride(2) == 1,
              "q must be a CPU float32 [batch, q_heads, ", head_dim,
              "] tensor with contiguous channels");
  const int64_t B = q.size(0), Hq = q.size(1);
  TORCH_CHECK_VALUE(kv_heads >= 1 && Hq % kv_heads == 0, "q heads (", Hq,
              ") must be a multiple of kv_heads (", kv_heads, ")");
  const PageLayout L = oscar::make_layout(int(kv_heads), int(head_dim), int(bits), int(k_group),
                                          int(v_group), int(norm));
  TORCH_CHECK_VALUE(pool.device().is_cpu() && pool.scalar_type() == at::kByte && pool.dim() == 2 &&
                  pool.size(1) == L.page_bytes && pool.stride(1) == 1,
              "pool must be a CPU uint8 [pages, ", L.page_bytes, "] tensor with contiguous rows");
  TORCH_CHECK_VALUE(page_table.device().is_cpu() && page_table.scalar_type() == at::kInt &&
                  page_table.dim() == 2 && page_table.size(0) == B && page_table.stride(1) == 1,
              "page_table must be a CPU int32 [", B, ", max_pages] tensor");
  check_index(num_pages, B, "num_pages");
  check_index(tail_index, B, "tail_index");
  check_index(tail_len, B, "tail_len");
  for (const at::Tensor* t : {&k_tail, &v_tail})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 4 && t->size(1) == kBlockTokens &&
                    t->size(2) == kv_heads && t->size(3) == head_dim && t->stride(3) == 1 &&
                    t->scalar_type() == k_tail.scalar_type(),
                "k_tail/v_tail must be CPU [slots, 128, ", kv_heads, ", ", head_dim,
                "] tensors of one dtype with contiguous channels");
  // Indices are checked up front: the kernel trusts them.
  const int64_t max_pages = page_table.size(1), n_slots = k_tail.size(0), n_rows = pool.size(0);
  const int32_t* np = num_pages.data_ptr<int32_t>();
  const int32_t* ti = tail_index.data_ptr<int32_t>();
  const int32_t* tl = tail_len.data_ptr<int32_t>();
  const int32_t* pt = page_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(np[b] >= 0 && np[b] <= max_pages, "num_pages[", b, "] = ", np[b],
                      " is outside [0, ", max_pages, "] (the page_table's width)");
    TORCH_CHECK_VALUE(tl[b] >= 0 && tl[b] <= kBlockTokens, "tail_len[", b, "] = ", tl[b],
                " is outside [0, 128]");
    TORCH_CHECK_VALUE(tl[b] == 0 || (ti[b] >= 0 && ti[b] < n_slots), "tail_index[", b, "] = ", ti[b],
                " is not a tail slot (", n_slots, " slots)");
    TORCH_CHECK_VALUE(np[b] + tl[b] > 0, "causal q_tokens (1) cannot exceed the cached tokens (0): request ", b,
                      " has no pages and an empty tail");
    for (int64_t i = 0; i < np[b]; ++i) {
      const int32_t p = pt[b * page_table.stride(0) + i];
      TORCH_CHECK_VALUE(p >= 0 && p < n_rows, "page_table[", b, ", ", i, "] = ", p,
                  " is not a pool row (", n_rows, " rows)");
    }
  }

  // A NaN or inf query would silently poison its request's output.
  TORCH_CHECK_VALUE(q.isfinite().all().item<bool>(), "q contains NaN or inf");

  at::Tensor out = at::empty(q.sizes(), q.options());
  Args a{L,
         int(Hq / kv_heads),
         int(rot_k),
         int(rot_v),
         float(scale),
         pool.data_ptr<uint8_t>(),
         pool.stride(0),
         pt,
         page_table.stride(0),
         np,
         ti,
         tl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_tail.scalar_type(), "decode_cpu", [&] {
    const float* qp = q.data_ptr<float>();
    const scalar_t* kp = k_tail.data_ptr<scalar_t>();
    const scalar_t* vp = v_tail.data_ptr<scalar_t>();
    float* op = out.data_ptr<float>();
    const std::array<int64_t, 3> kts{k_tail.stride(0), k_tail.stride(1), k_tail.stride(2)};
    const std::array<int64_t, 3> vts{v_tail.stride(0), v_tail.stride(1), v_tail.stride(2)};
    at::parallel_for(0, B * kv_heads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        decode_one<scalar_t>(a, qp, q.stride(0), q.stride(1), kp, vp, kts, vts, op,
                             out.stride(0), out.stride(1), int(i / kv_heads),
                             int(i % kv_heads));
    });
  });
  return out;
}

}  // namespace
}  // namespace oscar_kv_cpu

TORCH_LIBRARY(oscar_kv_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor pool, Tensor page_table, Tensor num_pages, "
      "Tensor k_tail, Tensor v_tail, Tensor tail_index, Tensor tail_len, float scale, "
      "int kv_heads, int head_dim, int bits, int k_group, int v_group, int norm, int rot_k, "
      "int rot_v) -> Tensor");
}

TORCH_LIBRARY_IMPL(oscar_kv_cpu, CPU, m) {
  m.impl("decode_attention", &oscar_kv_cpu::decode_attention);
}
