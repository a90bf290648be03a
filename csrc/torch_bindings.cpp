// The one place where op schemas are declared and bound to their CPU / CUDA implementations.
// Ops are reachable as torch.ops.stablelm_fast.<name>. Out-parameters are marked Tensor!.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(stablelm_fast, ops) {
}

// An (empty) Python module so that `import stablelm_fast._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
