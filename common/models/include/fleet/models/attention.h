// Attention as every family's blocks compute it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fleet::models {

/// softmax(q k^T / sqrt(d)) v for q [B, H, Tq, d] and k, v [B, H, Tk, d]; returns [B, Tq, H*d]
/// in v's dtype. Logits and softmax are float32 (as fused GPU attention computes them; bf16
/// logits of magnitude ~10 would carry errors of ~4% in the weights). Queries are taken in
/// chunks of `max_rows` rows (0: as many as fleet::families::AttentionChunkRows allows), each
/// against every key, so the softmax of each row is exact and memory stays under the budget
/// the activation estimates count. On CUDA, with a libtorch that has
/// scaled_dot_product_attention, that kernel computes it instead.
/// \param mask when defined, a float32 additive mask broadcastable to [B, H, Tq, Tk] (text
/// encoders' padding and causal masks, T5's position bias), added to the scaled logits.
at::Tensor ScaledDotAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t max_rows = 0, const at::Tensor& mask = {});

}  // namespace fleet::models
