// Small-M GEMM / GEMV for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), and the fused MLP first half
// gate_up_silu: out[M, I] = silu(x @ Wg^T) * (x @ Wu^T) with W = [Wg; Wu]: [2I, K].
//
// At batch 1-8 these layers are bound by reading the weights, so the kernel is organised around streaming each
// weight row exactly once: x is converted to fp32 up front ([M, K], small, stays in L1/L2), the N (output) range
// is split across threads, and each micro-tile holds R weight rows x MT activation rows of fp32 accumulators in
// registers, loading 8 weights (bf16/fp16 -> fp32) per row and step and reusing them for every activation row.
#include <type_traits>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/gemm.h"
#include "cpu/panel.h"
#include "ops.h"

namespace slf::cpu {
namespace {

constexpr int64_t kColBlock = 8;  // output columns per work unit (the widest tile)

// acc[m * R + r] = dot(x[m, :K], w[r][:K]) for m < MT, r < R.
template <typename w_t, int MT, int R>
SLF_AVX2 void tile_avx2(const float* x,           // [MT, K], row stride ldx
                        int64_t ldx,
                        const w_t* const* w,      // R rows of [K]
                        int64_t K, float* acc_out) {  // [MT, R]
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w[r] + k);
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * to_float(w[r][kk]);  // K tail
      acc_out[m * R + r] = s;
    }
}

// bf16 weights, x pre-permuted by permute_x_bf16: 16 weights per load. A bf16 is the top half of an fp32, so
// (w << 16) is the even-indexed element of each 32-bit pair and (w & 0xffff0000) the odd one: two ALU ops widen 16
// weights, against four (zero-extend + shift, twice) the generic path needs.
// NOTE: at batch 1 this kernel is compute-limited at about the DRAM rate on 2 AVX2 cores, so the saved uops are
// bandwidth: at M = 1 on distinct weights, 21 -> 23 GB/s on 2 threads (91% of an fp32 sum in the same run), and
// 22 -> 35 GB/s per core when the weights sit in cache.
template <int MT, int R>
SLF_AVX2 void tile_avx2_bf16_pairs(const float* xp,  // [MT, K] permuted, row stride ldx
                                   int64_t ldx, const c10::BFloat16* const* w, int64_t K, float* acc_out) {
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 we[R], wo[R];
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 xe = _mm256_loadu_ps(xp + m * ldx + k);
      const __m256 xo = _mm256_loadu_ps(xp + m * ldx + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm256_fmadd_ps(we[r], xe, acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(wo[r], xo, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += xp[m * ldx + kk] * to_float(w[r][kk]);  // K tail: not permuted
      acc_out[m * R + r] = s;
    }
}

// xp[m, 16b + j] = x[m, 16b + 2j] and xp[m, 16b + 8 + j] = x[m, 16b + 2j + 1] for j < 8, over whole 16-blocks;
// the K % 16 tail is copied as is.
inline void permute_x_bf16(const float* x, float* xp, int64_t M, int64_t K) {
  const int64_t k16 = K - K % 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* pr = xp + m * K;
    for (int64_t b = 0; b < k16; b += 16)
      for (int j = 0; j < 8; ++j) {
        pr[b + j] = xr[b + 2 * j];
        pr[b + 8 + j] = xr[b + 2 * j + 1];
      }
    for (int64_t k = k16; k < K; ++k) pr[k] = xr[k];
  }
}

template <typename w_t, int MT, int R>
void tile_scalar(const float* x, int64_t ldx, const w_t* const* w, int64_t K, float* acc_out) {
  float acc[MT][R] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float wk = to_float(w[r][k]);
      for (int m = 0; m < MT; ++m) acc[m][r] += x[m * ldx + k] * wk;
    }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc_out[m * R + r] = acc[m][r];
}

template <typename w_t, bool kAvx2, int MT, int R>
inline void tile(const float* x, int64_t ldx, const w_t* const* w, int64_t K, float* acc_out) {
  if constexpr (kAvx2 && std::is_same_v<w_t, c10::BFloat16>)
    tile_avx2_bf16_pairs<MT, R>(x, ldx, w, K, acc_out);  // x was permuted by gemv()
  else if constexpr (kAvx2)
    tile_avx2<w_t, MT, R>(x, ldx, w, K, acc_out);
  else
    tile_scalar<w_t, MT, R>(x, ldx, w, K, acc_out);
}

template <typename w_t, bool kAvx2, int MT>
inline void tile_rows(int64_t R, const float* x, int64_t ldx, const w_t* const* w, int64_t K, float* acc_out) {
  switch (R) {
    case 8: return tile<w_t, kAvx2, MT, 8>(x, ldx, w, K, acc_out);
    case 4: return tile<w_t, kAvx2, MT, 4>(x, ldx, w, K, acc_out);
    case 2: return tile<w_t, kAvx2, MT, 2>(x, ldx, w, K, acc_out);
    default: return tile<w_t, kAvx2, MT, 1>(x, ldx, w, K, acc_out);
  }
}

template <typename w_t, bool kAvx2>
inline void tile_mr(int64_t MT, int64_t R, const float* x, int64_t ldx, const w_t* const* w, int64_t K,
                    float* acc_out) {
  switch (MT) {
    case 1: return tile_rows<w_t, kAvx2, 1>(R, x, ldx, w, K, acc_out);
    case 2: return tile_rows<w_t, kAvx2, 2>(R, x, ldx, w, K, acc_out);
    case 3: return tile_rows<w_t, kAvx2, 3>(R, x, ldx, w, K, acc_out);
    default: return tile_rows<w_t, kAvx2, 4>(R, x, ldx, w, K, acc_out);
  }
}

// Weight rows per tile for MT activation rows: MT * R accumulators (+ R weight vectors) fit the 16 ymm registers.
// NOTE: 8 rows at M = 1 gives 8 independent FMA chains, enough to cover FMA latency on 2 ports.
inline int64_t rows_for(int64_t mt) { return mt == 1 ? 8 : (mt == 2 ? 4 : 2); }

// Columns [c0, c1) of the output for all M rows. kGateUp: column c reads weight rows c (gate) and I + c (up).
template <typename scalar_t, bool kAvx2, bool kGateUp>
void gemv_block(const float* xf,        // [M, K] fp32
                int64_t M, int64_t K,
                const scalar_t* W,      // [N, K] (linear) or [2I, K] (gate_up), row stride ldw
                int64_t ldw, int64_t I,
                const float* bias,      // [N] or null (linear only)
                scalar_t* out,          // [M, N or I], row stride ldo
                int64_t ldo, int64_t c0, int64_t c1) {
  float acc[4 * 8];
  const scalar_t* rows[8];
  // NOTE: column blocks outermost, activation-row tiles inside: a block's weight rows (<= 16 x K) are read from
  // DRAM by the first m-tile and from cache by the others, so W is streamed once whatever M is.
  for (int64_t cb = c0; cb < c1; cb += kColBlock) {
    const int64_t cb1 = std::min(c1, cb + kColBlock);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m0);
      // A tile covers p output columns: p weight rows for linear, p gate + p up rows for gate_up.
      const int64_t rmax = rows_for(mt);
      for (int64_t c = cb; c < cb1;) {
        int64_t p = kGateUp ? std::max<int64_t>(1, rmax / 2) : rmax;
        while (p > cb1 - c) p /= 2;
        const int64_t R = kGateUp ? 2 * p : p;
        for (int64_t j = 0; j < p; ++j) {
          rows[j] = W + (c + j) * ldw;
          if (kGateUp) rows[p + j] = W + (I + c + j) * ldw;
        }
        tile_mr<scalar_t, kAvx2>(mt, R, xf + m0 * K, K, rows, K, acc);
        for (int64_t m = 0; m < mt; ++m) {
          scalar_t* o = out + (m0 + m) * ldo + c;
          for (int64_t j = 0; j < p; ++j) {
            if constexpr (kGateUp) {
              o[j] = silu_mul_out<scalar_t>(acc[m * R + j], acc[m * R + p + j]);
            } else {
              o[j] = from_float<scalar_t>(acc[m * R + j] + (bias ? bias[c + j] : 0.f));
            }
          }
        }
        c += p;
      }
    }
  }
}

template <typename scalar_t, bool kGateUp>
void gemv(const float* xf, int64_t M, int64_t K, const scalar_t* W, int64_t ldw, int64_t n_out, int64_t I,
          const float* bias, scalar_t* out, int64_t ldo) {
  const bool avx2 = cpu_has_avx2();
  std::vector<float> permuted;
  if (avx2 && std::is_same_v<scalar_t, c10::BFloat16>) {
    permuted.resize(M * K);
    permute_x_bf16(xf, permuted.data(), M, K);
    xf = permuted.data();
  }
  const int64_t n_blocks = (n_out + kColBlock - 1) / kColBlock;
  // NOTE: parallel over output columns only: every thread streams a disjoint slice of W once.
  at::parallel_for(0, n_blocks, 4, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kColBlock, c1 = std::min(n_out, b1 * kColBlock);
    if (avx2)
      gemv_block<scalar_t, true, kGateUp>(xf, M, K, W, ldw, I, bias, out, ldo, c0, c1);
    else
      gemv_block<scalar_t, false, kGateUp>(xf, M, K, W, ldw, I, bias, out, ldo, c0, c1);
  });
}

// Above kGemvMaxM rows the layer is compute-bound: the packed GEMM (gemm.cpp, AVX2 only) takes over.
inline bool use_gemm(const torch::Tensor& x) { return x.size(0) > kGemvMaxM && cpu_has_avx2(); }

// out[M, n_out] from x[M, K] and weight ([n_out, K], or [2 n_out, K] with gate_up) through gemm_packed.
void run_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, int64_t n_out, bool gate_up,
              const float* bias) {
  const torch::Tensor xc = x.contiguous();
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gemm_packed", [&] {
    gemm_packed<scalar_t>(xc.data_ptr<scalar_t>(), xc.stride(0), x.size(0), x.size(1), weight.data_ptr<scalar_t>(),
                          weight.stride(0), n_out, gate_up, bias, out.data_ptr<scalar_t>(), out.stride(0));
  });
}

void check_common(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, int64_t n_out) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.stride(1) == 1,
              "weight must be [N, K] with contiguous rows and K = x.size(1)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must have the same dtype");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n_out && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              "out must be [M, ", n_out, "] of x's dtype with contiguous rows");
}

}  // namespace
}  // namespace slf::cpu

void linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
            const std::optional<torch::Tensor>& bias) {
  const int64_t n = weight.dim() == 3 ? weight.size(0) * slf::cpu::kPanel : weight.size(0);
  torch::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [N]");
    b = bias->to(at::kFloat).contiguous();
  }
  if (weight.dim() == 3)  // panel-packed (pack_linear_weight)
    return slf::cpu::panel_gemm(out, x, weight, b.defined() ? b.data_ptr<float>() : nullptr, false);
  slf::cpu::check_common(out, x, weight, n);
  if (x.size(0) == 0 || n == 0) return;
  if (slf::cpu::use_gemm(x))
    return slf::cpu::run_gemm(out, x, weight, n, false, b.defined() ? b.data_ptr<float>() : nullptr);
  const torch::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear", [&] {
    slf::cpu::gemv<scalar_t, false>(xf.data_ptr<float>(), x.size(0), x.size(1),
                                    weight.data_ptr<scalar_t>(),  // [N, K]
                                    weight.stride(0), n, 0, b.defined() ? b.data_ptr<float>() : nullptr,
                                    out.data_ptr<scalar_t>(),  // [M, N]
                                    out.stride(0));
  });
}

void gate_up_silu(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& gate_up_weight) {
  if (gate_up_weight.dim() == 3)  // panel-packed (pack_linear_weight)
    return slf::cpu::panel_gemm(out, x, gate_up_weight, nullptr, true);
  TORCH_CHECK(gate_up_weight.dim() == 2 && gate_up_weight.size(0) % 2 == 0, "gate_up_weight must be [2I, K]");
  const int64_t inter = gate_up_weight.size(0) / 2;
  slf::cpu::check_common(out, x, gate_up_weight, inter);
  if (x.size(0) == 0 || inter == 0) return;
  if (slf::cpu::use_gemm(x)) return slf::cpu::run_gemm(out, x, gate_up_weight, inter, true, nullptr);
  const torch::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_up_silu", [&] {
    slf::cpu::gemv<scalar_t, true>(xf.data_ptr<float>(), x.size(0), x.size(1),
                                   gate_up_weight.data_ptr<scalar_t>(),  // [2I, K]
                                   gate_up_weight.stride(0), inter, inter, nullptr,
                                   out.data_ptr<scalar_t>(),  // [M, I]
                                   out.stride(0));
  });
}

void pack_linear_weight(torch::Tensor& out, const torch::Tensor& weight) { slf::cpu::pack_panels(out, weight); }
