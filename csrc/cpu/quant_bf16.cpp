// Prefill of the int8 / int4 linear layers on AVX512-BF16 (layout in quant.h): each panel is dequantized once per
// call into bf16 pairs (the vnni layout of packed.h, [K / 2][16] 32-bit words), which stay in L2 while every token
// group of the call reads them with vdpbf16ps, as the bf16 GEMM (vnni_gemm.cpp) reads its weights.
//
// Dequantization of one quad row (16 features x 4 k, int32 lane = feature): for each of the 4 bytes a shift / mask,
// an int -> fp32 conversion and one FMA (u * s - (zero + offset) * s); pairs of k rounded to bf16 together
// (vcvtne2ps2bf16) and interleaved per feature (vpermw).
#include <immintrin.h>

#include "cpu/quant512.h"

#define SLF_QBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu::quant {
namespace {

using bf16 = c10::BFloat16;

// dst[0:16] = (bf16(d0[f]), bf16(d1[f])) words.
SLF_QBF16 inline void store_pair(__m512 d0, __m512 d1, const __m512i& inter, uint32_t* dst) {
  const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(d1, d0);  // u16 0..15 = d0, 16..31 = d1
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(inter, r));
}

SLF_QBF16 inline void dequant_row(__m512i u, __m512 s, __m512 m, const __m512i& inter, uint32_t* dst) {
  const __m512i byte = _mm512_set1_epi32(0xff);
  const __m512 d0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(u, byte)), s, m);
  const __m512 d1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(u, 8), byte)), s, m);
  const __m512 d2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(u, 16), byte)), s, m);
  const __m512 d3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 24)), s, m);
  store_pair(d0, d1, inter, dst);
  store_pair(d2, d3, inter, dst + kPanel);
}

template <int T, int NP>
SLF_QBF16 void micro(const uint32_t* const* w, const bf16* x, int64_t ldx, int64_t kh, float* c) {
  __m512 acc[T][NP];
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < NP; ++q) acc[t][q] = _mm512_setzero_ps();
  const uint32_t* xw[T];
  for (int t = 0; t < T; ++t) xw[t] = reinterpret_cast<const uint32_t*>(x + t * ldx);
  for (int64_t i = 0; i < kh; ++i) {
    __m512i wv[NP];
    for (int q = 0; q < NP; ++q) wv[q] = _mm512_loadu_si512(w[q] + i * kPanel);
    for (int t = 0; t < T; ++t) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xw[t][i]));
      for (int q = 0; q < NP; ++q) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], xb, (__m512bh)wv[q]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < NP; ++q) _mm512_storeu_ps(c + (t * kBf16Panels + q) * kPanel, acc[t][q]);
}

using MicroFn = void (*)(const uint32_t* const*, const bf16*, int64_t, int64_t, float*);

template <int T>
MicroFn micro_np(int np) {
  return np == 1 ? &micro<T, 1> : np == 2 ? &micro<T, 2> : np == 3 ? &micro<T, 3> : &micro<T, 4>;
}

}  // namespace

SLF_QBF16 void dequant_bf16(const Panel& w, uint32_t* dst) {
  const int64_t ng = w.K / w.G;
  __m512i inter;
  {
    alignas(64) int16_t idx[32];
    for (int i = 0; i < 16; ++i) {
      idx[2 * i] = static_cast<int16_t>(i);
      idx[2 * i + 1] = static_cast<int16_t>(16 + i);
    }
    inter = _mm512_load_si512(idx);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const uint8_t* q = w.q;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 s = scale_lanes(w, g);
    const __m512 m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(zero_lanes(w, g), s));
    for (int64_t kg = 0; kg < w.G; kg += w.bits == 8 ? 4 : 8, q += 64) {
      const __m512i v = _mm512_loadu_si512(q);
      if (w.bits == 8) {
        dequant_row(v, s, m, inter, dst);
        dst += 2 * kPanel;
      } else {
        dequant_row(_mm512_and_si512(v, low4), s, m, inter, dst);
        dequant_row(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), s, m, inter, dst + 2 * kPanel);
        dst += 4 * kPanel;
      }
    }
  }
}

void micro_bf16(const uint32_t* const* w, int np, const bf16* x, int64_t ldx, int64_t T, int64_t K, float* c) {
  TORCH_CHECK(T >= 1 && T <= kBf16T && np >= 1 && np <= kBf16Panels, "micro_bf16: tile out of range");
  MicroFn fn;
  switch (T) {
    case 1: fn = micro_np<1>(np); break;
    case 2: fn = micro_np<2>(np); break;
    case 3: fn = micro_np<3>(np); break;
    case 4: fn = micro_np<4>(np); break;
    case 5: fn = micro_np<5>(np); break;
    default: fn = micro_np<6>(np); break;
  }
  fn(w, x, ldx, K / 2, c);
}

}  // namespace slf::cpu::quant
