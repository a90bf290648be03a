// Panel-packed linear weights and the GEMM that reads them: csrc/cpu/panel_gemm.cpp.
//
// A weight W[N, K] (N a multiple of 16) is repacked once, at load, into panels of 16 output features:
// Wp[N / 16][K][16], so that one 32-byte load gives the 16 features' weights at one k. bf16 panels interleave the
// features in pairs (32-bit word i = feature i | feature i + 8 << 16): a shift and a mask widen them to two fp32
// vectors without shuffles. fp16 and fp32 panels keep the natural order.
#pragma once
#include <torch/all.h>

namespace slf::cpu {

constexpr int64_t kPanel = 16;  // output features per panel

// out[N / 16, K, 16] = W[N, K] repacked (see above).
void pack_panels(torch::Tensor& out, const torch::Tensor& w);

// out[M, n_out] = x[M, K] @ W^T (+ bias), from the panels of W ([n_out / 16, K, 16]); with gate_up the panels
// are those of [Wg; Wu] ([2 n_out / 16, K, 16]) and out = silu(x Wg^T) * (x Wu^T). Needs AVX2/FMA.
void panel_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& panels, const float* bias,
                bool gate_up);

}  // namespace slf::cpu
