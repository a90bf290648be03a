// Every decoder layer of a StableLM in one C++ call (the cpu backend, one process): the ops of
// stablelm_fast/model.py's DecoderLayer.forward in the same order, on the same kernels (ops.h), so the result is the
// Python path's to the bit. What it saves is the path between the kernels: a batch-1 decode step of the 1.6B makes
// ~200 op calls, and each one's Python wrapper, output allocation and dispatcher argument parsing cost ~5-25 us
// while no weight streams (~5 ms a step of ~38 ms, int4, Zen 4; bench/profile_step.py). llama.cpp runs its whole
// graph in C the same way.
//
// Built once after the weights are packed and the KV cache allocated (stablelm_fast/engine/cpu_forward.py, which
// also decides when this path applies); it holds references to the model's tensors, never copies.
#include <ATen/record_function.h>
#include <torch/all.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "ops.h"

namespace slf::cpu {
namespace {

using OptTensor = std::optional<torch::Tensor>;

// Each kernel call shows in torch.profiler under its op's name, as on the Python path (bench/profile_step.py); a
// flag check when no profiler runs.
#define SLF_RECORD(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

// One linear layer as the model's linear method runs it (layers/linear.py, quantization/linear_method.py).
struct Linear {
  torch::Tensor w;  // packed float weight (cpu/packed.h) or packed int weight (cpu/quant.h)
  OptTensor scales, zeros, bias, perm;  // perm: GPTQ act-order's input feature order (x_perm)
  int64_t bits = 0;  // 0: a float weight
  int64_t group = 0;
  bool gate_up = false;  // [Wg; Wu] fused with SwiGLU: out = silu(x Wg^T) * (x Wu^T)

  int64_t n_out() const { return gate_up ? w.size(0) / 2 : w.size(0); }

  torch::Tensor operator()(const torch::Tensor& x_in) const {
    const torch::Tensor x = perm.has_value() ? x_in.index_select(1, *perm) : x_in;
    torch::Tensor out = torch::empty({x.size(0), n_out()}, x.options());
    if (bits != 0) {
      SLF_RECORD("stablelm_fast::cpu_quant_linear");
      cpu_quant_linear(out, x, w, *scales, zeros, bias, bits, group, gate_up);
    } else if (gate_up) {
      SLF_RECORD("stablelm_fast::gate_up_silu");
      gate_up_silu(out, x, w);
    } else {
      SLF_RECORD("stablelm_fast::linear");
      linear(out, x, w, bias);
    }
    return out;
  }
};

struct Layer {
  torch::Tensor ln1_w, ln1_b;
  OptTensor ln2_w, ln2_b;  // none with the parallel residual (12B)
  OptTensor q_norm, k_norm;  // per-head QK LayerNorm weights (12B)
  torch::Tensor k_cache, v_cache;
  Linear qkv, o, gate_up, down;
};

class CpuForward : public torch::CustomClassHolder {
 public:
  CpuForward(int64_t num_q, int64_t num_kv, int64_t head_dim, double eps, double scale, bool parallel_residual)
      : num_q_(num_q), num_kv_(num_kv), head_dim_(head_dim), eps_(eps), scale_(scale),
        parallel_residual_(parallel_residual) {}

  // Linear layers in the order qkv, o, gate_up, down; add_layer takes the last four.
  void add_linear(torch::Tensor w, OptTensor scales, OptTensor zeros, OptTensor bias, OptTensor perm, int64_t bits,
                  int64_t group, bool gate_up) {
    TORCH_CHECK(w.dim() == 3, "add_linear: the weight must be packed (3-D), got ", w.dim(), "-D");
    TORCH_CHECK(bits == 0 || scales.has_value(), "add_linear: an int", bits, " weight needs its scales");
    TORCH_CHECK(!gate_up || !bias.has_value(), "add_linear: gate_up takes no bias");
    pending_.push_back(Linear{std::move(w), std::move(scales), std::move(zeros), std::move(bias), std::move(perm),
                              bits, group, gate_up});
  }

  void add_layer(torch::Tensor ln1_w, torch::Tensor ln1_b, OptTensor ln2_w, OptTensor ln2_b, OptTensor q_norm,
                 OptTensor k_norm, torch::Tensor k_cache, torch::Tensor v_cache) {
    TORCH_CHECK(pending_.size() == 4, "add_layer: expected 4 linear layers (qkv, o, gate_up, down), got ",
                pending_.size());
    TORCH_CHECK(ln2_w.has_value() != parallel_residual_, "add_layer: post_attention_layernorm must be given ",
                "exactly when the residual is not parallel");
    TORCH_CHECK(pending_[2].gate_up && !pending_[0].gate_up && !pending_[1].gate_up && !pending_[3].gate_up,
                "add_layer: the third linear layer (only) must be gate_up");
    layers_.push_back(Layer{std::move(ln1_w), std::move(ln1_b), std::move(ln2_w), std::move(ln2_b),
                            std::move(q_norm), std::move(k_norm), std::move(k_cache), std::move(v_cache),
                            pending_[0], pending_[1], pending_[2], pending_[3]});
    pending_.clear();
  }

  void set_norm(torch::Tensor w, torch::Tensor b) {
    norm_w_ = std::move(w);
    norm_b_ = std::move(b);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [T, hidden], the embedded tokens -> the final normed hidden states [T, hidden] (StableLmModel.forward).
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor cu_seqlens_q, torch::Tensor context_lens,
                        bool is_decode) {
    TORCH_CHECK(norm_w_.defined() && !layers_.empty() && pending_.empty(), "CpuForward: the model is not complete");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, hidden]");
    const int64_t T = x.size(0);
    torch::Tensor residual;
    for (const Layer& L : layers_) {
      torch::Tensor h = torch::empty_like(x);
      if (!residual.defined()) {  // the first layer: the residual stream starts as the embeddings
        SLF_RECORD("stablelm_fast::layernorm");
        layernorm(h, x, L.ln1_w, L.ln1_b, eps_);
        residual = x;
      } else {
        torch::Tensor r = torch::empty_like(x);
        SLF_RECORD("stablelm_fast::add_layernorm");
        add_layernorm(h, r, x, residual, L.ln1_w, L.ln1_b, eps_);
        residual = r;
      }
      const torch::Tensor qkv = L.qkv(h);
      torch::Tensor q = torch::empty({T, num_q_, head_dim_}, x.options());
      torch::Tensor k_cache = L.k_cache, v_cache = L.v_cache;
      {
        SLF_RECORD("stablelm_fast::qk_norm_rope_cache");
        qk_norm_rope_cache(q, qkv, positions, cos_sin, L.q_norm, L.k_norm, eps_, k_cache, v_cache, slot_mapping,
                           num_q_, num_kv_, head_dim_);
      }
      torch::Tensor o = torch::empty_like(q);
      if (is_decode) {
        SLF_RECORD("stablelm_fast::paged_attention_decode");
        paged_attention_decode(o, q, k_cache, v_cache, block_tables, context_lens, scale_);
      } else {
        SLF_RECORD("stablelm_fast::paged_attention");
        paged_attention(o, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale_);
      }
      torch::Tensor attn = L.o(o.view({T, num_q_ * head_dim_}));
      if (parallel_residual_) {  // x + attn(ln(x)) + mlp(ln(x)): attention and MLP read the same ln(x)
        x = attn.add_(L.down(L.gate_up(h)));
      } else {
        torch::Tensor h2 = torch::empty_like(x), r2 = torch::empty_like(x);
        {
          SLF_RECORD("stablelm_fast::add_layernorm");
          add_layernorm(h2, r2, attn, residual, *L.ln2_w, L.ln2_b, eps_);
        }
        residual = r2;
        x = L.down(L.gate_up(h2));
      }
    }
    torch::Tensor out = torch::empty_like(x), r = torch::empty_like(x);
    SLF_RECORD("stablelm_fast::add_layernorm");
    add_layernorm(out, r, x, residual, norm_w_, norm_b_, eps_);
    return out;
  }

 private:
  int64_t num_q_, num_kv_, head_dim_;
  double eps_, scale_;
  bool parallel_residual_;
  std::vector<Linear> pending_;
  std::vector<Layer> layers_;
  torch::Tensor norm_w_, norm_b_;
};

}  // namespace
}  // namespace slf::cpu

TORCH_LIBRARY_FRAGMENT(stablelm_fast, m) {
  // torch.classes.stablelm_fast.CpuForward: every decoder layer in one call (stablelm_fast/engine/cpu_forward.py).
  m.class_<slf::cpu::CpuForward>("CpuForward")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_linear", &slf::cpu::CpuForward::add_linear)
      .def("add_layer", &slf::cpu::CpuForward::add_layer)
      .def("set_norm", &slf::cpu::CpuForward::set_norm)
      .def("num_layers", &slf::cpu::CpuForward::num_layers)
      .def("forward", &slf::cpu::CpuForward::forward);
}
