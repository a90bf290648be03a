// Transcendental helpers for the CPU kernels (AVX2, and exp16 / silu16 on AVX-512).
#pragma once

#include <cmath>

#include "cpu/cpu_types.h"

namespace slf::cpu {

// The constants of exp8 and exp16 (both here), one polynomial at two vector widths: the clamp
// range, log2(e), ln 2 in two parts (hi exact in few bits), and e^r - 1 - r as r^2 (c0 r^5 + .. + c5).
namespace exp_poly {
constexpr float kMin = -87.3f, kMax = 88.7f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kC[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly

// exp(x) on 8 lanes: range reduction x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for accuracy), a degree-6
// polynomial for e^r, and 2^n built in the exponent bits. Max relative error ~2 ulp over the clamped range.
// NOTE: inputs are clamped to [-87.3, 88.7], so exp(-inf) gives ~1e-38 rather than 0: callers never pass -inf
// (attention computes exps of unmasked scores only).
SLF_AVX2 static inline __m256 exp8(__m256 x) {
  using namespace exp_poly;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kMin)), _mm256_set1_ps(kMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kC[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kC[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  // 2^n via the exponent field; n in [-126, 128]: split in two factors so that n = 128 does not overflow.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}

// s[j] = exp(s[j] - m) for j < n (8 lanes, the tail in scalars); returns their sum: the exponentials of one
// online-softmax step (attention_common.h, attention_tile.cpp).
SLF_AVX2 static inline float exp_sub_sum(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (; j < n; ++j) {
    s[j] = expf(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// silu(x) = x / (1 + exp(-x)) on 8 lanes (the formula of slf::silu).
SLF_AVX2 static inline __m256 silu8(__m256 x) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// e^x on 16 lanes: exp8's polynomial (exp_poly), 2^n with vscalefps. x clamped to [-87.3, 88.7]. The decode
// attention's softmax (attention_decode512.cpp) and the AMX prefill attention's (attention_amx.cpp).
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) static inline __m512 exp16(__m512 x) {
  using namespace exp_poly;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kMin)), _mm512_set1_ps(kMax));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kC[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kC[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
  return _mm512_scalef_ps(_mm512_add_ps(y, _mm512_set1_ps(1.0f)), n);
}

// silu on 16 lanes (two silu8): the AVX-512 epilogues of vnni_gemm.cpp and quant_vnni.cpp.
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) static inline __m512 silu16(__m512 v) {
  const __m256 lo = silu8(_mm512_castps512_ps256(v)), hi = silu8(_mm512_extractf32x8_ps(v, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

// In-register transpose: r[i] = row i (8 columns) -> r[j] = column j.
SLF_AVX2 static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// dst[k * ld + i] = x[i * ldx + k] in fp32 for k < K and i < lanes (<= 8), zero for rows i >= valid: up to 8 token
// rows of x transposed to k-major, the packed operand of the CPU GEMMs.
// NOTE: the 8-lane stores write 8 - lanes floats past each k's lanes; the next k overwrites them, and with
// lanes < 8 the caller leaves 8 floats of slack after the last k.
template <typename scalar_t>
SLF_AVX2 void pack_kmajor(const scalar_t* x, int64_t ldx, int64_t valid, int64_t K, float* dst, int64_t ld,
                          int64_t lanes) {
  const int64_t k8 = K - K % 8;
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 r[8];
    for (int64_t i = 0; i < 8; ++i) r[i] = i < valid ? load8(x + i * ldx + k) : _mm256_setzero_ps();
    transpose8(r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * ld, r[j]);
  }
  for (int64_t k = k8; k < K; ++k)
    for (int64_t i = 0; i < lanes; ++i) dst[k * ld + i] = i < valid ? to_float(x[i * ldx + k]) : 0.f;
}

}  // namespace slf::cpu
