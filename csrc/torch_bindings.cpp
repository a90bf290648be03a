// The one place where op schemas are declared and bound to their CPU / CUDA implementations.
// Ops are reachable as torch.ops.stablelm_fast.<name>. Out-parameters are marked Tensor!.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(stablelm_fast, ops) {
  // out = layernorm(x) over the last dim; x: [T, H]; weight, bias: [H].
  ops.def("layernorm(Tensor! out, Tensor x, Tensor weight, Tensor? bias, float eps) -> ()");
  ops.impl("layernorm", torch::kCPU, &layernorm);

  // residual_out = x + residual (rounded to x.dtype); out = layernorm(residual_out).
  ops.def(
      "add_layernorm(Tensor! out, Tensor! residual_out, Tensor x, Tensor residual, Tensor weight, Tensor? bias, "
      "float eps) -> ()");
  ops.impl("add_layernorm", torch::kCPU, &add_layernorm);

  // out: [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:].
  ops.def("silu_and_mul(Tensor! out, Tensor gate_up) -> ()");
  ops.impl("silu_and_mul", torch::kCPU, &silu_and_mul);
}

// An (empty) Python module so that `import stablelm_fast._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
