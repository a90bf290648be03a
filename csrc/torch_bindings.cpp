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
  // Per-head QK LayerNorm (optional) + partial NeoX rotary on q/k of the packed qkv [T, (Hq + 2 Hkv) * D];
  // q -> q_out [T, Hq, D], k / v -> the paged cache at slot_mapping (-1 = skip).
  ops.def(
      "qk_norm_rope_cache(Tensor! q_out, Tensor qkv, Tensor positions, Tensor cos_sin, Tensor? q_norm_weight, "
      "Tensor? k_norm_weight, float eps, Tensor! k_cache, Tensor! v_cache, Tensor slot_mapping, int num_q_heads, "
      "int num_kv_heads, int head_dim) -> ()");
  ops.impl("qk_norm_rope_cache", torch::kCPU, &qk_norm_rope_cache);

  // Causal varlen attention over the paged cache (prefill / extend / decode); out, q: [T, Hq, D].
  ops.def(
      "paged_attention(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor context_lens, float scale) -> ()");
  ops.impl("paged_attention", torch::kCPU, &paged_attention);

  // Decode attention: one query token per sequence; out, q: [B, Hq, D].
  ops.def(
      "paged_attention_decode(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> ()");
  ops.impl("paged_attention_decode", torch::kCPU, &paged_attention_decode);

  // Linear layers on weights packed once at load (csrc/cpu/packed.h: the shape tells the layout and so the ISA):
  // out[M, N] = x[M, K] @ W[N, K]^T (+ bias).
  ops.def("linear(Tensor! out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  ops.impl("linear", torch::kCPU, &linear);

  // out[M, I] = silu(x @ Wg^T) * (x @ Wu^T), gate_up_weight = [Wg; Wu] packed with halves=True.
  ops.def("gate_up_silu(Tensor! out, Tensor x, Tensor gate_up_weight) -> ()");
  ops.impl("gate_up_silu", torch::kCPU, &gate_up_silu);
  // out = weight [N, K] packed into the layout out's shape names: [N, K, 1] panels (AVX2 / scalar) or
  // [N, K / 2, 2] vnni (AVX512-BF16 / AMX, bf16); halves: weight = [Wg; Wu], each half packed on its own.
  ops.def("pack_linear_weight(Tensor! out, Tensor weight, bool halves) -> ()");
  ops.impl("pack_linear_weight", torch::kCPU, &pack_linear_weight);
  // The ISA the CPU kernels run with (csrc/cpu/isa.h): "amx", "avx512bf16", "avx2" or "scalar"; probed once,
  // capped by STABLELM_FAST_ISA.
  ops.def("cpu_isa() -> str", &cpu_isa);
  // Weight-only int8 / int4 linear on weights packed by stablelm_fast/ops/cpu_quant.py (csrc/cpu/quant.h):
  // out[M, N] = x @ dequant(W)^T (+ bias); gate_up: W = [Wg; Wu] packed apart, out[M, N / 2] = silu(x Wg^T) * (x Wu^T).
  ops.def(
      "cpu_quant_linear(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
      "int group_size, bool gate_up) -> ()");
  ops.impl("cpu_quant_linear", torch::kCPU, &cpu_quant_linear);
  // The int8 / int4 layout this process packs: "vnni" (AVX512-VNNI), "avx2" or "scalar".
  ops.def("cpu_quant_layout() -> str", &cpu_quant_layout);
  // An uninitialized uint8 [nbytes] CPU tensor for a packed weight: from 2 MiB up, 2 MiB-aligned anonymous memory
  // advised to transparent huge pages (csrc/cpu/memory.cpp); smaller ones as torch.empty.
  ops.def("cpu_weight_empty(int nbytes) -> Tensor", &cpu_weight_empty);
#ifdef SLF_WITH_CUDA
  // CUDA kernels (csrc/cuda/); ops without a CUDA kernel fall back to the reference in ops/cuda_ops.py.
  ops.impl("layernorm", torch::kCUDA, &layernorm_cuda);
  ops.impl("add_layernorm", torch::kCUDA, &add_layernorm_cuda);
  ops.impl("silu_and_mul", torch::kCUDA, &silu_and_mul_cuda);
  ops.impl("qk_norm_rope_cache", torch::kCUDA, &qk_norm_rope_cache_cuda);
  ops.impl("paged_attention_decode", torch::kCUDA, &paged_attention_decode_cuda);
  // Present only in CUDA builds: stablelm_fast.ops.extension_has_cuda() looks for it.
  ops.def("cuda_available() -> bool", &cuda_available);
#endif
}

// An (empty) Python module so that `import stablelm_fast._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
