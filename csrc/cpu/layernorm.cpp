// LayerNorm (with optional bias) and fused residual-add + LayerNorm on CPU.
// Semantics of stablelm_fast/ops/reference.py: statistics and the affine transform in fp32; the residual sum is
// rounded to the activation dtype before it is normalized.
#include <vector>

#include "cpu/cpu_types.h"
#include "ops.h"

namespace slf::cpu {
namespace {

// Loads one row into fp32 `buf`; with `res` given, adds it, rounds the sum to scalar_t and stores it to `res_out`.
// Returns sum(buf).
template <typename scalar_t>
float load_row_scalar(const scalar_t* x, const scalar_t* res, scalar_t* res_out, float* buf, int64_t h) {
  float sum = 0.f;
  for (int64_t i = 0; i < h; ++i) {
    float v = to_float(x[i]);
    if (res != nullptr) {
      const scalar_t r = from_float<scalar_t>(v + to_float(res[i]));
      res_out[i] = r;
      v = to_float(r);
    }
    buf[i] = v;
    sum += v;
  }
  return sum;
}

template <typename scalar_t>
SLF_AVX2 float load_row_avx2(const scalar_t* x, const scalar_t* res, scalar_t* res_out, float* buf, int64_t h) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    __m256 v = load8(x + i);
    if (res != nullptr) {
      store8(res_out + i, _mm256_add_ps(v, load8(res + i)));
      v = load8(res_out + i);  // the rounded sum
    }
    _mm256_storeu_ps(buf + i, v);
    acc = _mm256_add_ps(acc, v);
  }
  float sum = hsum8(acc);
  if (i < h) sum += load_row_scalar(x + i, res ? res + i : nullptr, res_out ? res_out + i : nullptr, buf + i, h - i);
  return sum;
}

SLF_AVX2 float centered_sq_sum_avx2(const float* buf, float mean, int64_t h) {
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(buf + i), vm);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  float s = hsum8(acc);
  for (; i < h; ++i) s += (buf[i] - mean) * (buf[i] - mean);
  return s;
}

template <typename scalar_t>
SLF_AVX2 void apply_avx2(const float* buf, float mean, float rstd, const float* w, const float* b, scalar_t* out,
                         int64_t h) {
  const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + i), vm), vr), _mm256_loadu_ps(w + i));
    if (b != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(b + i));
    store8(out + i, y);
  }
  for (; i < h; ++i) out[i] = from_float<scalar_t>(layernorm_apply(buf[i], mean, rstd, w[i], b ? b[i] : 0.f));
}

// out: [T, H]; x: [T, H]; res / res_out: [T, H] or null; w, b: [H] fp32 (b may be null).
template <typename scalar_t>
void layernorm_rows(scalar_t* out, const scalar_t* x, const scalar_t* res, scalar_t* res_out, const float* w,
                    const float* b, float eps, int64_t num_tokens, int64_t h, int64_t x_stride, int64_t res_stride) {
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, num_tokens, std::max<int64_t>(1, 16384 / h), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(h);  // the row in fp32
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* xt = x + t * x_stride;
      const scalar_t* rt = res ? res + t * res_stride : nullptr;
      scalar_t* rot = res ? res_out + t * h : nullptr;
      scalar_t* ot = out + t * h;
      if (avx2) {
        const float mean = layernorm_mean(load_row_avx2(xt, rt, rot, buf.data(), h), (int)h);
        const float rstd = layernorm_rstd(centered_sq_sum_avx2(buf.data(), mean, h), (int)h, eps);
        apply_avx2(buf.data(), mean, rstd, w, b, ot, h);
      } else {
        const float mean = layernorm_mean(load_row_scalar(xt, rt, rot, buf.data(), h), (int)h);
        float css = 0.f;
        for (int64_t i = 0; i < h; ++i) css += (buf[i] - mean) * (buf[i] - mean);
        const float rstd = layernorm_rstd(css, (int)h, eps);
        for (int64_t i = 0; i < h; ++i)
          ot[i] = from_float<scalar_t>(layernorm_apply(buf[i], mean, rstd, w[i], b ? b[i] : 0.f));
      }
    }
  });
}

void check_and_run(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor* residual,
                   torch::Tensor* residual_out, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias,
                   double eps) {
  TORCH_CHECK(x.dim() == 2, "x must be [num_tokens, hidden]");
  check_floating(x, "x");
  const int64_t num_tokens = x.size(0), h = x.size(1);
  TORCH_CHECK(x.stride(1) == 1, "x rows must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must be a contiguous [num_tokens, hidden] tensor of x's dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h, "weight must be [hidden]");
  // NOTE: weight / bias may be in any float dtype (the reference upcasts them); converting the [H] vectors to
  // fp32 once is cheaper than converting per row.
  thread_local std::vector<float> wbuf, bbuf;
  const float* w = fp32_vector(weight, wbuf);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h, "bias must be [hidden]");
    b = fp32_vector(*bias, bbuf);
  }
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->stride(1) == 1,
                "residual must be [num_tokens, hidden] with x's dtype and contiguous rows");
    TORCH_CHECK(residual_out->is_contiguous() && residual_out->sizes() == x.sizes() &&
                    residual_out->scalar_type() == x.scalar_type(),
                "residual_out must be contiguous [num_tokens, hidden] of x's dtype");
  }
  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layernorm", [&] {
    layernorm_rows<scalar_t>(out.data_ptr<scalar_t>(),                                   // [T, H]
                             x.data_ptr<scalar_t>(),                                     // [T, H] (row stride)
                             residual ? residual->data_ptr<scalar_t>() : nullptr,        // [T, H] or null
                             residual_out ? residual_out->data_ptr<scalar_t>() : nullptr,  // [T, H] or null
                             w,                                                          // [H]
                             b,                                                          // [H] or null
                             (float)eps, num_tokens, h, x.stride(0), residual ? residual->stride(0) : 0);
  });
}

}  // namespace
}  // namespace slf::cpu

void layernorm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
               const std::optional<torch::Tensor>& bias, double eps) {
  slf::cpu::check_and_run(out, x, nullptr, nullptr, weight, bias, eps);
}

void add_layernorm(torch::Tensor& out, torch::Tensor& residual_out, const torch::Tensor& x,
                   const torch::Tensor& residual, const torch::Tensor& weight,
                   const std::optional<torch::Tensor>& bias, double eps) {
  slf::cpu::check_and_run(out, x, &residual, &residual_out, weight, bias, eps);
}
