// Fused per-head QK LayerNorm + partial NeoX rotary + paged KV-cache write on CPU.
// Reads the packed projection qkv [T, (Hq + 2 Hkv) * D]; writes q to q_out [T, Hq, D] and k / v into the cache
// [num_blocks, block_size, Hkv, D] at slot_mapping[t] (slot -1 = skip).
#include <vector>

#include "cpu/cpu_types.h"
#include "ops.h"

namespace slf::cpu {
namespace {

// In-place on one head in fp32: optional per-head LayerNorm (no bias; the result is rounded to scalar_t like the
// unfused model does), then NeoX rotary on the first rotary_dim dims.
template <typename scalar_t>
inline void norm_rotate_head(float* buf,             // [D]
                             const float* norm_w,    // [D] or null
                             const float* cos_sin,   // [rotary_dim]: cos | sin
                             int64_t head_dim, int64_t rotary_dim, float eps) {
  if (norm_w != nullptr) {
    float sum = 0.f;
    for (int64_t i = 0; i < head_dim; ++i) sum += buf[i];
    const float mean = layernorm_mean(sum, (int)head_dim);
    float css = 0.f;
    for (int64_t i = 0; i < head_dim; ++i) css += (buf[i] - mean) * (buf[i] - mean);
    const float rstd = layernorm_rstd(css, (int)head_dim, eps);
    for (int64_t i = 0; i < head_dim; ++i)
      buf[i] = to_float(from_float<scalar_t>(layernorm_apply(buf[i], mean, rstd, norm_w[i], 0.f)));
  }
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) rotate_pair(buf[i], buf[i + half], cos_sin[i], cos_sin[half + i], &buf[i], &buf[i + half]);
}

template <typename scalar_t>
void qk_norm_rope_cache_impl(scalar_t* q_out,          // [T, Hq, D]
                             const scalar_t* qkv,      // [T, (Hq + 2 Hkv) * D], row stride qkv_stride
                             const int64_t* positions,  // [T]
                             const float* cos_sin,     // [max_positions, rotary_dim]
                             const float* q_norm_w,    // [Hq, D] or null
                             const float* k_norm_w,    // [Hkv, D] or null
                             scalar_t* k_cache,        // [num_blocks, block_size, Hkv, D]
                             scalar_t* v_cache,        // [num_blocks, block_size, Hkv, D]
                             const int64_t* slots,     // [T]
                             int64_t num_tokens, int64_t hq, int64_t hkv, int64_t head_dim, int64_t rotary_dim,
                             int64_t qkv_stride, int64_t block_size, int64_t cache_block_stride,
                             int64_t cache_token_stride, int64_t cache_head_stride, float eps) {
  // NOTE: one work item per (token, q head) and per (token, kv head); the kv item also copies v.
  const int64_t heads = hq + hkv;
  at::parallel_for(0, num_tokens * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(head_dim);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / heads, h = w % heads;
      const bool is_q = h < hq;
      const int64_t slot = slots[t];
      if (!is_q && slot < 0) continue;  // k/v of a padding token: nothing to write
      const scalar_t* src = qkv + t * qkv_stride + h * head_dim;  // q head h, or k head h - hq
      for (int64_t i = 0; i < head_dim; ++i) buf[i] = to_float(src[i]);
      const float* nw = is_q ? (q_norm_w ? q_norm_w + h * head_dim : nullptr)
                             : (k_norm_w ? k_norm_w + (h - hq) * head_dim : nullptr);
      norm_rotate_head<scalar_t>(buf.data(), nw, cos_sin + positions[t] * rotary_dim, head_dim, rotary_dim, eps);
      if (is_q) {
        scalar_t* dst = q_out + (t * hq + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) dst[i] = from_float<scalar_t>(buf[i]);
      } else {
        const int64_t kh = h - hq;
        const int64_t off = (slot / block_size) * cache_block_stride + (slot % block_size) * cache_token_stride +
                            kh * cache_head_stride;
        scalar_t* kd = k_cache + off;
        scalar_t* vd = v_cache + off;
        const scalar_t* vs = src + hkv * head_dim;  // v head kh
        for (int64_t i = 0; i < head_dim; ++i) kd[i] = from_float<scalar_t>(buf[i]);
        for (int64_t i = 0; i < head_dim; ++i) vd[i] = vs[i];
      }
    }
  });
}

}  // namespace
}  // namespace slf::cpu

void qk_norm_rope_cache(torch::Tensor& q_out, const torch::Tensor& qkv, const torch::Tensor& positions,
                        const torch::Tensor& cos_sin, const std::optional<torch::Tensor>& q_norm_weight,
                        const std::optional<torch::Tensor>& k_norm_weight, double eps, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_q_heads,
                        int64_t num_kv_heads, int64_t head_dim) {
  slf::cpu::check_floating(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (Hq + 2 Hkv) * D] with contiguous rows");
  TORCH_CHECK(qkv.size(1) == (num_q_heads + 2 * num_kv_heads) * head_dim, "qkv width != (Hq + 2 Hkv) * D");
  const int64_t num_tokens = qkv.size(0);
  TORCH_CHECK(q_out.is_contiguous() && q_out.numel() == num_tokens * num_q_heads * head_dim &&
                  q_out.scalar_type() == qkv.scalar_type(),
              "q_out must be contiguous [T, Hq, D] of qkv's dtype");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.scalar_type() == at::kFloat, "cos_sin must be fp32 [max_pos, rot]");
  const int64_t rotary_dim = cos_sin.size(1);
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim must be even and <= head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "k_cache / v_cache must be [num_blocks, block_size, Hkv, D] with equal strides");
  TORCH_CHECK(k_cache.size(2) == num_kv_heads && k_cache.size(3) == head_dim && k_cache.stride(3) == 1,
              "cache must be [num_blocks, block_size, Hkv, D] with contiguous heads");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "the KV cache must have qkv's dtype");
  TORCH_CHECK(positions.numel() == num_tokens && slot_mapping.numel() == num_tokens,
              "positions / slot_mapping must be [T]");
  const torch::Tensor pos = positions.to(at::kLong).contiguous();
  const torch::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const torch::Tensor cs = cos_sin.contiguous();
  // NOTE: a loop, not pos.min() / max().item(): two ATen reductions cost more than the op itself at decode
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cs.size(0), "positions out of the cos_sin range: ", pp[t]);
  thread_local std::vector<float> qbuf, kbuf;
  const float *qw = nullptr, *kw = nullptr;
  if (q_norm_weight.has_value()) {
    TORCH_CHECK(q_norm_weight->numel() == num_q_heads * head_dim, "q_norm_weight must be [Hq, D]");
    qw = slf::cpu::fp32_vector(*q_norm_weight, qbuf);
  }
  if (k_norm_weight.has_value()) {
    TORCH_CHECK(k_norm_weight->numel() == num_kv_heads * head_dim, "k_norm_weight must be [Hkv, D]");
    kw = slf::cpu::fp32_vector(*k_norm_weight, kbuf);
  }
  SLF_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "qk_norm_rope_cache", [&] {
    slf::cpu::qk_norm_rope_cache_impl<scalar_t>(
        q_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), cs.data_ptr<float>(),
        qw, kw,
        k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), num_tokens,
        num_q_heads, num_kv_heads, head_dim, rotary_dim, qkv.stride(0), k_cache.size(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), (float)eps);
  });
}
