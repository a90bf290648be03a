// Prefill / extend attention as tiles of small GEMMs (see attention_tile.h). Per tile of kTileKeys keys:
//   Kt  [D][32]  the tile's keys, fp32, transposed (the B operand of S = Q K^T: one row of 32 keys per d)
//   S   [rows][32] = Q Kt (q pre-scaled), masked per row to its causal limit, exponentiated (online softmax)
//   Vf  [32][Dp] the tile's values, fp32, rows padded to whole vectors
//   acc [rows][Dp] = acc * alpha_r + P Vf
// Both products are register-blocked: 4 rows x 32 keys (AVX-512: 8 accumulators; AVX2: 3 rows x 32, 12) for QK^T,
// 4 rows x 4 vectors of D for PV, so every loaded K / V vector serves several q rows (the GQA group's heads and the
// item's tokens) where the per-row dot products of attention.cpp reload it for every row.
#include "cpu/attention_tile.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/vec_math.h"

#define SLF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace slf::cpu {
namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- S[r][0:32] = sum_d Q[r][d] * Kt[d][0:32] ----

template <int R>
SLF_AVX512 inline void qk_block512(const float* q, int64_t ldq, const float* kt, int64_t d, float* s) {
  __m512 c[R][2];
  for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const __m512 b0 = _mm512_loadu_ps(kt + k * kTileKeys), b1 = _mm512_loadu_ps(kt + k * kTileKeys + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(q[i * ldq + k]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_ps(s + i * kTileKeys, c[i][0]);
    _mm512_storeu_ps(s + i * kTileKeys + 16, c[i][1]);
  }
}

template <int R>
SLF_AVX2 inline void qk_block256(const float* q, int64_t ldq, const float* kt, int64_t d, float* s) {
  __m256 c[R][4];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) c[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    __m256 b[4];
    for (int v = 0; v < 4; ++v) b[v] = _mm256_loadu_ps(kt + k * kTileKeys + 8 * v);
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_set1_ps(q[i * ldq + k]);
      for (int v = 0; v < 4; ++v) c[i][v] = _mm256_fmadd_ps(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(s + i * kTileKeys + 8 * v, c[i][v]);
}

SLF_AVX512 void qk512(const float* q, int64_t ldq, int64_t rows, const float* kt, int64_t d, float* s) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_block512<4>(q + r * ldq, ldq, kt, d, s + r * kTileKeys);
  for (; r < rows; ++r) qk_block512<1>(q + r * ldq, ldq, kt, d, s + r * kTileKeys);
}

SLF_AVX2 void qk256(const float* q, int64_t ldq, int64_t rows, const float* kt, int64_t d, float* s) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) qk_block256<3>(q + r * ldq, ldq, kt, d, s + r * kTileKeys);
  for (; r < rows; ++r) qk_block256<1>(q + r * ldq, ldq, kt, d, s + r * kTileKeys);
}

// ---- acc[r][0:dp] = acc[r] * alpha[r] + sum_j P[r][j] * Vf[j][0:dp] (dp a multiple of the vector width) ----

template <int R, int NV>
SLF_AVX512 inline void pv_block512(float* acc, int64_t lda, const float* alpha, const float* p, const float* vf,
                                   int64_t ldv, int64_t nkeys) {
  __m512 c[R][NV];
  for (int i = 0; i < R; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[i]);
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * lda + 16 * v), al);
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(vf + j * ldv + 16 * v);
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(p[i * kTileKeys + j]);
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + i * lda + 16 * v, c[i][v]);
}

template <int R, int NV>
SLF_AVX2 inline void pv_block256(float* acc, int64_t lda, const float* alpha, const float* p, const float* vf,
                                 int64_t ldv, int64_t nkeys) {
  __m256 c[R][NV];
  for (int i = 0; i < R; ++i) {
    const __m256 al = _mm256_set1_ps(alpha[i]);
    for (int v = 0; v < NV; ++v) c[i][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * lda + 8 * v), al);
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(vf + j * ldv + 8 * v);
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_set1_ps(p[i * kTileKeys + j]);
      for (int v = 0; v < NV; ++v) c[i][v] = _mm256_fmadd_ps(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + i * lda + 8 * v, c[i][v]);
}

// Rows in blocks of R over column chunks of up to 4 vectors; the block functions are instantiated per chunk size.
template <int R>
SLF_AVX512 void pv_rows512(float* acc, int64_t lda, const float* alpha, const float* p, const float* vf, int64_t dp,
                           int64_t nkeys) {
  for (int64_t c0 = 0; c0 < dp; c0 += 64) {
    const int64_t nv = std::min<int64_t>(4, (dp - c0) / 16);
    float* a = acc + c0;
    const float* v = vf + c0;
    switch (nv) {
      case 4: pv_block512<R, 4>(a, lda, alpha, p, v, dp, nkeys); break;
      case 3: pv_block512<R, 3>(a, lda, alpha, p, v, dp, nkeys); break;
      case 2: pv_block512<R, 2>(a, lda, alpha, p, v, dp, nkeys); break;
      default: pv_block512<R, 1>(a, lda, alpha, p, v, dp, nkeys); break;
    }
  }
}

template <int R>
SLF_AVX2 void pv_rows256(float* acc, int64_t lda, const float* alpha, const float* p, const float* vf, int64_t dp,
                         int64_t nkeys) {
  for (int64_t c0 = 0; c0 < dp; c0 += 24) {
    const int64_t nv = std::min<int64_t>(3, (dp - c0) / 8);
    float* a = acc + c0;
    const float* v = vf + c0;
    switch (nv) {
      case 3: pv_block256<R, 3>(a, lda, alpha, p, v, dp, nkeys); break;
      case 2: pv_block256<R, 2>(a, lda, alpha, p, v, dp, nkeys); break;
      default: pv_block256<R, 1>(a, lda, alpha, p, v, dp, nkeys); break;
    }
  }
}

void pv(bool avx512, float* acc, int64_t rows, const float* alpha, const float* p, const float* vf, int64_t dp,
        int64_t nkeys) {
  int64_t r = 0;
  if (avx512) {
    for (; r + 4 <= rows; r += 4) pv_rows512<4>(acc + r * dp, dp, alpha + r, p + r * kTileKeys, vf, dp, nkeys);
    for (; r < rows; ++r) pv_rows512<1>(acc + r * dp, dp, alpha + r, p + r * kTileKeys, vf, dp, nkeys);
  } else {
    for (; r + 4 <= rows; r += 4) pv_rows256<4>(acc + r * dp, dp, alpha + r, p + r * kTileKeys, vf, dp, nkeys);
    for (; r < rows; ++r) pv_rows256<1>(acc + r * dp, dp, alpha + r, p + r * kTileKeys, vf, dp, nkeys);
  }
}

// Row r's scores s[0:n] (n >= 1 valid keys) -> p = exp(s - m_new), zero past n; returns alpha = exp(m_old - m_new).
SLF_AVX2 float softmax_row(SoftmaxState* st, float* s, int64_t n) {
  float bmax = -INFINITY;
  for (int64_t j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
  const float alpha = softmax_rescale(st, bmax);
  st->l += exp_sub_sum(s, n, st->m);
  for (int64_t j = n; j < kTileKeys; ++j) s[j] = 0.f;
  return alpha;
}

}  // namespace

int64_t tile_workspace_floats(int64_t head_dim) {
  const int64_t dp = round_up(head_dim, 16);
  // q, acc: [rows][dp]; s: [rows][32]; kt: [d][32]; vf: [32][dp]; alpha: [rows]
  return 2 * kTileMaxRows * dp + kTileMaxRows * kTileKeys + head_dim * kTileKeys + kTileKeys * dp + kTileMaxRows;
}

template <typename scalar_t>
void tile_attention_item(bool avx512, int64_t t0, int64_t t1, int64_t kv_head, scalar_t* out, const scalar_t* q,
                         const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* block_table,
                         int64_t q_start, int64_t q_len, int64_t ctx, const TileGeom& g, float* ws) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx_attention_takes(g.head_dim))
      return amx_attention_item(t0, t1, kv_head, out, q, k_cache, v_cache, block_table, q_start, q_len, ctx, g);
  }
  const int64_t d = g.head_dim, dp = round_up(d, 16), group = g.group, rows = (t1 - t0) * group;
  float* qf = ws;
  float* acc = qf + kTileMaxRows * dp;
  float* s = acc + kTileMaxRows * dp;
  float* kt = s + kTileMaxRows * kTileKeys;
  float* vf = kt + d * kTileKeys;
  float* alpha = vf + kTileKeys * dp;
  SoftmaxState st[kTileMaxRows];
  int64_t limit[kTileMaxRows];  // last key row r attends (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group, h = kv_head * group + r % group;
    const scalar_t* qr = q + t * g.q_tok_stride + h * g.q_head_stride;
    for (int64_t i = 0; i < d; ++i) qf[r * dp + i] = to_float(qr[i]) * g.scale;
    std::fill(acc + r * dp, acc + (r + 1) * dp, 0.f);
    st[r] = softmax_init();
    limit[r] = ctx - q_len + (t - q_start);
  }
  std::fill(vf, vf + kTileKeys * dp, 0.f);  // the padding columns stay 0
  const int64_t max_key = limit[rows - 1];
  for (int64_t j0 = 0; j0 <= max_key; j0 += kTileKeys) {
    const int64_t jn = std::min(max_key + 1, j0 + kTileKeys) - j0;
    for (int64_t j = 0; j < kTileKeys; ++j) {
      if (j >= jn) {  // past the last key: zero K (scores unused) and V (multiplied by p = 0)
        for (int64_t i = 0; i < d; ++i) kt[i * kTileKeys + j] = 0.f;
        std::fill(vf + j * dp, vf + j * dp + d, 0.f);
        continue;
      }
      const int64_t key = j0 + j;
      const int64_t off = (int64_t)block_table[key / g.block_size] * g.c_block_stride +
                          (key % g.block_size) * g.c_tok_stride + kv_head * g.c_head_stride;
      const scalar_t* kr = k_cache + off;
      const scalar_t* vr = v_cache + off;
      for (int64_t i = 0; i < d; ++i) kt[i * kTileKeys + j] = to_float(kr[i]);
      for (int64_t i = 0; i < d; ++i) vf[j * dp + i] = to_float(vr[i]);
    }
    // Rows whose causal limit is before this tile are all masked: they are the first rows (limits grow with r),
    // so the tile's work starts at row r0.
    int64_t r0 = 0;
    while (r0 < rows && limit[r0] < j0) ++r0;
    if (avx512)
      qk512(qf + r0 * dp, dp, rows - r0, kt, d, s + r0 * kTileKeys);
    else
      qk256(qf + r0 * dp, dp, rows - r0, kt, d, s + r0 * kTileKeys);
    for (int64_t r = r0; r < rows; ++r)
      alpha[r] = softmax_row(&st[r], s + r * kTileKeys, std::min(jn, limit[r] + 1 - j0));
    pv(avx512, acc + r0 * dp, rows - r0, alpha + r0, s + r0 * kTileKeys, vf, dp, jn);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group, h = kv_head * group + r % group;
    scalar_t* o = out + t * g.out_tok_stride + h * g.out_head_stride;
    const float inv = 1.f / st[r].l;
    for (int64_t i = 0; i < d; ++i) o[i] = from_float<scalar_t>(acc[r * dp + i] * inv);
  }
}

#define SLF_INSTANTIATE(T)                                                                                     \
  template void tile_attention_item<T>(bool, int64_t, int64_t, int64_t, T*, const T*, const T*, const T*,      \
                                       const int32_t*, int64_t, int64_t, int64_t, const TileGeom&, float*);
SLF_INSTANTIATE(float)
SLF_INSTANTIATE(c10::BFloat16)
SLF_INSTANTIATE(c10::Half)
#undef SLF_INSTANTIATE

}  // namespace slf::cpu
