// Packed-panel GEMM for the compute-bound range of M (batched decode, prefill): csrc/cpu/gemm.cpp.
#pragma once
#include <cstdint>

namespace slf::cpu {

// Rows of x above which linear / gate_up_silu leave the weight-streaming GEMV (gemv.cpp) for the packed GEMM.
// Measured with bench/kernels/bench_gemm.py on the 1.6B shapes (2 AVX2 cores): the GEMV wins while the weights'
// DRAM stream is the limit (M <= 8), the GEMM from M = 16 up.
constexpr int64_t kGemvMaxM = 12;

// y[M, n_out] = x[M, K] @ W[n_out, K]^T (+ bias), or with gate_up: y[M, I] = silu(x Wg^T) * (x Wu^T) where
// W = [Wg; Wu] is [2I, K] and n_out = I. Accumulates in fp32; needs AVX2/FMA (callers check cpu_has_avx2()).
template <typename scalar_t>
void gemm_packed(const scalar_t* x, int64_t ldx, int64_t M, int64_t K, const scalar_t* W, int64_t ldw,
                 int64_t n_out, bool gate_up, const float* bias, scalar_t* out, int64_t ldo);

}  // namespace slf::cpu
