// Load-time packed linear weights: the layouts, the packing (csrc/cpu/pack.cpp) and the GEMMs that read them in
// place (panel_gemm.cpp: AVX2, vnni_gemm.cpp: AVX512-BF16, amx_gemm.cpp: AMX, scalar_gemm.cpp: portable).
//
// A weight W[N, K] is cut into panels of 16 output features; the last panel holds the N % 16 left over (the tail).
// The layout, and with it the ISA the weight was packed for, is told by the packed tensor's shape:
//   panels [N, K, 1]  (AVX2 / scalar; any dtype): N / 16 panels [K][16], then the tail [K][N % 16]. In full bf16
//                     panels the 32-bit word i holds features i and i + 8 (a shift and a mask widen them to two
//                     fp32 vectors); the tail, fp16 and fp32 keep the natural order.
//   vnni   [N, K/2, 2] (AVX512-BF16 and AMX; bf16, K even): N / 16 panels [K/2][16][2] (a 64-byte row: 16
//                     features x one pair of k, the operand of vdpbf16ps and of an AMX B tile), then the tail
//                     [K/2][N % 16][2].
// A gate_up weight [Wg; Wu] ([2I, K]) is packed as two such matrices of I rows, stacked (halves = true).
// The shapes are a plain tensor's: the packed weight lives in an nn.Parameter, survives .data / clone, and tells
// the kernel and the Python wrapper (stablelm_fast/ops/cpu_linear.py) its N, K and layout at no cost.
#pragma once
#include <torch/all.h>

#include <vector>

#include "cpu/isa.h"

namespace slf::cpu {

constexpr int64_t kPanel = 16;  // output features per panel

enum class Layout { kPanels, kVnni };

// The layout of a packed tensor from its shape; TORCH_CHECKs that it is one (a 3-D contiguous tensor).
Layout layout_of(const torch::Tensor& packed);

// The lowest ISA that runs a layout: panels need AVX2 for the fast kernel but run anywhere (scalar kernel).
inline Isa layout_isa(Layout l) { return l == Layout::kVnni ? Isa::kAvx512Bf16 : Isa::kScalar; }

// out (shape above) = W packed; halves: W = [Wg; Wu], each half packed on its own.
void pack_weight(torch::Tensor& out, const torch::Tensor& w, bool halves);

// out[M, n_out] = x[M, K] @ W^T (+ bias fp32 [n_out]); with gate_up, W = [Wg; Wu] packed with halves and
// out = silu(x Wg^T) * (x Wu^T), n_out = I. Shapes and dtypes checked by the caller (linear.cpp).
void panel_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
                bool gate_up);
void vnni_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
               bool gate_up);
// The panels of a vnni-packed weight of n_mats matrices (2: gate_up's [Wg; Wu]) of n_out features each, every one a
// full panel of 32-bit words ([K/2][16]: a pair of bf16 per feature): panel(m, p) points into the weight, except the
// tail panel of each matrix (n_out % 16 features), which the constructor copies into a buffer widened with zero
// features (the vnni and AMX kernels work on whole panels).
class VnniPanels {
 public:
  VnniPanels(const c10::BFloat16* packed, int64_t n_out, int64_t K, bool gate_up);
  const uint32_t* panel(int64_t m, int64_t p) const {
    return p < n_full ? base_ + m * n_out * kh_ + p * words_ : tail_.data() + m * words_;
  }
  int64_t width(int64_t p) const { return p < n_full ? kPanel : tail; }
  const int64_t n_out, n_full, tail, n_panels;

 private:
  const uint32_t* base_;
  int64_t kh_, words_;
  std::vector<uint32_t> tail_;
};

// out[t][0:width] (bf16, row stride ldo) for t < rows from fp32 tiles c (and cu: out = silu(c) * cu, both rounded
// to bf16 first) of row stride ldc, plus bias: the AVX512-BF16 epilogue of vnni_gemm, shared with amx_gemm.
void emit_bf16_rows(const float* c, const float* cu, int64_t ldc, int64_t rows, const float* bias, int64_t width,
                    c10::BFloat16* out, int64_t ldo);
// AMX tiles (amx_gemm.cpp, amx.h), where amx::use(M, K): above 4 tokens (decode streams the weights with vnni_gemm).
void amx_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
              bool gate_up);
void scalar_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
                 bool gate_up);

// Position of feature f (< 16) in a full panels-layout row: bf16 rows interleave features f and f + 8.
template <typename scalar_t>
constexpr int64_t panel_slot(int64_t f) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return f < 8 ? 2 * f : 2 * (f - 8) + 1;
  return f;
}

}  // namespace slf::cpu
