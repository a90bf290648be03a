// The linear-layer ops on packed weights (packed.h): argument checks, then one dispatch on the weight's layout and
// the process's ISA (isa.h). Row-major weights are the Python wrapper's business (ops/cpu_linear.py).
#include "cpu/amx.h"
#include "cpu/cpu_types.h"
#include "cpu/packed.h"
#include "ops.h"

namespace slf::cpu {
namespace {

// out[M, n_out] = the GEMM of x with packed (gate_up: n_out = I of the stacked [Wg; Wu]).
void run_packed(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed,
                const std::optional<torch::Tensor>& bias, bool gate_up) {
  check_floating(x, "x");
  const Layout layout = layout_of(packed);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "packed weight and x must have the same dtype, got ",
              packed.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(packed.size(1) * packed.size(2) == x.size(1), "packed weight is for K = ",
              packed.size(1) * packed.size(2), " but x has K = ", x.size(1));
  TORCH_CHECK(!gate_up || packed.size(0) % 2 == 0, "packed gate_up weight must have an even number of rows");
  const int64_t n_out = gate_up ? packed.size(0) / 2 : packed.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n_out && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              "out must be [M, ", n_out, "] of x's dtype with contiguous rows");
  thread_local std::vector<float> bias_buf;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out, "bias must be [N] = [", n_out, "]");
    bp = slf::cpu::fp32_vector(*bias, bias_buf);
  }
  if (x.size(0) == 0 || n_out == 0) return;
  if (layout == Layout::kVnni) {
    TORCH_CHECK(static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx512Bf16),
                "this weight was packed for avx512bf16 (vnni layout) but the process runs ", isa_name(cpu_isa()),
                " (STABLELM_FAST_ISA / the CPU): pack weights in the process that uses them");
    if (amx::use(x.size(0), x.size(1))) return amx_gemm(out, x, packed, bp, gate_up);
    return vnni_gemm(out, x, packed, bp, gate_up);
  }
  if (cpu_has_avx2()) return panel_gemm(out, x, packed, bp, gate_up);
  scalar_gemm(out, x, packed, bp, gate_up);
}

}  // namespace
}  // namespace slf::cpu

void linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
            const std::optional<torch::Tensor>& bias) {
  slf::cpu::run_packed(out, x, weight, bias, false);
}

void gate_up_silu(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& gate_up_weight) {
  slf::cpu::run_packed(out, x, gate_up_weight, std::nullopt, true);
}

void pack_linear_weight(torch::Tensor& out, const torch::Tensor& weight, bool halves) {
  slf::cpu::pack_weight(out, weight, halves);
}

std::string cpu_isa() { return slf::cpu::isa_name(slf::cpu::cpu_isa()); }
