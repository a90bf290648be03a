// Paged causal attention on CPU: varlen prefill / chunked-prefill extend with GQA, and the op entry points. Scores,
// softmax and the output accumulator are fp32 (online softmax over tiles of kKeyTile keys). This file splits prefill
// work into items: attention_tile.cpp runs them (AVX2 / AVX-512 GEMM tiles), or below AVX2 the scalar attention_item
// here; decode (q_len = 1) is attention_decode.cpp's.
#include <algorithm>
#include <vector>

#include "cpu/attention_common.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace slf::cpu {
namespace {

struct WorkItem {
  int32_t seq;
  int32_t kv_head;
  int32_t t0, t1;  // global token range [t0, t1) of q (inside sequence `seq`)
  int64_t cost;
};

// Prefill / extend without SIMD (machines below AVX2); attention_tile.cpp serves every other ISA.
template <typename scalar_t>
void attention_item(const WorkItem& it, scalar_t* out, const scalar_t* q, const scalar_t* k_cache,
                    const scalar_t* v_cache, const int32_t* block_table, int64_t q_start, int64_t q_len,
                    int64_t ctx, int64_t group, int64_t head_dim, int64_t block_size, int64_t q_tok_stride,
                    int64_t q_head_stride, int64_t out_tok_stride, int64_t out_head_stride, int64_t c_block_stride,
                    int64_t c_tok_stride, int64_t c_head_stride, float scale, std::vector<float>& qbuf,
                    std::vector<float>& acc, std::vector<float>& scores) {
  const int64_t ntok = it.t1 - it.t0, rows = ntok * group;
  // Row r = (token it.t0 + r / group, q head kv_head * group + r % group).
  SoftmaxState st[kMaxRows];
  int64_t limit[kMaxRows];  // last key position row r may attend (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.t0 + r / group, h = it.kv_head * group + r % group;
    const scalar_t* qr = q + t * q_tok_stride + h * q_head_stride;  // [D]
    for (int64_t i = 0; i < head_dim; ++i) qbuf[r * head_dim + i] = to_float(qr[i]);
    std::fill(acc.begin() + r * head_dim, acc.begin() + (r + 1) * head_dim, 0.f);
    st[r] = softmax_init();
    limit[r] = ctx - q_len + (t - q_start);
  }
  const int64_t max_key = ctx - q_len + (it.t1 - 1 - q_start);  // limit of the chunk's last row
  const scalar_t* kp[kKeyTile];
  const scalar_t* vp[kKeyTile];
  for (int64_t j0 = 0; j0 <= max_key; j0 += kKeyTile) {
    const int64_t j1 = std::min(max_key + 1, j0 + kKeyTile);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t off = (int64_t)block_table[j / block_size] * c_block_stride + (j % block_size) * c_tok_stride +
                          it.kv_head * c_head_stride;
      kp[j - j0] = k_cache + off;  // [D]
      vp[j - j0] = v_cache + off;  // [D]
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (limit[r] < j0) continue;  // every key of this tile is in row r's future
      const int64_t jn = std::min(j1, limit[r] + 1) - j0;
      const float* qr = qbuf.data() + r * head_dim;
      float* s = scores.data();
      for (int64_t j = 0; j < jn; ++j) s[j] = dot_scalar(qr, kp[j], head_dim) * scale;
      const float alpha = softmax_tile<false>(&st[r], s, jn);
      scale_add_scalar(acc.data() + r * head_dim, alpha, s, vp, jn, head_dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.t0 + r / group, h = it.kv_head * group + r % group;
    scalar_t* o = out + t * out_tok_stride + h * out_head_stride;  // [D]
    const float inv = 1.f / st[r].l;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = from_float<scalar_t>(acc[r * head_dim + i] * inv);
  }
}

template <typename scalar_t>
void paged_attention_impl(scalar_t* out,             // [T, Hq, D]
                          const scalar_t* q,         // [T, Hq, D]
                          const scalar_t* k_cache,   // [num_blocks, block_size, Hkv, D]
                          const scalar_t* v_cache,   // [num_blocks, block_size, Hkv, D]
                          const int32_t* block_tables,  // [B, max_blocks_per_seq]
                          const int32_t* cu_seqlens,    // [B + 1]
                          const int32_t* context_lens,  // [B]
                          int64_t num_seqs, int64_t hkv, int64_t bt_stride, const TileGeom& g) {
  const int64_t group = g.group, head_dim = g.head_dim;
  // NOTE: a work item is (sequence, kv head, chunk of q tokens): the q heads of one GQA group share every K/V
  // load, and chunking tokens keeps the fp32 accumulators in L1/L2 while parallelizing long prefills.
  const int64_t tok_chunk = std::max<int64_t>(1, kMaxRows / group);
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t t_begin = cu_seqlens[b], t_end = cu_seqlens[b + 1];
    const int64_t q_len = t_end - t_begin, ctx = context_lens[b];
    if (q_len <= 0) continue;
    TORCH_CHECK(ctx >= q_len, "context_lens[", b, "] = ", ctx, " < its query length ", q_len);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += tok_chunk) {
      const int64_t t1 = std::min(t_end, t0 + tok_chunk);
      const int64_t cost = (t1 - t0) * (ctx - q_len + (t1 - t_begin));
      for (int64_t kh = 0; kh < hkv; ++kh) items.push_back({(int32_t)b, (int32_t)kh, (int32_t)t0, (int32_t)t1, cost});
    }
  }
  // NOTE: causal items differ in cost: claimed in turn (parallel.h), longest first.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_isa() >= Isa::kAvx512Bf16;
  if (avx2) {  // tiles of small GEMMs (attention_tile.cpp)
    for_each_claimed(items.size(), [&, ws = std::vector<float>(tile_workspace_floats(head_dim))](int64_t i) mutable {
      const WorkItem& it = items[i];
      const int64_t b = it.seq, q_start = cu_seqlens[b], q_len = cu_seqlens[b + 1] - cu_seqlens[b];
      tile_attention_item<scalar_t>(avx512, it.t0, it.t1, it.kv_head, out, q, k_cache, v_cache,
                                    block_tables + b * bt_stride, q_start, q_len, context_lens[b], g, ws.data());
    });
    return;
  }
  const std::vector<float> rows(kMaxRows * head_dim), tile(kMaxRows * kKeyTile);
  for_each_claimed(items.size(), [&, qbuf = rows, acc = rows, scores = tile](int64_t i) mutable {
    const WorkItem& it = items[i];
    const int64_t b = it.seq, q_start = cu_seqlens[b], q_len = cu_seqlens[b + 1] - cu_seqlens[b];
    attention_item<scalar_t>(it, out, q, k_cache, v_cache, block_tables + b * bt_stride, q_start, q_len,
                             context_lens[b], group, head_dim, g.block_size, g.q_tok_stride, g.q_head_stride,
                             g.out_tok_stride, g.out_head_stride, g.c_block_stride, g.c_tok_stride, g.c_head_stride,
                             g.scale, qbuf, acc, scores);
  });
}

void run_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                   const torch::Tensor* cu_seqlens_q, const torch::Tensor& context_lens, double scale) {
  check_floating(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, Hq, D] with contiguous heads");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.scalar_type() == q.scalar_type(),
              "out must be [T, Hq, D] of q's dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.stride(3) == 1,
              "k_cache / v_cache must be [num_blocks, block_size, Hkv, D] with equal strides");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the KV cache must have q's dtype");
  const int64_t hq = q.size(1), hkv = k_cache.size(2), head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "cache head_dim != q head_dim");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "num_q_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(hq / hkv <= kMaxRows, "GQA group larger than ", kMaxRows, " is not supported");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks] with contiguous rows");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(), "context_lens must be int32");
  const int64_t num_seqs = context_lens.numel();
  TORCH_CHECK(block_tables.size(0) >= num_seqs, "block_tables has fewer rows than sequences");
  const int32_t* cl = context_lens.data_ptr<int32_t>();  // (a loop: an ATen max().item() costs ~2 us per layer)
  const int64_t max_ctx = num_seqs > 0 ? *std::max_element(cl, cl + num_seqs) : 0;
  TORCH_CHECK(max_ctx <= block_tables.size(1) * k_cache.size(1), "a context is longer than its block table");
  if (cu_seqlens_q != nullptr) {
    TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_q->is_contiguous() &&
                    cu_seqlens_q->numel() == num_seqs + 1,
                "cu_seqlens_q must be int32 [B + 1]");
  } else {
    TORCH_CHECK(q.size(0) == num_seqs, "decode: q must have one token per sequence");
  }
  if (q.size(0) == 0 || num_seqs == 0) return;
  const TileGeom g{hq / hkv, head_dim, k_cache.size(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), (float)scale};
  SLF_DISPATCH_FLOATING_TYPES(q.scalar_type(), "paged_attention", [&] {
    const auto* bt = block_tables.data_ptr<int32_t>();
    const auto* lens = context_lens.data_ptr<int32_t>();
    if (cu_seqlens_q == nullptr)
      paged_decode<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                             v_cache.data_ptr<scalar_t>(), bt, lens, num_seqs, hkv, block_tables.stride(0), g);
    else
      paged_attention_impl<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                     v_cache.data_ptr<scalar_t>(), bt, cu_seqlens_q->data_ptr<int32_t>(), lens,
                                     num_seqs, hkv, block_tables.stride(0), g);
  });
}

}  // namespace
}  // namespace slf::cpu

void paged_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                     const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens, double scale) {
  slf::cpu::run_attention(out, q, k_cache, v_cache, block_tables, &cu_seqlens_q, context_lens, scale);
}

void paged_attention_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  slf::cpu::run_attention(out, q, k_cache, v_cache, block_tables, nullptr, context_lens, scale);
}
