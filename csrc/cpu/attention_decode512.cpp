// One decode work item with AVX-512 (attention_decode.cpp builds the items, merges split contexts and runs the
// AVX2 / scalar ones): rows r = q heads h0 + r of one token against keys [k0, k1) of its sequence, in tiles of
// kKeyTile keys:
//   S[j][r] = q_r . k_j * scale   keys outermost, so each cache row [Hkv, D] is read front to back; 16 rows' dot
//                                 products reduced together into one vector (S is key-major: row r is lane r % 16)
//   online softmax                16 rows per vector: a tile's max, exp and sum without a scalar loop
//   acc[r] += p[j][r] * v_j       fp32 accumulators (in L1), loaded / stored once per four keys, whose V rows are
//                                 read side by side front to back
// bf16: q . k with vdpbf16ps straight from the bf16 q and cache (exact products, fp32 sums), and V widened 32 values
// at a time as even / odd halves of its 32-bit lanes (shift / mask), so acc holds each 32 dims permuted (the even
// dims, then the odd) until the epilogue. fp32 / fp16: 16 dims at a time, in order. Tails with masked loads.
// NOTE: tried and not kept (bench/kernels/bench_attention.py and alternated runs, Zen 4, 2026-12-02): software
// prefetch of the next rows (V during Q K, K four keys ahead): slower cold at batch 1 (ctx 128, 2 threads: 76 ->
// 82-99 us), the hardware prefetchers follow the front-to-back rows; P V with vdpbf16ps on key pairs (P rounded
// to bf16): no measurable gain (ctx 64: 23.1 -> 22.4 us, in the noise); batch 1 split by heads (2 x 16) instead of
// context parts: slower cold (ctx 128: ~82 -> ~100-117 us).
#include <algorithm>
#include <cmath>

#include "cpu/attention_common.h"

#define SLF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu {
namespace {

using bf16 = c10::BFloat16;

// ---- per dtype: dims per chunk, q . k of one chunk, a V chunk widened to fp32, the output store ----
template <typename T>
constexpr int64_t kChunk = 16;
template <>
constexpr int64_t kChunk<bf16> = 32;

SLF_AVX512 inline __mmask32 chunk_mask(int64_t n) { return n >= 32 ? ~0u : (1u << n) - 1; }

// acc + the products of chunk q[0:n] . k[0:n] (lanes hold partial sums)
SLF_AVX512 inline __m512 dot_chunk(__m512 acc, const bf16* q, const bf16* k, __mmask32 m) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, q), (__m512bh)_mm512_maskz_loadu_epi16(m, k));
}
SLF_AVX512 inline __m512 dot_chunk(__m512 acc, const float* q, const float* k, __mmask32 m) {
  return _mm512_fmadd_ps(_mm512_maskz_loadu_ps((__mmask16)m, q), _mm512_maskz_loadu_ps((__mmask16)m, k), acc);
}
SLF_AVX512 inline __m512 load_half(const c10::Half* p, __mmask32 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)m, p));
}
SLF_AVX512 inline __m512 dot_chunk(__m512 acc, const c10::Half* q, const c10::Half* k, __mmask32 m) {
  return _mm512_fmadd_ps(load_half(q, m), load_half(k, m), acc);
}

// v[0:n] widened to fp32: bf16 as its even dims then its odd dims (w[0], w[1]), else in order (w[0])
template <typename T>
constexpr int kVecs = 1;
template <>
constexpr int kVecs<bf16> = 2;
SLF_AVX512 inline void widen(const bf16* v, __mmask32 m, __m512* w) {
  const __m512i x = _mm512_maskz_loadu_epi16(m, v);
  w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  w[1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
SLF_AVX512 inline void widen(const float* v, __mmask32 m, __m512* w) { w[0] = _mm512_maskz_loadu_ps((__mmask16)m, v); }
SLF_AVX512 inline void widen(const c10::Half* v, __mmask32 m, __m512* w) { w[0] = load_half(v, m); }

// acc[r] += sum over the KB keys x of p[x * ld + r] * v_x for the rows of one kv head (r0 .. r0 + group), the
// keys' chunks widened once; each accumulator chunk loaded and stored once per KB keys.
template <int KB, typename T>
SLF_AVX512 inline void pv_keys(float* acc, int64_t dp, const float* p, int64_t ld, const T* const* v, int64_t r0,
                               int64_t group, int64_t nchunk, __mmask32 tail_mask) {
  constexpr int64_t C = kChunk<T>;
  constexpr int V = kVecs<T>;
  for (int64_t c = 0; c < nchunk; ++c) {
    const __mmask32 mask = c + 1 < nchunk ? ~0u : tail_mask;
    __m512 w[KB][V];
#pragma GCC unroll 4
    for (int x = 0; x < KB; ++x) widen(v[x] + c * C, mask, w[x]);
    for (int64_t r = r0; r < r0 + group; ++r) {
      float* ar = acc + r * dp + c * C;
      __m512 a[V];
#pragma GCC unroll 2
      for (int u = 0; u < V; ++u) a[u] = _mm512_load_ps(ar + 16 * u);
#pragma GCC unroll 4
      for (int x = 0; x < KB; ++x) {
        const __m512 px = _mm512_set1_ps(p[x * ld + r]);
#pragma GCC unroll 2
        for (int u = 0; u < V; ++u) a[u] = _mm512_fmadd_ps(px, w[x][u], a[u]);
      }
#pragma GCC unroll 2
      for (int u = 0; u < V; ++u) _mm512_store_ps(ar + 16 * u, a[u]);
    }
  }
}

// dst[0:n] = the chunk's accumulators (in dim order) * inv
SLF_AVX512 inline void store16(float* dst, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, x); }
SLF_AVX512 inline void store16(bf16* dst, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(x));
}
SLF_AVX512 inline void store16(c10::Half* dst, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename Out>
SLF_AVX512 inline void store_chunk(Out* dst, const float* acc, __m512 inv, int64_t n, bool permuted) {
  const __m512 a = _mm512_mul_ps(_mm512_load_ps(acc), inv);
  if (!permuted) {
    store16(dst, a, (__mmask16)chunk_mask(std::min<int64_t>(n, 16)));
    return;
  }
  const __m512 b = _mm512_mul_ps(_mm512_load_ps(acc + 16), inv);  // a: dims 0, 2, .., 30; b: 1, 3, .., 31
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  store16(dst, _mm512_permutex2var_ps(a, lo, b), (__mmask16)chunk_mask(std::min<int64_t>(n, 16)));
  if (n > 16) store16(dst + 16, _mm512_permutex2var_ps(a, hi, b), (__mmask16)chunk_mask(std::min<int64_t>(n - 16, 16)));
}

// (sum of a[0], .., sum of a[15]): pairs of vectors combined within 128-bit lanes (unpack ps, then pd), then
// across lanes (shuffle_f32x4), 45 instructions for the 16 sums.
SLF_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

template <typename T>
SLF_AVX512 void item_impl(const DecodeArgs<T>& a, float* ws) {
  const TileGeom& g = *a.g;
  const int64_t group = g.group, d = g.head_dim, rows = a.rows, cs = g.c_head_stride, qs = g.q_head_stride;
  constexpr int64_t C = kChunk<T>;
  const int64_t nchunk = (d + C - 1) / C, dp = nchunk * C, ld = (rows + 15) / 16 * 16;  // acc row / S row
  float* acc = ws;                      // [rows][dp], 64-byte aligned rows (dp a multiple of 16)
  float* s = ws + kMaxRows * dp;        // [kKeyTile][ld]: S, then P
  alignas(64) float m[kMaxRows], l[kMaxRows];
  std::fill(acc, acc + rows * dp, 0.f);
  std::fill(m, m + ld, -INFINITY);
  std::fill(l, l + ld, 0.f);
  int64_t kv_off[kMaxRows];  // row r's kv head within the item's cache rows
  for (int64_t r = 0; r < rows; ++r) kv_off[r] = r / group * cs;
  const __mmask32 tail_mask = chunk_mask(d - (nchunk - 1) * C);
  const __m512 scale = _mm512_set1_ps(g.scale);
  for (int64_t j0 = a.k0; j0 < a.k1; j0 += kKeyTile) {
    const int64_t jn = std::min<int64_t>(a.k1, j0 + kKeyTile) - j0;
    int64_t off[kKeyTile];  // cache offset of key j0 + j at the item's first kv head
    for (int64_t j = 0; j < jn; ++j)
      off[j] = (int64_t)a.block_table[(j0 + j) / g.block_size] * g.c_block_stride +
               ((j0 + j) % g.block_size) * g.c_tok_stride + a.head_off;
    // S = Q K^T * scale, 16 rows at a time per key
    for (int64_t j = 0; j < jn; ++j) {
      const T* kj = a.k_cache + off[j];
      for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const int64_t nr = std::min<int64_t>(16, rows - r0);
        __m512 sum[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) sum[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < nchunk; ++c) {
          const __mmask32 mask = c + 1 < nchunk ? ~0u : tail_mask;
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            if (i < nr)
              sum[i] = dot_chunk(sum[i], a.q + (r0 + i) * qs + c * C, kj + kv_off[r0 + i] + c * C, mask);
        }
        _mm512_store_ps(s + j * ld + r0, _mm512_mul_ps(reduce16(sum), scale));
      }
    }
    // online softmax, 16 rows per vector: P = exp(S - m_new), l = l * alpha + sum P, acc *= alpha
    for (int64_t r0 = 0; r0 < ld; r0 += 16) {
      __m512 mx = _mm512_load_ps(s + r0);
      for (int64_t j = 1; j < jn; ++j) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j * ld + r0));
      const __m512 m_old = _mm512_load_ps(m + r0), m_new = _mm512_max_ps(m_old, mx);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < jn; ++j) {
        const __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(s + j * ld + r0), m_new));
        _mm512_store_ps(s + j * ld + r0, p);
        sum = _mm512_add_ps(sum, p);
      }
      const __m512 alpha = exp16(_mm512_sub_ps(m_old, m_new));  // m_old = -inf: ~1e-38, times acc = 0
      _mm512_store_ps(m + r0, m_new);
      _mm512_store_ps(l + r0, _mm512_fmadd_ps(_mm512_load_ps(l + r0), alpha, sum));
      if (_mm512_cmp_ps_mask(m_new, m_old, _CMP_NEQ_OQ) == 0) continue;  // max unchanged: alpha = 1
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r) {
        const __m512 f = _mm512_set1_ps(al[r - r0]);
        for (float* x = acc + r * dp; x < acc + (r + 1) * dp; x += 16)
          _mm512_store_ps(x, _mm512_mul_ps(f, _mm512_load_ps(x)));
      }
    }
    // acc += P V, four keys at a time (four cache rows read side by side, front to back)
    for (int64_t j = 0; j < jn;) {
      const int kb = jn - j >= 4 ? 4 : 1;
      for (int64_t r0 = 0; r0 < rows; r0 += group) {
        const T* v[4];
        for (int x = 0; x < kb; ++x) v[x] = a.v_cache + off[j + x] + kv_off[r0];
        if (kb == 4)
          pv_keys<4>(acc, dp, s + j * ld, ld, v, r0, group, nchunk, tail_mask);
        else
          pv_keys<1>(acc, dp, s + j * ld, ld, v, r0, group, nchunk, tail_mask);
      }
      j += kb;
    }
  }
  // epilogue: the normalized output, or the unnormalized state (m, l, acc in dim order) of a context part
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = acc + r * dp;
    if (a.partial != nullptr) {
      float* dst = a.partial + r * (d + 2);
      dst[0] = m[r];
      dst[1] = l[r];
      for (int64_t c = 0; c < nchunk; ++c)
        store_chunk(dst + 2 + c * C, ar + c * C, _mm512_set1_ps(1.f), d - c * C, C == 32);
    } else {
      T* o = a.out + r * g.out_head_stride;
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int64_t c = 0; c < nchunk; ++c) store_chunk(o + c * C, ar + c * C, inv, d - c * C, C == 32);
    }
  }
}

template <typename T>
SLF_AVX512 void merge_impl(const float* const* parts, int64_t n, int64_t rows, int64_t d, T* out,
                           int64_t out_head_stride) {
  const int64_t stride = d + 2;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    // 16 rows' (m, l) of every part; each part's weight exp(m_s - m) / l
    const __mmask16 rm = (__mmask16)chunk_mask(std::min<int64_t>(16, rows - r0));
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(stride)));
    __m512 ms[kMaxParts], ls[kMaxParts];
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t x = 0; x < n; ++x) {
      const float* base = parts[x] + r0 * stride;
      ms[x] = _mm512_mask_i32gather_ps(_mm512_set1_ps(0.f), rm, idx, base, 4);
      ls[x] = _mm512_mask_i32gather_ps(_mm512_set1_ps(1.f), rm, idx, base + 1, 4);
      m = _mm512_max_ps(m, ms[x]);
    }
    __m512 l = _mm512_setzero_ps();
    for (int64_t x = 0; x < n; ++x) {
      ms[x] = exp16(_mm512_sub_ps(ms[x], m));  // the part's factor
      l = _mm512_fmadd_ps(ms[x], ls[x], l);
    }
    alignas(64) float w[kMaxParts][16];
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
    for (int64_t x = 0; x < n; ++x) _mm512_store_ps(w[x], _mm512_mul_ps(ms[x], inv));
    for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r)
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mask = (__mmask16)chunk_mask(std::min<int64_t>(16, d - i));
        __m512 acc = _mm512_setzero_ps();
        for (int64_t x = 0; x < n; ++x)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(w[x][r - r0]),
                                _mm512_maskz_loadu_ps(mask, parts[x] + r * stride + 2 + i), acc);
        store16(out + r * out_head_stride + i, acc, mask);
      }
  }
}

}  // namespace

template <typename scalar_t>
void merge_parts_avx512(const float* const* parts, int64_t n, int64_t rows, int64_t d, scalar_t* out,
                        int64_t out_head_stride) {
  merge_impl<scalar_t>(parts, n, rows, d, out, out_head_stride);
}

template void merge_parts_avx512<float>(const float* const*, int64_t, int64_t, int64_t, float*, int64_t);
template void merge_parts_avx512<bf16>(const float* const*, int64_t, int64_t, int64_t, bf16*, int64_t);
template void merge_parts_avx512<c10::Half>(const float* const*, int64_t, int64_t, int64_t, c10::Half*, int64_t);

int64_t decode512_workspace_floats(int64_t head_dim) {
  return kMaxRows * ((head_dim + 31) / 32 * 32) + kKeyTile * kMaxRows;
}

// NOTE: the exported function carries no target attribute (its declaration in the header has none).
template <typename scalar_t>
void decode_item_avx512(const DecodeArgs<scalar_t>& a, float* ws) {
  item_impl<scalar_t>(a, ws);
}

template void decode_item_avx512<float>(const DecodeArgs<float>&, float*);
template void decode_item_avx512<bf16>(const DecodeArgs<bf16>&, float*);
template void decode_item_avx512<c10::Half>(const DecodeArgs<c10::Half>&, float*);

}  // namespace slf::cpu
