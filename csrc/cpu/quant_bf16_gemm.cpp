// The bf16-block path of the int8 / int6 / int4 linear layers (bf16 x; quant_linear.cpp picks it): chunks of up to
// four output panels, each dequantized to bf16 pairs (dequant_bf16, quant_bf16.cpp) once per call, then every token
// against them: oneDNN's brgemm on AMX machines above 4 tokens (at::native::cpublas::brgemm reads a dequantized
// panel as its packed B: N = 16, ld 16; as brgemm_gemm.cpp), else vdpbf16ps (micro_bf16) over groups of 6 tokens.
#include <ATen/native/CPUBlas.h>

#include "cpu/quant_gemm.h"

namespace slf::cpu {
bool use_brgemm(int64_t M);  // packed.h (not included: its kPanel would clash with quant::kPanel here)
}

namespace slf::cpu::quant {

constexpr int64_t kBrgemmRows = 32;  // tokens per brgemm call (two 16-row AMX C tiles)

void gemm_bf16_blocks(const PackedPanels& w, const c10::BFloat16* xb, int64_t ldx, int64_t M, const float* bias,
                      c10::BFloat16* out, int64_t ldo, bool gate_up) {
  const int64_t K = w.proto.K, n_mats = w.n_mats, n_panels = w.n_panels;
  const bool brgemm = use_brgemm(M);
  const int per_chunk = gate_up ? kBf16Panels / 2 : kBf16Panels;
  const int64_t n_chunks = (n_panels + per_chunk - 1) / per_chunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> buf(kBf16Panels * (K / 2) * kPanel);
    alignas(64) float c[kBf16T * kBf16Panels * kPanel], cb[2 * kBrgemmRows * kPanel];
    const uint32_t* wp[kBf16Panels];
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t p0 = ch * per_chunk;
      const int np_out = static_cast<int>(std::min<int64_t>(per_chunk, n_panels - p0));
      for (int64_t m = 0; m < n_mats; ++m)
        for (int qq = 0; qq < np_out; ++qq) {
          uint32_t* dst = &buf[(m * np_out + qq) * (K / 2) * kPanel];
          dequant_bf16(w.panel(m, p0 + qq), dst);
          wp[m * np_out + qq] = dst;
        }
      if (brgemm) {
        for (int64_t t0 = 0; t0 < M; t0 += kBrgemmRows) {
          const int64_t rows = std::min(kBrgemmRows, M - t0);
          for (int qq = 0; qq < np_out; ++qq) {
            for (int64_t m = 0; m < n_mats; ++m)
              at::native::cpublas::brgemm(rows, kPanel, K, ldx, kPanel, kPanel, false, xb + t0 * ldx,
                                          reinterpret_cast<const c10::BFloat16*>(wp[m * np_out + qq]),
                                          cb + m * kBrgemmRows * kPanel);
            const int64_t p = p0 + qq;
            emit(cb, gate_up ? cb + kBrgemmRows * kPanel : nullptr, kPanel, rows, w.width(p),
                 bias ? bias + p * kPanel : nullptr, out + t0 * ldo + p * kPanel, ldo);
          }
        }
        continue;
      }
      for (int64_t t0 = 0; t0 < M; t0 += kBf16T) {
        const int64_t T = std::min(kBf16T, M - t0);
        micro_bf16(wp, np_out * static_cast<int>(n_mats), xb + t0 * ldx, ldx, T, K, c);
        for (int qq = 0; qq < np_out; ++qq) {
          const int64_t p = p0 + qq;
          emit(c + qq * kPanel, gate_up ? c + (np_out + qq) * kPanel : nullptr, kBf16Panels * kPanel, T, w.width(p),
               bias ? bias + p * kPanel : nullptr, out + t0 * ldo + p * kPanel, ldo);
        }
      }
    }
    if (brgemm) at::native::cpublas::brgemm_release();
  });
}

}  // namespace slf::cpu::quant
