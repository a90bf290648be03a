// Raw-pointer host launchers of the CUDA kernels (csrc/cuda/*_kernels.cu). This header and the kernels depend on
// the CUDA runtime only, not on torch, so csrc/cuda/check.sh can compile them on any machine with nvcc; the
// torch-facing wrappers (device guard, current stream, checks) live in torch_wrappers.cu (SLF_WITH_CUDA only).
// Every launcher enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace slf::cuda {

// Activation / cache element type of a launch.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out = layernorm(x (+ residual)) over rows of `hidden`; with residual non-null, residual_out = x + residual
// (rounded to the dtype) is what gets normalized. weight / bias: fp32 [hidden] (bias may be null).
cudaError_t launch_add_layernorm(DType dtype, void* out, void* residual_out, const void* x, const void* residual,
                                 const float* weight, const float* bias, float eps, int64_t num_tokens,
                                 int64_t hidden, int64_t x_stride, int64_t residual_stride, cudaStream_t stream);

// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]; gate_up row stride in_stride.
cudaError_t launch_silu_and_mul(DType dtype, void* out, const void* gate_up, int64_t num_tokens, int64_t inter,
                                int64_t in_stride, cudaStream_t stream);

// Per-head QK LayerNorm (optional) + NeoX rotary + paged cache write; see reference.qk_norm_rope_cache.
cudaError_t launch_qk_norm_rope_cache(DType dtype, void* q_out, const void* qkv, const int64_t* positions,
                                      const float* cos_sin, const float* q_norm_w, const float* k_norm_w,
                                      void* k_cache, void* v_cache, const int64_t* slot_mapping,
                                      int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                                      int rotary_dim, int64_t qkv_stride, int block_size,
                                      int64_t cache_block_stride, int64_t cache_token_stride,
                                      int64_t cache_head_stride, float eps, cudaStream_t stream);

// Decode attention: out, q [B, Hq, D] (token stride q_stride / out_stride, heads contiguous), cache
// [num_blocks, block_size, Hkv, D], block_tables [B, bt_stride] int32, context_lens [B] int32.
cudaError_t launch_paged_attention_decode(DType dtype, void* out, const void* q, const void* k_cache,
                                          const void* v_cache, const int32_t* block_tables,
                                          const int32_t* context_lens, int num_seqs, int num_q_heads,
                                          int num_kv_heads, int head_dim, int block_size, int64_t bt_stride,
                                          int64_t q_stride, int64_t out_stride, int64_t cache_block_stride,
                                          int64_t cache_token_stride, int64_t cache_head_stride, float scale,
                                          cudaStream_t stream);

}  // namespace slf::cuda
