// Fused per-head QK LayerNorm + partial NeoX rotary + paged KV-cache write on CUDA.
// One warp per (token, head) of the Hq + Hkv q/k heads; the k warp also copies v into the cache.
#include "cuda/cuda_utils.cuh"

namespace slf::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;

template <typename scalar_t>
__global__ void qk_norm_rope_cache_kernel(scalar_t* __restrict__ q_out,            // [T, Hq, D]
                                          const scalar_t* __restrict__ qkv,        // [T, (Hq + 2 Hkv) * D]
                                          const int64_t* __restrict__ positions,   // [T]
                                          const float* __restrict__ cos_sin,       // [max_pos, rotary_dim]
                                          const float* __restrict__ q_norm_w,      // [Hq, D] or null
                                          const float* __restrict__ k_norm_w,      // [Hkv, D] or null
                                          scalar_t* __restrict__ k_cache,          // [blocks, bs, Hkv, D]
                                          scalar_t* __restrict__ v_cache,          // [blocks, bs, Hkv, D]
                                          const int64_t* __restrict__ slot_mapping,  // [T]
                                          int64_t num_tokens, int hq, int hkv, int head_dim, int rotary_dim,
                                          int64_t qkv_stride, int block_size, int64_t c_block_stride,
                                          int64_t c_token_stride, int64_t c_head_stride, float eps) {
  __shared__ float buf[kWarps][kMaxHeadDim];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int heads = hq + hkv;
  const int64_t item = (int64_t)blockIdx.x * kWarps + warp;
  if (item >= num_tokens * heads) return;  // whole warp exits together
  const int64_t t = item / heads;
  const int h = (int)(item % heads);
  const bool is_q = h < hq;
  const int64_t slot = slot_mapping[t];
  if (!is_q && slot < 0) return;
  float* x = buf[warp];
  const scalar_t* src = qkv + t * qkv_stride + (int64_t)h * head_dim;
  float sum = 0.f;
  for (int i = lane; i < head_dim; i += 32) {
    x[i] = to_f32(src[i]);
    sum += x[i];
  }
  const float* nw = is_q ? (q_norm_w ? q_norm_w + (int64_t)h * head_dim : nullptr)
                         : (k_norm_w ? k_norm_w + (int64_t)(h - hq) * head_dim : nullptr);
  if (nw != nullptr) {
    const float mean = layernorm_mean(warp_sum(sum), head_dim);
    float css = 0.f;
    for (int i = lane; i < head_dim; i += 32) css += (x[i] - mean) * (x[i] - mean);
    const float rstd = layernorm_rstd(warp_sum(css), head_dim, eps);
    // NOTE: rounded to the activation dtype before rotary, like the unfused model.
    for (int i = lane; i < head_dim; i += 32)
      x[i] = to_f32(from_f32<scalar_t>(layernorm_apply(x[i], mean, rstd, nw[i], 0.f)));
  }
  __syncwarp();
  const int half = rotary_dim / 2;
  const float* cs = cos_sin + positions[t] * rotary_dim;
  for (int i = lane; i < half; i += 32) {
    float o1, o2;
    rotate_pair(x[i], x[i + half], cs[i], cs[half + i], &o1, &o2);
    x[i] = o1;
    x[i + half] = o2;
  }
  __syncwarp();
  if (is_q) {
    scalar_t* dst = q_out + (t * hq + h) * head_dim;
    for (int i = lane; i < head_dim; i += 32) dst[i] = from_f32<scalar_t>(x[i]);
  } else {
    const int kh = h - hq;
    const int64_t off = (slot / block_size) * c_block_stride + (slot % block_size) * c_token_stride +
                        (int64_t)kh * c_head_stride;
    const scalar_t* vs = src + (int64_t)hkv * head_dim;
    for (int i = lane; i < head_dim; i += 32) {
      k_cache[off + i] = from_f32<scalar_t>(x[i]);
      v_cache[off + i] = vs[i];
    }
  }
}

}  // namespace

cudaError_t launch_qk_norm_rope_cache(DType dtype, void* q_out, const void* qkv, const int64_t* positions,
                                      const float* cos_sin, const float* q_norm_w, const float* k_norm_w,
                                      void* k_cache, void* v_cache, const int64_t* slot_mapping,
                                      int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                                      int rotary_dim, int64_t qkv_stride, int block_size,
                                      int64_t cache_block_stride, int64_t cache_token_stride,
                                      int64_t cache_head_stride, float eps, cudaStream_t stream) {
  if (head_dim > kMaxHeadDim || rotary_dim > head_dim || rotary_dim % 2 != 0) return cudaErrorInvalidValue;
  const int64_t items = num_tokens * (num_q_heads + num_kv_heads);
  if (items == 0) return cudaSuccess;
  const unsigned blocks = (unsigned)((items + kWarps - 1) / kWarps);
  return SLF_CUDA_DISPATCH(dtype, [&] {
    qk_norm_rope_cache_kernel<scalar_t><<<blocks, kWarps * 32, 0, stream>>>(
        static_cast<scalar_t*>(q_out), static_cast<const scalar_t*>(qkv), positions, cos_sin, q_norm_w, k_norm_w,
        static_cast<scalar_t*>(k_cache), static_cast<scalar_t*>(v_cache), slot_mapping, num_tokens, num_q_heads,
        num_kv_heads, head_dim, rotary_dim, qkv_stride, block_size, cache_block_stride, cache_token_stride,
        cache_head_stride, eps);
    return cudaGetLastError();
  });
}

}  // namespace slf::cuda
