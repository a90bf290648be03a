// The load-time quantizer of the cpu backend: ops/quant_reference.py's quantize_weight (round to nearest, scales on
// the fp16 grid) in C++, to the bit, one pass over each group. The torch reference makes ~10 full passes over the
// weight in fp32 temporaries: quantizing the 1.6B at load took ~25 s of its ~40 s int4 load (Zen 4, cProfile).
// Same arithmetic as the reference: fp32 max / divide / add (no FMA contraction: ISO C++ mode), round half to even
// (nearbyint), fp16 by round to nearest even (c10::Half).
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_types.h"

namespace slf::cpu {
namespace {

constexpr float kFp16Smallest = 5.9604644775390625e-8f;  // 2^-24
constexpr float kFp16Max = 65504.f;

// quant_reference.fp16_grid of a positive scale (0 or NaN: 1, as torch.where(scales > 0, scales, 1) before it).
float fp16_grid(float s) {
  if (!(s > 0.f)) s = 1.f;
  return static_cast<float>(c10::Half(std::min(std::max(s, kFp16Smallest), kFp16Max)));
}

// One group of g weights (fp32 in w) -> quantized values in q (stored form: q + the default zero when symmetric),
// its scale, and its zero point (asymmetric).
void quantize_group(const float* w, int64_t g, int bits, bool sym, int32_t* q, float* scale, uint8_t* zero) {
  if (sym) {
    const int qmax = (1 << (bits - 1)) - 1, def = bits == 8 ? 0 : 1 << (bits - 1);
    float amax = 0.f;
    for (int64_t i = 0; i < g; ++i) amax = std::max(amax, std::fabs(w[i]));
    const float s = fp16_grid(amax / static_cast<float>(qmax));
    for (int64_t i = 0; i < g; ++i) {
      const float r = std::min(std::max(std::nearbyint(w[i] / s), static_cast<float>(-qmax - 1)),
                               static_cast<float>(qmax));
      q[i] = static_cast<int32_t>(r) + def;
    }
    *scale = s;
    return;
  }
  const float levels = static_cast<float>((1 << bits) - 1);
  float lo = w[0], hi = w[0];
  for (int64_t i = 1; i < g; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  const float s = fp16_grid((hi - lo) / levels);
  const float z = std::min(std::max(std::nearbyint(-lo / s), 0.f), levels);
  for (int64_t i = 0; i < g; ++i) {
    const float v = w[i] / s + z;
    q[i] = static_cast<int32_t>(std::min(std::max(std::nearbyint(v), 0.f), levels));
  }
  *scale = s;
  *zero = static_cast<uint8_t>(z);
}

}  // namespace
}  // namespace slf::cpu

// weight [N, K] (float / bf16 / fp16) -> qweight (int8 [N, K]; uint8 [N, K / 2] nibbles for int4, k even low; uint8
// [N, K] for int6), scales fp32 [N, K / G], zeros uint8 [N, K / G] (given: asymmetric) - the canonical form.
void cpu_quantize_weight(torch::Tensor& qweight, torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
                         const torch::Tensor& weight, int64_t bits, int64_t group_size) {
  using namespace slf::cpu;
  TORCH_CHECK(bits == 8 || bits == 6 || bits == 4, "bits must be 8, 6 or 4, got ", bits);
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "weight must be [N, K] with contiguous rows");
  check_floating(weight, "weight");
  const int64_t N = weight.size(0), K = weight.size(1), G = group_size;
  TORCH_CHECK(G > 0 && K % G == 0, "group_size must divide K = ", K, "; got ", G);
  TORCH_CHECK(bits != 4 || K % 2 == 0, "int4 weights need an even K, got ", K);
  const bool sym = !zeros.has_value();
  TORCH_CHECK(sym || bits != 8, "asymmetric int8 is not supported");
  const int64_t qcols = bits == 4 ? K / 2 : K;
  TORCH_CHECK(qweight.is_contiguous() && qweight.size(0) == N && qweight.size(1) == qcols &&
                  qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "qweight must be contiguous [N, ", qcols, "] of ", bits == 8 ? "int8" : "uint8");
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == N && scales.size(1) == K / G &&
                  scales.scalar_type() == at::kFloat, "scales must be contiguous float32 [N, K / G]");
  TORCH_CHECK(sym || (zeros->is_contiguous() && zeros->sizes() == scales.sizes() &&
                      zeros->scalar_type() == at::kByte),
              "zeros must be contiguous uint8 [N, K / G]");
  uint8_t* qb = reinterpret_cast<uint8_t*>(qweight.data_ptr());
  float* sb = scales.data_ptr<float>();
  uint8_t* zb = sym ? nullptr : zeros->data_ptr<uint8_t>();
  SLF_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "cpu_quantize_weight", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t ld = weight.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<float> wf(K);
      std::vector<int32_t> q(K);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = 0; k < K; ++k) wf[k] = to_float(w[n * ld + k]);
        for (int64_t g = 0; g < K / G; ++g)
          quantize_group(wf.data() + g * G, G, static_cast<int>(bits), sym, q.data() + g * G,
                         sb + n * (K / G) + g, sym ? nullptr : zb + n * (K / G) + g);
        uint8_t* row = qb + n * qcols;
        if (bits == 4) {
          for (int64_t k = 0; k < K; k += 2) row[k / 2] = static_cast<uint8_t>(q[k] | (q[k + 1] << 4));
        } else {
          for (int64_t k = 0; k < K; ++k) row[k] = static_cast<uint8_t>(static_cast<int8_t>(q[k]));
        }
      }
    });
  });
}

TORCH_LIBRARY_FRAGMENT(stablelm_fast, m) {
  // The canonical form of ops/quant_reference.py's quantize_weight, bit for bit (zeros given: asymmetric).
  m.def("cpu_quantize_weight(Tensor! qweight, Tensor! scales, Tensor!? zeros, Tensor weight, int bits, "
        "int group_size) -> ()");
  m.impl("cpu_quantize_weight", torch::kCPU, &cpu_quantize_weight);
}
