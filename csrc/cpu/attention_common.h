// What the prefill (attention.cpp) and decode (attention_decode.cpp) halves of the CPU paged attention share: the
// work-item sizes, the scalar dot product and accumulate, one online-softmax step; and the decode entry point.
#pragma once

#include <algorithm>

#include "cpu/attention_tile.h"
#include "cpu/cpu_types.h"
#include "cpu/vec_math.h"

namespace slf::cpu {

constexpr int64_t kKeyTile = 32;  // keys per online-softmax step
constexpr int64_t kMaxRows = 64;  // q rows (tokens x heads of one kv group) per work item
static_assert(kTileMaxRows == kMaxRows && kTileKeys == kKeyTile, "attention_tile.cpp takes the same work items");

// ---- dot(q, k) and acc += p * v over one head (D values) ----
template <typename scalar_t>
inline float dot_scalar(const float* q, const scalar_t* k, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += q[i] * to_float(k[i]);
  return s;
}

template <typename scalar_t>
inline void scale_add_scalar(float* acc, float alpha, const float* p, const scalar_t* const* v, int64_t n,
                             int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    float a = acc[i] * alpha;
    // NOTE: p == 0 (a masked key, or an exp underflow) is skipped rather than multiplied, so that a NaN in a
    // cache slot that is never attended cannot leak into the output.
    for (int64_t j = 0; j < n; ++j)
      if (p[j] != 0.f) a += p[j] * to_float(v[j][i]);
    acc[i] = a;
  }
}

// One online-softmax step over the scores s[0:n] of a row: moves the state to the tile's maximum, replaces s[j] by
// exp(s[j] - m) and adds them to st->l; returns the factor the row's accumulator must be scaled by.
template <bool kAvx2>
inline float softmax_tile(SoftmaxState* st, float* s, int64_t n) {
  float bmax = -INFINITY;
  for (int64_t j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
  const float alpha = softmax_rescale(st, bmax);
  if constexpr (kAvx2) {
    st->l += exp_sub_sum(s, n, st->m);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      s[j] = expf(s[j] - st->m);
      st->l += s[j];
    }
  }
  return alpha;
}

// One decode work item for decode_item_avx512 (attention_decode512.cpp): q rows r = q heads h0 + r of one token
// (kv head (h0 + r) / group) against keys [k0, k1) of its sequence.
template <typename scalar_t>
struct DecodeArgs {
  const scalar_t* q;                      // [rows, D] at g->q_head_stride: q head h0 of the token
  const scalar_t* k_cache;                // [num_blocks, block_size, Hkv, D]
  const scalar_t* v_cache;                // same
  const int32_t* block_table;             // [max_blocks] of the sequence
  int64_t head_off;                       // cache offset of kv head h0 / group within a token row
  int64_t rows, k0, k1;
  scalar_t* out;                          // [rows, D] at g->out_head_stride (partial == nullptr)
  float* partial;                         // [rows][2 + D]: (m, l, unnormalized acc) of a context part, or nullptr
  const TileGeom* g;
};

// fp32 elements (64-byte aligned) of one thread's workspace for decode_item_avx512.
int64_t decode512_workspace_floats(int64_t head_dim);
template <typename scalar_t>
void decode_item_avx512(const DecodeArgs<scalar_t>& a, float* workspace);

// The context parts (up to kMaxParts) of one decode row block -> its normalized output rows: parts[s] is part s's
// [rows][2 + D] (m, l, acc) from decode_item_avx512, in key order.
constexpr int64_t kMaxParts = 8;
template <typename scalar_t>
void merge_parts_avx512(const float* const* parts, int64_t n, int64_t rows, int64_t d, scalar_t* out,
                        int64_t out_head_stride);

// Decode, one q token per sequence (attention_decode.cpp): out[b] = attention of q[b] over its context_lens[b] keys.
template <typename scalar_t>
void paged_decode(scalar_t* out, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs, int64_t hkv,
                  int64_t bt_stride, const TileGeom& g);

}  // namespace slf::cpu
