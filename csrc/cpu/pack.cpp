// Packing of linear weights into the layouts of packed.h.
#include <cstring>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/packed.h"

namespace slf::cpu {
namespace {

// NOTE: both packers walk k in the outer loop and the panel's features in the inner one, so that each panel is
// written sequentially (16 row streams read, one written): feature-major loops scattered 2-byte writes over the
// whole 64 KB panel and packed a 1.6B at ~0.26 GB/s (11 s of its 16 s load).

// One matrix of n rows (src row stride ld) into dst, panels layout.
template <typename scalar_t>
void pack_panels(const scalar_t* src, int64_t ld, int64_t n, int64_t K, scalar_t* dst) {
  const int64_t n_full = n / kPanel, tail = n % kPanel;
  at::parallel_for(0, n_full + (tail > 0), 1, [&](int64_t p0, int64_t p1) {
    const scalar_t* rows[kPanel];
    int64_t slots[kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = p < n_full ? kPanel : tail;
      for (int64_t f = 0; f < width; ++f) {
        rows[f] = src + (p * kPanel + f) * ld;
        slots[f] = p < n_full ? panel_slot<scalar_t>(f) : f;
      }
      scalar_t* d = dst + p * K * kPanel;
      for (int64_t k = 0; k < K; ++k, d += width)
        for (int64_t f = 0; f < width; ++f) d[slots[f]] = rows[f][k];
    }
  });
}

// One matrix of n rows into dst, vnni layout (K even): per k pair, the 16 features' (k, k + 1) bf16 pairs as 32-bit
// words.
void pack_vnni(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t K, c10::BFloat16* dst) {
  const int64_t n_full = n / kPanel, tail = n % kPanel;
  at::parallel_for(0, n_full + (tail > 0), 1, [&](int64_t p0, int64_t p1) {
    const c10::BFloat16* rows[kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = p < n_full ? kPanel : tail;
      for (int64_t f = 0; f < width; ++f) rows[f] = src + (p * kPanel + f) * ld;
      c10::BFloat16* d = dst + p * K * kPanel;
      for (int64_t k = 0; k < K; k += 2, d += 2 * width)
        for (int64_t f = 0; f < width; ++f) std::memcpy(d + 2 * f, rows[f] + k, 2 * sizeof(c10::BFloat16));
    }
  });
}

}  // namespace

Layout layout_of(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && (packed.size(2) == 1 || packed.size(2) == 2),
              "a packed weight must be a contiguous [N, K, 1] (panels) or [N, K / 2, 2] (vnni) tensor, got shape ",
              packed.sizes());
  if (packed.size(2) == 1) return Layout::kPanels;
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "vnni-packed weights must be bfloat16");
  return Layout::kVnni;
}

void pack_weight(torch::Tensor& out, const torch::Tensor& w, bool halves) {
  check_floating(w, "weight");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "weight must be [N, K] with contiguous rows");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(!halves || N % 2 == 0, "a gate_up weight (halves=True) must have an even number of rows, got ", N);
  TORCH_CHECK(out.scalar_type() == w.scalar_type(), "out must have weight's dtype");
  const Layout layout = layout_of(out);
  TORCH_CHECK(out.size(0) == N && out.size(1) * out.size(2) == K,
              "out must be [N, K, 1] or [N, K / 2, 2] for weight [N, K] = ", w.sizes(), ", got ", out.sizes());
  const int64_t n = halves ? N / 2 : N;
  for (int64_t h = 0; h < (halves ? 2 : 1); ++h) {
    SLF_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_weight", [&] {
      const scalar_t* src = w.data_ptr<scalar_t>() + h * n * w.stride(0);
      scalar_t* dst = out.data_ptr<scalar_t>() + h * n * K;
      if (layout == Layout::kVnni)  // bf16 only (layout_of)
        return pack_vnni(reinterpret_cast<const c10::BFloat16*>(src), w.stride(0), n, K,
                         reinterpret_cast<c10::BFloat16*>(dst));
      pack_panels(src, w.stride(0), n, K, dst);
    });
  }
}

VnniPanels::VnniPanels(const c10::BFloat16* packed, int64_t n_out_, int64_t K, bool gate_up)
    : n_out(n_out_), n_full(n_out_ / kPanel), tail(n_out_ % kPanel), n_panels(n_full + (tail > 0)),
      base_(reinterpret_cast<const uint32_t*>(packed)), kh_(K / 2), words_(K / 2 * kPanel) {
  const int64_t n_mats = gate_up ? 2 : 1;
  tail_.assign(tail > 0 ? n_mats * words_ : 0, 0u);
  for (int64_t m = 0; tail > 0 && m < n_mats; ++m) {
    const uint32_t* src = base_ + m * n_out * kh_ + n_full * words_;  // [K/2][tail] words
    for (int64_t i = 0; i < kh_; ++i)
      std::memcpy(tail_.data() + m * words_ + i * kPanel, src + i * tail, tail * sizeof(uint32_t));
  }
}

}  // namespace slf::cpu
