// Portable GEMM on panels-packed weights (packed.h), every M, no SIMD intrinsics: the kernel of CPUs without AVX2
// and of STABLELM_FAST_ISA=scalar. fp32 accumulation, k in order (the compiler vectorises the 16 features).
#include <algorithm>

#include "cpu/cpu_types.h"
#include "cpu/packed.h"

namespace slf::cpu {
namespace {

constexpr int64_t kTok = 4;  // tokens per pass over a panel

// c[t][j] = sum_k x[t][k] W[p * 16 + j][k] for t < T, j < width; w: the panel, row stride ld (16, or the tail's width).
template <typename scalar_t>
void panel_dot(const scalar_t* x, int64_t ldx, int64_t T, int64_t K, const scalar_t* w, int64_t ld,
               const int64_t* slot, int64_t width, float (*c)[kPanel]) {
  for (int64_t t = 0; t < T; ++t) std::fill(c[t], c[t] + kPanel, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    float wk[kPanel];
    for (int64_t j = 0; j < width; ++j) wk[j] = to_float(w[k * ld + slot[j]]);
    for (int64_t t = 0; t < T; ++t) {
      const float xv = to_float(x[t * ldx + k]);
      for (int64_t j = 0; j < width; ++j) c[t][j] += xv * wk[j];
    }
  }
}

template <typename scalar_t>
void run(const scalar_t* x, int64_t ldx, int64_t M, int64_t K, const scalar_t* packed, int64_t n_out, bool gate_up,
         const float* bias, scalar_t* out, int64_t ldo) {
  const int64_t n_full = n_out / kPanel, tail = n_out % kPanel;
  int64_t full_slot[kPanel], tail_slot[kPanel];
  for (int64_t j = 0; j < kPanel; ++j) {
    full_slot[j] = panel_slot<scalar_t>(j);
    tail_slot[j] = j;
  }
  at::parallel_for(0, n_full + (tail > 0), 1, [&](int64_t p0, int64_t p1) {
    float c[kTok][kPanel], cu[kTok][kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const bool full = p < n_full;
      const int64_t width = full ? kPanel : tail;
      const scalar_t* wg = packed + p * K * kPanel;
      for (int64_t t0 = 0; t0 < M; t0 += kTok) {
        const int64_t T = std::min(kTok, M - t0);
        panel_dot(x + t0 * ldx, ldx, T, K, wg, width, full ? full_slot : tail_slot, width, c);
        if (gate_up)
          panel_dot(x + t0 * ldx, ldx, T, K, wg + n_out * K, width, full ? full_slot : tail_slot, width, cu);
        for (int64_t t = 0; t < T; ++t) {
          scalar_t* o = out + (t0 + t) * ldo + p * kPanel;
          for (int64_t j = 0; j < width; ++j)
            o[j] = gate_up ? silu_mul_out<scalar_t>(c[t][j], cu[t][j])
                           : from_float<scalar_t>(c[t][j] + (bias ? bias[p * kPanel + j] : 0.f));
        }
      }
    }
  });
}

}  // namespace

void scalar_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
                 bool gate_up) {
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scalar_gemm", [&] {
    run<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.size(0), x.size(1), packed.data_ptr<scalar_t>(),
                  out.size(1), gate_up, bias, out.data_ptr<scalar_t>(), out.stride(0));
  });
}

}  // namespace slf::cpu
