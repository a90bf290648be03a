// GEMM on vnni-packed bf16 weights (packed.h) with AVX512-BF16, every M: y[M, N] = x[M, K] @ W[N, K]^T, fp32
// accumulation by vdpbf16ps (each 32-bit lane: += x[k] w[k] + x[k+1] w[k+1], products exact in fp32).
//
// The micro-kernel computes T tokens (<= 6) x NP panels (<= 4, 16 features each) over a range of k pairs: per pair,
// NP 64-byte loads of the panel rows, T broadcasts of x's pair (x is read where it lies, bf16 rows: pairs along K are
// adjacent in memory, so x needs no packing) and T * NP vdpbf16ps into T * NP zmm accumulators (24 of 32 at most).
//
// Per thread (threads own disjoint ranges of chunks, a chunk being the NP panels of one micro-tile):
//   for each chunk (its panels, NP x K x 32 bytes, stay in L2 across the token groups)
//     for each group of 6 tokens: micro-kernel over K, epilogue straight to out (bias / silu(gate) * up, bf16)
// At M <= 6 there is one group: the weights stream from DRAM once, four panels at a time.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/packed.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

#define SLF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu {
namespace {

constexpr int64_t kTok = 6;    // tokens per micro-tile
constexpr int kMaxPanels = 4;  // panels per micro-tile
// Software prefetch kPrefetchRows panel rows (2 KB) ahead of each stream on AMX CPUs (Intel) only. Zen 4, 1.6B layer
// shapes, M = 1, 2 threads, weights from DRAM: the hardware prefetchers alone stream 29-33 GB/s where a prefetch 24
// panel rows ahead read 24-26 GB/s (three interleaved runs each, 2026-12-01). Intel Xeon with AMX, the same shapes
// 24 times over (2.47 GB): 25.4-26.4 GB/s with the prefetch 32 rows ahead against 21.8-23.5 without (three
// alternated runs, 2026-12-02; 16 / 24 / 48 / 64 / 128 rows no better than 32).
constexpr int64_t kPrefetchRows = 32;

using bf16 = c10::BFloat16;

// c[t][q * 16 + j] = sum over k pairs [0, kh) of x[t] . W_q[pair][j], for t < T, q < NP.
// w[q]: panel q's rows (16 32-bit words each, one pair of bf16 per feature); x: token rows of bf16, stride ldx.
template <int T, int NP, bool kPf>
SLF_AVX512BF16 void micro(const uint32_t* const* w, const bf16* x, int64_t ldx, int64_t kh, float* c) {
  __m512 acc[T][NP];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) acc[t][q] = _mm512_setzero_ps();
  const uint32_t* xw[T];
  for (int t = 0; t < T; ++t) xw[t] = reinterpret_cast<const uint32_t*>(x + t * ldx);
  for (int64_t i = 0; i < kh; ++i) {
    __m512i wv[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      wv[q] = _mm512_loadu_si512(w[q] + i * kPanel);
      if constexpr (kPf)
        _mm_prefetch(reinterpret_cast<const char*>(w[q] + (i + kPrefetchRows) * kPanel), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xw[t][i]));
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], xb, (__m512bh)wv[q]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) _mm512_storeu_ps(c + (t * kMaxPanels + q) * kPanel, acc[t][q]);
}

using MicroFn = void (*)(const uint32_t* const*, const bf16*, int64_t, int64_t, float*);

template <int T, bool kPf>
constexpr MicroFn micro_np(int np) {
  return np == 1 ? &micro<T, 1, kPf> : np == 2 ? &micro<T, 2, kPf> : np == 3 ? &micro<T, 3, kPf> : &micro<T, 4, kPf>;
}

template <bool kPf>
MicroFn micro_for(int64_t T, int np) {
  switch (T) {
    case 1: return micro_np<1, kPf>(np);
    case 2: return micro_np<2, kPf>(np);
    case 3: return micro_np<3, kPf>(np);
    case 4: return micro_np<4, kPf>(np);
    case 5: return micro_np<5, kPf>(np);
    default: return micro_np<6, kPf>(np);
  }
}

SLF_AVX512BF16 inline __m512 round_bf16(__m512 v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[t][col0 + j] for j < width (<= 16) from one 16-feature column of c (gate_up: gate and up columns).
SLF_AVX512BF16 inline void emit(const float* c, const float* cu, const float* bias, int64_t width, bf16* o) {
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
  __m512 v = _mm512_maskz_loadu_ps(mask, c);
  if (cu != nullptr) {
    v = _mm512_mul_ps(silu16(round_bf16(v)), round_bf16(_mm512_maskz_loadu_ps(mask, cu)));
  } else if (bias != nullptr) {
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  }
  _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

SLF_AVX512BF16 void run(const bf16* x, int64_t ldx, int64_t M, int64_t K, const bf16* packed, int64_t n_out,
                        bool gate_up, const float* bias, bf16* out, int64_t ldo) {
  const int64_t kh = K / 2, n_mats = gate_up ? 2 : 1;
  const VnniPanels panels(packed, n_out, K, gate_up);  // the tail panels widened to full ones for the micro-kernel
  const int64_t n_panels = panels.n_panels;
  // A chunk: per_chunk output panels (gate_up: the same panels of Wg and Wu).
  const int per_chunk = gate_up ? kMaxPanels / 2 : kMaxPanels;
  const bool pf = cpu_isa() == Isa::kAmx;
  // (chunks claimed in turn: parallel.h)
  for_each_claimed((n_panels + per_chunk - 1) / per_chunk, [&](int64_t ch) {
    alignas(64) float c[kTok * kMaxPanels * kPanel];
    const uint32_t* w[kMaxPanels];
    const int64_t p0 = ch * per_chunk;
    const int np_out = static_cast<int>(std::min<int64_t>(per_chunk, n_panels - p0));
    for (int q = 0; q < np_out; ++q)
      for (int64_t m = 0; m < n_mats; ++m) w[m * np_out + q] = panels.panel(m, p0 + q);
    const int np = np_out * static_cast<int>(n_mats);
    for (int64_t t0 = 0; t0 < M; t0 += kTok) {
      const int64_t T = std::min(kTok, M - t0);
      (pf ? micro_for<true>(T, np) : micro_for<false>(T, np))(w, x + t0 * ldx, ldx, kh, c);
      for (int64_t t = 0; t < T; ++t)
        for (int q = 0; q < np_out; ++q) {
          const int64_t p = p0 + q, width = panels.width(p);
          const float* ct = c + (t * kMaxPanels + q) * kPanel;
          emit(ct, gate_up ? ct + np_out * kPanel : nullptr, bias ? bias + p * kPanel : nullptr, width,
               out + (t0 + t) * ldo + p * kPanel);
        }
    }
  });
}

}  // namespace

void vnni_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
               bool gate_up) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "vnni-packed weights take bfloat16 x, got ", x.scalar_type());
  run(reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), x.size(0), x.size(1),
      reinterpret_cast<const bf16*>(packed.data_ptr()), out.size(1), gate_up, bias,
      reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0));
}

SLF_AVX512BF16 void emit_bf16_rows(const float* c, const float* cu, int64_t ldc, int64_t rows, const float* bias,
                                   int64_t width, c10::BFloat16* out, int64_t ldo) {
  for (int64_t t = 0; t < rows; ++t) emit(c + t * ldc, cu ? cu + t * ldc : nullptr, bias, width, out + t * ldo);
}

}  // namespace slf::cpu
