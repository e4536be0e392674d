// Host entry points of the oscar-kv CUDA ops (registered in torch_bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace oscar_kv {

// Layout arguments, in this order everywhere: kv_heads, head_dim, bits, k_group, v_group,
// norm (0 none, 1 token, 2 head), rot_k, rot_v (rotate K / rotate V online).
void quantize_pages(const at::Tensor& k, const at::Tensor& v, const at::Tensor& src_index,
                    const at::Tensor& page_ids, at::Tensor& pool, int64_t kv_heads,
                    int64_t head_dim, int64_t bits, int64_t k_group, int64_t v_group,
                    int64_t norm, int64_t rot_k, int64_t rot_v);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& pool,
                            const at::Tensor& page_table, const at::Tensor& num_pages,
                            const at::Tensor& k_tail, const at::Tensor& v_tail,
                            const at::Tensor& tail_index, const at::Tensor& tail_len,
                            double scale, int64_t num_splits, int64_t kv_heads, int64_t head_dim,
                            int64_t bits, int64_t k_group, int64_t v_group, int64_t norm,
                            int64_t rot_k, int64_t rot_v, const std::optional<at::Tensor>& lse);

std::tuple<at::Tensor, at::Tensor> dequantize_pages(const at::Tensor& pool,
                                                    const at::Tensor& page_ids, int64_t kv_heads,
                                                    int64_t head_dim, int64_t bits,
                                                    int64_t k_group, int64_t v_group,
                                                    int64_t norm, int64_t rot_k, int64_t rot_v);

at::Tensor rotate_q(const at::Tensor& q);

}  // namespace oscar_kv
