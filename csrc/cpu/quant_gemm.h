// The driver side of the int8 / int6 / int4 linear layers (quant_linear.cpp, quant_bf16_gemm.cpp): a packed weight
// seen as full panels of 16 features (the micro-kernels' unit, quant.h), and the epilogue that writes their outputs.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/quant.h"

namespace slf::cpu::quant {

// One packed weight of n_mats matrices (2: gate_up's [Wg; Wu], each packed apart) of n_out features: panel (m, p)
// is panel p of matrix m; the tail panel of each matrix (n_out % 16 features) is copied once per call into buffers
// widened to 16 features with zero scales, so every micro-kernel sees full panels.
struct PackedPanels {
  Panel proto;
  const uint8_t* qb;
  const uint16_t* sb;  // fp16 scales
  const uint8_t* zb;
  int64_t n_out, ng, row_bytes, panel_bytes, n_full, tail, n_panels, n_mats;
  std::vector<uint8_t> tq, tz;
  std::vector<uint16_t> ts;

  PackedPanels(const Panel& proto_, const uint8_t* q, const uint16_t* s, const uint8_t* z, int64_t n_out_,
               bool gate_up)
      : proto(proto_), qb(q), sb(s), zb(z), n_out(n_out_), ng(proto_.K / proto_.G),
        row_bytes(proto_.K * proto_.bits / 8), panel_bytes(row_bytes * kPanel), n_full(n_out_ / kPanel),
        tail(n_out_ % kPanel), n_panels(n_full + (tail > 0)), n_mats(gate_up ? 2 : 1) {
    if (tail == 0) return;
    tq.assign(n_mats * panel_bytes, 0);
    ts.assign(n_mats * ng * kPanel, 0);  // fp16 +0
    if (zb) tz.assign(n_mats * ng * kPanel, 0);
    const int64_t R = row_bytes / 4;
    for (int64_t m = 0; m < n_mats; ++m) {
      const uint8_t* qt = qb + m * n_out * row_bytes + n_full * panel_bytes;
      for (int64_t r = 0; r < R; ++r) std::memcpy(&tq[m * panel_bytes + r * 64], qt + r * tail * 4, tail * 4);
      const int64_t o = m * n_out * ng + n_full * ng * kPanel;
      for (int64_t g = 0; g < ng; ++g) {
        std::memcpy(&ts[(m * ng + g) * kPanel], sb + o + g * tail, tail * sizeof(uint16_t));
        if (zb) std::memcpy(&tz[(m * ng + g) * kPanel], zb + o + g * tail, tail);
      }
    }
  }

  Panel panel(int64_t m, int64_t p) const {
    Panel w = proto;
    const bool full = p < n_full;
    w.q = full ? qb + m * n_out * row_bytes + p * panel_bytes : &tq[m * panel_bytes];
    w.s = full ? sb + m * n_out * ng + p * ng * kPanel : &ts[m * ng * kPanel];
    w.z = zb == nullptr ? nullptr : full ? zb + m * n_out * ng + p * ng * kPanel : &tz[m * ng * kPanel];
    return w;
  }

  int64_t width(int64_t p) const { return p < n_full ? kPanel : tail; }
};

// out[t][0:width] (row stride ldo) from c[t][0:width] (row stride ldc) of T tokens: + bias, or silu(c) * cu (gate_up).
template <typename scalar_t>
inline void emit(const float* c, const float* cu, int64_t ldc, int64_t T, int64_t width, const float* bias,
                 scalar_t* out, int64_t ldo) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < width; ++j) {
      float v = c[t * ldc + j];
      if (cu != nullptr) v = silu(v) * cu[t * ldc + j];
      else if (bias != nullptr) v += bias[j];
      out[t * ldo + j] = from_float<scalar_t>(v);
    }
}

// The bf16-block path (bf16 x, quant_bf16_gemm.cpp): every panel dequantized to bf16 once per call, then AMX tiles
// (amx::use: AMX machines above 4 tokens) or vdpbf16ps (micro_bf16) over all M tokens.
void gemm_bf16_blocks(const PackedPanels& w, const c10::BFloat16* x, int64_t ldx, int64_t M, const float* bias,
                      c10::BFloat16* out, int64_t ldo, bool gate_up);

}  // namespace slf::cpu::quant
