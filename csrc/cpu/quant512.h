// AVX-512 pieces shared by the micro-kernels of quant_vnni.cpp and quant_bf16.cpp (layout in quant.h).
#pragma once
#include <immintrin.h>

#include "cpu/quant.h"

namespace slf::cpu::quant {

// group g's 16 fp16 scales as fp32 lanes.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 scale_lanes(const Panel& w, int64_t g) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.s + g * kPanel)));
}

// zero + offset of group g's 16 features as fp32 lanes: the panel's zero points, or its one default.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 zero_lanes(const Panel& w, int64_t g) {
  if (w.z == nullptr) return _mm512_set1_ps(float(w.zero + w.offset));
  const __m128i z8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.z + g * kPanel));
  return _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z8)), _mm512_set1_ps(float(w.offset)));
}

}  // namespace slf::cpu::quant
