// Prefill / extend attention of one work item with AMX tiles (bf16 caches, head size % 32 == 0, AMX CPUs): the work
// item and the online softmax of attention_tile.cpp, its two products as tile GEMMs on bf16 (amx.h's 16 x 64-byte
// tiles):
//   S [rows][32 keys] = Q K^T: A = the item's q rows (bf16, packed once per item), B = the key tile as pairs of d
//     ([d/2][32 keys] 32-bit words: every 16 pairs of d and 16 keys a B tile), scattered from the cache rows;
//   O += P V: A = P (bf16 [rows][32 keys]), B = the value tile with its rows paired ([16 key pairs][d][2]: a B tile
//     per 16 features), the product in a fresh C tile, then acc = acc * alpha + it (AVX-512).
// Scores are scaled in fp32 (q stays as the cache holds it); keys past the tile's last one are zero in K and V.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/amx.h"
#include "cpu/attention_common.h"
#include "cpu/attention_tile.h"
#include "cpu/vec_math.h"

#define SLF_AMX_ATT \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu {
namespace {

using bf16 = c10::BFloat16;

// kw[p][j] (32-bit words, row stride kTileKeys) = K row j's pair p of d, for keys j < jn; zero for j >= jn.
SLF_AMX_ATT void pack_keys(const bf16* const* rows, int64_t jn, int64_t d, uint32_t* kw) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(kTileKeys)));
  if (jn < kTileKeys) std::memset(kw, 0, d / 2 * kTileKeys * sizeof(uint32_t));
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t p0 = 0; p0 < d / 2; p0 += 16)
      _mm512_i32scatter_epi32(kw + p0 * kTileKeys + j, idx, _mm512_loadu_si512(rows[j] + 2 * p0), 4);
}

// vw[kp][i] (32-bit words, row stride d) = (V[2 kp][i], V[2 kp + 1][i]); rows past jn read as zero.
SLF_AMX_ATT void pack_values(const bf16* const* rows, int64_t jn, int64_t d, uint32_t* vw) {
  alignas(64) int16_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) {
    lo[2 * i] = static_cast<int16_t>(i), lo[2 * i + 1] = static_cast<int16_t>(32 + i);
    hi[2 * i] = static_cast<int16_t>(16 + i), hi[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t kp = 0; kp < kTileKeys / 2; ++kp) {
    uint32_t* o = vw + kp * d;
    const bool a_ok = 2 * kp < jn, b_ok = 2 * kp + 1 < jn;
    for (int64_t i = 0; i < d; i += 32) {
      const __m512i a = a_ok ? _mm512_loadu_si512(rows[2 * kp] + i) : _mm512_setzero_si512();
      const __m512i b = b_ok ? _mm512_loadu_si512(rows[2 * kp + 1] + i) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + i, _mm512_permutex2var_epi16(a, ilo, b));
      _mm512_storeu_si512(o + i + 16, _mm512_permutex2var_epi16(a, ihi, b));
    }
  }
}

// s[r][0:32] for the 16-row blocks from rb0: the item's q rows qb ([rows_pad][d] bf16) times the key tile kw.
SLF_AMX_ATT void scores(const bf16* qb, int64_t d, const uint32_t* kw, int64_t rb0, int64_t rb1, float* s) {
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t ds = 0; ds < d / 32; ++ds) {
      _tile_loadd(4, qb + rb * 16 * d + ds * 32, d * static_cast<int64_t>(sizeof(bf16)));
      _tile_loadd(6, kw + ds * 16 * kTileKeys, kTileKeys * 4);
      _tile_loadd(7, kw + ds * 16 * kTileKeys + 16, kTileKeys * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, s + rb * 16 * kTileKeys, kTileKeys * 4);
    _tile_stored(1, s + rb * 16 * kTileKeys + 16, kTileKeys * 4);
  }
}

// acc[r][0:d] = acc[r] * alpha[r] + P[r] V for rows r < rows of the blocks from rb0 (pb: [rows_pad][32] bf16; acc:
// [rows][d]).
SLF_AMX_ATT void accumulate(const bf16* pb, const uint32_t* vw, int64_t d, int64_t rb0, int64_t rb1, int64_t rows,
                            const float* alpha, float* acc) {
  alignas(64) float c[16 * 16];
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    _tile_loadd(4, pb + rb * 16 * kTileKeys, kTileKeys * static_cast<int64_t>(sizeof(bf16)));
    for (int64_t dc = 0; dc < d; dc += 16) {
      _tile_zero(0);
      _tile_loadd(6, vw + dc, d * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_stored(0, c, 64);
      for (int64_t i = 0; i < 16 && rb * 16 + i < rows; ++i) {
        float* a = acc + (rb * 16 + i) * d + dc;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_set1_ps(alpha[rb * 16 + i]),
                                            _mm512_loadu_ps(c + 16 * i)));
      }
    }
  }
}

// One online-softmax step of a row over its 32 scores s, the first n (>= 1) attended: scaled, exponentiated against
// the new maximum, summed into st; p[0:32] = bf16 of them (0 past n). Returns the accumulator's factor.
SLF_AMX_ATT float softmax_row(SoftmaxState* st, const float* s, int64_t n, float scale, bf16* p) {
  const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(n >= 32 ? 0xffff : n <= 16 ? 0 : (1u << (n - 16)) - 1);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, s), vs);
  const __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, s + 16), vs);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const float bmax =
      _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(ninf, m0, a), _mm512_mask_mov_ps(ninf, m1, b)));
  const float alpha = softmax_rescale(st, bmax);
  const __m512 m = _mm512_set1_ps(st->m);
  const __m512 ea = _mm512_maskz_mov_ps(m0, exp16(_mm512_sub_ps(a, m)));
  const __m512 eb = _mm512_maskz_mov_ps(m1, exp16(_mm512_sub_ps(b, m)));
  st->l += _mm512_reduce_add_ps(_mm512_add_ps(ea, eb));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(ea));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), (__m256i)_mm512_cvtneps_pbh(eb));
  return alpha;
}

}  // namespace

bool amx_attention_takes(int64_t head_dim) { return head_dim % 32 == 0 && amx::enabled(); }

void amx_attention_item(int64_t t0, int64_t t1, int64_t kv_head, bf16* out, const bf16* q, const bf16* k_cache,
                        const bf16* v_cache, const int32_t* block_table, int64_t q_start, int64_t q_len, int64_t ctx,
                        const TileGeom& g) {
  const int64_t d = g.head_dim, group = g.group, rows = (t1 - t0) * group;
  const int64_t rows_pad = (rows + 15) / 16 * 16, n_rb = rows_pad / 16;
  thread_local std::vector<bf16> qb, pb;
  thread_local std::vector<uint32_t> kw, vw;
  thread_local std::vector<float> s, acc;
  qb.assign(rows_pad * d, bf16(0.f));
  pb.assign(rows_pad * kTileKeys, bf16(0.f));
  kw.resize(d / 2 * kTileKeys);
  vw.resize(kTileKeys / 2 * d);
  s.resize(rows_pad * kTileKeys);
  acc.assign(rows * d, 0.f);
  SoftmaxState st[kTileMaxRows];
  int64_t limit[kTileMaxRows];  // last key row r attends (causal)
  float alpha[kTileMaxRows];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group, h = kv_head * group + r % group;
    std::memcpy(qb.data() + r * d, q + t * g.q_tok_stride + h * g.q_head_stride, d * sizeof(bf16));
    st[r] = softmax_init();
    limit[r] = ctx - q_len + (t - q_start);
  }
  amx::Tiles tiles;
  tiles.load();
  const bf16* krows[kTileKeys];
  const bf16* vrows[kTileKeys];
  const int64_t max_key = limit[rows - 1];
  for (int64_t j0 = 0; j0 <= max_key; j0 += kTileKeys) {
    const int64_t jn = std::min(max_key + 1, j0 + kTileKeys) - j0;
    for (int64_t j = 0; j < jn; ++j) {
      const int64_t key = j0 + j;
      const int64_t off = (int64_t)block_table[key / g.block_size] * g.c_block_stride +
                          (key % g.block_size) * g.c_tok_stride + kv_head * g.c_head_stride;
      krows[j] = k_cache + off;
      vrows[j] = v_cache + off;
    }
    pack_keys(krows, jn, d, kw.data());
    pack_values(vrows, jn, d, vw.data());
    // Rows whose causal limit is before this tile are all masked: the first ones (limits grow with r).
    int64_t r0 = 0;
    while (r0 < rows && limit[r0] < j0) ++r0;
    const int64_t rb0 = r0 / 16;
    __asm__ volatile("" ::: "memory");  // the tile loads (asm without memory operands) must see the packed tiles
    scores(qb.data(), d, kw.data(), rb0, n_rb, s.data());
    for (int64_t r = rb0 * 16; r < rows_pad; ++r) {
      bf16* pr = pb.data() + r * kTileKeys;
      if (r < r0 || r >= rows) {  // masked here, or padding: P = 0, the accumulator kept
        std::fill(pr, pr + kTileKeys, bf16(0.f));
        if (r < rows) alpha[r] = 1.f;
      } else {
        alpha[r] = softmax_row(&st[r], s.data() + r * kTileKeys, std::min(jn, limit[r] + 1 - j0), g.scale, pr);
      }
    }
    __asm__ volatile("" ::: "memory");
    accumulate(pb.data(), vw.data(), d, rb0, n_rb, rows, alpha, acc.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group, h = kv_head * group + r % group;
    bf16* o = out + t * g.out_tok_stride + h * g.out_head_stride;
    const float inv = 1.f / st[r].l;
    for (int64_t i = 0; i < d; ++i) o[i] = bf16(acc[r * d + i] * inv);
  }
}

}  // namespace slf::cpu
