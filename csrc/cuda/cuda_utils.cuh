// Device helpers shared by the CUDA kernels: dtype conversion, warp / block reductions, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/math_utils.h"
#include "cuda/launchers.h"

namespace slf::cuda {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < nwarps ? partial[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace slf::cuda

// Runs the body with `scalar_t` bound to the element type of `dtype`.
#define SLF_CUDA_DISPATCH(dtype, ...)                                  \
  [&]() -> cudaError_t {                                               \
    switch (dtype) {                                                   \
      case ::slf::cuda::DType::kFloat32: {                             \
        using scalar_t = float;                                        \
        return __VA_ARGS__();                                          \
      }                                                                \
      case ::slf::cuda::DType::kFloat16: {                             \
        using scalar_t = __half;                                       \
        return __VA_ARGS__();                                          \
      }                                                                \
      case ::slf::cuda::DType::kBFloat16: {                            \
        using scalar_t = __nv_bfloat16;                                \
        return __VA_ARGS__();                                          \
      }                                                                \
    }                                                                  \
    return cudaErrorInvalidValue;                                      \
  }()
