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

// Decode, one q token per sequence (attention_decode.cpp): out[b] = attention of q[b] over its context_lens[b] keys.
template <typename scalar_t>
void paged_decode(scalar_t* out, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs, int64_t hkv,
                  int64_t bt_stride, const TileGeom& g);

}  // namespace slf::cpu
