// AVX2 micro-kernel of the int8 / int6 / int4 linear layers (layout in quant.h): int8 activations, one full panel of 16
// features (two ymm halves of 8) x T <= 2 tokens over the whole K (16 ymm registers: 4 int32 + 4 fp32 accumulators).
//   int8 (signed layout): per 32-byte half of a quad row, vpmaddubsw(|w|, sign(xq, w)) (|w| <= 128, so a pair of
//        products never saturates int16) and vpmaddwd with ones into 8 int32 lanes (one per feature).
//   int4: per 32-byte half, two nibble rows (mask, shift); vpmaddubsw(u4, xq) summed in int16 over the block (at
//        most 8 of them per block of 32 k: |sum| <= 8 * 2 * 15 * 127 < 32768), one vpmaddwd per block.
// Per block of B k the int32 sums -> fp32 x (sx * scale), as in quant_vnni.cpp.

#include <immintrin.h>

#include "cpu/quant.h"

#define SLF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace slf::cpu::quant {
namespace {

constexpr int64_t kAhead = 1024;

// The per-panel kernel's prefetch of a step of `lines` 64-byte rows at q: a few tokens (stream: W from DRAM once)
// into L2 4 KB ahead, every line, as the decode kernels do; more tokens one line 1 KB ahead into L1.
SLF_AVX2 inline void ahead(const uint8_t* q, bool stream, int lines = 1) {
  if (stream) {
    prefetch_l2(q, lines);
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(q + kAhead), _MM_HINT_T0);
  }
}

// Half h (features 8h .. 8h + 7) of group g's fp16 scales, and of its zero + offset, as fp32 lanes (quant512.h's
// scale_lanes / zero_lanes on 8 lanes; zero8 for panels with zero points).
SLF_AVX2 inline __m256 scale8(const Panel& w, int64_t g, int h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.s + g * kPanel + 8 * h)));
}
SLF_AVX2 inline __m256 zero8(const Panel& w, int64_t g, int h) {
  const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.z + g * kPanel + 8 * h));
  return _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8)), _mm256_set1_ps(float(w.offset)));
}

// int6: half h's four int8-style quad rows of 16 k from the three rows at q (nibble | two top bits at bits 4-5;
// quant_vnni.cpp's unpack6 on 32 bytes). u <= 63, |xq| <= 127: a pair of maddubs products sums to at most 32004.
SLF_AVX2 inline __m256i join6_avx2(__m256i nib, __m256i hs) {
  return _mm256_or_si256(_mm256_and_si256(nib, _mm256_set1_epi8(0x0f)), _mm256_and_si256(hs, _mm256_set1_epi8(0x30)));
}

SLF_AVX2 inline void unpack6_avx2(const uint8_t* q, __m256i* u) {
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128));
  u[0] = join6_avx2(v0, _mm256_slli_epi16(h, 4));
  u[1] = join6_avx2(_mm256_srli_epi16(v0, 4), _mm256_slli_epi16(h, 2));
  u[2] = join6_avx2(v1, h);
  u[3] = join6_avx2(_mm256_srli_epi16(v1, 4), _mm256_srli_epi16(h, 2));
}

template <int T, int BITS>
SLF_AVX2 void avx2(const Panel& w, const Act& x, int64_t t0, float* c) {
  const int64_t ng = w.K / w.G, nb = w.G / x.B, rows = x.B / 4;
  const uint8_t* q = w.q;
  const int8_t* xq[T];
  const float *bs[T], *gs[T];
  const int32_t* bsum[T];
  __m256 acc[T][2];
  for (int t = 0; t < T; ++t) {
    xq[t] = x.q_row(t0 + t);
    bs[t] = x.bs_row(t0 + t);
    bsum[t] = x.bsum_row(t0 + t);
    gs[t] = x.gs_row(t0 + t);
    acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f);
  const int zeff = w.zero + w.offset;
  const bool stream = x.stream;
  int64_t k = 0, b = 0;
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 s[2] = {scale8(w, g, 0), scale8(w, g, 1)};
    for (int64_t bi = 0; bi < nb; ++bi, ++b) {
      __m256i ia[T][2];
      if constexpr (BITS == 8) {
        for (int t = 0; t < T; ++t) ia[t][0] = ia[t][1] = _mm256_setzero_si256();
        for (int64_t r = 0; r < rows; ++r, q += 64, k += 4) {
          ahead(q, stream);
          for (int h = 0; h < 2; ++h) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * h));
            const __m256i aw = _mm256_abs_epi8(wv);
            for (int t = 0; t < T; ++t) {
              const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(load4(xq[t] + k)), wv));
              ia[t][h] = _mm256_add_epi32(ia[t][h], _mm256_madd_epi16(p, ones));
            }
          }
        }
      } else if constexpr (BITS == 6) {  // 16 k per step (layout in quant.h); two maddubs per int16 sum
        for (int t = 0; t < T; ++t) ia[t][0] = ia[t][1] = _mm256_setzero_si256();
        for (int64_t r = 0; r < rows; r += 4, q += 192, k += 16) {
          ahead(q, stream, 3);
          for (int h = 0; h < 2; ++h) {
            __m256i u[4];
            unpack6_avx2(q + 32 * h, u);
            for (int t = 0; t < T; ++t) {
              const __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], _mm256_set1_epi32(load4(xq[t] + k))),
                                                 _mm256_maddubs_epi16(u[1], _mm256_set1_epi32(load4(xq[t] + k + 4))));
              const __m256i bb = _mm256_add_epi16(
                  _mm256_maddubs_epi16(u[2], _mm256_set1_epi32(load4(xq[t] + k + 8))),
                  _mm256_maddubs_epi16(u[3], _mm256_set1_epi32(load4(xq[t] + k + 12))));
              ia[t][h] = _mm256_add_epi32(ia[t][h],
                                          _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(bb, ones)));
            }
          }
        }
      } else {
        __m256i p16[T][2];
        for (int t = 0; t < T; ++t) p16[t][0] = p16[t][1] = _mm256_setzero_si256();
        for (int64_t r = 0; r < rows; r += 2, q += 64, k += 8) {
          ahead(q, stream);
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * h));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int t = 0; t < T; ++t) {
              const __m256i a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xq[t] + k)));
              const __m256i bb = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xq[t] + k + 4)));
              p16[t][h] = _mm256_add_epi16(p16[t][h], _mm256_add_epi16(a, bb));
            }
          }
        }
        for (int t = 0; t < T; ++t)
          for (int h = 0; h < 2; ++h) ia[t][h] = _mm256_madd_epi16(p16[t][h], ones);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i corr = _mm256_set1_epi32(zeff * bsum[t][b]);
        const __m256 sx = _mm256_set1_ps(bs[t][b]);
        for (int h = 0; h < 2; ++h) {
          const __m256i d = w.z ? ia[t][h] : _mm256_sub_epi32(ia[t][h], corr);
          acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s[h], sx), acc[t][h]);
        }
      }
    }
    if (w.z) {
      for (int h = 0; h < 2; ++h) {
        const __m256 m = _mm256_mul_ps(zero8(w, g, h), s[h]);
        for (int t = 0; t < T; ++t) acc[t][h] = _mm256_fnmadd_ps(m, _mm256_set1_ps(gs[t][g]), acc[t][h]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(c + t * kPanel, acc[t][0]);
    _mm256_storeu_ps(c + t * kPanel + 8, acc[t][1]);
  }
}

// One token (decode), NP panels side by side: NP streams of W in flight. NOTE: one panel at a time (avx2<1, BITS>,
// one stream and a software prefetch) read int8 / int4 weights at 20 / 16 GB/s in a decode step on 2 Zen 4 cores in
// AVX2 mode (66% / 54% of the measured bandwidth) while it ran 37 / 30 GB/s a core from L2. An L2 prefetch per 64
// bytes of each stream (quant.h: kL2Ahead), as in quant_vnni.cpp's vnni4. Scales are loaded per
// block (from L1) and the fp32 sums may live in memory: both are touched once per block of 32 k, and the int sums
// keep the registers.
template <int NP, int BITS>
SLF_AVX2 void avx2_streams(const Panel* w, const Act& x, int64_t t0, float* c) {
  const int64_t ng = w[0].K / w[0].G, nb = w[0].G / x.B, rows = x.B / 4;
  const int8_t* xq = x.q_row(t0);
  const float* bs = x.bs_row(t0);
  const int32_t* bsum = x.bsum_row(t0);
  const float* gs = x.gs_row(t0);
  const uint8_t* q[NP];
  __m256 acc[NP][2];
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    q[p] = w[p].q;
    acc[p][0] = acc[p][1] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f);
  const int zeff = w[0].zero + w[0].offset;
  int64_t k = 0, b = 0;
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t bi = 0; bi < nb; ++bi, ++b) {
      __m256i ia[NP][2];
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) ia[p][0] = ia[p][1] = _mm256_setzero_si256();
      if constexpr (BITS == 8) {
        for (int64_t r = 0; r < rows; ++r, k += 4) {
          const __m256i xb = _mm256_set1_epi32(load4(xq + k));
#pragma GCC unroll 4
          for (int p = 0; p < NP; ++p) {
            prefetch_l2(q[p]);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[p] + 32 * h));
              const __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xb, wv));
              ia[p][h] = _mm256_add_epi32(ia[p][h], _mm256_madd_epi16(pr, ones));
            }
            q[p] += 64;
          }
        }
      } else if constexpr (BITS == 6) {
        for (int64_t r = 0; r < rows; r += 4, k += 16) {
          const __m256i x0 = _mm256_set1_epi32(load4(xq + k)), x1 = _mm256_set1_epi32(load4(xq + k + 4));
          const __m256i x2 = _mm256_set1_epi32(load4(xq + k + 8)), x3 = _mm256_set1_epi32(load4(xq + k + 12));
#pragma GCC unroll 4
          for (int p = 0; p < NP; ++p) {
            prefetch_l2(q[p], 3);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              __m256i u[4];
              unpack6_avx2(q[p] + 32 * h, u);
              const __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], x0), _mm256_maddubs_epi16(u[1], x1));
              const __m256i bb = _mm256_add_epi16(_mm256_maddubs_epi16(u[2], x2), _mm256_maddubs_epi16(u[3], x3));
              ia[p][h] = _mm256_add_epi32(ia[p][h], _mm256_add_epi32(_mm256_madd_epi16(a, ones),
                                                                     _mm256_madd_epi16(bb, ones)));
            }
            q[p] += 192;
          }
        }
      } else {  // int16 sums over the block (at most 8 maddubs pairs: see avx2()), one vpmaddwd at its end
        for (int64_t r = 0; r < rows; r += 2, k += 8) {
          const __m256i x0 = _mm256_set1_epi32(load4(xq + k)), x1 = _mm256_set1_epi32(load4(xq + k + 4));
#pragma GCC unroll 4
          for (int p = 0; p < NP; ++p) {
            prefetch_l2(q[p]);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[p] + 32 * h));
              const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
              ia[p][h] = _mm256_add_epi16(ia[p][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0),
                                                                     _mm256_maddubs_epi16(hi, x1)));
            }
            q[p] += 64;
          }
        }
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p)
          for (int h = 0; h < 2; ++h) ia[p][h] = _mm256_madd_epi16(ia[p][h], ones);
      }
      const __m256i corr = _mm256_set1_epi32(zeff * bsum[b]);
      const __m256 sx = _mm256_set1_ps(bs[b]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p)
        for (int h = 0; h < 2; ++h) {
          const __m256i d = w[p].z ? ia[p][h] : _mm256_sub_epi32(ia[p][h], corr);
          acc[p][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(scale8(w[p], g, h), sx), acc[p][h]);
        }
    }
    if (w[0].z) {
      const __m256 xg = _mm256_set1_ps(gs[g]);
      for (int p = 0; p < NP; ++p)
        for (int h = 0; h < 2; ++h) {
          acc[p][h] = _mm256_fnmadd_ps(_mm256_mul_ps(zero8(w[p], g, h), scale8(w[p], g, h)), xg, acc[p][h]);
        }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    _mm256_storeu_ps(c + p * kPanel, acc[p][0]);
    _mm256_storeu_ps(c + p * kPanel + 8, acc[p][1]);
  }
}

// One row of x -> int8 per block of B k (B a multiple of 8), as quantize_rows' scalar loop computes it: amax by
// vmaxps of |x| (order-free, exact), q = cvtps (round to nearest even, as nearbyint) of x * (127 / amax).
SLF_AVX2 void quantize_row8(const float* x, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum,
                            float* gs) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t per_group = G / B;
  for (int64_t g = 0; g < K / G; ++g) gs[g] = 0.f;
  for (int64_t b = 0; b < K / B; ++b) {
    const float* xb = x + b * B;
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < B; i += 8)  // (|x|, m): a NaN x is skipped, as by std::max(m, |x|)
      m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float amax = _mm_cvtss_f32(h);
    const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < B; i += 8) {
      const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vinv));
      sum = _mm256_add_epi32(sum, v);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      const __m128i w8 = _mm_packs_epi16(w16, w16);  // |v| <= 127: no saturation
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + b * B + i), w8);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    const int32_t total = _mm_cvtsi128_si32(s4);
    bs[b] = sx;
    bsum[b] = total;
    gs[b / per_group] += sx * float(total);
  }
}

}  // namespace

void micro_avx2(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c) {
  TORCH_CHECK(T >= 1 && T <= kAvx2T, "micro_avx2: T out of range");
  if (w.bits == 8) return T == 1 ? avx2<1, 8>(w, x, t0, c) : avx2<2, 8>(w, x, t0, c);
  if (w.bits == 6) return T == 1 ? avx2<1, 6>(w, x, t0, c) : avx2<2, 6>(w, x, t0, c);
  return T == 1 ? avx2<1, 4>(w, x, t0, c) : avx2<2, 4>(w, x, t0, c);
}

void micro_avx2_4(const Panel* w, const Act& x, int64_t t0, float* c) {
  if (w[0].bits == 8) return avx2_streams<4, 8>(w, x, t0, c);
  if (w[0].bits == 6) return avx2_streams<4, 6>(w, x, t0, c);
  return avx2_streams<4, 4>(w, x, t0, c);
}

void quantize_row_avx2(const float* x, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum,
                       float* gs) {
  quantize_row8(x, K, B, G, q, bs, bsum, gs);
}

}  // namespace slf::cpu::quant
