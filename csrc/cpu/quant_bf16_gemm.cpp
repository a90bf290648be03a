// The bf16-block path of the int8 / int6 / int4 linear layers (bf16 x; quant_linear.cpp picks it): chunks of up to
// four output panels, each dequantized to bf16 pairs (dequant_bf16, quant_bf16.cpp) once per call, then every token
// against them: AMX tiles where amx::use (a dequantized panel is a vnni panel, amx.h), else vdpbf16ps (micro_bf16)
// over groups of 6 tokens.
#include "cpu/amx.h"
#include "cpu/quant_gemm.h"

namespace slf::cpu::quant {

void gemm_bf16_blocks(const PackedPanels& w, const c10::BFloat16* xb, int64_t ldx, int64_t M, const float* bias,
                      c10::BFloat16* out, int64_t ldo, bool gate_up) {
  const int64_t K = w.proto.K, n_mats = w.n_mats, n_panels = w.n_panels;
  const bool use_amx = amx::use(M, K);
  const amx::Rows rows_of_x(xb, ldx, use_amx ? M : 0, K);
  const int per_chunk = gate_up ? kBf16Panels / 2 : kBf16Panels;
  const int64_t n_chunks = (n_panels + per_chunk - 1) / per_chunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> buf(kBf16Panels * (K / 2) * kPanel);
    alignas(64) float c[kBf16T * kBf16Panels * kPanel], cb[2 * amx::kBlockM * kPanel];
    const uint32_t* wp[kBf16Panels];
    amx::Tiles tiles;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t p0 = ch * per_chunk;
      const int np_out = static_cast<int>(std::min<int64_t>(per_chunk, n_panels - p0));
      for (int64_t m = 0; m < n_mats; ++m)
        for (int qq = 0; qq < np_out; ++qq) {
          uint32_t* dst = &buf[(m * np_out + qq) * (K / 2) * kPanel];
          dequant_bf16(w.panel(m, p0 + qq), dst);
          wp[m * np_out + qq] = dst;
        }
      if (use_amx) {
        tiles.load();
        auto bp = [&](int i) { return reinterpret_cast<const c10::BFloat16*>(wp[i]); };
        for (int64_t t0 = 0; t0 < M; t0 += amx::kBlockM) {
          const int64_t rows = std::min(amx::kBlockM, M - t0);
          // gate_up: gate and up of panel qq together; else panels qq and qq + 1
          for (int qq = 0; qq < np_out; qq += gate_up ? 1 : 2) {
            const bool two = gate_up || qq + 1 < np_out;
            amx::block(rows, rows_of_x.at(t0), rows_of_x.ld(t0), bp(qq),
                       two ? bp(gate_up ? np_out + qq : qq + 1) : nullptr, K, cb, cb + amx::kBlockM * kPanel);
            for (int h = 0; h < (gate_up ? 1 : 1 + two); ++h) {
              const int64_t p = p0 + qq + h;
              emit(cb + h * amx::kBlockM * kPanel, gate_up ? cb + amx::kBlockM * kPanel : nullptr, kPanel, rows,
                   w.width(p), bias ? bias + p * kPanel : nullptr, out + t0 * ldo + p * kPanel, ldo);
            }
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
  });
}

}  // namespace slf::cpu::quant
