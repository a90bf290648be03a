// Packed-panel GEMM (BLIS-style) for the compute-bound range of M: y[M, N] = x[M, K] @ W[N, K]^T on AVX2/FMA,
// with bf16 / fp16 / fp32 weights widened to fp32 one cache-sized block at a time and fp32 accumulation.
//
// Both operands are K-contiguous, so x is packed once per call into x^T panels of 16 tokens ([K][16] fp32), and
// the micro-kernel computes a 6-feature x 16-token tile of C^T: per k it loads 16 tokens (2 ymm), broadcasts six
// weights and issues 12 FMAs into 12 ymm accumulators; the weights need no transpose, only widening.
//
// Blocking (see blocking_for), per thread (threads own disjoint ranges of output features: no synchronisation):
//   for jc: nc tokens
//     for ic: mc weight rows           C^T block mc x nc fp32 (L1/L2)
//       for pc: kc of K (usually all)  W block mc x kc widened to fp32 (L2)
//         for jr: 16-token panel       x^T panel kc x 16 (L2), reused by the mc / 6 tiles
//           for ir: 6 weight rows      micro-kernel
//       epilogue: C^T block -> out (bias, or silu(gate) * up), rounded to the output dtype
#include <algorithm>
#include <memory>

#include "cpu/cpu_types.h"
#include "cpu/gemm.h"
#include "cpu/vec_math.h"

namespace slf::cpu {
namespace {

constexpr int kFR = 6;         // weight rows (output features) per micro-tile
constexpr int64_t kTR = 16;    // tokens per micro-tile / x^T panel
constexpr int64_t kUnit = 48;  // output features per unit of work split between threads

// Block sizes, chosen per call (see blocking_for).
struct Blocking {
  int64_t kc;  // K per block
  int64_t mc;  // weight rows per block (a multiple of 2 * kFR: gate_up blocks are half gate, half up)
  int64_t nc;  // tokens per block (a multiple of kTR)
};

// W streams through in whole rows (kc = K up to 8192), as many rows as fit ~192 KB of L2 once widened: long
// contiguous DRAM reads, and no C^T round trips over K. The 128-token blocks keep the x^T panels of a block (1 MB at
// K = 2048) in L3 across the row blocks. Measured on the 1.6B shapes at M = 2048 (2 AVX2 cores, medians of 3):
// 123-140 GFLOP/s, against 115-127 for BLIS's usual 256-wide K blocks x 96 rows x 128-512 tokens and ~95 with
// 1024-2048-token blocks.
inline Blocking blocking_for(int64_t M, int64_t K) {
  const int64_t kc = K <= 8192 ? K : 4096;
  const int64_t mc = std::clamp<int64_t>((48 * 1024 / kc) / (2 * kFR) * (2 * kFR), 2 * kFR, 96);
  return {kc, mc, std::min<int64_t>(128, (M + kTR - 1) / kTR * kTR)};
}

// xp[p][k][t] = x[kTR * p + t][k] in fp32 (zero for tokens >= M), for panels p in [p0, p1).
template <typename scalar_t>
SLF_AVX2 void pack_x(const scalar_t* x, int64_t ldx, int64_t M, int64_t K, float* xp, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t h = 0; h < kTR; h += 8) {
      const int64_t t0 = std::min(M, p * kTR + h);
      pack_kmajor(x + t0 * ldx, ldx, std::clamp<int64_t>(M - t0, 0, 8), K, xp + p * K * kTR + h, kTR, 8);
    }
}

// wb[r][0:kc] = W[rows[r]][pc:pc + kc] in fp32, for r < mc; rows mc up to a multiple of kFR are zero.
template <typename scalar_t>
SLF_AVX2 void widen_block(const scalar_t* W, int64_t ldw, const int64_t* rows, int64_t mc, int64_t pc, int64_t kc,
                          float* wb, int64_t ldb) {
  for (int64_t r = 0; r < mc; ++r) {
    const scalar_t* src = W + rows[r] * ldw + pc;
    float* dst = wb + r * ldb;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
    for (; k < kc; ++k) dst[k] = to_float(src[k]);
  }
  // The N tail: zero rows up to a whole micro-tile, so the micro-kernel is always 6 rows (their C^T rows are
  // computed and never read).
  for (int64_t r = mc; r % kFR != 0; ++r) std::fill(wb + r * ldb, wb + r * ldb + kc, 0.f);
}

// c[f][0:16] (+)= sum_k w[f][k] * xp[k][0:16] for f < 6: the 6 x 16 register tile.
// NOTE: twelve named accumulators, not an array: GCC 12 keeps a __m256[6][2] in memory (ten stores per k, a third
// of the FMA rate).
SLF_AVX2 void micro(const float* w, int64_t ldw, const float* xp, int64_t kc, float* c, int64_t ldc, bool accumulate) {
#define SLF_ACC(f) __m256 a##f##0 = _mm256_setzero_ps(), a##f##1 = _mm256_setzero_ps();
  SLF_ACC(0) SLF_ACC(1) SLF_ACC(2) SLF_ACC(3) SLF_ACC(4) SLF_ACC(5)
#undef SLF_ACC
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 x0 = _mm256_loadu_ps(xp + k * kTR);
    const __m256 x1 = _mm256_loadu_ps(xp + k * kTR + 8);
#define SLF_FMA(f)                                                  \
  {                                                                 \
    const __m256 wv = _mm256_broadcast_ss(w + f * ldw + k);         \
    a##f##0 = _mm256_fmadd_ps(wv, x0, a##f##0);                     \
    a##f##1 = _mm256_fmadd_ps(wv, x1, a##f##1);                     \
  }
    SLF_FMA(0) SLF_FMA(1) SLF_FMA(2) SLF_FMA(3) SLF_FMA(4) SLF_FMA(5)
#undef SLF_FMA
  }
#define SLF_STORE(f)                                                                              \
  {                                                                                               \
    float* cf = c + f * ldc;                                                                      \
    if (accumulate) {                                                                             \
      a##f##0 = _mm256_add_ps(a##f##0, _mm256_loadu_ps(cf));                                      \
      a##f##1 = _mm256_add_ps(a##f##1, _mm256_loadu_ps(cf + 8));                                  \
    }                                                                                             \
    _mm256_storeu_ps(cf, a##f##0);                                                                \
    _mm256_storeu_ps(cf + 8, a##f##1);                                                            \
  }
  SLF_STORE(0) SLF_STORE(1) SLF_STORE(2) SLF_STORE(3) SLF_STORE(4) SLF_STORE(5)
#undef SLF_STORE
}

// Output features [f0, f1) for all M tokens. gate_up: feature f reads weight rows f (gate) and n_out + f (up).
template <typename scalar_t>
SLF_AVX2 void gemm_features(const float* xp, int64_t M, int64_t K, const scalar_t* W, int64_t ldw, int64_t n_out,
                            bool gate_up, const float* bias, scalar_t* out, int64_t ldo, int64_t f0, int64_t f1) {
  const Blocking bk = blocking_for(M, K);
  std::unique_ptr<float[]> wb(new float[bk.mc * bk.kc]), cb(new float[bk.mc * bk.nc]);
  std::unique_ptr<int64_t[]> rows(new int64_t[bk.mc]);
  const int64_t fb_max = gate_up ? bk.mc / 2 : bk.mc;
  for (int64_t jc = 0; jc < M; jc += bk.nc) {
    const int64_t nc = std::min(bk.nc, M - jc), np = (nc + kTR - 1) / kTR;
    for (int64_t fi = f0; fi < f1; fi += fb_max) {
      const int64_t fb = std::min(fb_max, f1 - fi), mc = gate_up ? 2 * fb : fb;
      for (int64_t r = 0; r < fb; ++r) {
        rows[r] = fi + r;
        if (gate_up) rows[fb + r] = n_out + fi + r;
      }
      for (int64_t pc = 0; pc < K; pc += bk.kc) {
        const int64_t kc = std::min(bk.kc, K - pc);
        widen_block(W, ldw, rows.get(), mc, pc, kc, wb.get(), bk.kc);
        for (int64_t jr = 0; jr < np; ++jr) {
          const float* panel = xp + ((jc / kTR + jr) * K + pc) * kTR;
          for (int64_t ir = 0; ir < mc; ir += kFR)
            micro(wb.get() + ir * bk.kc, bk.kc, panel, kc, cb.get() + ir * bk.nc + jr * kTR, bk.nc, pc > 0);
        }
      }
      for (int64_t t = 0; t < nc; ++t) {
        scalar_t* o = out + (jc + t) * ldo + fi;
        const float* c = cb.get() + t;
        for (int64_t j = 0; j < fb; ++j) {
          if (gate_up) {
            o[j] = silu_mul_out<scalar_t>(c[j * bk.nc], c[(fb + j) * bk.nc]);
          } else {
            o[j] = from_float<scalar_t>(c[j * bk.nc] + (bias ? bias[fi + j] : 0.f));
          }
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void gemm_packed(const scalar_t* x, int64_t ldx, int64_t M, int64_t K, const scalar_t* W, int64_t ldw,
                 int64_t n_out, bool gate_up, const float* bias, scalar_t* out, int64_t ldo) {
  const int64_t n_panels = (M + kTR - 1) / kTR;
  // NOTE: the packed x^T is reused across calls of the same thread (no page faults / zeroing per layer).
  thread_local std::unique_ptr<float[]> xp_buf;
  thread_local int64_t xp_size = 0;
  if (xp_size < n_panels * kTR * K) {
    xp_size = n_panels * kTR * K;
    xp_buf.reset(new float[xp_size]);
  }
  float* xp = xp_buf.get();
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) { pack_x(x, ldx, M, K, xp, p0, p1); });
  const int64_t n_units = (n_out + kUnit - 1) / kUnit;
  at::parallel_for(0, n_units, 1, [&](int64_t u0, int64_t u1) {
    gemm_features(xp, M, K, W, ldw, n_out, gate_up, bias, out, ldo, u0 * kUnit, std::min(n_out, u1 * kUnit));
  });
}

template void gemm_packed<float>(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, bool,
                                 const float*, float*, int64_t);
template void gemm_packed<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*,
                                         int64_t, int64_t, bool, const float*, c10::BFloat16*, int64_t);
template void gemm_packed<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, const c10::Half*, int64_t, int64_t,
                                     bool, const float*, c10::Half*, int64_t);

}  // namespace slf::cpu
