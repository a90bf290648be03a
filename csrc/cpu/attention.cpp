// Paged causal attention on CPU: varlen prefill / chunked-prefill extend, and decode (q_len = 1), with GQA.
// Scores, softmax and the output accumulator are fp32 (online softmax over tiles of KT keys). This file splits the
// work into items and runs decode; prefill / extend items go to attention_tile.cpp (AVX2 / AVX-512 GEMM tiles) and,
// below AVX2, to the scalar attention_item here; AVX-512 decode tiles are in attention_decode512.cpp.
#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/attention_tile.h"
#include "cpu/cpu_types.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace slf::cpu {
namespace {

constexpr int64_t kKeyTile = 32;  // keys per online-softmax step
constexpr int64_t kMaxRows = 64;  // q rows (tokens x heads of one kv group) per work item

// ---- dot(q, k) and acc += p * v over one head (D values) ----
template <typename scalar_t>
inline float dot_scalar(const float* q, const scalar_t* k, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += q[i] * to_float(k[i]);
  return s;
}

template <typename scalar_t>
SLF_AVX2 float dot_avx2(const float* q, const scalar_t* k, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  float s = hsum8(_mm256_add_ps(a0, a1));
  for (; i < d; ++i) s += q[i] * to_float(k[i]);
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
float softmax_tile(SoftmaxState* st, float* s, int64_t n) {
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

struct WorkItem {
  int32_t seq;
  int32_t kv_head;  // first kv head
  int32_t kv_heads;  // kv heads covered: 1 for prefill items, a range for decode items (decode_item)
  int32_t t0, t1;  // global token range [t0, t1) of q (inside sequence `seq`)
  int64_t cost;
  // decode: the keys [k0, k1) this item attends, and where its result goes: part < 0, normalized into `out`;
  // else unnormalized (m, l, acc) into slot `part` of the split-context partials, merged after all items ran
  int32_t k0 = 0, k1 = 0, part = -1;
};

// Prefill / extend without SIMD (machines below AVX2); attention_tile.cpp serves every other ISA.
template <typename scalar_t>
void attention_item(const WorkItem& it, scalar_t* out, const scalar_t* q, const scalar_t* k_cache,
                    const scalar_t* v_cache, const int32_t* block_table, int64_t q_start, int64_t q_len,
                    int64_t ctx, int64_t group, int64_t head_dim, int64_t block_size, int64_t q_tok_stride,
                    int64_t q_head_stride, int64_t out_tok_stride, int64_t out_head_stride, int64_t c_block_stride,
                    int64_t c_tok_stride, int64_t c_head_stride, float scale, std::vector<float>& qbuf,
                    std::vector<float>& acc, std::vector<float>& scores) {
  const int64_t ntok = it.t1 - it.t0, rows = ntok * group;
  // Row r = (token it.t0 + r / group, q head kv_head * group + r % group).
  SoftmaxState st[kMaxRows];
  int64_t limit[kMaxRows];  // last key position row r may attend (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.t0 + r / group, h = it.kv_head * group + r % group;
    const scalar_t* qr = q + t * q_tok_stride + h * q_head_stride;  // [D]
    for (int64_t i = 0; i < head_dim; ++i) qbuf[r * head_dim + i] = to_float(qr[i]);
    std::fill(acc.begin() + r * head_dim, acc.begin() + (r + 1) * head_dim, 0.f);
    st[r] = softmax_init();
    limit[r] = ctx - q_len + (t - q_start);
  }
  const int64_t max_key = ctx - q_len + (it.t1 - 1 - q_start);  // limit of the chunk's last row
  const scalar_t* kp[kKeyTile];
  const scalar_t* vp[kKeyTile];
  for (int64_t j0 = 0; j0 <= max_key; j0 += kKeyTile) {
    const int64_t j1 = std::min(max_key + 1, j0 + kKeyTile);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t off = (int64_t)block_table[j / block_size] * c_block_stride + (j % block_size) * c_tok_stride +
                          it.kv_head * c_head_stride;
      kp[j - j0] = k_cache + off;  // [D]
      vp[j - j0] = v_cache + off;  // [D]
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (limit[r] < j0) continue;  // every key of this tile is in row r's future
      const int64_t jn = std::min(j1, limit[r] + 1) - j0;
      const float* qr = qbuf.data() + r * head_dim;
      float* s = scores.data();
      for (int64_t j = 0; j < jn; ++j) s[j] = dot_scalar(qr, kp[j], head_dim) * scale;
      const float alpha = softmax_tile<false>(&st[r], s, jn);
      scale_add_scalar(acc.data() + r * head_dim, alpha, s, vp, jn, head_dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.t0 + r / group, h = it.kv_head * group + r % group;
    scalar_t* o = out + t * out_tok_stride + h * out_head_stride;  // [D]
    const float inv = 1.f / st[r].l;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = from_float<scalar_t>(acc[r * head_dim + i] * inv);
  }
}

// ---- decode tiles, keys outermost: scores[r][j] = q_r . k_j * scale, then acc[r] += p[r][j] * v_j ----
// Row r is q head (first head of the item) + r and reads kv head r / group; off[j] is key j's cache offset at the
// item's first kv head. Each K / V row is widened to fp32 once and used by the group's q heads.
template <typename scalar_t>
SLF_AVX2 void decode_qk_avx2(const float* qbuf, int64_t rows, int64_t group, int64_t d, const scalar_t* k_cache,
                             const int64_t* off, int64_t jn, int64_t c_head_stride, float scale, float* kf,
                             float* scores) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r0 = 0; r0 < rows; r0 += group) {
      const scalar_t* kr = k_cache + off[j] + (r0 / group) * c_head_stride;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) _mm256_storeu_ps(kf + i, load8(kr + i));
      for (; i < d; ++i) kf[i] = to_float(kr[i]);
      for (int64_t r = r0; r < r0 + group; ++r) scores[r * kKeyTile + j] = dot_avx2(qbuf + r * d, kf, d) * scale;
    }
}

template <typename scalar_t>
SLF_AVX2 void decode_pv_avx2(float* acc, int64_t rows, int64_t group, int64_t d, const scalar_t* v_cache,
                             const int64_t* off, int64_t jn, int64_t c_head_stride, const float* scores) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r0 = 0; r0 < rows; r0 += group) {
      const scalar_t* vr = v_cache + off[j] + (r0 / group) * c_head_stride;
      for (int64_t r = r0; r < r0 + group; ++r) {
        const float p = scores[r * kKeyTile + j];
        if (p == 0.f) continue;  // see scale_add_scalar
        const __m256 vp = _mm256_set1_ps(p);
        float* ar = acc + r * d;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(ar + i, _mm256_fmadd_ps(vp, load8(vr + i), _mm256_loadu_ps(ar + i)));
        for (; i < d; ++i) ar[i] += p * to_float(vr[i]);
      }
    }
}

template <typename scalar_t>
void decode_qk_scalar(const float* qbuf, int64_t rows, int64_t group, int64_t d, const scalar_t* k_cache,
                      const int64_t* off, int64_t jn, int64_t c_head_stride, float scale, float*, float* scores) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r = 0; r < rows; ++r)
      scores[r * kKeyTile + j] = dot_scalar(qbuf + r * d, k_cache + off[j] + (r / group) * c_head_stride, d) * scale;
}

template <typename scalar_t>
void decode_pv_scalar(float* acc, int64_t rows, int64_t group, int64_t d, const scalar_t* v_cache,
                      const int64_t* off, int64_t jn, int64_t c_head_stride, const float* scores) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      const float p = scores[r * kKeyTile + j];
      const scalar_t* vr = v_cache + off[j] + (r / group) * c_head_stride;
      scale_add_scalar(acc + r * d, 1.f, &p, &vr, 1, d);
    }
}

// Decode (one q token): a work item covers a range of kv heads of one sequence and walks the keys in order, every
// head of a key before the next key. The cache row of a token ([Hkv, D], 4 KB for the 1.6B) is then read
// front to back, where head-by-head order reads D values from each of 32 rows 4 KB apart: a stride the
// prefetchers do not follow. Measured (bench/kernels/bench_attention.py, bf16, 32 sequences x 160 keys): 1.6B
// shape 10.9 -> 3.1 ms (16% -> 51% of the memory bandwidth), 12B shape (GQA 4, D = 160) 6.8 -> 3.8 ms.
template <typename scalar_t, bool kAvx2>
void decode_item(const WorkItem& it, scalar_t* out, const scalar_t* q, const scalar_t* k_cache,
                 const scalar_t* v_cache, const int32_t* block_table, int64_t ctx, int64_t group, int64_t head_dim,
                 int64_t block_size, int64_t q_tok_stride, int64_t q_head_stride, int64_t out_tok_stride,
                 int64_t out_head_stride, int64_t c_block_stride, int64_t c_tok_stride, int64_t c_head_stride,
                 float scale, bool avx512, std::vector<float>& qbuf, std::vector<float>& acc,
                 std::vector<float>& scores, float* partials) {
  const int64_t t = it.t0, h0 = it.kv_head * group, rows = it.kv_heads * group;  // row r: q head h0 + r
  SoftmaxState st[kMaxRows];
  std::vector<float> kf(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* qr = q + t * q_tok_stride + (h0 + r) * q_head_stride;
    for (int64_t i = 0; i < head_dim; ++i) qbuf[r * head_dim + i] = to_float(qr[i]);
    std::fill(acc.begin() + r * head_dim, acc.begin() + (r + 1) * head_dim, 0.f);
    st[r] = softmax_init();
  }
  const int64_t head_off = it.kv_head * c_head_stride;
  for (int64_t j0 = it.k0; j0 < it.k1; j0 += kKeyTile) {
    const int64_t jn = std::min<int64_t>(it.k1, j0 + kKeyTile) - j0;
    int64_t row_off[kKeyTile];  // cache offset of key j0 + j, first kv head of the item
    for (int64_t j = 0; j < jn; ++j)
      row_off[j] = (int64_t)block_table[(j0 + j) / block_size] * c_block_stride +
                   ((j0 + j) % block_size) * c_tok_stride + head_off;
    if (kAvx2 && avx512)
      decode_qk_avx512(qbuf.data(), rows, group, head_dim, k_cache, row_off, jn, c_head_stride, scale, kf.data(),
                       scores.data(), kKeyTile);
    else if constexpr (kAvx2)
      decode_qk_avx2(qbuf.data(), rows, group, head_dim, k_cache, row_off, jn, c_head_stride, scale, kf.data(),
                     scores.data());
    else
      decode_qk_scalar(qbuf.data(), rows, group, head_dim, k_cache, row_off, jn, c_head_stride, scale, kf.data(),
                       scores.data());
    for (int64_t r = 0; r < rows; ++r) {
      const float alpha = softmax_tile<kAvx2>(&st[r], scores.data() + r * kKeyTile, jn);
      float* ar = acc.data() + r * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) ar[i] *= alpha;
    }
    if (kAvx2 && avx512)
      decode_pv_avx512(acc.data(), rows, group, head_dim, v_cache, row_off, jn, c_head_stride, scores.data(),
                       kKeyTile);
    else if constexpr (kAvx2)
      decode_pv_avx2(acc.data(), rows, group, head_dim, v_cache, row_off, jn, c_head_stride, scores.data());
    else
      decode_pv_scalar(acc.data(), rows, group, head_dim, v_cache, row_off, jn, c_head_stride, scores.data());
  }
  if (it.part >= 0) {  // one split of the context: its unnormalized state, merged by merge_splits
    float* dst = partials + it.part * kMaxRows * (head_dim + 2);
    for (int64_t r = 0; r < rows; ++r, dst += head_dim + 2) {
      dst[0] = st[r].m;
      dst[1] = st[r].l;
      std::copy(acc.begin() + r * head_dim, acc.begin() + (r + 1) * head_dim, dst + 2);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + t * out_tok_stride + (h0 + r) * out_head_stride;
    const float inv = 1.f / st[r].l;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = from_float<scalar_t>(acc[r * head_dim + i] * inv);
  }
}

// The split-context decode items of one (sequence, kv heads) -> its output rows: the parts' softmax states merged
// (softmax_merge) and their accumulators summed with the merge's factors, in split order.
template <typename scalar_t>
void merge_splits(const WorkItem* parts, int64_t n, const float* partials, scalar_t* out, int64_t group,
                  int64_t head_dim, int64_t out_tok_stride, int64_t out_head_stride) {
  const WorkItem& it = parts[0];
  const int64_t rows = it.kv_heads * group, stride = head_dim + 2;
  std::vector<float> acc(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = partials + it.part * kMaxRows * stride + r * stride;
    SoftmaxState st{p[0], p[1]};
    std::copy(p + 2, p + 2 + head_dim, acc.begin());
    for (int64_t s = 1; s < n; ++s) {
      const float* ps = partials + parts[s].part * kMaxRows * stride + r * stride;
      float fa, fb;
      st = softmax_merge(st, SoftmaxState{ps[0], ps[1]}, &fa, &fb);
      for (int64_t i = 0; i < head_dim; ++i) acc[i] = acc[i] * fa + ps[2 + i] * fb;
    }
    scalar_t* o = out + it.t0 * out_tok_stride + (it.kv_head * group + r) * out_head_stride;
    const float inv = 1.f / st.l;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = from_float<scalar_t>(acc[i] * inv);
  }
}

template <typename scalar_t>
void paged_attention_impl(scalar_t* out,             // [T, Hq, D]
                          const scalar_t* q,         // [T, Hq, D]
                          const scalar_t* k_cache,   // [num_blocks, block_size, Hkv, D]
                          const scalar_t* v_cache,   // [num_blocks, block_size, Hkv, D]
                          const int32_t* block_tables,  // [B, max_blocks_per_seq]
                          const int32_t* cu_seqlens,    // [B + 1], or null for decode (q_len = 1 each)
                          const int32_t* context_lens,  // [B]
                          int64_t num_seqs, int64_t hq, int64_t hkv, int64_t head_dim, int64_t block_size,
                          int64_t bt_stride, int64_t q_tok_stride, int64_t q_head_stride, int64_t out_tok_stride,
                          int64_t out_head_stride, int64_t c_block_stride, int64_t c_tok_stride,
                          int64_t c_head_stride, float scale) {
  const int64_t group = hq / hkv;
  // NOTE: a work item is (sequence, kv head, chunk of q tokens): the q heads of one GQA group share every K/V
  // load, and chunking tokens keeps the fp32 accumulators in L1/L2 while parallelizing long prefills.
  const int64_t tok_chunk = std::max<int64_t>(1, kMaxRows / group);
  std::vector<WorkItem> items;
  // Decode items take every kv head of a token (up to kMaxRows q heads): a cache row [Hkv, D] is one contiguous
  // stretch (4 KB for the 1.6B), and reading parts of many rows (a few heads per item) measured at a third of the
  // memory bandwidth, reading whole rows at ~2/3 (Zen 4, contexts larger than the caches). With fewer such items
  // than 2 x threads (small batches), each sequence's context is split into parts of whole cache blocks, every
  // part an item, merged afterwards (flash-decoding).
  const int64_t decode_heads = std::min<int64_t>(hkv, kMaxRows / group);
  const int64_t head_items = (hkv + decode_heads - 1) / decode_heads;
  const int64_t want_splits = cu_seqlens ? 1
      : (2 * at::get_num_threads() + num_seqs * head_items - 1) / (num_seqs * head_items);
  int32_t n_parts = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    if (cu_seqlens == nullptr) {
      const int64_t ctx = context_lens[b];
      TORCH_CHECK(ctx >= 1, "context_lens[", b, "] = ", ctx, " < its query length 1");
      // parts of at least kKeyTile keys, cut at cache-block boundaries
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want_splits, ctx / kKeyTile));
      const int64_t span = (ctx + splits - 1) / splits, chunk = (span + block_size - 1) / block_size * block_size;
      for (int64_t kh = 0; kh < hkv; kh += decode_heads) {
        const int64_t n = std::min(decode_heads, hkv - kh);
        for (int64_t k0 = 0; k0 < ctx; k0 += chunk) {
          const int64_t k1 = std::min(ctx, k0 + chunk);
          WorkItem w{(int32_t)b, (int32_t)kh, (int32_t)n, (int32_t)b, (int32_t)b + 1, n * (k1 - k0)};
          w.k0 = (int32_t)k0;
          w.k1 = (int32_t)k1;
          w.part = chunk < ctx ? n_parts++ : -1;
          items.push_back(w);
        }
      }
      continue;
    }
    const int64_t t_begin = cu_seqlens[b], t_end = cu_seqlens[b + 1];
    const int64_t q_len = t_end - t_begin, ctx = context_lens[b];
    if (q_len <= 0) continue;
    TORCH_CHECK(ctx >= q_len, "context_lens[", b, "] = ", ctx, " < its query length ", q_len);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += tok_chunk) {
      const int64_t t1 = std::min(t_end, t0 + tok_chunk);
      const int64_t cost = (t1 - t0) * (ctx - q_len + (t1 - t_begin));
      for (int64_t kh = 0; kh < hkv; ++kh)
        items.push_back({(int32_t)b, (int32_t)kh, 1, (int32_t)t0, (int32_t)t1, cost});
    }
  }
  // NOTE: causal items differ in cost; hand them out longest first from a shared counter (dynamic scheduling)
  // instead of at::parallel_for's static split of the range.
  // (the split decode items of one sequence and heads, in key order, for the merge; the sort is stable)
  std::vector<WorkItem> split_items;
  for (const WorkItem& w : items)
    if (w.part >= 0) split_items.push_back(w);
  std::vector<float> partials(static_cast<size_t>(n_parts) * kMaxRows * (head_dim + 2));
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = (int64_t)items.size();
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_items);
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_isa() >= Isa::kAvx512Bf16;
  const TileGeom geom{group, head_dim, block_size, q_tok_stride, q_head_stride, out_tok_stride, out_head_stride,
                      c_block_stride, c_tok_stride, c_head_stride, scale};
  static_assert(kTileMaxRows == kMaxRows, "attention_tile.cpp takes the work items made here");
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    std::vector<float> qbuf(kMaxRows * head_dim), acc(kMaxRows * head_dim), scores(kMaxRows * kKeyTile);
    std::vector<float> tile_ws(cu_seqlens && avx2 ? tile_workspace_floats(head_dim) : 0);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
      const WorkItem& it = items[i];
      const int64_t b = it.seq;
      const int64_t q_start = cu_seqlens ? cu_seqlens[b] : b;
      const int64_t q_len = cu_seqlens ? cu_seqlens[b + 1] - cu_seqlens[b] : 1;
      if (cu_seqlens && avx2) {  // prefill / extend: tiles of small GEMMs (attention_tile.cpp)
        tile_attention_item<scalar_t>(avx512, it.t0, it.t1, it.kv_head, out, q, k_cache, v_cache,
                                      block_tables + b * bt_stride, q_start, q_len, context_lens[b], geom,
                                      tile_ws.data());
        continue;
      }
      auto run = [&](auto avx2_tag) {
        if (cu_seqlens == nullptr) {
          decode_item<scalar_t, decltype(avx2_tag)::value>(
              it, out, q, k_cache, v_cache, block_tables + b * bt_stride, context_lens[b], group, head_dim,
              block_size, q_tok_stride, q_head_stride, out_tok_stride, out_head_stride, c_block_stride, c_tok_stride,
              c_head_stride, scale, avx512, qbuf, acc, scores, partials.data());
          return;
        }
        attention_item<scalar_t>(
            it, out, q, k_cache, v_cache, block_tables + b * bt_stride, q_start, q_len, context_lens[b], group,
            head_dim, block_size, q_tok_stride, q_head_stride, out_tok_stride, out_head_stride, c_block_stride,
            c_tok_stride, c_head_stride, scale, qbuf, acc, scores);
      };
      if (avx2)
        run(std::true_type{});
      else
        run(std::false_type{});
    }
  });
  for (size_t i = 0; i < split_items.size();) {
    size_t j = i + 1;
    while (j < split_items.size() && split_items[j].seq == split_items[i].seq &&
           split_items[j].kv_head == split_items[i].kv_head)
      ++j;
    merge_splits(&split_items[i], static_cast<int64_t>(j - i), partials.data(), out, group, head_dim, out_tok_stride,
                 out_head_stride);
    i = j;
  }
}

void run_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                   const torch::Tensor* cu_seqlens_q, const torch::Tensor& context_lens, double scale) {
  check_floating(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, Hq, D] with contiguous heads");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.scalar_type() == q.scalar_type(),
              "out must be [T, Hq, D] of q's dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.stride(3) == 1,
              "k_cache / v_cache must be [num_blocks, block_size, Hkv, D] with equal strides");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the KV cache must have q's dtype");
  const int64_t hq = q.size(1), hkv = k_cache.size(2), head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "cache head_dim != q head_dim");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "num_q_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(hq / hkv <= kMaxRows, "GQA group larger than ", kMaxRows, " is not supported");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks] with contiguous rows");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(), "context_lens must be int32");
  const int64_t num_seqs = context_lens.numel();
  TORCH_CHECK(block_tables.size(0) >= num_seqs, "block_tables has fewer rows than sequences");
  const int64_t max_ctx = num_seqs > 0 ? context_lens.max().item<int32_t>() : 0;
  TORCH_CHECK(max_ctx <= block_tables.size(1) * k_cache.size(1), "a context is longer than its block table");
  if (cu_seqlens_q != nullptr) {
    TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_q->is_contiguous() &&
                    cu_seqlens_q->numel() == num_seqs + 1,
                "cu_seqlens_q must be int32 [B + 1]");
  } else {
    TORCH_CHECK(q.size(0) == num_seqs, "decode: q must have one token per sequence");
  }
  if (q.size(0) == 0 || num_seqs == 0) return;
  SLF_DISPATCH_FLOATING_TYPES(q.scalar_type(), "paged_attention", [&] {
    paged_attention_impl<scalar_t>(
        out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        block_tables.data_ptr<int32_t>(), cu_seqlens_q ? cu_seqlens_q->data_ptr<int32_t>() : nullptr,
        context_lens.data_ptr<int32_t>(), num_seqs, hq, hkv, head_dim, k_cache.size(1), block_tables.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), (float)scale);
  });
}

}  // namespace
}  // namespace slf::cpu

void paged_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                     const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens, double scale) {
  slf::cpu::run_attention(out, q, k_cache, v_cache, block_tables, &cu_seqlens_q, context_lens, scale);
}

void paged_attention_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  slf::cpu::run_attention(out, q, k_cache, v_cache, block_tables, nullptr, context_lens, scale);
}
