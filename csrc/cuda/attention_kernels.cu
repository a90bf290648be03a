// Paged decode attention on CUDA: one block per (q head, sequence), 4 warps. Each warp walks a strided subset of
// the context keys with its own online softmax (lane l holds dims l, l + 32, ...), then the 4 partial states are
// merged with softmax_merge. fp32 scores / softmax / accumulation.
#include "cuda/cuda_utils.cuh"

namespace slf::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / 32;

template <typename scalar_t>
__global__ void paged_attention_decode_kernel(scalar_t* __restrict__ out,            // [B, Hq, D]
                                              const scalar_t* __restrict__ q,        // [B, Hq, D]
                                              const scalar_t* __restrict__ k_cache,  // [blocks, bs, Hkv, D]
                                              const scalar_t* __restrict__ v_cache,  // [blocks, bs, Hkv, D]
                                              const int32_t* __restrict__ block_tables,  // [B, bt_stride]
                                              const int32_t* __restrict__ context_lens,  // [B]
                                              int group, int head_dim, int block_size, int64_t bt_stride,
                                              int64_t q_stride, int64_t out_stride, int64_t c_block_stride,
                                              int64_t c_token_stride, int64_t c_head_stride, float scale) {
  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ float s_acc[kWarps][kMaxHeadDim];
  const int h = blockIdx.x, b = blockIdx.y, kh = h / group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ctx = context_lens[b];
  const int32_t* bt = block_tables + b * bt_stride;
  float qv[kPerLane], acc[kPerLane];
  const scalar_t* qh = q + b * q_stride + (int64_t)h * head_dim;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < head_dim ? to_f32(qh[d]) : 0.f;
    acc[i] = 0.f;
  }
  SoftmaxState st = softmax_init();
  for (int j = warp; j < ctx; j += kWarps) {
    const int64_t off = (int64_t)bt[j / block_size] * c_block_stride + (int64_t)(j % block_size) * c_token_stride +
                        (int64_t)kh * c_head_stride;
    const scalar_t* kp = k_cache + off;
    const scalar_t* vp = v_cache + off;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) dot += qv[i] * to_f32(kp[d]);
    }
    const float s = warp_sum(dot) * scale;
    const float alpha = softmax_rescale(&st, s);
    const float p = expf(s - st.m);
    st.l += p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) acc[i] = acc[i] * alpha + p * to_f32(vp[d]);
    }
  }
  if (lane == 0) {
    s_m[warp] = st.m;
    s_l[warp] = st.l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) s_acc[warp][d] = acc[i];
  }
  __syncthreads();
  if (warp == 0) {
    SoftmaxState total{s_m[0], s_l[0]};
    float fac[kWarps];
    fac[0] = 1.f;
    for (int w = 1; w < kWarps; ++w) {
      float fa, fb;
      total = softmax_merge(total, SoftmaxState{s_m[w], s_l[w]}, &fa, &fb);
      for (int v = 0; v < w; ++v) fac[v] *= fa;
      fac[w] = fb;
    }
    const float inv = 1.f / total.l;
    scalar_t* o = out + b * out_stride + (int64_t)h * head_dim;
    for (int d = lane; d < head_dim; d += 32) {
      float a = 0.f;
      for (int w = 0; w < kWarps; ++w)
        if (fac[w] != 0.f) a += s_acc[w][d] * fac[w];  // NOTE: a warp that saw no key has fac 0: skip it
      o[d] = from_f32<scalar_t>(a * inv);
    }
  }
}

}  // namespace

cudaError_t launch_paged_attention_decode(DType dtype, void* out, const void* q, const void* k_cache,
                                          const void* v_cache, const int32_t* block_tables,
                                          const int32_t* context_lens, int num_seqs, int num_q_heads,
                                          int num_kv_heads, int head_dim, int block_size, int64_t bt_stride,
                                          int64_t q_stride, int64_t out_stride, int64_t cache_block_stride,
                                          int64_t cache_token_stride, int64_t cache_head_stride, float scale,
                                          cudaStream_t stream) {
  if (head_dim > kMaxHeadDim || num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) return cudaErrorInvalidValue;
  if (num_seqs == 0) return cudaSuccess;
  if (num_seqs > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(num_q_heads, num_seqs);
  return SLF_CUDA_DISPATCH(dtype, [&] {
    paged_attention_decode_kernel<scalar_t><<<grid, kWarps * 32, 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k_cache),
        static_cast<const scalar_t*>(v_cache), block_tables, context_lens, num_q_heads / num_kv_heads, head_dim,
        block_size, bt_stride, q_stride, out_stride, cache_block_stride, cache_token_stride, cache_head_stride,
        scale);
    return cudaGetLastError();
  });
}

}  // namespace slf::cuda
