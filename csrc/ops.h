// Declarations of every op in stablelm_fast._C. Schemas live in torch_bindings.cpp (one per op).
// Out-parameters come first and are written in place; outputs are allocated by the Python wrappers
// (stablelm_fast/ops/cpu_ops.py, cuda_ops.py).
#pragma once
#include <torch/all.h>

#include <optional>

// ---- CPU (csrc/cpu/) ----

// csrc/cpu/layernorm.cpp
void layernorm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
               const std::optional<torch::Tensor>& bias, double eps);
void add_layernorm(torch::Tensor& out, torch::Tensor& residual_out, const torch::Tensor& x,
                   const torch::Tensor& residual, const torch::Tensor& weight,
                   const std::optional<torch::Tensor>& bias, double eps);

// csrc/cpu/activation.cpp
void silu_and_mul(torch::Tensor& out, const torch::Tensor& gate_up);
