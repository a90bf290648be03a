// The weight-only int8 / int6 / int4 linear op of the CPU backend (torch.ops.stablelm_fast.cpu_quant_linear): argument
// checks, the choice of kernel, and the loops around the micro-kernels of quant.h.
//
// Kernels, by the weight's layout and the process's ISA (isa.h), x of M tokens:
//   int8 activations (quant_vnni.cpp: AVX512-VNNI; quant_avx2.cpp: AVX2): x quantized per block of B k (act_block:
//        up to 128, dividing the group size) to int8, dot products in int32. Every M (see choose()).
//   bf16 blocks (quant_bf16_gemm.cpp, bf16 x): each panel dequantized to bf16 once per call, then on AMX machines
//        above 4 tokens AMX tiles (amx.h), else vdpbf16ps over every token group (STABLELM_FAST_QGEMM=bf16).
//   scalar (quant_scalar.cpp; STABLELM_FAST_ISA=scalar, CPUs without AVX2): fp32 dequantization, fp32 x.
// STABLELM_FAST_QGEMM=int|fp32|bf16 forces one AVX-512 kernel at every M (the bench and the tests use it; fp32 is
// the in-register dequantization to fp32 FMAs of quant_vnni.cpp).
// Threads own disjoint ranges of output panels (gate_up: a panel of Wg and the same panel of Wu). At M = 1 the
// vnni and avx2 kernels take four panels at a time (micro_vnni4 / micro_avx2_4: four streams of W; measured ~1.2x
// one panel for int8 on VNNI).
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/amx.h"
#include "cpu/parallel.h"
#include "cpu/quant_gemm.h"
#include "ops.h"

namespace slf::cpu::quant {
namespace {

enum class Kernel { kScalar, kAvx2, kVnni, kFp32, kBf16 };

// NOTE: read at every call (a getenv, ~0.1 us against >= 10 us of GEMV), so that a benchmark or a test can switch
// kernels within one process.
int forced_kernel() {  // -1: auto, else a Kernel
  const char* s = std::getenv("STABLELM_FAST_QGEMM");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return -1;
  if (std::strcmp(s, "int") == 0) return static_cast<int>(Kernel::kVnni);
  if (std::strcmp(s, "fp32") == 0) return static_cast<int>(Kernel::kFp32);
  if (std::strcmp(s, "bf16") == 0) return static_cast<int>(Kernel::kBf16);
  TORCH_CHECK(false, "STABLELM_FAST_QGEMM must be auto, int, fp32 or bf16; got '", s, "'");
}

Kernel choose(int bits, bool vnni_layout, bool signed_layout, bool bf16_x, int64_t M, int64_t K) {
  const Isa isa = cpu_isa();
  if (vnni_layout)
    TORCH_CHECK(has_vnni(), "this int", bits, " weight was packed for avx512 vnni but the process runs ", isa_name(isa),
                " (STABLELM_FAST_ISA / the CPU): pack weights in the process that uses them");
  if (static_cast<int>(isa) < static_cast<int>(Isa::kAvx2)) return Kernel::kScalar;
  if (!has_vnni() || signed_layout) return Kernel::kAvx2;
  if (bits == 6) return Kernel::kVnni;  // int6: the int-activation kernels only, at every M
  const int f = forced_kernel();
  if (f >= 0) {
    const Kernel k = static_cast<Kernel>(f);
    return k == Kernel::kBf16 && !bf16_x ? Kernel::kVnni : k;
  }
  // NOTE: the int8-activation kernel at every M: vpdpbusd does twice the multiply-adds of vdpbf16ps, and on a Zen 4
  // core it measured 1.2-1.5x the dequantized-bf16-block GEMM (and our bf16 GEMM) at M = 32 and 128 too
  // (bench/kernels/bench_quant_gemm.py). With AMX (amx::use: M > 4, K % 32 == 0), bf16 blocks through AMX tiles
  // instead: 1.2-1.6x oneDNN's brgemm on the same blocks and 1.1-2.6x the int8-activation kernel at M = 32 / 128
  // (Intel Xeon with AMX, 2 cores, 1.6B shapes).
  return bf16_x && amx::use(M, K) ? Kernel::kBf16 : Kernel::kVnni;
}

// k per int8 block of x: the largest of 128 / 64 / 32 / 16 / 8 / 4 dividing G, at most 32 for int8 weights and for
// the AVX2 kernel. NOTE: the int4 / int6 vnni kernels' per-block epilogue (combine, convert, scale) costs about a
// quarter of their ops at 32 k a block, and their decode is compute-bound enough for that to show (ops per byte:
// int4 ~2x int8): blocks of 128 k measured ~12% faster on a Zen 4 core with the weight in L2; the extra error of x
// is small next to int4's (built-in model, int4 g128: KL 6.90e-4 -> 7.11e-4; with outlier channels 1.715e-2 ->
// 1.718e-2). int8, whose error x's quantization dominates, keeps 32 (KL 8.1e-5 -> 1.1e-4 at 128); AVX2 sums int4
// products in int16, which 32 k keeps from overflowing (quant_avx2.cpp).
int64_t act_block(int64_t G, int bits, Kernel kernel) {
  const int64_t most = kernel == Kernel::kVnni && bits != 8 ? 128 : 32;
  for (int64_t b : {128, 64, 32, 16, 8, 4})
    if (b <= most && G % b == 0) return b;
  return 0;
}

// Per-call scratch of the int-activation kernels (x in fp32 and its int8 form), kept by the calling thread.
struct ActBuffers {
  std::vector<float> f, bs, gs;
  std::vector<int8_t> q;
  std::vector<int32_t> bsum;
};

// x's M rows of K (row stride ld) as contiguous fp32: x itself when it already is, else converted into buf.
template <typename scalar_t>
const float* fp32_rows(const scalar_t* x, int64_t M, int64_t K, int64_t ld, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (ld == K || M == 1) return x;
  }
  buf.resize(M * K);
  float* f = buf.data();
  // NOTE: threads above ~64K elements only (decode converts one row in ~1 us, a parallel region costs more)
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 16) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) f[m * K + k] = to_float(x[m * ld + k]);
  });
  return f;
}

}  // namespace

}  // namespace slf::cpu::quant

namespace {
using namespace slf::cpu;
using namespace slf::cpu::quant;

void run(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& bias, int64_t bits,
         int64_t G, bool gate_up) {
  check_floating(x, "x");
  TORCH_CHECK(bits == 8 || bits == 6 || bits == 4, "bits must be 8, 6 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == 4 && qweight.is_contiguous() &&
                  (qweight.scalar_type() == at::kByte || (bits == 8 && qweight.scalar_type() == at::kChar)),
              "qweight must be packed by pack_quant_weight: a contiguous uint8 / int8 [N, R, 4] tensor, got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 32 == K * bits, "packed weight is for K = ", qweight.size(1) * 32 / bits,
              " but x has K = ", K);
  const int64_t g_unit = bits == 8 ? 4 : bits == 6 ? 32 : 8;  // k per kernel step (int6: a block of two 16-k steps)
  TORCH_CHECK(G > 0 && K % G == 0 && G % g_unit == 0, "group_size ", G, " must divide K = ", K,
              " and be a multiple of ", g_unit);
  const int64_t ng = K / G;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == ng,
              "scales must be packed by pack_quant_weight: contiguous float16 [N, K / group_size] = [", N, ", ", ng,
              "], got ", scales.scalar_type(), " ", scales.sizes());
  if (zeros.has_value())
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->dim() == 2 &&
                    zeros->size(0) == N && zeros->size(1) == ng,
                "zeros must be contiguous uint8 [N, K / group_size] = [", N, ", ", ng, "]");
  TORCH_CHECK(!gate_up || N % 2 == 0, "a packed gate_up weight must have an even number of rows");
  const int64_t n_out = gate_up ? N / 2 : N;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == n_out && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              "out must be [M, ", n_out, "] of x's dtype with contiguous rows");
  thread_local std::vector<float> bias_buf;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(!gate_up, "gate_up takes no bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out, "bias must be [N] = [", n_out, "]");
    bp = slf::cpu::fp32_vector(*bias, bias_buf);
  }
  if (M == 0 || n_out == 0) return;

  const bool signed_layout = qweight.scalar_type() == at::kChar;
  const bool vnni_layout = bits == 8 && !signed_layout;
  const Kernel kernel =
      choose(static_cast<int>(bits), vnni_layout, signed_layout, x.scalar_type() == at::kBFloat16, M, K);
  Panel proto{nullptr, nullptr, nullptr, K, G, static_cast<int>(bits), vnni_layout ? 128 : 0,
              bits == 8 ? 0 : bits == 6 ? 32 : 8};

  const PackedPanels w(proto, reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
                       reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                       zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, n_out, gate_up);
  const int64_t n_panels = w.n_panels;

  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_quant_linear", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ldo = out.stride(0);
    if (kernel == Kernel::kBf16) {  // (bf16 x only: choose())
      return gemm_bf16_blocks(w, reinterpret_cast<const c10::BFloat16*>(x.data_ptr()), x.stride(0), M, bp,
                              reinterpret_cast<c10::BFloat16*>(o), ldo, gate_up);
    }
    // fp32 rows of x (scalar / fp32 kernels), then its int8 form (int kernels), in buffers of the calling thread.
    // NOTE: no tensors allocated per call: a decode step makes ~100 of these calls, and five allocations and a
    // dtype conversion through ATen cost each one ~5-10 us while no weight streams.
    thread_local ActBuffers buf;
    Act act;
    act.K = K;
    act.ng = ng;
    act.f = fp32_rows(x.data_ptr<scalar_t>(), M, K, x.stride(0), buf.f);
    if (kernel == Kernel::kVnni || kernel == Kernel::kAvx2) {
      act.B = act_block(G, static_cast<int>(bits), kernel);
      buf.q.resize(M * K);
      buf.bs.resize(M * (K / act.B));
      buf.bsum.resize(M * (K / act.B));
      buf.gs.resize(M * ng);
      quantize_rows(act.f, M, K, act.B, G, buf.q.data(), buf.bs.data(), buf.bsum.data(), buf.gs.data());
      act.q = buf.q.data();
      act.bs = buf.bs.data();
      act.bsum = buf.bsum.data();
      act.gs = buf.gs.data();
    }
    Micro micro = kernel == Kernel::kVnni ? &micro_vnni
                  : kernel == Kernel::kFp32 ? &micro_fp32_avx512
                  : kernel == Kernel::kAvx2 ? &micro_avx2
                                            : &micro_scalar;
    const int64_t tmax = kernel == Kernel::kAvx2 ? kAvx2T : kernel == Kernel::kScalar ? kScalarT : kVnniT;
    const bool four = (kernel == Kernel::kVnni || kernel == Kernel::kAvx2) && M == 1;
    // A few tokens (decode, small batches): W streams from DRAM once. Each stream then reads `run_len` consecutive
    // panels (~64 KB of W) of a claimed unit (the four streams of `four`, or the one of the per-panel kernels), and
    // the kernels prefetch it 4 KB ahead into L2 (act.stream; quant.h: kL2Ahead). NOTE: units of adjacent single
    // panels (16 KB for int4 at K = 2048) restart the prefetchers' streams at every unit. Measured in the engine
    // (1.6B shape, alternated in one process, tok/s): M = 1 int4 26.4 -> 27.5 with 64 KB runs, ~29.7 with the
    // prefetch too (AVX2 mode 22.3 -> 24.7 -> 26-30); M = 2 int4 36.7 -> 52.1 (AVX2 mode 34.7 -> 38.2 -> 51.1), M = 4
    // int4 62.8 -> 93.2, int8 49.4 -> 57.8. More tokens keep single-panel units (prefill reuses W from L2).
    constexpr int64_t kStreamBytes = 64 * 1024;
    act.stream = M <= kVnniT;
    const int64_t run_len = act.stream ? std::clamp<int64_t>(kStreamBytes / w.panel_bytes, 1, 8) : 1;
    const int64_t per_unit = (four ? (gate_up ? 2 : 4) : 1) * run_len;
    const int64_t n_units = (n_panels + per_unit - 1) / per_unit;
    // the epilogue: AVX-512 for bf16 x on VNNI machines (the scalar one cost ~10% of an int8 GEMM at M = 128, more
    // with gate_up's silu), else quant_gemm.h's
    auto put = [&](const float* c, const float* cu, int64_t ldc, int64_t T, int64_t width, const float* b,
                   scalar_t* dst, int64_t ld) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (kernel == Kernel::kVnni)  // (a cast the other dtypes' instantiations never reach)
          return emit_bf16(c, cu, ldc, T, width, b, reinterpret_cast<c10::BFloat16*>(dst), ld);
      }
      emit(c, cu, ldc, T, width, b, dst, ld);
    };
    auto run_panels = [&](int64_t p, int64_t p1) {  // panels [p, p1)
      alignas(64) float c[kVnniT * kPanel], cu[kVnniT * kPanel];
      if (four) {  // decode: four panels (gate_up: two of Wg, two of Wu) at a time, stream i at p + i * run
        const int64_t ways = gate_up ? 2 : 4, run = (p1 - p) / ways;
        alignas(64) float c4[4 * kPanel];
        for (int64_t j = 0; j < run; ++j) {
          Panel ws[4];
          for (int i = 0; i < 4; ++i) ws[i] = gate_up ? w.panel(i % 2, p + (i / 2) * run + j) : w.panel(0, p + i * run + j);
          (kernel == Kernel::kVnni ? micro_vnni4 : micro_avx2_4)(ws, act, 0, c4);
          for (int64_t i = 0; i < ways; ++i) {
            const int64_t pi = p + i * run + j;
            put(c4 + (gate_up ? 2 * i : i) * kPanel, gate_up ? c4 + (2 * i + 1) * kPanel : nullptr, kPanel, 1,
                 w.width(pi), bp ? bp + pi * kPanel : nullptr, o + pi * kPanel, ldo);
          }
        }
        p += ways * run;
      }
      for (; p < p1; ++p) {
        const Panel wg = w.panel(0, p);
        const Panel wu = gate_up ? w.panel(1, p) : wg;
        const int64_t width = w.width(p);
        for (int64_t t0 = 0; t0 < M; t0 += tmax) {
          const int64_t T = std::min(tmax, M - t0);
          micro(wg, act, t0, T, c);
          if (gate_up) micro(wu, act, t0, T, cu);
          put(c, gate_up ? cu : nullptr, kPanel, T, width, bp ? bp + p * kPanel : nullptr, o + t0 * ldo + p * kPanel,
               ldo);
        }
      }
    };
    // (units claimed in turn: parallel.h)
    for_each_claimed(n_units, [&](int64_t u) { run_panels(u * per_unit, std::min(n_panels, (u + 1) * per_unit)); });
  });
}

}  // namespace

void cpu_quant_linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                      const torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
                      const std::optional<torch::Tensor>& bias, int64_t bits, int64_t group_size, bool gate_up) {
  run(out, x, qweight, scales, zeros, bias, bits, group_size, gate_up);
}

std::string cpu_quant_layout() {
  if (slf::cpu::quant::has_vnni()) return "vnni";
  return slf::cpu::cpu_has_avx2() ? "avx2" : "scalar";
}
