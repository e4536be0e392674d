// Launchers of the oscar-kv CUDA kernels: input checks, layout, template dispatch.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a
// bare CUDA toolkit (nvcc + cudart, as in CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "oscar/decode.cuh"
#include "oscar/quant.cuh"
#include "oscar_kv_ops.h"

namespace oscar_kv {
namespace {

using oscar::PageLayout;

PageLayout checked_layout(int64_t kv_heads, int64_t head_dim, int64_t bits, int64_t k_group,
                          int64_t v_group, int64_t norm) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  TORCH_CHECK(k_group == 32 || k_group == 64 || k_group == 128,
              "k_group must be 32, 64 or 128, got ", k_group);
  TORCH_CHECK(v_group >= 16 && v_group <= head_dim && head_dim % v_group == 0 &&
                  (v_group & (v_group - 1)) == 0,
              "v_group must be a power of two in 16..head_dim, got ", v_group);
  TORCH_CHECK(norm >= 0 && norm <= 2, "norm must be 0 (none), 1 (token) or 2 (head)");
  TORCH_CHECK(kv_heads >= 1, "kv_heads must be >= 1");
  return oscar::make_layout(int(kv_heads), int(head_dim), int(bits), int(k_group), int(v_group),
                            int(norm));
}

void check_pool(const at::Tensor& pool, const PageLayout& l) {
  TORCH_CHECK(pool.is_cuda(), "pool must be a CUDA tensor");
  TORCH_CHECK(pool.scalar_type() == at::kByte && pool.dim() == 2 && pool.size(1) == l.page_bytes,
              "pool must be uint8 [num_pages, ", l.page_bytes, "], got ", pool.sizes());
  TORCH_CHECK(pool.stride(1) == 1 && pool.stride(0) % 16 == 0,
              "pool rows must be contiguous with a row stride that is a multiple of 16");
}

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              name, " must be a contiguous int32 CUDA tensor of length ", n);
}

bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// Calls f.template operator()<T, D, BITS>() for the runtime dtype / head_dim / bits.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t d, int64_t bits, F&& f) {
  auto by_bits = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (bits == 2) f.template operator()<T, D, 2>();
    else f.template operator()<T, D, 4>();
  };
  auto by_dim = [&](auto tag) {
    if (d == 64) by_bits(tag, std::integral_constant<int, 64>{});
    else if (d == 128) by_bits(tag, std::integral_constant<int, 128>{});
    else by_bits(tag, std::integral_constant<int, 256>{});
  };
  if (dtype == at::kBFloat16) by_dim(__nv_bfloat16{});
  else if (dtype == at::kHalf) by_dim(__half{});
  else by_dim(float{});
}

}  // namespace

void quantize_pages(const at::Tensor& k, const at::Tensor& v, const at::Tensor& src_index,
                    const at::Tensor& page_ids, at::Tensor& pool, int64_t kv_heads,
                    int64_t head_dim, int64_t bits, int64_t k_group, int64_t v_group,
                    int64_t norm, int64_t rot_k, int64_t rot_v) {
  const PageLayout l = checked_layout(kv_heads, head_dim, bits, k_group, v_group, norm);
  check_pool(pool, l);
  TORCH_CHECK(k.is_cuda() && v.is_cuda(), "k and v must be CUDA tensors");
  TORCH_CHECK(k.dim() == 4 && k.size(1) == oscar::kBlockTokens && k.size(2) == kv_heads &&
                  k.size(3) == head_dim,
              "k must be [n, 128, ", kv_heads, ", ", head_dim, "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "v must match k's shape and dtype");
  TORCH_CHECK(is_float_type(k.scalar_type()), "k must be float32, float16 or bfloat16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v channels must be contiguous");
  const int64_t n = page_ids.size(0);
  check_index(page_ids, "page_ids", n);
  check_index(src_index, "src_index", n);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(pool.device());
  oscar::QuantizeArgs a{};
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.src_index = src_index.data_ptr<int32_t>();
  a.page_ids = page_ids.data_ptr<int32_t>();
  a.pool = pool.data_ptr<uint8_t>();
  a.page_stride = pool.stride(0);
  for (int i = 0; i < 3; ++i) {
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
  }
  a.layout = l;
  a.rot_k = int(rot_k);
  a.rot_v = int(rot_v);
  const dim3 grid(unsigned(n), unsigned(kv_heads), unsigned(oscar::kBlockTokens / k_group));
  const size_t smem = size_t(k_group) * head_dim * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(k.scalar_type(), head_dim, bits, [&]<typename T, int D, int BITS>() {
    auto kernel = oscar::quantize_pages_kernel<T, D, BITS>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
    kernel<<<grid, 128, smem, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& pool,
                            const at::Tensor& page_table, const at::Tensor& num_pages,
                            const at::Tensor& k_tail, const at::Tensor& v_tail,
                            const at::Tensor& tail_index, const at::Tensor& tail_len,
                            double scale, int64_t num_splits, int64_t kv_heads, int64_t head_dim,
                            int64_t bits, int64_t k_group, int64_t v_group, int64_t norm,
                            int64_t rot_k, int64_t rot_v, const std::optional<at::Tensor>& lse) {
  const PageLayout l = checked_layout(kv_heads, head_dim, bits, k_group, v_group, norm);
  check_pool(pool, l);
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.size(2) == head_dim && q.stride(2) == 1,
              "q must be a CUDA [batch, q_heads, ", head_dim, "] tensor with contiguous channels");
  TORCH_CHECK(is_float_type(q.scalar_type()), "q must be float32, float16 or bfloat16");
  const int64_t batch = q.size(0), hq = q.size(1);
  TORCH_CHECK(hq % kv_heads == 0 && hq / kv_heads <= oscar::kMaxGroup,
              "q_heads / kv_heads must be an integer <= ", oscar::kMaxGroup);
  const int group = int(hq / kv_heads);
  TORCH_CHECK(page_table.is_cuda() && page_table.scalar_type() == at::kInt &&
                  page_table.dim() == 2 && page_table.size(0) == batch &&
                  page_table.stride(1) == 1,
              "page_table must be int32 CUDA [batch, max_pages] with contiguous rows");
  check_index(num_pages, "num_pages", batch);
  check_index(tail_index, "tail_index", batch);
  check_index(tail_len, "tail_len", batch);
  for (const at::Tensor* t : {&k_tail, &v_tail}) {
    TORCH_CHECK(t->is_cuda() && t->dim() == 4 && t->size(1) == oscar::kBlockTokens &&
                    t->size(2) == kv_heads && t->size(3) == head_dim && t->stride(3) == 1,
                "k_tail/v_tail must be CUDA [slots, 128, ", kv_heads, ", ", head_dim, "]");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "k_tail/v_tail must have q's dtype");
  }
  if (lse)
    TORCH_CHECK(lse->device() == q.device() && lse->scalar_type() == at::kFloat &&
                    lse->dim() == 2 && lse->size(0) == batch && lse->size(1) == hq,
                "lse must be a float32 [", batch, ", ", hq, "] tensor on q's device");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t max_pages = page_table.size(1);
  int64_t ns = num_splits;
  if (ns <= 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    ns = std::max<int64_t>(1, std::min<int64_t>(max_pages, (2 * sms + batch * kv_heads - 1) /
                                                                (batch * kv_heads)));
  }
  const int64_t pps = std::max<int64_t>(1, (max_pages + ns - 1) / ns);
  ns = max_pages ? std::max<int64_t>(1, (max_pages + pps - 1) / pps) : 1;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor mid_o = at::empty({batch, hq, ns + 1, head_dim}, f32);
  at::Tensor mid_m = at::empty({batch, hq, ns + 1}, f32);
  at::Tensor mid_l = at::empty({batch, hq, ns + 1}, f32);
  at::Tensor out = at::empty({batch, hq, head_dim}, q.options());

  oscar::DecodeArgs a{};
  a.q = q.data_ptr();
  a.q_stride[0] = q.stride(0);
  a.q_stride[1] = q.stride(1);
  a.pool = pool.data_ptr<uint8_t>();
  a.page_stride = pool.stride(0);
  a.page_table = page_table.data_ptr<int32_t>();
  a.pt_stride = page_table.stride(0);
  a.num_pages = num_pages.data_ptr<int32_t>();
  a.k_tail = k_tail.data_ptr();
  a.v_tail = v_tail.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.kt_stride[i] = k_tail.stride(i);
    a.vt_stride[i] = v_tail.stride(i);
  }
  a.tail_index = tail_index.data_ptr<int32_t>();
  a.tail_len = tail_len.data_ptr<int32_t>();
  a.mid_o = mid_o.data_ptr<float>();
  a.mid_m = mid_m.data_ptr<float>();
  a.mid_l = mid_l.data_ptr<float>();
  a.pages_per_split = int(pps);
  a.qk_scale = float(scale * 1.4426950408889634);
  a.group = group;
  a.layout = l;
  a.rot_q = int(rot_k);
  const int rb = int(head_dim * bits / 8);
  const size_t smem = sizeof(float) * oscar::decode_smem(int(head_dim), group,
                                                          int(oscar::kBlockTokens / k_group), rb,
                                                          int(head_dim / v_group))
                                           .total;
  // Older parts (sm_86/sm_89: 99 KiB per block) cannot hold the largest shapes; say so
  // instead of a bare "invalid argument" from cudaFuncSetAttribute.
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= size_t(optin), "oscar_kv decode needs ", smem,
              " B of shared memory per block (head_dim ", head_dim, ", GQA group ", group, ", ",
              bits, "-bit, k_group ", k_group, ") and this GPU allows ", optin,
              "; use OSCAR_KV_BACKEND=triton or a model with a smaller GQA group");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(unsigned(batch), unsigned(kv_heads), unsigned(ns + 1));
  dispatch(q.scalar_type(), head_dim, bits, [&]<typename T, int D, int BITS>() {
    auto split = oscar::decode_split_kernel<T, D, BITS>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
    split<<<grid, oscar::kDecodeThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    oscar::merge_kernel<T, D><<<dim3(unsigned(batch), unsigned(kv_heads)), oscar::kDecodeThreads,
                                sizeof(float) * group * D, stream>>>(
        a.mid_o, a.mid_m, a.mid_l, static_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1),
        int(ns), group, int(rot_v), lse ? lse->data_ptr<float>() : nullptr,
        lse ? lse->stride(0) : 0, lse ? lse->stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dequantize_pages(const at::Tensor& pool,
                                                    const at::Tensor& page_ids, int64_t kv_heads,
                                                    int64_t head_dim, int64_t bits,
                                                    int64_t k_group, int64_t v_group,
                                                    int64_t norm, int64_t rot_k, int64_t rot_v) {
  const PageLayout l = checked_layout(kv_heads, head_dim, bits, k_group, v_group, norm);
  check_pool(pool, l);
  const int64_t n = page_ids.size(0);
  check_index(page_ids, "page_ids", n);
  const c10::cuda::CUDAGuard guard(pool.device());
  auto opts = pool.options().dtype(at::kFloat);
  at::Tensor k = at::empty({n, oscar::kBlockTokens, kv_heads, head_dim}, opts);
  at::Tensor v = at::empty_like(k);
  if (n == 0) return {k, v};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(at::kFloat, head_dim, bits, [&]<typename T, int D, int BITS>() {
    oscar::dequantize_pages_kernel<D, BITS><<<dim3(unsigned(n), unsigned(kv_heads), 4), 128, 0,
                                              stream>>>(
        pool.data_ptr<uint8_t>(), pool.stride(0), page_ids.data_ptr<int32_t>(),
        k.data_ptr<float>(), v.data_ptr<float>(), l, int(rot_k), int(rot_v));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {k, v};
}

at::Tensor rotate_q(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda() && is_float_type(q.scalar_type()), "q must be a float CUDA tensor");
  const int64_t d = q.size(-1);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "head_dim must be 64, 128 or 256, got ", d);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor x = q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / d;
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), d, 2, [&]<typename T, int D, int BITS>() {
    oscar::fwht_rows_kernel<T, D><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(
        static_cast<const T*>(x.data_ptr()), out.data_ptr<float>(), rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace oscar_kv
