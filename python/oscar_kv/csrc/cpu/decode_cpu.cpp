// Decode attention over packed pages + the exact tail on the CPU, fused: the codes of 8
// channels come out of one 16- or 32-bit word (channel c + j at bit j * bits) and are used
// at once, so nothing the size of the context is ever materialized (the batched torch ops
// dequantize whole pages first).
//
// One task per (request, KV head), spread over at::parallel_for; the G query heads of the KV
// head share every loaded code word. Per page, in the rotated unit-scaled basis of the reference
// (oscar_kv.ref.attention):
//   K: for each K group, qs[g][c] = (H q)[g][c] * k_scale[c], qz[g] = (H q)[g] . k_zero;
//      logit[g][t] = (qs[g] . code[t] + qz[g]) * norm[t] * scale
//   V: acc[g] += p[g][t] * (code[t][c] * v_scale[t][grp(c)] + v_zero[t][grp(c)])
// with one online-softmax update per page. After the pages the value part is un-rotated when
// V was rotated online (linear, so it commutes with the softmax rescaling), then the tail
// tokens (model basis, unrotated q) are folded in the same way. The optional lse output gets
// each query head's m + log(l): the log-sum-exp of its scaled logits, which a caller merging
// this attention with another part over other keys needs.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <optional>
#include <vector>

#include "oscar/layout.h"

namespace oscar_kv_cpu {
namespace {

using oscar::kBlockTokens;
using oscar::PageLayout;

constexpr int kLanes = 8;  // floats per SIMD step (one AVX2 register)
constexpr int kMaxHeadBlock = 8;  // query heads whose accumulators stay in registers

inline void halves_to_float(const uint8_t* src, int64_t n, float* dst) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
#ifdef __F16C__
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(h[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = float(c10::Half(h[i], c10::Half::from_bits()));
#endif
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
#pragma omp simd reduction(max : mx)
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

#ifdef __AVX2__
// AVX2: a step's 8 codes come from one 16-bit (2-bit codes) or 32-bit (4-bit) word,
// broadcast and shifted per lane (channel c + j sits at bit j * bits), so nothing goes
// through memory between unpacking and use.
inline __m256 codes8(const uint8_t* row, int c, int bits) {
  if (bits == 2) {
    uint16_t w;
    std::memcpy(&w, row + c / 4, 2);
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i x = _mm256_srlv_epi32(_mm256_set1_epi32(w), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(3)));
  }
  uint32_t w;
  std::memcpy(&w, row + c / 2, 4);
  const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i x = _mm256_srlv_epi32(_mm256_set1_epi32(int(w)), sh);
  return _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(15)));
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Logits of tokens [t0, t1) of a page for a block of GB heads: qs [GB][D] and qz [GB] are
// the K group's folded query (see the top of the file); GB accumulators in registers.
template <int GB>
void page_logits(const float* qs, const float* qz, const uint8_t* kc, int NB, int D, int bits,
                 int t0, int t1, const float* norms, float scale, float* logits) {
  for (int t = t0; t < t1; ++t) {
    const uint8_t* row = kc + int64_t(t) * NB;
    __m256 part[GB];
    for (int g = 0; g < GB; ++g) part[g] = _mm256_setzero_ps();
    for (int c = 0; c < D; c += kLanes) {
      const __m256 code = codes8(row, c, bits);
      for (int g = 0; g < GB; ++g)
        part[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + g * D + c), code, part[g]);
    }
    const float f = (norms ? norms[t] : 1.f) * scale;
    for (int g = 0; g < GB; ++g) logits[g * kBlockTokens + t] = (hsum(part[g]) + qz[g]) * f;
  }
}

// acc [GB][D] += sum_t p[g][t] * V[t], 8 channels at a time over all 128 tokens, the GB
// accumulators in registers; vs/vz [128][D / VG] are the page's V params as floats.
template <int GB>
void page_values(const float* p, const uint8_t* vc, const float* vs, const float* vz, int NB,
                 int D, int bits, int VG, float* acc) {
  const int NVG = D / VG;
  for (int c = 0; c < D; c += kLanes) {
    __m256 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm256_loadu_ps(acc + g * D + c);
    const int gv = c / VG;  // VG is a multiple of 8: one V group per step
    for (int t = 0; t < kBlockTokens; ++t) {
      const __m256 v = _mm256_fmadd_ps(codes8(vc + int64_t(t) * NB, c, bits),
                                       _mm256_set1_ps(vs[t * NVG + gv]),
                                       _mm256_set1_ps(vz[t * NVG + gv]));
      for (int g = 0; g < GB; ++g)
        a[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * kBlockTokens + t]), v, a[g]);
    }
    for (int g = 0; g < GB; ++g) _mm256_storeu_ps(acc + g * D + c, a[g]);
  }
}
#else
// The 8 codes of channels c..c+7 (c % 8 == 0) of a packed row, as floats: the same word and
// shifts as the AVX2 path, one lane at a time.
inline void codes8_portable(const uint8_t* row, int c, int bits, float* out) {
  uint32_t w = 0;
  std::memcpy(&w, row + c * bits / 8, bits);  // 8 codes of `bits` bits = `bits` bytes
  const uint32_t mask = (1u << bits) - 1;
  for (int j = 0; j < kLanes; ++j) out[j] = float((w >> (j * bits)) & mask);
}

// Logits of tokens [t0, t1) of a page for a block of GB heads: qs [GB][D] and qz [GB] are
// the K group's folded query (see the top of the file). GB accumulators of 8 lanes stay in
// registers while a token's codes stream by.
template <int GB>
void page_logits(const float* qs, const float* qz, const uint8_t* kc, int NB, int D, int bits,
                 int t0, int t1, const float* norms, float scale, float* logits) {
  for (int t = t0; t < t1; ++t) {
    const uint8_t* row = kc + int64_t(t) * NB;
    float part[GB][kLanes] = {};
    for (int c = 0; c < D; c += kLanes) {
      float code[kLanes];
      codes8_portable(row, c, bits, code);
      for (int g = 0; g < GB; ++g)
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) part[g][j] += qs[g * D + c + j] * code[j];
    }
    const float f = (norms ? norms[t] : 1.f) * scale;
    for (int g = 0; g < GB; ++g) {
      float sum = 0.f;
      for (int j = 0; j < kLanes; ++j) sum += part[g][j];
      logits[g * kBlockTokens + t] = (sum + qz[g]) * f;
    }
  }
}

// acc [GB][D] += sum_t p[g][t] * V[t], 8 channels at a time over all 128 tokens, so the GB
// accumulators stay in registers; vs/vz [128][D / VG] are the page's V params as floats.
template <int GB>
void page_values(const float* p, const uint8_t* vc, const float* vs, const float* vz, int NB,
                 int D, int bits, int VG, float* acc) {
  const int NVG = D / VG;
  for (int c = 0; c < D; c += kLanes) {
    float a[GB][kLanes];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < kLanes; ++j) a[g][j] = acc[g * D + c + j];
    const int gv = c / VG;  // VG is a multiple of 8: one V group per step
    for (int t = 0; t < kBlockTokens; ++t) {
      float code[kLanes];
      codes8_portable(vc + int64_t(t) * NB, c, bits, code);
      const float s = vs[t * NVG + gv], z = vz[t * NVG + gv];
      for (int g = 0; g < GB; ++g) {
        const float pg = p[g * kBlockTokens + t];
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) a[g][j] += pg * (code[j] * s + z);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < kLanes; ++j) acc[g * D + c + j] = a[g][j];
  }
}

#endif  // __AVX2__

// Calls f(std::integral_constant<int, gb>) for gb in 1..8.
template <typename F>
void with_head_block(int gb, F&& f) {
  switch (gb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// q and out are fp32; the tails are T (the model's dtype).
template <typename T>
void decode_one(const Args& a, const float* q, int64_t qs0, int64_t qs1, const T* kt,
                const T* vt, std::array<int64_t, 3> kts, std::array<int64_t, 3> vts, float* out,
                int64_t os0, int64_t os1, float* lse, int64_t ls0, int64_t ls1, int b, int hk) {
  const PageLayout& L = a.L;
  const int D = L.head_dim, G = a.G, NB = D * L.bits / 8, KG = L.k_group;
  const int NGK = kBlockTokens / KG, NVG = D / L.v_group;
  std::vector<float> qf(G * D), qr(G * D), acc(G * D, 0.f), logits(G * kBlockTokens);
  std::vector<float> row(D), qz(G), m(G, -std::numeric_limits<float>::infinity()), l(G, 0.f);
  std::vector<float> qs(kMaxHeadBlock * D), ksf(NGK * D), kzf(NGK * D), vsf(kBlockTokens * NVG),
      vzf(kBlockTokens * NVG);
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
    const float* norms = nullptr;
    if (L.norm == oscar::kNormToken) norms = reinterpret_cast<const float*>(page + L.off_norms);
    if (L.norm == oscar::kNormHead)
      norms = reinterpret_cast<const float*>(page + L.off_norms) + int64_t(hk) * kBlockTokens;
    const int64_t kpar = int64_t(hk) * NGK * D * 2, vpar = int64_t(hk) * kBlockTokens * NVG * 2;
    halves_to_float(page + L.off_k_scale + kpar, NGK * D, ksf.data());
    halves_to_float(page + L.off_k_zero + kpar, NGK * D, kzf.data());
    halves_to_float(page + L.off_v_scale + vpar, kBlockTokens * NVG, vsf.data());
    halves_to_float(page + L.off_v_zero + vpar, kBlockTokens * NVG, vzf.data());
    for (int g0 = 0; g0 < G; g0 += kMaxHeadBlock) {
      const int gb = std::min(kMaxHeadBlock, G - g0);
      float* lg = logits.data() + g0 * kBlockTokens;
      float* ac = acc.data() + g0 * D;
      with_head_block(gb, [&](auto GB) {
        for (int grp = 0; grp < NGK; ++grp) {
          for (int g = 0; g < GB; ++g) {
            float z = 0.f;
#pragma omp simd reduction(+ : z)
            for (int c = 0; c < D; ++c) {
              qs[g * D + c] = qr[(g0 + g) * D + c] * ksf[grp * D + c];
              z += qr[(g0 + g) * D + c] * kzf[grp * D + c];
            }
            qz[g] = z;
          }
          page_logits<GB>(qs.data(), qz.data(), kc, NB, D, L.bits, grp * KG, (grp + 1) * KG,
                          norms, a.scale, lg);
        }
        softmax_block(lg, kBlockTokens, GB, D, m.data() + g0, l.data() + g0, ac);
        page_values<GB>(lg, vc, vsf.data(), vzf.data(), NB, D, L.bits, L.v_group, ac);
      });
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
    // m is the running max of the natural-log logits, l the sum of exp(logit - m).
    if (lse) lse[b * ls0 + (hk * G + g) * ls1] = m[g] + std::log(l[g]);
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
                            int64_t rot_v, const std::optional<at::Tensor>& lse) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK_VALUE(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  TORCH_CHECK_VALUE(k_group == 32 || k_group == 64 || k_group == 128,
              "k_group must be 32, 64 or 128, got ", k_group);
  TORCH_CHECK_VALUE(v_group % 8 == 0 && head_dim % v_group == 0,
                    "v_group must be a multiple of 8 dividing head_dim, got ", v_group);
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

  if (lse)
    TORCH_CHECK_VALUE(lse->device().is_cpu() && lse->scalar_type() == at::kFloat &&
                          lse->dim() == 2 && lse->size(0) == B && lse->size(1) == Hq,
                      "lse must be a CPU float32 [", B, ", ", Hq, "] tensor");
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
    float* lp = lse ? lse->data_ptr<float>() : nullptr;
    const int64_t ls0 = lse ? lse->stride(0) : 0, ls1 = lse ? lse->stride(1) : 0;
    const std::array<int64_t, 3> kts{k_tail.stride(0), k_tail.stride(1), k_tail.stride(2)};
    const std::array<int64_t, 3> vts{v_tail.stride(0), v_tail.stride(1), v_tail.stride(2)};
    at::parallel_for(0, B * kv_heads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        decode_one<scalar_t>(a, qp, q.stride(0), q.stride(1), kp, vp, kts, vts, op,
                             out.stride(0), out.stride(1), lp, ls0, ls1, int(i / kv_heads),
                             int(i % kv_heads));
    });
  });
  return out;
}

// Shapes only: lets torch.compile / FakeTensor trace through the op without running it.
at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                 int64_t, const std::optional<at::Tensor>&) {
  return at::empty(q.sizes(), q.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace oscar_kv_cpu

TORCH_LIBRARY(oscar_kv_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor pool, Tensor page_table, Tensor num_pages, "
      "Tensor k_tail, Tensor v_tail, Tensor tail_index, Tensor tail_len, float scale, "
      "int kv_heads, int head_dim, int bits, int k_group, int v_group, int norm, int rot_k, "
      "int rot_v, Tensor(a!)? lse=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(oscar_kv_cpu, CPU, m) {
  m.impl("decode_attention", &oscar_kv_cpu::decode_attention);
}

TORCH_LIBRARY_IMPL(oscar_kv_cpu, Meta, m) {
  m.impl("decode_attention", &oscar_kv_cpu::decode_attention_meta);
}
