// silu_and_mul on CPU: gate_up [T, 2I] (gate first) -> out [T, I] = silu(gate) * up, in fp32.
#include "cpu/cpu_types.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace slf::cpu {
namespace {

template <typename scalar_t>
SLF_AVX2 void silu_and_mul_span_avx2(scalar_t* o, const scalar_t* g, const scalar_t* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(o + i, _mm256_mul_ps(silu8(load8(g + i)), load8(u + i)));
  for (; i < n; ++i) o[i] = from_float<scalar_t>(silu(to_float(g[i])) * to_float(u[i]));
}

// out: [T, I]; gate_up: [T, 2I] with row stride `in_stride`.
template <typename scalar_t>
void silu_and_mul_rows(scalar_t* out, const scalar_t* gate_up, int64_t num_tokens, int64_t inter,
                       int64_t in_stride) {
  // NOTE: parallel over the flattened [T, I] range so that decode (T = 1) still uses every thread.
  const int64_t chunk = 512;
  const int64_t chunks_per_row = (inter + chunk - 1) / chunk;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, num_tokens * chunks_per_row, 8, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / chunks_per_row, i0 = (w % chunks_per_row) * chunk;
      const int64_t i1 = std::min(inter, i0 + chunk);
      const scalar_t* g = gate_up + t * in_stride;  // [2I]
      const scalar_t* u = g + inter;
      scalar_t* o = out + t * inter;  // [I]
      if (avx2) {
        silu_and_mul_span_avx2(o + i0, g + i0, u + i0, i1 - i0);
        continue;
      }
      for (int64_t i = i0; i < i1; ++i) o[i] = from_float<scalar_t>(silu(to_float(g[i])) * to_float(u[i]));
    }
  });
}

}  // namespace
}  // namespace slf::cpu

void silu_and_mul(torch::Tensor& out, const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1,
              "gate_up must be [num_tokens, 2 * intermediate] with contiguous rows");
  slf::cpu::check_floating(gate_up, "gate_up");
  const int64_t num_tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(out.is_contiguous() && out.size(0) == num_tokens && out.size(1) == inter &&
                  out.scalar_type() == gate_up.scalar_type(),
              "out must be contiguous [num_tokens, intermediate] of gate_up's dtype");
  SLF_DISPATCH_FLOATING_TYPES(gate_up.scalar_type(), "silu_and_mul", [&] {
    slf::cpu::silu_and_mul_rows<scalar_t>(out.data_ptr<scalar_t>(),      // [T, I]
                                          gate_up.data_ptr<scalar_t>(),  // [T, 2I]
                                          num_tokens, inter, gate_up.stride(0));
  });
}
