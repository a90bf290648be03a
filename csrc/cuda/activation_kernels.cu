// silu_and_mul on CUDA: gate_up [T, 2I] -> out [T, I] = silu(gate) * up, fp32 math.
#include "cuda/cuda_utils.cuh"

namespace slf::cuda {
namespace {

template <typename scalar_t>
__global__ void silu_and_mul_kernel(scalar_t* __restrict__ out,            // [T, I]
                                    const scalar_t* __restrict__ gate_up,  // [T, 2I], row stride in_stride
                                    int64_t inter, int64_t in_stride) {
  const int64_t t = blockIdx.y;
  const scalar_t* g = gate_up + t * in_stride;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < inter; i += (int64_t)gridDim.x * blockDim.x)
    out[t * inter + i] = from_f32<scalar_t>(silu(to_f32(g[i])) * to_f32(g[inter + i]));
}

}  // namespace

cudaError_t launch_silu_and_mul(DType dtype, void* out, const void* gate_up, int64_t num_tokens, int64_t inter,
                                int64_t in_stride, cudaStream_t stream) {
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  const int threads = 256;
  int64_t bx = (inter + threads - 1) / threads;
  if (bx > 64) bx = 64;  // NOTE: grid-stride over I; a grid y-dimension per token (<= 65535 tokens per launch)
  if (num_tokens > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)bx, (unsigned)num_tokens);
  return SLF_CUDA_DISPATCH(dtype, [&] {
    silu_and_mul_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<const scalar_t*>(gate_up), inter, in_stride);
    return cudaGetLastError();
  });
}

}  // namespace slf::cuda
