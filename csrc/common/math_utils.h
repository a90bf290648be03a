// Scalar arithmetic shared by the CPU (.cpp) and CUDA (.cu) kernels, so that CPU tests exercise the same formulas
// the GPU kernels use. Everything here is fp32 and header-only; SLF_HOST_DEVICE expands to `__host__ __device__`
// under nvcc and to nothing in the host compiler.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLF_HOST_DEVICE __host__ __device__
#define SLF_INLINE __forceinline__
#else
#define SLF_HOST_DEVICE
#define SLF_INLINE inline
#endif

namespace slf {

// silu(x) = x * sigmoid(x), written as x / (1 + exp(-x)) (the formula torch uses).
SLF_HOST_DEVICE SLF_INLINE float silu(float x) { return x / (1.0f + expf(-x)); }

// LayerNorm statistics from a two-pass reduction: `sum` = sum(x), `centered_sq_sum` = sum((x - mean)^2).
// NOTE: two passes (mean first, then centered squares) instead of E[x^2] - E[x]^2: it matches torch's
// numerics and does not cancel catastrophically for rows with a large mean.
SLF_HOST_DEVICE SLF_INLINE float layernorm_mean(float sum, int n) { return sum / (float)n; }

SLF_HOST_DEVICE SLF_INLINE float layernorm_rstd(float centered_sq_sum, int n, float eps) {
  return 1.0f / sqrtf(centered_sq_sum / (float)n + eps);
}

// One normalized element: (x - mean) * rstd * w + b.
SLF_HOST_DEVICE SLF_INLINE float layernorm_apply(float x, float mean, float rstd, float w, float b) {
  return (x - mean) * rstd * w + b;
}

// NeoX rotary on one pair (x1 = x[i], x2 = x[i + rotary_dim / 2]) with cos/sin of the pair's frequency.
SLF_HOST_DEVICE SLF_INLINE void rotate_pair(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = x1 * c - x2 * s;
  *o2 = x2 * c + x1 * s;
}

// Online-softmax state of one query row: running max `m` and running denominator `l` (of exp(score - m)).
struct SoftmaxState {
  float m;
  float l;
};

SLF_HOST_DEVICE SLF_INLINE SoftmaxState softmax_init() { return SoftmaxState{-INFINITY, 0.0f}; }

// Moves the state to a new block whose maximum score is `block_max`; returns the factor by which previously
// accumulated numerators (the output accumulator) must be multiplied. The caller then adds exp(s - state.m) for
// each new score to state.l and to its accumulator.
SLF_HOST_DEVICE SLF_INLINE float softmax_rescale(SoftmaxState* st, float block_max) {
  const float m_new = block_max > st->m ? block_max : st->m;
  // NOTE: with m = -inf (nothing seen yet) the factor is exp(-inf) = 0, and the accumulator is 0 anyway.
  const float alpha = (st->m == -INFINITY) ? 0.0f : expf(st->m - m_new);
  st->m = m_new;
  st->l *= alpha;
  return alpha;
}

// Merges two partial softmax states (split-K / tree reductions); returns the factors for the two accumulators.
SLF_HOST_DEVICE SLF_INLINE SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b, float* fa, float* fb) {
  const float m = a.m > b.m ? a.m : b.m;
  *fa = (a.m == -INFINITY) ? 0.0f : expf(a.m - m);
  *fb = (b.m == -INFINITY) ? 0.0f : expf(b.m - m);
  return SoftmaxState{m, a.l * *fa + b.l * *fb};
}

// bf16 <-> fp32 on raw bits (round to nearest even, NaN kept quiet), for code that handles bf16 as uint16_t.
SLF_HOST_DEVICE SLF_INLINE float bf16_bits_to_float(uint16_t h) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}

SLF_HOST_DEVICE SLF_INLINE uint16_t float_to_bf16_bits(float f) {
  union {
    uint32_t u;
    float f;
  } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x0040u);  // NaN
  const uint32_t rounding_bias = 0x7fffu + ((v.u >> 16) & 1u);
  return (uint16_t)((v.u + rounding_bias) >> 16);
}

}  // namespace slf
