// Torch-facing wrappers of the CUDA launchers: argument checks, device guard, current stream. Compiled only in
// CUDA builds of the extension (setup.py defines SLF_WITH_CUDA); registered in csrc/torch_bindings.cpp.
#ifdef SLF_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "cuda/launchers.h"
#include "ops.h"

namespace {

slf::cuda::DType to_dtype(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return slf::cuda::DType::kFloat32;
    case at::kHalf: return slf::cuda::DType::kFloat16;
    case at::kBFloat16: return slf::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

torch::Tensor f32(const torch::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

void add_layernorm_cuda(torch::Tensor& out, torch::Tensor& residual_out, const torch::Tensor& x,
                        const torch::Tensor& residual, const torch::Tensor& weight,
                        const std::optional<torch::Tensor>& bias, double eps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a CUDA [T, H] tensor, contiguous rows");
  TORCH_CHECK(out.is_contiguous() && residual_out.is_contiguous() && residual.stride(1) == 1,
              "out / residual_out must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const torch::Tensor w = f32(weight), b = bias.has_value() ? f32(*bias) : torch::Tensor();
  check_launch(slf::cuda::launch_add_layernorm(to_dtype(x), out.data_ptr(), residual_out.data_ptr(), x.data_ptr(),
                                               residual.data_ptr(), w.data_ptr<float>(),
                                               b.defined() ? b.data_ptr<float>() : nullptr, (float)eps, x.size(0),
                                               x.size(1), x.stride(0), residual.stride(0),
                                               c10::cuda::getCurrentCUDAStream()),
               "add_layernorm");
}

void layernorm_cuda(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
                    const std::optional<torch::Tensor>& bias, double eps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a CUDA [T, H] tensor, contiguous rows");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const torch::Tensor w = f32(weight), b = bias.has_value() ? f32(*bias) : torch::Tensor();
  check_launch(slf::cuda::launch_add_layernorm(to_dtype(x), out.data_ptr(), nullptr, x.data_ptr(), nullptr,
                                               w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                                               (float)eps, x.size(0), x.size(1), x.stride(0), 0,
                                               c10::cuda::getCurrentCUDAStream()),
               "layernorm");
}

void silu_and_mul_cuda(torch::Tensor& out, const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_cuda() && gate_up.dim() == 2 && gate_up.stride(1) == 1 && out.is_contiguous(),
              "gate_up must be a CUDA [T, 2I] tensor with contiguous rows");
  const c10::cuda::OptionalCUDAGuard guard(device_of(gate_up));
  check_launch(slf::cuda::launch_silu_and_mul(to_dtype(gate_up), out.data_ptr(), gate_up.data_ptr(),
                                              gate_up.size(0), gate_up.size(1) / 2, gate_up.stride(0),
                                              c10::cuda::getCurrentCUDAStream()),
               "silu_and_mul");
}

void qk_norm_rope_cache_cuda(torch::Tensor& q_out, const torch::Tensor& qkv, const torch::Tensor& positions,
                             const torch::Tensor& cos_sin, const std::optional<torch::Tensor>& q_norm_weight,
                             const std::optional<torch::Tensor>& k_norm_weight, double eps, torch::Tensor& k_cache,
                             torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_q_heads,
                             int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be a CUDA [T, W] tensor");
  TORCH_CHECK(q_out.is_contiguous() && k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "q_out must be contiguous; caches [blocks, bs, Hkv, D] with equal strides");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type(), "the KV cache must have qkv's dtype");
  const c10::cuda::OptionalCUDAGuard guard(device_of(qkv));
  const torch::Tensor pos = positions.to(at::kLong).contiguous(), slots = slot_mapping.to(at::kLong).contiguous();
  const torch::Tensor cs = f32(cos_sin);
  const torch::Tensor qw = q_norm_weight.has_value() ? f32(*q_norm_weight) : torch::Tensor();
  const torch::Tensor kw = k_norm_weight.has_value() ? f32(*k_norm_weight) : torch::Tensor();
  check_launch(slf::cuda::launch_qk_norm_rope_cache(
                   to_dtype(qkv), q_out.data_ptr(), qkv.data_ptr(), pos.data_ptr<int64_t>(), cs.data_ptr<float>(),
                   qw.defined() ? qw.data_ptr<float>() : nullptr, kw.defined() ? kw.data_ptr<float>() : nullptr,
                   k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr<int64_t>(), qkv.size(0), (int)num_q_heads,
                   (int)num_kv_heads, (int)head_dim, (int)cs.size(1), qkv.stride(0), (int)k_cache.size(1),
                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), (float)eps,
                   c10::cuda::getCurrentCUDAStream()),
               "qk_norm_rope_cache");
}

void paged_attention_decode_cuda(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                                 const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                 const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [B, Hq, D]");
  TORCH_CHECK(out.is_contiguous() && k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "out must be contiguous; caches [blocks, bs, Hkv, D] with equal strides");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  context_lens.is_contiguous() && block_tables.stride(1) == 1,
              "block_tables / context_lens must be int32");
  const c10::cuda::OptionalCUDAGuard guard(device_of(q));
  check_launch(slf::cuda::launch_paged_attention_decode(
                   to_dtype(q), out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(), (int)q.size(0),
                   (int)q.size(1), (int)k_cache.size(2), (int)q.size(2), (int)k_cache.size(1),
                   block_tables.stride(0), q.stride(0), out.stride(0), k_cache.stride(0), k_cache.stride(1),
                   k_cache.stride(2), (float)scale, c10::cuda::getCurrentCUDAStream()),
               "paged_attention_decode");
}

bool cuda_available() { return true; }

#endif  // SLF_WITH_CUDA
