// Chunked attention: every chunk size gives the unchunked result up to float32 rounding (each
// row's softmax is over all keys; BLAS may sum a row differently in a smaller matmul), one
// chunk size always gives the same bits, the budget rule bounds a chunk's scores, and bf16
// inputs keep their dtype.
#include "fleet/models/attention.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "fleet/families/attention.h"

namespace fleet::models {
namespace {

// The formula written out, whole rows at once.
at::Tensor Naive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor p = at::softmax(at::matmul(q, k.transpose(-1, -2)) / std::sqrt(q.size(3)), -1);
  return at::matmul(p, v).permute({0, 2, 1, 3}).reshape({q.size(0), q.size(2), -1});
}

TEST(Attention, EveryChunkSizeGivesTheWholeRowsResult) {
  at::Tensor q = at::randn({2, 3, 37, 16}), k = at::randn({2, 3, 11, 16}),
             v = at::randn({2, 3, 11, 16});
  at::Tensor whole = ScaledDotAttention(q, k, v, /*max_rows=*/37);
  EXPECT_EQ(whole.sizes(), (std::vector<int64_t>{2, 37, 48}));
  EXPECT_TRUE(at::allclose(whole, Naive(q, k, v), 1e-5, 1e-6));
  for (int64_t rows : {1, 5, 36, 100}) {
    at::Tensor chunked = ScaledDotAttention(q, k, v, rows);
    EXPECT_TRUE(at::allclose(chunked, whole, 1e-6, 1e-6)) << rows;
    EXPECT_TRUE(at::equal(ScaledDotAttention(q, k, v, rows), chunked)) << rows;
  }
  EXPECT_TRUE(at::equal(ScaledDotAttention(q, k, v), whole));  // the budget: one chunk here
}

TEST(Attention, AnAdditiveMaskIsAddedToEveryChunksLogits) {
  at::Tensor q = at::randn({2, 3, 9, 8}), k = at::randn({2, 3, 9, 8}), v = at::randn({2, 3, 9, 8});
  // A padding mask per sample (the last 4 keys of sample 1) broadcast over heads, plus a
  // per-head bias, as the text encoders build them.
  at::Tensor mask = at::zeros({2, 1, 9, 9});
  mask.select(0, 1).narrow(-1, 5, 4).fill_(-std::numeric_limits<float>::max());
  at::Tensor bias = at::randn({1, 3, 9, 9});
  at::Tensor whole = ScaledDotAttention(q, k, v, /*max_rows=*/9, mask + bias);
  at::Tensor p = at::softmax(at::matmul(q, k.transpose(-1, -2)) / std::sqrt(8.0) + mask + bias, -1);
  EXPECT_TRUE(
      at::allclose(whole, at::matmul(p, v).permute({0, 2, 1, 3}).reshape({2, 9, -1}), 1e-5, 1e-6));
  for (int64_t rows : {1, 4}) {
    EXPECT_TRUE(at::allclose(ScaledDotAttention(q, k, v, rows, mask + bias), whole, 1e-6, 1e-6));
  }
  // Masked keys get no weight: sample 1 does not depend on its last 4 values.
  at::Tensor v2 = v.clone();
  v2.select(0, 1).narrow(-2, 5, 4).fill_(1e3);
  EXPECT_TRUE(at::equal(ScaledDotAttention(q, k, v2, 9, mask).select(0, 1),
                        ScaledDotAttention(q, k, v, 9, mask).select(0, 1)));
  // A mask of one row broadcasts over the queries.
  EXPECT_TRUE(at::allclose(
      ScaledDotAttention(q, k, v, 4, bias.narrow(-2, 0, 1)),
      ScaledDotAttention(q, k, v, 9, bias.narrow(-2, 0, 1).expand({1, 3, 9, 9})), 1e-6, 1e-6));
}

TEST(Attention, KeepsTheValuesDtype) {
  at::Tensor q = at::randn({1, 2, 8, 8}).to(at::kBFloat16), k = at::randn({1, 2, 8, 8}),
             v = at::randn({1, 2, 8, 8}).to(at::kBFloat16);
  EXPECT_EQ(ScaledDotAttention(q, k.to(at::kBFloat16), v, 3).scalar_type(), at::kBFloat16);
}

TEST(Attention, TheBudgetBoundsAChunk) {
  using families::AttentionChunkBytes;
  using families::AttentionChunkRows;
  using families::kAttentionBudgetBytes;
  // WAN 14B at 480p, 81 frames: 40 heads over 32,760 tokens; the full matrix would be 51 GB.
  EXPECT_LE(AttentionChunkBytes(40, 32760, 32760), kAttentionBudgetBytes);
  EXPECT_GE(AttentionChunkRows(40, 32760, 32760), 1);
  EXPECT_EQ(AttentionChunkRows(2, 10, 10), 10);  // small: one chunk
  // A row that alone exceeds the budget still runs, one row at a time.
  EXPECT_EQ(AttentionChunkRows(1 << 20, 100, 1 << 20), 1);
}

}  // namespace
}  // namespace fleet::models
