// GEMM on vnni-packed bf16 weights (packed.h) through oneDNN's batch-reduce GEMM micro-kernel as torch ships it
// (at::native::cpublas::brgemm, what Inductor's and SGLang's CPU kernels call): AMX tiles on CPUs with AMX, oneDNN's
// AVX512-BF16 kernel elsewhere. A vnni panel [K/2][16][2] is brgemm's packed B for N = 16 (ld_b = 16) as it lies, so
// no repacking: per panel and block of up to kRows tokens, one brgemm call into an fp32 tile, then the epilogue.
//
// Used for M > kBrgemmMinM on AMX machines (vnni_gemm.cpp streams the weights at decode); STABLELM_FAST_BRGEMM=1
// forces it wherever the vnni layout runs (tests use that to cover this file on AVX512-BF16 machines), =0 disables.
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/packed.h"

namespace slf::cpu {
namespace {

constexpr int64_t kRows = 32;  // tokens per brgemm call (two 16-row AMX C tiles)

using bf16 = c10::BFloat16;

void run(const bf16* x, int64_t ldx, int64_t M, int64_t K, const bf16* packed, int64_t n_out, bool gate_up,
         const float* bias, bf16* out, int64_t ldo) {
  const int64_t kh = K / 2, elems = K * kPanel;  // bf16 elements per full panel
  const int64_t n_full = n_out / kPanel, tail = n_out % kPanel, n_panels = n_full + (tail > 0);
  const int64_t n_mats = gate_up ? 2 : 1;
  std::vector<bf16> tail_buf(tail > 0 ? n_mats * elems : 0, bf16(0.f));  // tail panels widened to 16 features
  for (int64_t m = 0; tail > 0 && m < n_mats; ++m) {
    const bf16* src = packed + m * n_out * K + n_full * elems;
    for (int64_t i = 0; i < kh; ++i)
      std::memcpy(tail_buf.data() + m * elems + i * 2 * kPanel, src + i * 2 * tail, 2 * tail * sizeof(bf16));
  }
  auto panel = [&](int64_t m, int64_t p) -> const bf16* {
    return p < n_full ? packed + m * n_out * K + p * elems : tail_buf.data() + m * elems;
  };
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    float c[2][kRows * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = p < n_full ? kPanel : tail;
      for (int64_t t0 = 0; t0 < M; t0 += kRows) {
        const int64_t rows = std::min(kRows, M - t0);
        for (int64_t m = 0; m < n_mats; ++m)
          at::native::cpublas::brgemm(rows, kPanel, K, ldx, kPanel, kPanel, false, x + t0 * ldx, panel(m, p), c[m]);
        emit_bf16_rows(c[0], gate_up ? c[1] : nullptr, kPanel, rows, bias ? bias + p * kPanel : nullptr, width,
                       out + t0 * ldo + p * kPanel, ldo);
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

}  // namespace

bool use_brgemm(int64_t M) {
  static const int forced = [] {
    const char* s = std::getenv("STABLELM_FAST_BRGEMM");
    return s == nullptr || *s == '\0' ? -1 : (std::strcmp(s, "0") == 0 ? 0 : 1);
  }();
  if (forced >= 0) return forced == 1;
  return cpu_isa() == Isa::kAmx && M > kBrgemmMinM;
}

void brgemm_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
                 bool gate_up) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "vnni-packed weights take bfloat16 x, got ", x.scalar_type());
  run(reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), x.size(0), x.size(1),
      reinterpret_cast<const bf16*>(packed.data_ptr()), out.size(1), gate_up, bias,
      reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0));
}

}  // namespace slf::cpu
