// AVX-512 micro-kernels of the int8 / int6 / int4 linear layers (layout in quant.h), one full panel of 16 features x T
// tokens over the whole K:
//   micro_vnni         int8 activations: per quad row one 64-byte load (int4: one load, a mask and a shift give two
//                      quad rows; int6: three loads give four, unpack6), per token a broadcast of 4 bytes of xq and
//                      one vpdpbusd (u8 weights x s8 x, 16 int32 lanes = the 16 features); per block of B k the
//                      int32 sums -> fp32 x (sx * scale).
//   micro_fp32_avx512  the in-register dequantization to fp32 FMAs (measured against micro_vnni in
//                      bench/kernels/bench_quant_gemm.py; STABLELM_FAST_QGEMM=fp32 runs it): per 16 bytes of a quad
//                      row (4 features x 4 k) a widening to 16 int32, a conversion, an FMA with scale / zero, and
//                      per token an FMA with x's 4 values broadcast; lanes are summed by 4 at the end.
// The weights stream from DRAM once per panel, one sequential stream per thread.
// NOTE: no software prefetch in the one-panel kernels: 1-2 KB ahead into L1 measured ~10% slower than the hardware
// prefetchers alone on Zen 4 (int8 GEMV, one core, medians of interleaved runs on a loaded machine). The decode
// kernel (vnni4: four streams) prefetches into L2 instead (quant.h: kL2Ahead).
// NOTE (micro_vnni): the scale and the zero correction once per group instead (a second fp32 accumulator per
// token) measured 1.45x slower at M = 128 (int4 g128, 2048 x 6144): the per-block multiply costs less than the extra
// live registers.
#include <type_traits>

#include <immintrin.h>

#include "cpu/quant512.h"
#include "cpu/vec_math.h"

#define SLF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define SLF_VNNI_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu::quant {
namespace {

// int6: the four int8-style quad rows of 16 k (layout in quant.h) from the panel's three rows at q: each a nibble
// of row 0 or 1 ORed with two bits of row 2 moved to bits 4-5 (16-bit shifts: what crosses a byte is masked off).
SLF_VNNI inline __m512i join6(__m512i nib, __m512i hs) {
  return _mm512_or_si512(_mm512_and_si512(nib, _mm512_set1_epi8(0x0f)), _mm512_and_si512(hs, _mm512_set1_epi8(0x30)));
}

SLF_VNNI inline void unpack6(const uint8_t* q, __m512i* u) {
  const __m512i v0 = _mm512_loadu_si512(q), v1 = _mm512_loadu_si512(q + 64), h = _mm512_loadu_si512(q + 128);
  u[0] = join6(v0, _mm512_slli_epi16(h, 4));
  u[1] = join6(_mm512_srli_epi16(v0, 4), _mm512_slli_epi16(h, 2));
  u[2] = join6(v1, h);
  u[3] = join6(_mm512_srli_epi16(v1, 4), _mm512_srli_epi16(h, 2));
}

// NOTE: x's rows addressed from one pointer each (token t at t K, t K / B, t ng) and the row loops unrolled: with a
// pointer per token and rolled loops GCC spilled pointers and copied every accumulator once an iteration.
template <int T, int BITS>
SLF_VNNI void vnni(const Panel& w, const Act& x, int64_t t0, float* c) {
  const int64_t ng = w.K / w.G, nb = w.G / x.B, rows = x.B / 4, K = x.K, nbk = K / x.B;
  const uint8_t* q = w.q;
  const int8_t* const xq = x.q_row(t0);
  const float* const bs = x.bs_row(t0);
  const int32_t* const bsum = x.bsum_row(t0);
  const float* const gs = x.gs_row(t0);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8(static_cast<char>(0xf0));
  const int zeff = w.zero + w.offset;  // without zero points
  const bool stream = x.stream;
  int64_t k = 0, b = 0;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 s = scale_lanes(w, g);
    for (int64_t bi = 0; bi < nb; ++bi, ++b) {
      // NOTE: two int32 chains per token (even / odd quad rows): with one token, a single chain of vpdpbusd
      // (latency ~5 cycles) bounded int4 at ~6 bytes of W per cycle.
      __m512i ia[T], ib[T];
      for (int t = 0; t < T; ++t) ia[t] = ib[t] = _mm512_setzero_si512();
      if constexpr (BITS == 8) {
        int64_t r = 0;
#pragma GCC unroll 4
        for (; r + 2 <= rows; r += 2, q += 128, k += 8) {
          if (stream) prefetch_l2(q, 2);
          const __m512i w0 = _mm512_loadu_si512(q), w1 = _mm512_loadu_si512(q + 64);
          for (int t = 0; t < T; ++t) {
            ia[t] = _mm512_dpbusd_epi32(ia[t], w0, _mm512_set1_epi32(load4(xq + t * K + k)));
            ib[t] = _mm512_dpbusd_epi32(ib[t], w1, _mm512_set1_epi32(load4(xq + t * K + k + 4)));
          }
        }
        if (r < rows) {  // B = 4: one quad row per block
          const __m512i w0 = _mm512_loadu_si512(q);
          for (int t = 0; t < T; ++t)
            ia[t] = _mm512_dpbusd_epi32(ia[t], w0, _mm512_set1_epi32(load4(xq + t * K + k)));
          q += 64;
          k += 4;
        }
      } else if constexpr (BITS == 6) {  // 16 k (four quad rows of x) per step; B is a multiple of 16
#pragma GCC unroll 2
        for (int64_t r = 0; r < rows; r += 4, q += 192, k += 16) {
          if (stream) prefetch_l2(q, 3);
          __m512i u[4];
          unpack6(q, u);
          for (int t = 0; t < T; ++t) {
            ia[t] = _mm512_dpbusd_epi32(ia[t], u[0], _mm512_set1_epi32(load4(xq + t * K + k)));
            ib[t] = _mm512_dpbusd_epi32(ib[t], u[1], _mm512_set1_epi32(load4(xq + t * K + k + 4)));
            ia[t] = _mm512_dpbusd_epi32(ia[t], u[2], _mm512_set1_epi32(load4(xq + t * K + k + 8)));
            ib[t] = _mm512_dpbusd_epi32(ib[t], u[3], _mm512_set1_epi32(load4(xq + t * K + k + 12)));
          }
        }
      } else {
        // the high nibbles stay in place (16 x their value, no shift per load): ib = 16 x the sum, exactly
#pragma GCC unroll 4
        for (int64_t r = 0; r < rows; r += 2, q += 64, k += 8) {
          if (stream) prefetch_l2(q);
          const __m512i v = _mm512_loadu_si512(q);
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(v, high4);
          for (int t = 0; t < T; ++t) {
            ia[t] = _mm512_dpbusd_epi32(ia[t], lo, _mm512_set1_epi32(load4(xq + t * K + k)));
            ib[t] = _mm512_dpbusd_epi32(ib[t], hi, _mm512_set1_epi32(load4(xq + t * K + k + 4)));
          }
        }
        for (int t = 0; t < T; ++t) ib[t] = _mm512_srai_epi32(ib[t], 4);
      }
      for (int t = 0; t < T; ++t) ia[t] = _mm512_add_epi32(ia[t], ib[t]);
      for (int t = 0; t < T; ++t) {
        // exact zero correction in int32 when the zero point is one constant
        const __m512i d = w.z ? ia[t] : _mm512_sub_epi32(ia[t], _mm512_set1_epi32(zeff * bsum[t * nbk + b]));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(bs[t * nbk + b])), acc[t]);
      }
    }
    if (w.z) {  // - (zero + offset) * s * X_g
      const __m512 m = _mm512_mul_ps(zero_lanes(w, g), s);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fnmadd_ps(m, _mm512_set1_ps(gs[t * ng + g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(c + t * kPanel, acc[t]);
}

// int8 weights with one scale per feature (one group over K) and no zero points, the int8 default, x in blocks of 32
// k (act_block): each block's int32 sum starts at its offset correction (-(zero + offset) sum_b(xq), no subtraction
// after), becomes fp32 in one FMA by x's block scale, and the weight scale multiplies once at the end: 2 ops per token
// and block after its 8 vpdpbusd, where vnni<T, 8> spends 5 (add of two chains, subtract, convert, multiply, FMA).
// The block's 8 quad rows fully unrolled, x's rows addressed from one pointer (token t at t K): no spilled pointers.
// With T >= 3 one chain per token (T chains keep vpdpbusd's pipe busy: its latency is 4 cycles on Zen 4).
template <int T>
SLF_VNNI void vnni8_channel(const Panel& w, const Act& x, int64_t t0, float* c) {
  constexpr int kRows = 8;  // quad rows per block of 32 k
  constexpr bool two = T < 3;
  const int64_t K = x.K, nb = K / 32;
  const int8_t* xq = x.q_row(t0);
  const float* bs = x.bs_row(t0);
  const int32_t* bsum = x.bsum_row(t0);
  const uint8_t* q = w.q;
  const int zeff = w.zero + w.offset;
  const bool stream = x.stream;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, q += kRows * 64, xq += 32) {
    __m512i ia[T], ib[T];
    for (int t = 0; t < T; ++t) {
      ia[t] = _mm512_set1_epi32(-zeff * bsum[t * nb + b]);
      if constexpr (two) ib[t] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      if (stream) prefetch_l2(q + 64 * r);
      const __m512i wr = _mm512_loadu_si512(q + 64 * r);
      for (int t = 0; t < T; ++t) {
        const __m512i xb = _mm512_set1_epi32(load4(xq + t * K + 4 * r));
        if (two && (r & 1)) {
          ib[t] = _mm512_dpbusd_epi32(ib[t], wr, xb);
        } else {
          ia[t] = _mm512_dpbusd_epi32(ia[t], wr, xb);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      if constexpr (two) ia[t] = _mm512_add_epi32(ia[t], ib[t]);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[t]), _mm512_set1_ps(bs[t * nb + b]), acc[t]);
    }
  }
  const __m512 s = scale_lanes(w, 0);
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(c + t * kPanel, _mm512_mul_ps(acc[t], s));
}

// One token, four panels at once, their rows interleaved: four streams of W in flight (a single stream held a core
// well below what the bf16 GEMM, four panels at a time, reads), one broadcast of x per row for all four.
template <int BITS>
SLF_VNNI void vnni4(const Panel* w, const Act& x, int64_t t0, float* c) {
  constexpr int NP = 4;
  const int64_t ng = w[0].K / w[0].G, nb = w[0].G / x.B, rows = x.B / 4;
  const int8_t* xq = x.q_row(t0);
  const float* bs = x.bs_row(t0);
  const int32_t* bsum = x.bsum_row(t0);
  const float* gs = x.gs_row(t0);
  const uint8_t* q[NP];
  __m512 acc[NP];
  for (int p = 0; p < NP; ++p) {
    q[p] = w[p].q;
    acc[p] = _mm512_setzero_ps();
  }
  const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8(static_cast<char>(0xf0));
  const int zeff = w[0].zero + w[0].offset;
  int64_t k = 0, b = 0;
  for (int64_t g = 0; g < ng; ++g) {
    __m512 s[NP];
    for (int p = 0; p < NP; ++p) s[p] = scale_lanes(w[p], g);
    for (int64_t bi = 0; bi < nb; ++bi, ++b) {
      __m512i ia[NP], ih[NP];
      for (int p = 0; p < NP; ++p) ia[p] = ih[p] = _mm512_setzero_si512();
      if constexpr (BITS == 8) {
        for (int64_t r = 0; r < rows; ++r, k += 4) {
          const __m512i xb = _mm512_set1_epi32(load4(xq + k));
          for (int p = 0; p < NP; ++p) {
            prefetch_l2(q[p]);
            ia[p] = _mm512_dpbusd_epi32(ia[p], _mm512_loadu_si512(q[p]), xb);
            q[p] += 64;
          }
        }
      } else if constexpr (BITS == 6) {
        for (int64_t r = 0; r < rows; r += 4, k += 16) {
          const __m512i x0 = _mm512_set1_epi32(load4(xq + k)), x1 = _mm512_set1_epi32(load4(xq + k + 4));
          const __m512i x2 = _mm512_set1_epi32(load4(xq + k + 8)), x3 = _mm512_set1_epi32(load4(xq + k + 12));
          for (int p = 0; p < NP; ++p) {
            __m512i u[4];
            prefetch_l2(q[p], 3);
            unpack6(q[p], u);
            q[p] += 192;
            ia[p] = _mm512_dpbusd_epi32(ia[p], u[0], x0);
            ih[p] = _mm512_dpbusd_epi32(ih[p], u[1], x1);
            ia[p] = _mm512_dpbusd_epi32(ia[p], u[2], x2);
            ih[p] = _mm512_dpbusd_epi32(ih[p], u[3], x3);
          }
        }
        for (int p = 0; p < NP; ++p) ia[p] = _mm512_add_epi32(ia[p], ih[p]);
      } else {
        for (int64_t r = 0; r < rows; r += 2, k += 8) {
          const __m512i x0 = _mm512_set1_epi32(load4(xq + k)), x1 = _mm512_set1_epi32(load4(xq + k + 4));
          // NOTE: the high nibbles in place (16 x their value; ih = 16 x the sum, exact in int32: at most
          // 240 * 127 * 4 * 16 per lane and block): no shift per load, and two independent chains per panel
          for (int p = 0; p < NP; ++p) {
            prefetch_l2(q[p]);
            const __m512i v = _mm512_loadu_si512(q[p]);
            q[p] += 64;
            ia[p] = _mm512_dpbusd_epi32(ia[p], _mm512_and_si512(v, low4), x0);
            ih[p] = _mm512_dpbusd_epi32(ih[p], _mm512_and_si512(v, high4), x1);
          }
        }
        for (int p = 0; p < NP; ++p) ia[p] = _mm512_add_epi32(ia[p], _mm512_srai_epi32(ih[p], 4));
      }
      const __m512 sx = _mm512_set1_ps(bs[b]);
      const __m512i corr = _mm512_set1_epi32(zeff * bsum[b]);
      for (int p = 0; p < NP; ++p) {
        const __m512i d = w[p].z ? ia[p] : _mm512_sub_epi32(ia[p], corr);
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s[p], sx), acc[p]);
      }
    }
    if (w[0].z) {
      for (int p = 0; p < NP; ++p)
        acc[p] = _mm512_fnmadd_ps(_mm512_mul_ps(zero_lanes(w[p], g), s[p]), _mm512_set1_ps(gs[g]), acc[p]);
    }
  }
  for (int p = 0; p < NP; ++p) _mm512_storeu_ps(c + p * kPanel, acc[p]);
}

// acc[t][j] += dequant(u: 16 bytes j of the quad row) * x[t][k .. k + 4] (lanes: feature 4j + l / 4, k + l % 4).
template <int T>
SLF_VNNI inline void fp32_row(__m512i u, const __m512* sl, const __m512* ml, const float* const* xf, int64_t k,
                              __m512 (*acc)[4]) {
  __m512 xp[T];
  for (int t = 0; t < T; ++t) xp[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(xf[t] + k));
  const __m128i part[4] = {_mm512_castsi512_si128(u), _mm512_extracti32x4_epi32(u, 1),
                           _mm512_extracti32x4_epi32(u, 2), _mm512_extracti32x4_epi32(u, 3)};
  for (int j = 0; j < 4; ++j) {
    const __m512 wf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part[j])), sl[j], ml[j]);
    for (int t = 0; t < T; ++t) acc[t][j] = _mm512_fmadd_ps(wf, xp[t], acc[t][j]);
  }
}

template <int T, int BITS>
SLF_VNNI void fp32(const Panel& w, const Act& x, int64_t t0, float* c) {
  const int64_t ng = w.K / w.G;
  const float* xf[T];
  __m512 acc[T][4];
  for (int t = 0; t < T; ++t) {
    xf[t] = x.f_row(t0 + t);
    for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_ps();
  }
  __m512i idx[4];  // lane l of part j holds feature 4j + l / 4
  for (int j = 0; j < 4; ++j)
    idx[j] = _mm512_set_epi32(4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 2, 4 * j + 2, 4 * j + 2, 4 * j + 2,
                              4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j, 4 * j, 4 * j, 4 * j);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const uint8_t* q = w.q;
  int64_t k = 0;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 s = scale_lanes(w, g);
    const __m512 m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(zero_lanes(w, g), s));
    __m512 sl[4], ml[4];
    for (int j = 0; j < 4; ++j) {
      sl[j] = _mm512_permutexvar_ps(idx[j], s);
      ml[j] = _mm512_permutexvar_ps(idx[j], m);
    }
    for (int64_t kg = 0; kg < w.G; kg += BITS == 8 ? 4 : 8, q += 64) {
      const __m512i v = _mm512_loadu_si512(q);
      if constexpr (BITS == 8) {
        fp32_row<T>(v, sl, ml, xf, k, acc);
        k += 4;
      } else {
        fp32_row<T>(_mm512_and_si512(v, low4), sl, ml, xf, k, acc);
        fp32_row<T>(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), sl, ml, xf, k + 4, acc);
        k += 8;
      }
    }
  }
  alignas(64) float lanes[16];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < 4; ++j) {
      _mm512_store_ps(lanes, acc[t][j]);
      for (int i = 0; i < 4; ++i)
        c[t * kPanel + 4 * j + i] = lanes[4 * i] + lanes[4 * i + 1] + lanes[4 * i + 2] + lanes[4 * i + 3];
    }
}

// f(std::integral_constant<int, T>) for T = 1 .. kVnniT: the token count as a template argument.
template <typename F>
void with_tokens(int64_t T, const char* name, F&& f) {
  TORCH_CHECK(T >= 1 && T <= kVnniT, name, ": T out of range");
  switch (T) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

}  // namespace

void micro_vnni(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c) {
  with_tokens(T, "micro_vnni", [&](auto t) {
    constexpr int kT = decltype(t)::value;
    if (w.bits == 8 && w.G == w.K && w.z == nullptr && x.B == 32) return vnni8_channel<kT>(w, x, t0, c);
    w.bits == 8 ? vnni<kT, 8>(w, x, t0, c) : w.bits == 6 ? vnni<kT, 6>(w, x, t0, c) : vnni<kT, 4>(w, x, t0, c);
  });
}

void micro_vnni4(const Panel* w, const Act& x, int64_t t0, float* c) {
  if (w[0].bits == 8) return vnni4<8>(w, x, t0, c);
  if (w[0].bits == 6) return vnni4<6>(w, x, t0, c);
  return vnni4<4>(w, x, t0, c);
}

void micro_fp32_avx512(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c) {
  TORCH_CHECK(w.bits != 6, "micro_fp32_avx512: int6 weights run the vnni kernel only");
  with_tokens(T, "micro_fp32_avx512", [&](auto t) {
    constexpr int kT = decltype(t)::value;
    w.bits == 8 ? fp32<kT, 8>(w, x, t0, c) : fp32<kT, 4>(w, x, t0, c);
  });
}

SLF_VNNI_BF16 void emit_bf16(const float* c, const float* cu, int64_t ldc, int64_t T, int64_t width,
                             const float* bias, c10::BFloat16* out, int64_t ldo) {
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
  const __m512 vb = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    __m512 v = _mm512_maskz_loadu_ps(mask, c + t * ldc);
    v = cu != nullptr ? _mm512_mul_ps(silu16(v), _mm512_maskz_loadu_ps(mask, cu + t * ldc)) : _mm512_add_ps(v, vb);
    _mm256_mask_storeu_epi16(out + t * ldo, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

bool has_vnni() {
  static const bool v = static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx512Bf16) &&
                        __builtin_cpu_supports("avx512vnni");
  return v;
}

}  // namespace slf::cpu::quant
