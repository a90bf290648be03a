// Helpers shared by the CPU kernels: dtype dispatch, run-time ISA detection, and AVX2 load/store of 8 values of
// any supported activation dtype as 8 fp32 lanes.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdlib>
#include <vector>
#include <torch/all.h>

#include "common/math_utils.h"
#include "cpu/isa.h"

// fp32, bf16 and fp16: the activation / weight dtypes every CPU op accepts.
#define SLF_DISPATCH_CASE_FLOATING_TYPES(...)          \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)

#define SLF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, SLF_DISPATCH_CASE_FLOATING_TYPES(__VA_ARGS__))

// NOTE: the AVX2 (and AVX-512) paths are compiled per function with target attributes (no -march flags), and are
// chosen at run time from cpu_isa() (isa.h); every kernel keeps a portable scalar path.
#define SLF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace slf::cpu {

// NOTE: STABLELM_FAST_ISA=scalar (or STABLELM_FAST_NO_AVX2=1) forces the portable scalar paths (tests use it to
// cover them on AVX2 machines).
inline bool cpu_has_avx2() { return static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx2); }

inline void check_floating(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// A small vector (norm weights, a bias) as contiguous fp32: its own data when it already is, else converted into buf.
// NOTE: instead of `t.to(at::kFloat).contiguous()`: an ATen allocation and conversion cost ~2-4 us per call, ops are
// called a few hundred times a decode step, and buf (the caller's, e.g. thread_local) is reused.
inline const float* fp32_vector(const torch::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  const torch::Tensor c = t.is_contiguous() ? t : t.contiguous();
  buf.resize(c.numel());
  SLF_DISPATCH_FLOATING_TYPES(c.scalar_type(), "fp32_vector", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) buf[i] = static_cast<float>(p[i]);
  });
  return buf.data();
}

// ---- AVX2: 8 elements <-> __m256 of fp32 ----

SLF_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

SLF_AVX2 static inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend to 32 bits and shift left by 16.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

SLF_AVX2 static inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

SLF_AVX2 static inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

SLF_AVX2 static inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even: add 0x7fff + lsb of the kept half, then keep the high 16 bits. NaNs are made quiet.
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, is_nan);
  // Pack the 8 32-bit lanes (each < 65536) to 8 16-bit values; packus works per 128-bit lane, so fix the order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

SLF_AVX2 static inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Horizontal sum of the 8 lanes.
SLF_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- scalar conversions ----
template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// One output of the fused MLP first half from its fp32 gate and up sums: silu(gate) * up in T.
// NOTE: gate and up are rounded to the activation dtype first, as the unfused linear + silu_and_mul.
template <typename T>
inline T silu_mul_out(float gate, float up) {
  return from_float<T>(silu(to_float(from_float<T>(gate))) * to_float(from_float<T>(up)));
}

}  // namespace slf::cpu
