// GEMM on panels-packed weights (packed.h), every M: y[M, N] = x[M, K] @ W[N, K]^T on AVX2/FMA, fp32 accumulation.
//
// x is packed per call into groups of 6 tokens ([K][6] fp32, zero-padded). The micro-kernel computes a 16-feature x
// 6-token tile over the whole K: per k one 32-byte load of the panel row (widened in registers: bf16 by a shift and a
// mask), 6 broadcasts of x and 12 FMAs into 12 named accumulators. Up to kWidenMinM tokens the weights are read
// where they lie (a widened copy of W cost a quarter of the time at M = 32 in the former row-major packed GEMM),
// so the same kernel streams the weights at batch 1; from kWidenMinM tokens on, each block of panels is widened to
// fp32 once for all tokens, and the micro-kernel runs FMAs and loads only.
//
// Per thread (threads own disjoint ranges of panels):
//   for a block of panels that fits L2 (W read from DRAM once; widened to fp32 for M >= kWidenMinM)
//     for each 6-token group of x (from L3 for large M, reused by the block's panels)
//       for each panel of the block: micro-kernel over K, epilogue straight to out (bias / silu(gate) * up)
#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/packed.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace slf::cpu {
namespace {

constexpr int64_t kTok = 6;               // tokens per micro-tile
constexpr int64_t kL2Block = 256 * 1024;  // bytes of W per block of panels (L2 is 512 KB per core here)
// Tokens from which half-precision panels are widened to fp32 once per block (see run). Measured on the 1.6B
// shapes, bf16, 2 threads (medians of 9, interleaved): in-loop widening 109 / 113 GFLOP/s at M = 16 / 32 against
// 91 / 109 with the copy; at M = 64 the copy wins, 126 against 103.
constexpr int64_t kWidenMinM = 48;
// Columns of K per pass over the widened panels (64 KB per panel in fp32): the 1.6B down projection (K = 5632)
// ran 7-18% slower than the row-major GEMM in one pass, its panel (360 KB) and token group (135 KB) filling L2.
constexpr int64_t kKChunk = 2048;
constexpr int kStreams = 4;  // panels read side by side at M = 1 (micro_streams)

// One panel row (16 weights at one k) as fp32: lo = features 0-7, hi = features 8-15.
SLF_AVX2 inline void load_row(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}
SLF_AVX2 inline void load_row(const c10::Half* w, __m256& lo, __m256& hi) {
  lo = load8(w);
  hi = load8(w + 8);
}
SLF_AVX2 inline void load_row(const c10::BFloat16* w, __m256& lo, __m256& hi) {
  // A bf16 is the top half of an fp32: word << 16 is the low feature of the pair, word & 0xffff0000 the high one.
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// c[t][0:16] (+)= sum_k xg[k][t] * w[k][0:16] for t < T.
// NOTE: named accumulators (GCC keeps __m256 arrays in memory). With T <= 3 there are too few FMA chains to hide
// their latency, so odd k go to a second set (b), summed at the end.
template <typename w_t, int T>
SLF_AVX2 void micro(const w_t* w, const float* xg, int64_t K, float* c, bool accumulate) {
  const __m256 z = _mm256_setzero_ps();
  __m256 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z, a50 = z, a51 = z;
  __m256 b00 = z, b01 = z, b10 = z, b11 = z, b20 = z, b21 = z;
#define SLF_FMA(acc, t, kk)                                          \
  if constexpr (T > t) {                                             \
    const __m256 xv = _mm256_broadcast_ss(xg + (kk) * kTok + t);     \
    acc##t##0 = _mm256_fmadd_ps(lo, xv, acc##t##0);                  \
    acc##t##1 = _mm256_fmadd_ps(hi, xv, acc##t##1);                  \
  }
#define SLF_STEP(acc, kk)                                                                 \
  {                                                                                       \
    __m256 lo, hi;                                                                        \
    load_row(w + (kk) * kPanel, lo, hi);                                                  \
    SLF_FMA(acc, 0, kk) SLF_FMA(acc, 1, kk) SLF_FMA(acc, 2, kk)                           \
    SLF_FMA(a, 3, kk) SLF_FMA(a, 4, kk) SLF_FMA(a, 5, kk)                                 \
  }
  // At small M the kernel streams W from DRAM, one panel after the other: a software prefetch ~1.5 KB ahead keeps
  // that single stream at the bandwidth the row-major GEMV reaches with its many concurrent rows.
  constexpr int64_t kAhead = 1536 / (kPanel * int64_t(sizeof(w_t)));
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + kAhead) * kPanel), _MM_HINT_T0);
    SLF_STEP(a, k)
    if constexpr (T <= 3) {
      SLF_STEP(b, k + 1)
    } else {
      SLF_STEP(a, k + 1)
    }
  }
  for (; k < K; ++k) SLF_STEP(a, k)
#undef SLF_STEP
#undef SLF_FMA
#define SLF_MERGE(t)                                 \
  a##t##0 = _mm256_add_ps(a##t##0, b##t##0);         \
  a##t##1 = _mm256_add_ps(a##t##1, b##t##1);
  if constexpr (T <= 3) {
    SLF_MERGE(0) SLF_MERGE(1) SLF_MERGE(2)
  }
#undef SLF_MERGE
#define SLF_OUT(t)                                                                   \
  if constexpr (T > t) {                                                             \
    if (accumulate) {                                                                \
      a##t##0 = _mm256_add_ps(a##t##0, _mm256_loadu_ps(c + t * kPanel));            \
      a##t##1 = _mm256_add_ps(a##t##1, _mm256_loadu_ps(c + t * kPanel + 8));         \
    }                                                                                \
    _mm256_storeu_ps(c + t * kPanel, a##t##0);                                       \
    _mm256_storeu_ps(c + t * kPanel + 8, a##t##1);                                   \
  }
  SLF_OUT(0) SLF_OUT(1) SLF_OUT(2) SLF_OUT(3) SLF_OUT(4) SLF_OUT(5)
#undef SLF_OUT
}

// M = 1: c[q * 16 + j] = sum_k x[k] * w_q[k][j] for the NP panels w[q], read side by side (NP streams of W in
// flight). NOTE: one panel at a time (micro<w_t, 1>, one stream) read ~20 GB/s of bf16 weights in a decode step on
// 2 Zen 4 cores in AVX2 mode, half of what the AVX-512 kernel's four streams read; in L2 it ran ~11 B of W a cycle.
// No software prefetch here: with four streams the hardware prefetchers keep up (as in vnni_gemm.cpp; an L2
// prefetch 4 KB ahead, which the int4 / int8 decode kernels take, measured no different for bf16).
template <typename w_t, int NP>
SLF_AVX2 void micro_streams(const w_t* const* w, const float* x, int64_t x_stride, int64_t K, float* c) {
  __m256 lo_acc[NP], hi_acc[NP];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) lo_acc[q] = hi_acc[q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xv = _mm256_broadcast_ss(x + k * x_stride);
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      __m256 lo, hi;
      load_row(w[q] + k * kPanel, lo, hi);
      lo_acc[q] = _mm256_fmadd_ps(lo, xv, lo_acc[q]);
      hi_acc[q] = _mm256_fmadd_ps(hi, xv, hi_acc[q]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    _mm256_storeu_ps(c + q * kPanel, lo_acc[q]);
    _mm256_storeu_ps(c + q * kPanel + 8, hi_acc[q]);
  }
}

template <typename w_t>
SLF_AVX2 void micro_streams_n(int np, const w_t* const* w, const float* x, int64_t x_stride, int64_t K, float* c) {
  switch (np) {
    case 4: return micro_streams<w_t, 4>(w, x, x_stride, K, c);
    case 3: return micro_streams<w_t, 3>(w, x, x_stride, K, c);
    case 2: return micro_streams<w_t, 2>(w, x, x_stride, K, c);
    default: return micro_streams<w_t, 1>(w, x, x_stride, K, c);
  }
}

template <typename w_t>
SLF_AVX2 void micro_t(int64_t T, const w_t* w, const float* xg, int64_t K, float* c, bool accumulate = false) {
  switch (T) {
    case 6: return micro<w_t, 6>(w, xg, K, c, accumulate);
    case 5: return micro<w_t, 5>(w, xg, K, c, accumulate);
    case 4: return micro<w_t, 4>(w, xg, K, c, accumulate);
    case 3: return micro<w_t, 3>(w, xg, K, c, accumulate);
    case 2: return micro<w_t, 2>(w, xg, K, c, accumulate);
    default: return micro<w_t, 1>(w, xg, K, c, accumulate);
  }
}

// dst[k][0:16] = the panel's 16 weights at k in fp32, natural feature order.
template <typename w_t>
SLF_AVX2 void widen_panel(const w_t* w, int64_t K, float* dst) {
  for (int64_t k = 0; k < K; ++k) {
    __m256 lo, hi;
    load_row(w + k * kPanel, lo, hi);
    _mm256_storeu_ps(dst + k * kPanel, lo);
    _mm256_storeu_ps(dst + k * kPanel + 8, hi);
  }
}

template <typename scalar_t>
void run(const scalar_t* x, int64_t ldx, int64_t M, int64_t K, const scalar_t* panels, int64_t n_out, bool gate_up,
         const float* bias, scalar_t* out, int64_t ldo) {
  // x in 6-token groups, xp[g][k][t] = x[6g + t][k] (zero past M), 8 floats of slack after each (pack_kmajor).
  const int64_t n_groups = (M + kTok - 1) / kTok, group_stride = kTok * K + 8;
  // NOTE: the packed x is reused across calls of the same thread (no page faults / zeroing per layer).
  thread_local std::unique_ptr<float[]> xp_buf;
  thread_local int64_t xp_size = 0;
  if (xp_size < n_groups * group_stride) {
    xp_size = n_groups * group_stride;
    xp_buf.reset(new float[xp_size]);
  }
  float* xp = xp_buf.get();
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      pack_kmajor(x + g * kTok * ldx, ldx, std::min(kTok, M - g * kTok), K, xp + g * group_stride, kTok, kTok);
  });

  // Output panels: n_full whole ones, then the tail (packed [K][tail], natural order), widened here to a whole
  // panel with zero features so that the micro-kernel reads every panel alike.
  const int64_t n_full = n_out / kPanel, tail = n_out % kPanel, n_fp = n_full + (tail > 0);
  const int64_t n_mats = gate_up ? 2 : 1;
  std::vector<scalar_t> tail_buf(tail > 0 ? n_mats * K * kPanel : 0, scalar_t(0.f));
  for (int64_t m = 0; tail > 0 && m < n_mats; ++m) {
    const scalar_t* src = panels + m * n_out * K + n_full * K * kPanel;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t f = 0; f < tail; ++f) tail_buf[(m * K + k) * kPanel + panel_slot<scalar_t>(f)] = src[k * tail + f];
  }
  auto panel = [&](int64_t m, int64_t p) -> const scalar_t* {
    return p < n_full ? panels + m * n_out * K + p * K * kPanel : tail_buf.data() + m * K * kPanel;
  };
  // From kWidenMinM tokens on, half-precision panels are widened to fp32 once per block of panels, for all tokens:
  // the in-loop widening (two integer ops per 12 FMAs) then costs more than the copy.
  const bool widen = !std::is_same_v<scalar_t, float> && M >= kWidenMinM;
  // Widened panels of a long K are used kc columns at a time (C accumulated in cbuf), so that a block of panels'
  // chunk and a token group's chunk share L2.
  const int64_t kc = widen ? std::min(K, kKChunk) : K;
  const int64_t block_bytes = kc * kPanel * n_mats * (widen ? 4 : int64_t(sizeof(scalar_t)));
  const int64_t per_block = std::clamp<int64_t>(kL2Block / block_bytes, 1, 16);
  // out rows of group g, panel p, from C (gate and up tiles, token t at t * kPanel).
  auto emit = [&](int64_t g, int64_t T, int64_t p, const float* c, const float* cu) {
    const int64_t width = p < n_full ? kPanel : tail;
    for (int64_t t = 0; t < T; ++t) {
      scalar_t* o = out + (g * kTok + t) * ldo + p * kPanel;
      const float* ct = c + t * kPanel;
      if (gate_up) {
        for (int64_t j = 0; j < width; ++j) o[j] = silu_mul_out<scalar_t>(ct[j], cu[t * kPanel + j]);
      } else {
        for (int64_t j = 0; j < width; ++j) o[j] = from_float<scalar_t>(ct[j] + (bias ? bias[p * kPanel + j] : 0.f));
      }
    }
  };
  if (M == 1) {  // decode: chunks of four panels (gate_up: two of Wg and the same two of Wu), claimed in turn
    const int per_chunk = gate_up ? kStreams / 2 : kStreams;
    for_each_claimed((n_fp + per_chunk - 1) / per_chunk, [&](int64_t ch) {
      alignas(32) float c[kStreams * kPanel];
      const scalar_t* w[kStreams];
      const int64_t p0 = ch * per_chunk;
      const int np_out = static_cast<int>(std::min<int64_t>(per_chunk, n_fp - p0));
      for (int64_t m = 0; m < n_mats; ++m)
        for (int q = 0; q < np_out; ++q) w[m * np_out + q] = panel(m, p0 + q);
      micro_streams_n<scalar_t>(np_out * static_cast<int>(n_mats), w, xp, kTok, K, c);
      for (int q = 0; q < np_out; ++q) emit(0, 1, p0 + q, c + q * kPanel, c + (np_out + q) * kPanel);
    });
    return;
  }
  at::parallel_for(0, n_fp, 1, [&](int64_t p0, int64_t p1) {
    const int64_t tile = kTok * kPanel;
    std::unique_ptr<float[]> cbuf(new float[(kc < K ? n_groups * per_block : 1) * n_mats * tile]);
    std::unique_ptr<float[]> wbuf(widen ? new float[n_mats * per_block * K * kPanel] : nullptr);
    for (int64_t pb = p0; pb < p1; pb += per_block) {
      const int64_t pe = std::min(p1, pb + per_block);
      if (widen)
        for (int64_t p = pb; p < pe; ++p)
          for (int64_t m = 0; m < n_mats; ++m)
            widen_panel(panel(m, p), K, wbuf.get() + ((p - pb) * n_mats + m) * K * kPanel);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = std::min(kc, K - k0);
        for (int64_t g = 0; g < n_groups; ++g) {
          const int64_t T = std::min(kTok, M - g * kTok);
          const float* xg = xp + g * group_stride + k0 * kTok;
          for (int64_t p = pb; p < pe; ++p) {
            float* c = cbuf.get() + (kc < K ? (g * per_block + p - pb) * n_mats * tile : 0);
            for (int64_t m = 0; m < n_mats; ++m) {
              if (widen)
                micro_t(T, wbuf.get() + (((p - pb) * n_mats + m) * K + k0) * kPanel, xg, kn, c + m * tile, k0 > 0);
              else
                micro_t(T, panel(m, p) + k0 * kPanel, xg, kn, c + m * tile, k0 > 0);
            }
            if (k0 + kn == K) emit(g, T, p, c, c + tile);
          }
        }
      }
    }
  });
}

}  // namespace

void panel_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
                bool gate_up) {
  TORCH_CHECK(cpu_has_avx2(), "panel_gemm needs AVX2/FMA (linear.cpp runs scalar_gemm without)");
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "panel_gemm", [&] {
    run<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.size(0), x.size(1), packed.data_ptr<scalar_t>(),
                  out.size(1), gate_up, bias, out.data_ptr<scalar_t>(), out.stride(0));
  });
}

}  // namespace slf::cpu
