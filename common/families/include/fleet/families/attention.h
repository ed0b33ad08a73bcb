// How much memory one attention may take, shared by the block code (common/models, which
// chunks by it) and the activation estimates of the families (which count it), so a plan's
// headroom covers what the blocks really allocate.
//
// Attention runs in chunks of query rows: each chunk forms its float32 scores against every
// key, its softmax (float32) and the probabilities (compute dtype), so a row's softmax is exact
// and the chunk size only bounds memory. The rule depends on shapes alone, never on the device
// or its free memory, so fleet-run-local and every worker cut the same chunks and compute the
// same bits.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fleet::families {

/// Bytes the score chunks of one attention may take.
inline constexpr uint64_t kAttentionBudgetBytes = 128ull << 20;

/// Bytes per score element: float32 logits, float32 softmax, probabilities (at most float32).
inline constexpr uint64_t kAttentionBytesPerScore = 12;

/// Query rows per chunk for `batch_heads` (batch x heads) attentions of `queries` rows over
/// `keys` keys: as many as fit the budget, at least one, at most `queries`.
inline int64_t AttentionChunkRows(int64_t batch_heads, int64_t queries, int64_t keys) {
  const uint64_t per_row = static_cast<uint64_t>(std::max<int64_t>(batch_heads, 1)) *
                           static_cast<uint64_t>(std::max<int64_t>(keys, 1)) *
                           kAttentionBytesPerScore;
  const int64_t rows = static_cast<int64_t>(kAttentionBudgetBytes / per_row);
  return std::clamp<int64_t>(rows, 1, std::max<int64_t>(queries, 1));
}

/// Peak bytes of one attention's score chunk (what an activation estimate adds for it).
inline uint64_t AttentionChunkBytes(int64_t batch_heads, int64_t queries, int64_t keys) {
  return static_cast<uint64_t>(AttentionChunkRows(batch_heads, queries, keys)) *
         static_cast<uint64_t>(std::max<int64_t>(batch_heads, 1)) *
         static_cast<uint64_t>(std::max<int64_t>(keys, 1)) * kAttentionBytesPerScore;
}

}  // namespace fleet::families
