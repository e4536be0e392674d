// The oscar_kv ops in torch's dispatcher: schemas, CUDA kernels, and Meta (fake) kernels
// so torch.compile / meta tensors can trace shapes without running anything.
#include <torch/library.h>

#include "oscar_kv_ops.h"

namespace oscar_kv {
namespace {

void quantize_pages_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t) {}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                 const std::optional<at::Tensor>&) {
  return at::empty(q.sizes(), q.options());
}

std::tuple<at::Tensor, at::Tensor> dequantize_pages_meta(const at::Tensor& pool,
                                                         const at::Tensor& page_ids,
                                                         int64_t kv_heads, int64_t head_dim,
                                                         int64_t, int64_t, int64_t, int64_t,
                                                         int64_t, int64_t) {
  auto k = at::empty({page_ids.size(0), 128, kv_heads, head_dim},
                     pool.options().dtype(at::kFloat));
  return {k, at::empty_like(k)};
}

at::Tensor rotate_q_meta(const at::Tensor& q) {
  return at::empty(q.sizes(), q.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace oscar_kv

TORCH_LIBRARY(oscar_kv, m) {
  m.def(
      "quantize_pages(Tensor k, Tensor v, Tensor src_index, Tensor page_ids, Tensor(a!) pool, "
      "int kv_heads, int head_dim, int bits, int k_group, int v_group, int norm, int rot_k, "
      "int rot_v) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor pool, Tensor page_table, Tensor num_pages, "
      "Tensor k_tail, Tensor v_tail, Tensor tail_index, Tensor tail_len, float scale, "
      "int num_splits, int kv_heads, int head_dim, int bits, int k_group, int v_group, "
      "int norm, int rot_k, int rot_v, Tensor(a!)? lse=None) -> Tensor");
  m.def(
      "dequantize_pages(Tensor pool, Tensor page_ids, int kv_heads, int head_dim, int bits, "
      "int k_group, int v_group, int norm, int rot_k, int rot_v) -> (Tensor, Tensor)");
  m.def("rotate_q(Tensor q) -> Tensor");
}

TORCH_LIBRARY_IMPL(oscar_kv, CUDA, m) {
  m.impl("quantize_pages", &oscar_kv::quantize_pages);
  m.impl("decode_attention", &oscar_kv::decode_attention);
  m.impl("dequantize_pages", &oscar_kv::dequantize_pages);
  m.impl("rotate_q", &oscar_kv::rotate_q);
}

TORCH_LIBRARY_IMPL(oscar_kv, Meta, m) {
  m.impl("quantize_pages", &oscar_kv::quantize_pages_meta);
  m.impl("decode_attention", &oscar_kv::decode_attention_meta);
  m.impl("dequantize_pages", &oscar_kv::dequantize_pages_meta);
  m.impl("rotate_q", &oscar_kv::rotate_q_meta);
}
