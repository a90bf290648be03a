// Fused residual-add + LayerNorm (and plain LayerNorm with residual = null) on CUDA. One block per token row;
// the row is kept in registers-or-smem via a two-pass reduction (mean, then centered squares), in fp32.
#include "cuda/cuda_utils.cuh"

namespace slf::cuda {
namespace {

template <typename scalar_t>
__global__ void add_layernorm_kernel(scalar_t* __restrict__ out,           // [T, H]
                                     scalar_t* __restrict__ residual_out,  // [T, H] or null
                                     const scalar_t* __restrict__ x,       // [T, H], row stride x_stride
                                     const scalar_t* __restrict__ residual,  // [T, H] or null
                                     const float* __restrict__ weight,     // [H]
                                     const float* __restrict__ bias,       // [H] or null
                                     float eps, int hidden, int64_t x_stride, int64_t res_stride) {
  extern __shared__ float row[];  // [H] fp32: the (rounded) input row
  const int64_t t = blockIdx.x;
  const scalar_t* xr = x + t * x_stride;
  float sum = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_f32(xr[i]);
    if (residual != nullptr) {
      // NOTE: the sum is rounded to the activation dtype before the norm, like the unfused model.
      const scalar_t r = from_f32<scalar_t>(v + to_f32(residual[t * res_stride + i]));
      residual_out[t * hidden + i] = r;
      v = to_f32(r);
    }
    row[i] = v;
    sum += v;
  }
  const float mean = layernorm_mean(block_sum(sum), hidden);
  float css = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) css += (row[i] - mean) * (row[i] - mean);
  const float rstd = layernorm_rstd(block_sum(css), hidden, eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[t * hidden + i] = from_f32<scalar_t>(layernorm_apply(row[i], mean, rstd, weight[i], bias ? bias[i] : 0.f));
}

}  // namespace

cudaError_t launch_add_layernorm(DType dtype, void* out, void* residual_out, const void* x, const void* residual,
                                 const float* weight, const float* bias, float eps, int64_t num_tokens,
                                 int64_t hidden, int64_t x_stride, int64_t residual_stride, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int threads = hidden >= 1024 ? 1024 : ((int)(hidden + 31) / 32) * 32;
  const size_t smem = hidden * sizeof(float);
  return SLF_CUDA_DISPATCH(dtype, [&] {
    add_layernorm_kernel<scalar_t><<<(unsigned)num_tokens, threads, smem, stream>>>(
        static_cast<scalar_t*>(out), static_cast<scalar_t*>(residual_out), static_cast<const scalar_t*>(x),
        static_cast<const scalar_t*>(residual), weight, bias, eps, (int)hidden, x_stride, residual_stride);
    return cudaGetLastError();
  });
}

}  // namespace slf::cuda
