// Portable pieces of the int8 / int6 / int4 linear layers (layout in quant.h): the scalar micro-kernel (fp32
// dequantization, fp32 x: CPUs without AVX2, STABLELM_FAST_ISA=scalar) and the quantization of x to int8 per block
// that every int-activation kernel reads (per row with AVX2 where B is a multiple of 8: quantize_row_avx2).
#include <algorithm>
#include <cmath>

#include <ATen/Parallel.h>

#include "cpu/quant.h"

namespace slf::cpu::quant {

void micro_scalar(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c) {
  std::fill(c, c + T * kPanel, 0.f);
  const int64_t rows_per_group = w.G / 4;
  for (int64_t g = 0; g < w.K / w.G; ++g) {
    float wf[kPanel][4];
    for (int64_t r = 0; r < rows_per_group; ++r) {
      const int64_t k = g * w.G + 4 * r;
      for (int64_t f = 0; f < kPanel; ++f) {
        const float zero = float((w.z ? w.z[g * kPanel + f] : w.zero) + w.offset);
        const float s = half_to_float(w.s[g * kPanel + f]);
        for (int64_t i = 0; i < 4; ++i) {
          int u;
          if (w.bits == 8) {
            const uint8_t byte = w.q[(k / 4) * 64 + f * 4 + i];
            u = w.offset ? int(byte) : int(static_cast<int8_t>(byte));
          } else if (w.bits == 6) {  // 16 k in three rows: two of nibbles, one of top bits (quant.h)
            const int64_t c = k / 16, j = k % 16;
            const uint8_t byte = w.q[(3 * c + j / 8) * 64 + f * 4 + i];
            const int top = (w.q[(3 * c + 2) * 64 + f * 4 + i] >> (2 * (j / 4))) & 3;
            u = ((j / 4) % 2 ? byte >> 4 : byte & 15) + 16 * top;
          } else {
            const uint8_t byte = w.q[(k / 8) * 64 + f * 4 + i];
            u = (k / 4) % 2 ? byte >> 4 : byte & 15;
          }
          wf[f][i] = (float(u) - zero) * s;
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = x.f_row(t0 + t) + k;
        for (int64_t f = 0; f < kPanel; ++f)
          c[t * kPanel + f] += xr[0] * wf[f][0] + xr[1] * wf[f][1] + xr[2] * wf[f][2] + xr[3] * wf[f][3];
      }
    }
  }
}

void quantize_rows(const float* xf, int64_t M, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum,
                   float* gs) {
  const int64_t nblk = K / B, ng = K / G, per_group = G / B;
  const bool vec = B % 8 == 0 && static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx2);
  // NOTE: one thread below ~1M elements (a parallel region costs more than it saves at decode / small M)
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 20) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (vec) {
        quantize_row_avx2(xf + m * K, K, B, G, q + m * K, bs + m * nblk, bsum + m * nblk, gs + m * ng);
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) gs[m * ng + g] = 0.f;
      for (int64_t b = 0; b < nblk; ++b) {
        const float* xb = xf + m * K + b * B;
        float amax = 0.f;
        for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int64_t i = 0; i < B; ++i) {
          const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
          q[m * K + b * B + i] = static_cast<int8_t>(v);
          sum += v;
        }
        bs[m * nblk + b] = sx;
        bsum[m * nblk + b] = sum;
        gs[m * ng + b / per_group] += sx * float(sum);
      }
    }
  });
}

}  // namespace slf::cpu::quant
