// Declarations of every op in stablelm_fast._C. Schemas live in torch_bindings.cpp (one per op).
// Out-parameters come first and are written in place; outputs are allocated by the Python wrappers
// (stablelm_fast/ops/cpu_ops.py, cuda_ops.py).
#pragma once
#include <torch/all.h>

#include <optional>
#include <string>

// ---- CPU (csrc/cpu/) ----

// csrc/cpu/layernorm.cpp
void layernorm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
               const std::optional<torch::Tensor>& bias, double eps);
void add_layernorm(torch::Tensor& out, torch::Tensor& residual_out, const torch::Tensor& x,
                   const torch::Tensor& residual, const torch::Tensor& weight,
                   const std::optional<torch::Tensor>& bias, double eps);

// csrc/cpu/activation.cpp
void silu_and_mul(torch::Tensor& out, const torch::Tensor& gate_up);

// csrc/cpu/pos_encoding.cpp
void qk_norm_rope_cache(torch::Tensor& q_out, const torch::Tensor& qkv, const torch::Tensor& positions,
                        const torch::Tensor& cos_sin, const std::optional<torch::Tensor>& q_norm_weight,
                        const std::optional<torch::Tensor>& k_norm_weight, double eps, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_q_heads,
                        int64_t num_kv_heads, int64_t head_dim);

// csrc/cpu/attention.cpp
void paged_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                     const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens, double scale);
void paged_attention_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale);

// csrc/cpu/linear.cpp: weights packed by pack_linear_weight (layouts in csrc/cpu/packed.h)
void linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
            const std::optional<torch::Tensor>& bias);
void gate_up_silu(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& gate_up_weight);
void pack_linear_weight(torch::Tensor& out, const torch::Tensor& weight, bool halves);
std::string cpu_isa();

// csrc/cpu/quant_linear.cpp: weight-only int8 / int4 on weights packed by ops/cpu_quant.py (layout in cpu/quant.h)
void cpu_quant_linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                      const torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
                      const std::optional<torch::Tensor>& bias, int64_t bits, int64_t group_size, bool gate_up);
std::string cpu_quant_layout();

// csrc/cpu/memory.cpp: an uninitialized uint8 buffer for a load-time packed weight (2 MiB-aligned, huge pages advised)
torch::Tensor cpu_weight_empty(int64_t nbytes);

// ---- CUDA (csrc/cuda/torch_wrappers.cu; only in builds with SLF_WITH_CUDA) ----
#ifdef SLF_WITH_CUDA
void layernorm_cuda(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
                    const std::optional<torch::Tensor>& bias, double eps);
void add_layernorm_cuda(torch::Tensor& out, torch::Tensor& residual_out, const torch::Tensor& x,
                        const torch::Tensor& residual, const torch::Tensor& weight,
                        const std::optional<torch::Tensor>& bias, double eps);
void silu_and_mul_cuda(torch::Tensor& out, const torch::Tensor& gate_up);
void qk_norm_rope_cache_cuda(torch::Tensor& q_out, const torch::Tensor& qkv, const torch::Tensor& positions,
                             const torch::Tensor& cos_sin, const std::optional<torch::Tensor>& q_norm_weight,
                             const std::optional<torch::Tensor>& k_norm_weight, double eps, torch::Tensor& k_cache,
                             torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_q_heads,
                             int64_t num_kv_heads, int64_t head_dim);
void paged_attention_decode_cuda(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                                 const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                 const torch::Tensor& context_lens, double scale);
bool cuda_available();
#endif
