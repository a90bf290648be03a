// Decode attention tiles with AVX-512 (16 fp32 lanes): the same loops as attention_decode.cpp's AVX2 decode_qk /
// decode_pv (keys outermost, each K / V row widened to fp32 once for the GQA group's q heads), twice the lanes per
// instruction, and four keys' dot products reduced together.
#include "cpu/attention_tile.h"

#include "cpu/cpu_types.h"

#define SLF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace slf::cpu {
namespace {

SLF_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SLF_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SLF_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// dot(q, k) over d (k already fp32, d a multiple of 16 handled in vectors, the rest in scalars).
SLF_AVX512 inline float dot16(const float* q, const float* k, int64_t d) {
  __m512 a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), a);
  float s = _mm512_reduce_add_ps(a);
  for (; i < d; ++i) s += q[i] * k[i];
  return s;
}

// (sum a0, sum a1, sum a2, sum a3): 256-bit halves added, then one hadd tree for the four.
SLF_AVX512 inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  auto half = [](__m512 v) SLF_AVX512 { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// MHA (group 1): no K row is shared by two q heads, so dot q with the cache row in registers, four keys at a time
// (keys outermost still: four cache rows are streamed together), one reduction for the four.
template <typename scalar_t>
SLF_AVX512 void qk_mha(const float* qbuf, int64_t rows, int64_t d, const scalar_t* k_cache, const int64_t* off,
                       int64_t jn, int64_t c_head_stride, float scale, float* scores, int64_t ld) {
  int64_t j = 0;
  for (; j + 4 <= jn; j += 4)
    for (int64_t r = 0; r < rows; ++r) {
      const float* q = qbuf + r * d;
      const scalar_t* k[4];
      for (int x = 0; x < 4; ++x) k[x] = k_cache + off[j + x] + r * c_head_stride;
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
        for (int x = 0; x < 4; ++x) a[x] = _mm512_fmadd_ps(qv, load16(k[x] + i), a[x]);
      }
      float s[4];
      _mm_storeu_ps(s, reduce4(a[0], a[1], a[2], a[3]));
      for (; i < d; ++i)
        for (int x = 0; x < 4; ++x) s[x] += q[i] * to_float(k[x][i]);
      for (int x = 0; x < 4; ++x) scores[r * ld + j + x] = s[x] * scale;
    }
  for (; j < jn; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* kr = k_cache + off[j] + r * c_head_stride;
      const float* q = qbuf + r * d;
      __m512 a = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(kr + i), a);
      float acc = _mm512_reduce_add_ps(a);
      for (; i < d; ++i) acc += q[i] * to_float(kr[i]);
      scores[r * ld + j] = acc * scale;
    }
}

template <typename scalar_t>
SLF_AVX512 void qk_impl(const float* qbuf, int64_t rows, int64_t group, int64_t d, const scalar_t* k_cache,
                                 const int64_t* off, int64_t jn, int64_t c_head_stride, float scale, float* kf,
                                 float* scores, int64_t ld) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r0 = 0; r0 < rows; r0 += group) {
      const scalar_t* kr = k_cache + off[j] + (r0 / group) * c_head_stride;
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) _mm512_storeu_ps(kf + i, load16(kr + i));
      for (; i < d; ++i) kf[i] = to_float(kr[i]);
      for (int64_t r = r0; r < r0 + group; ++r) scores[r * ld + j] = dot16(qbuf + r * d, kf, d) * scale;
    }
}

template <typename scalar_t>
SLF_AVX512 void pv_impl(float* acc, int64_t rows, int64_t group, int64_t d, const scalar_t* v_cache,
                                 const int64_t* off, int64_t jn, int64_t c_head_stride, const float* scores,
                                 int64_t ld) {
  for (int64_t j = 0; j < jn; ++j)
    for (int64_t r0 = 0; r0 < rows; r0 += group) {
      const scalar_t* vr = v_cache + off[j] + (r0 / group) * c_head_stride;
      for (int64_t r = r0; r < r0 + group; ++r) {
        const float p = scores[r * ld + j];
        if (p == 0.f) continue;  // a masked key or an exp underflow: never multiply a cache slot by 0
        const __m512 vp = _mm512_set1_ps(p);
        float* ar = acc + r * d;
        int64_t i = 0;
        for (; i + 16 <= d; i += 16)
          _mm512_storeu_ps(ar + i, _mm512_fmadd_ps(vp, load16(vr + i), _mm512_loadu_ps(ar + i)));
        for (; i < d; ++i) ar[i] += p * to_float(vr[i]);
      }
    }
}

}  // namespace

// NOTE: the exported functions carry no target attribute (their declaration in the header has none); the AVX-512
// code is in the static functions above.
template <typename scalar_t>
void decode_qk_avx512(const float* qbuf, int64_t rows, int64_t group, int64_t d, const scalar_t* k_cache,
                      const int64_t* off, int64_t jn, int64_t c_head_stride, float scale, float* kf, float* scores,
                      int64_t ld) {
  if (group == 1)
    qk_mha(qbuf, rows, d, k_cache, off, jn, c_head_stride, scale, scores, ld);
  else
    qk_impl(qbuf, rows, group, d, k_cache, off, jn, c_head_stride, scale, kf, scores, ld);
}

template <typename scalar_t>
void decode_pv_avx512(float* acc, int64_t rows, int64_t group, int64_t d, const scalar_t* v_cache,
                      const int64_t* off, int64_t jn, int64_t c_head_stride, const float* scores, int64_t ld) {
  pv_impl(acc, rows, group, d, v_cache, off, jn, c_head_stride, scores, ld);
}

#define SLF_INSTANTIATE(T)                                                                                          \
  template void decode_qk_avx512<T>(const float*, int64_t, int64_t, int64_t, const T*, const int64_t*, int64_t,    \
                                    int64_t, float, float*, float*, int64_t);                                      \
  template void decode_pv_avx512<T>(float*, int64_t, int64_t, int64_t, const T*, const int64_t*, int64_t, int64_t, \
                                    const float*, int64_t);
SLF_INSTANTIATE(float)
SLF_INSTANTIATE(c10::BFloat16)
SLF_INSTANTIATE(c10::Half)
#undef SLF_INSTANTIATE

}  // namespace slf::cpu
