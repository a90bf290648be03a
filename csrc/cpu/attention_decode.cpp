// Paged decode attention on CPU (one q token per sequence), with GQA: work items of whole cache rows, small batches'
// contexts split in parts and merged (flash-decoding); AVX2 / scalar tiles here, whole AVX-512 items in
// attention_decode512.cpp. Scores, softmax and the accumulator in fp32 (online softmax over tiles of kKeyTile keys).
#include <vector>

#include "cpu/attention_common.h"
#include "cpu/parallel.h"

namespace slf::cpu {
namespace {

// A decode work item: kv heads [kv_head, kv_head + kv_heads) of sequence seq (its token t0 = seq), keys [k0, k1);
// part < 0: the result goes normalized into out, else unnormalized (m, l, acc) into slot `part` of the partials.
struct DecodeItem {
  int32_t seq, kv_head, kv_heads, t0;
  int64_t cost;
  int32_t k0, k1, part;
};

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
        for (; i + 8 <= d; i += 8)
          _mm256_storeu_ps(ar + i, _mm256_fmadd_ps(vp, load8(vr + i), _mm256_loadu_ps(ar + i)));
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
void decode_item(const DecodeItem& it, scalar_t* out, const scalar_t* q, const scalar_t* k_cache,
                 const scalar_t* v_cache, const int32_t* block_table, const TileGeom& g,
                 std::vector<float>& qbuf, std::vector<float>& acc, std::vector<float>& scores, float* partials) {
  const int64_t group = g.group, head_dim = g.head_dim, block_size = g.block_size, c_head_stride = g.c_head_stride;
  const int64_t q_tok_stride = g.q_tok_stride, q_head_stride = g.q_head_stride, out_tok_stride = g.out_tok_stride,
                out_head_stride = g.out_head_stride, c_block_stride = g.c_block_stride, c_tok_stride = g.c_tok_stride;
  const float scale = g.scale;
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
    if constexpr (kAvx2)
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
    if constexpr (kAvx2)
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
void merge_splits(const DecodeItem* parts, int64_t n, const float* partials, scalar_t* out, int64_t group,
                  int64_t head_dim, int64_t out_tok_stride, int64_t out_head_stride) {
  const DecodeItem& it = parts[0];
  const int64_t rows = it.kv_heads * group, stride = head_dim + 2;
  if (cpu_isa() >= Isa::kAvx512Bf16 && n <= kMaxParts) {
    const float* p[kMaxParts];
    for (int64_t s = 0; s < n; ++s) p[s] = partials + parts[s].part * kMaxRows * stride;
    merge_parts_avx512(p, n, rows, head_dim, out + it.t0 * out_tok_stride + it.kv_head * group * out_head_stride,
                       out_head_stride);
    return;
  }
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
void run_decode(scalar_t* out, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs, int64_t hkv,
                int64_t bt_stride, const TileGeom& g) {
  const int64_t group = g.group, head_dim = g.head_dim, block_size = g.block_size;
  // Decode items take every kv head of a token (up to kMaxRows q heads): a cache row [Hkv, D] is one contiguous
  // stretch (4 KB for the 1.6B), and reading parts of many rows (a few heads per item) measured at a third of the
  // memory bandwidth, reading whole rows at ~2/3 (Zen 4, contexts larger than the caches). With fewer such items
  // than 2 x threads (small batches), each sequence's context is split into parts of whole cache blocks, every
  // part an item, merged afterwards (flash-decoding).
  const int64_t decode_heads = std::min<int64_t>(hkv, kMaxRows / group);
  const int64_t head_items = (hkv + decode_heads - 1) / decode_heads;
  const int64_t want_splits = (2 * at::get_num_threads() + num_seqs * head_items - 1) / (num_seqs * head_items);
  std::vector<DecodeItem> items;
  int32_t n_parts = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t ctx = context_lens[b];
    TORCH_CHECK(ctx >= 1, "context_lens[", b, "] = ", ctx, " < its query length 1");
    // parts of at least kKeyTile keys, cut at cache-block boundaries
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want_splits, ctx / kKeyTile));
    const int64_t span = (ctx + splits - 1) / splits, chunk = (span + block_size - 1) / block_size * block_size;
    for (int64_t kh = 0; kh < hkv; kh += decode_heads) {
      const int64_t n = std::min(decode_heads, hkv - kh);
      for (int64_t k0 = 0; k0 < ctx; k0 += chunk) {
        const int64_t k1 = std::min(ctx, k0 + chunk);
        items.push_back({(int32_t)b, (int32_t)kh, (int32_t)n, (int32_t)b, n * (k1 - k0), (int32_t)k0, (int32_t)k1,
                         chunk < ctx ? n_parts++ : -1});
      }
    }
  }
  // the split items of one sequence and heads, in key order, for the merge (taken before the sort)
  std::vector<DecodeItem> split_items;
  for (const DecodeItem& w : items)
    if (w.part >= 0) split_items.push_back(w);
  // NOTE: buffers kept per thread between calls (grown, never zeroed): a fresh zeroed vector of the partials
  // and of each thread's workspace cost a memset of ~100 KB per call, a few percent of a batch-1 call.
  static thread_local std::vector<float> partials_buf;
  partials_buf.resize(std::max(partials_buf.size(), static_cast<size_t>(n_parts) * kMaxRows * (head_dim + 2)));
  float* const partials = partials_buf.data();  // (the calling thread's: the workers see it through this pointer)
  // NOTE: items differ in cost (context lengths): claimed in turn (parallel.h), longest first
  std::stable_sort(items.begin(), items.end(),
                   [](const DecodeItem& a, const DecodeItem& b) { return a.cost > b.cost; });
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_isa() >= Isa::kAvx512Bf16;
  if (avx512) {  // attention_decode512.cpp, a workspace per thread kept between calls
    for_each_claimed(items.size(), [&](int64_t i) {
      static thread_local std::vector<float> ws_buf;
      ws_buf.resize(std::max<size_t>(ws_buf.size(), decode512_workspace_floats(head_dim) + 16));
      float* ws = ws_buf.data() + (16 - reinterpret_cast<uintptr_t>(ws_buf.data()) / 4 % 16) % 16;  // 64 B aligned
      const DecodeItem& it = items[i];
      const int64_t h0 = it.kv_head * group;
      const DecodeArgs<scalar_t> args{q + it.t0 * g.q_tok_stride + h0 * g.q_head_stride, k_cache, v_cache,
                                      block_tables + it.seq * bt_stride, it.kv_head * g.c_head_stride,
                                      it.kv_heads * group, it.k0, it.k1,
                                      out + it.t0 * g.out_tok_stride + h0 * g.out_head_stride,
                                      it.part >= 0 ? partials + it.part * kMaxRows * (head_dim + 2) : nullptr, &g};
      decode_item_avx512<scalar_t>(args, ws);
    });
  } else {
    const std::vector<float> rows(kMaxRows * head_dim), tile(kMaxRows * kKeyTile);
    for_each_claimed(items.size(), [&, qbuf = rows, acc = rows, scores = tile](int64_t i) mutable {
      const DecodeItem& it = items[i];
      auto run = [&](auto avx2_tag) {
        decode_item<scalar_t, decltype(avx2_tag)::value>(it, out, q, k_cache, v_cache,
                                                         block_tables + it.seq * bt_stride, g, qbuf, acc, scores,
                                                         partials);
      };
      if (avx2)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
  }
  for (size_t i = 0; i < split_items.size();) {
    size_t j = i + 1;
    while (j < split_items.size() && split_items[j].seq == split_items[i].seq &&
           split_items[j].kv_head == split_items[i].kv_head)
      ++j;
    merge_splits(&split_items[i], static_cast<int64_t>(j - i), partials, out, group, head_dim,
                 g.out_tok_stride, g.out_head_stride);
    i = j;
  }
}

}  // namespace

template <typename scalar_t>
void paged_decode(scalar_t* out, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs, int64_t hkv,
                  int64_t bt_stride, const TileGeom& g) {
  run_decode(out, q, k_cache, v_cache, block_tables, context_lens, num_seqs, hkv, bt_stride, g);
}

template void paged_decode<float>(float*, const float*, const float*, const float*, const int32_t*, const int32_t*,
                                  int64_t, int64_t, int64_t, const TileGeom&);
template void paged_decode<c10::BFloat16>(c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*,
                                          const c10::BFloat16*, const int32_t*, const int32_t*, int64_t, int64_t,
                                          int64_t, const TileGeom&);
template void paged_decode<c10::Half>(c10::Half*, const c10::Half*, const c10::Half*, const c10::Half*,
                                      const int32_t*, const int32_t*, int64_t, int64_t, int64_t, const TileGeom&);

}  // namespace slf::cpu
