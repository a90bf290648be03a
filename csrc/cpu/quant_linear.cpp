// The weight-only int8 / int6 / int4 linear op of the CPU backend (torch.ops.stablelm_fast.cpu_quant_linear): argument
// checks, the choice of kernel, and the loops around the micro-kernels of quant.h.
//
// Kernels, by the weight's layout and the process's ISA (isa.h), x of M tokens:
//   int8 activations (quant_vnni.cpp: AVX512-VNNI; quant_avx2.cpp: AVX2): x quantized per block of B = 32 k (B = the
//        largest of 32 / 16 / 8 / 4 dividing the group size) to int8, dot products in int32. Every M (see choose()).
//   bf16 blocks (quant_bf16.cpp, bf16 x): each panel dequantized to bf16 once per call, then on AMX machines above
//        4 tokens oneDNN's brgemm (at::native::cpublas::brgemm, as brgemm_gemm.cpp; STABLELM_FAST_BRGEMM=1 forces
//        it), else vdpbf16ps over every token group (STABLELM_FAST_QGEMM=bf16).
//   scalar (STABLELM_FAST_ISA=scalar, CPUs without AVX2): fp32 dequantization, fp32 x.
// STABLELM_FAST_QGEMM=int|fp32|bf16 forces one AVX-512 kernel at every M (the bench and the tests use it; fp32 is
// the in-register dequantization to fp32 FMAs of quant_vnni.cpp).
// Threads own disjoint ranges of output panels (gate_up: a panel of Wg and the same panel of Wu). At M = 1 the
// vnni kernel takes four panels at a time (micro_vnni4: four streams of W; measured ~1.2x one panel for int8).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/native/CPUBlas.h>

#include "cpu/cpu_types.h"
#include "cpu/quant.h"
#include "ops.h"

namespace slf::cpu {
bool use_brgemm(int64_t M);  // packed.h (not included: its kPanel would clash with quant::kPanel here)
}

namespace slf::cpu::quant {
namespace {

constexpr int64_t kBrgemmRows = 32;  // tokens per brgemm call (two 16-row AMX C tiles)

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

Kernel choose(int bits, bool vnni_layout, bool signed_layout, bool bf16_x, int64_t M) {
  const Isa isa = cpu_isa();
  if (vnni_layout)
    TORCH_CHECK(has_vnni(), "this int", bits, " weight was packed for avx512 vnni but the process runs ", isa_name(isa),
                " (STABLELM_FAST_ISA / the CPU): pack weights in the process that uses them");
  if (bits == 6) return Kernel::kVnni;  // int6 (vnni layout only) has this kernel only, at every M
  if (static_cast<int>(isa) < static_cast<int>(Isa::kAvx2)) return Kernel::kScalar;
  if (!has_vnni() || signed_layout) return Kernel::kAvx2;
  const int f = forced_kernel();
  if (f >= 0) {
    const Kernel k = static_cast<Kernel>(f);
    return k == Kernel::kBf16 && !bf16_x ? Kernel::kVnni : k;
  }
  // NOTE: the int8-activation kernel at every M: vpdpbusd does twice the multiply-adds of vdpbf16ps, and on a Zen 4
  // core it measured 1.2-1.5x the dequantized-bf16-block GEMM (and our bf16 GEMM) at M = 32 and 128 too
  // (bench/kernels/bench_quant_gemm.py). With AMX (use_brgemm: M > 4 on AMX machines), bf16 blocks through
  // oneDNN's brgemm instead.
  return bf16_x && use_brgemm(M) ? Kernel::kBf16 : Kernel::kVnni;
}

int64_t act_block(int64_t G) {
  for (int64_t b : {32, 16, 8, 4})
    if (G % b == 0) return b;
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

template <typename scalar_t>
void emit(const float* c, const float* cu, int64_t ldc, int64_t T, int64_t width, const float* bias, scalar_t* out,
          int64_t ldo) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < width; ++j) {
      float v = c[t * ldc + j];
      if (cu != nullptr) v = silu(v) * cu[t * ldc + j];
      else if (bias != nullptr) v += bias[j];
      out[t * ldo + j] = from_float<scalar_t>(v);
    }
}

}  // namespace

void micro_scalar(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c) {
  std::fill(c, c + T * kPanel, 0.f);
  const int64_t rows_per_group = w.G / 4;
  for (int64_t g = 0; g < w.K / w.G; ++g) {
    float wf[kPanel][4];
    for (int64_t r = 0; r < rows_per_group; ++r) {
      const int64_t k = g * w.G + 4 * r;
      for (int64_t f = 0; f < kPanel; ++f) {
        const float zero = float((w.z ? w.z[g * kPanel + f] : w.zero) + w.offset), s = w.s[g * kPanel + f];
        for (int64_t i = 0; i < 4; ++i) {
          int u;
          if (w.bits == 8) {
            const uint8_t byte = w.q[(k / 4) * 64 + f * 4 + i];
            u = w.offset ? int(byte) : int(static_cast<int8_t>(byte));
          } else {
            const uint8_t byte = w.q[(k / 8) * 64 + f * 4 + i];
            u = (k / 4) % 2 ? byte >> 4 : byte & 15;
          }
          wf[f][i] = (float(u) - zero) * s;
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = x.f_row(t0 + t) + k;
        for (int64_t f = 0; f < kPanel; ++f)
          c[t * kPanel + f] += xr[0] * wf[f][0] + xr[1] * wf[f][1] + xr[2] * wf[f][2] + xr[3] * wf[f][3];
      }
    }
  }
}

void quantize_rows(const float* xf, int64_t M, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum,
                   float* gs) {
  const int64_t nblk = K / B, ng = K / G, per_group = G / B;
  const bool vec = B % 8 == 0 && static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx2);
  // NOTE: one thread below ~1M elements (a parallel region costs more than it saves at decode / small M)
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 20) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (vec) {
        quantize_row_avx2(xf + m * K, K, B, G, q + m * K, bs + m * nblk, bsum + m * nblk, gs + m * ng);
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) gs[m * ng + g] = 0.f;
      for (int64_t b = 0; b < nblk; ++b) {
        const float* xb = xf + m * K + b * B;
        float amax = 0.f;
        for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int64_t i = 0; i < B; ++i) {
          const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
          q[m * K + b * B + i] = static_cast<int8_t>(v);
          sum += v;
        }
        bs[m * nblk + b] = sx;
        bsum[m * nblk + b] = sum;
        gs[m * ng + b / per_group] += sx * float(sum);
      }
    }
  });
}

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
  const int64_t g_unit = bits == 8 ? 4 : bits == 6 ? 32 : 8;  // k per quad row (int6: two 16-k steps per block)
  TORCH_CHECK(G > 0 && K % G == 0 && G % g_unit == 0, "group_size ", G, " must divide K = ", K,
              " and be a multiple of ", g_unit);
  const int64_t ng = K / G;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == ng,
              "scales must be contiguous float32 [N, K / group_size] = [", N, ", ", ng, "], got ", scales.sizes());
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
  const bool vnni_layout = (bits == 8 && !signed_layout) || bits == 6;
  const Kernel kernel = choose(static_cast<int>(bits), vnni_layout, signed_layout, x.scalar_type() == at::kBFloat16, M);
  Panel proto{nullptr, nullptr, nullptr, K, G, static_cast<int>(bits), bits == 8 && vnni_layout ? 128 : 0,
              bits == 8 ? 0 : bits == 6 ? 32 : 8};

  // The tail panel of each matrix widened to 16 features (zero scales), so every micro-kernel sees full panels.
  const int64_t row_bytes = K * bits / 8 / 4 * 4, panel_bytes = row_bytes * kPanel;  // bytes per feature / panel
  const int64_t n_full = n_out / kPanel, tail = n_out % kPanel, n_panels = n_full + (tail > 0);
  const int64_t n_mats = gate_up ? 2 : 1, R = row_bytes / 4;
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float* sb = scales.data_ptr<float>();
  const uint8_t* zb = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  std::vector<uint8_t> tq(tail ? n_mats * panel_bytes : 0), tz(tail && zb ? n_mats * ng * kPanel : 0);
  std::vector<float> ts(tail ? n_mats * ng * kPanel : 0, 0.f);
  for (int64_t m = 0; tail && m < n_mats; ++m) {
    const uint8_t* q = qb + m * n_out * row_bytes + n_full * panel_bytes;
    for (int64_t r = 0; r < R; ++r) std::memcpy(&tq[m * panel_bytes + r * 64], q + r * tail * 4, tail * 4);
    const int64_t o = m * n_out * ng + n_full * ng * kPanel;
    for (int64_t g = 0; g < ng; ++g) {
      std::memcpy(&ts[(m * ng + g) * kPanel], sb + o + g * tail, tail * sizeof(float));
      if (zb) std::memcpy(&tz[(m * ng + g) * kPanel], zb + o + g * tail, tail);
    }
  }
  auto panel = [&](int64_t m, int64_t p) {
    Panel w = proto;
    const bool full = p < n_full;
    w.q = full ? qb + m * n_out * row_bytes + p * panel_bytes : &tq[m * panel_bytes];
    w.s = full ? sb + m * n_out * ng + p * ng * kPanel : &ts[m * ng * kPanel];
    w.z = zb == nullptr ? nullptr : full ? zb + m * n_out * ng + p * ng * kPanel : &tz[m * ng * kPanel];
    return w;
  };

  SLF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_quant_linear", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ldo = out.stride(0);
    if (kernel == Kernel::kBf16) {
      const bool brgemm = use_brgemm(M);
      const auto* xb = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
      const int per_chunk = gate_up ? kBf16Panels / 2 : kBf16Panels;
      const int64_t n_chunks = (n_panels + per_chunk - 1) / per_chunk;
      at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<uint32_t> buf(kBf16Panels * (K / 2) * kPanel);
        alignas(64) float c[kBf16T * kBf16Panels * kPanel], cb[2 * kBrgemmRows * kPanel];
        const uint32_t* wp[kBf16Panels];
        for (int64_t ch = c0; ch < c1; ++ch) {
          const int64_t p0 = ch * per_chunk;
          const int np_out = static_cast<int>(std::min<int64_t>(per_chunk, n_panels - p0));
          for (int64_t m = 0; m < n_mats; ++m)
            for (int qq = 0; qq < np_out; ++qq) {
              uint32_t* dst = &buf[(m * np_out + qq) * (K / 2) * kPanel];
              dequant_bf16(panel(m, p0 + qq), dst);
              wp[m * np_out + qq] = dst;
            }
          if (brgemm) {  // AMX: oneDNN's brgemm reads a dequantized panel as its packed B (N = 16, ld 16)
            for (int64_t t0 = 0; t0 < M; t0 += kBrgemmRows) {
              const int64_t rows = std::min(kBrgemmRows, M - t0);
              for (int qq = 0; qq < np_out; ++qq) {
                for (int64_t m = 0; m < n_mats; ++m)
                  at::native::cpublas::brgemm(rows, kPanel, K, x.stride(0), kPanel, kPanel, false,
                                              xb + t0 * x.stride(0),
                                              reinterpret_cast<const c10::BFloat16*>(wp[m * np_out + qq]),
                                              cb + m * kBrgemmRows * kPanel);
                const int64_t p = p0 + qq, width = p < n_full ? kPanel : tail;
                emit(cb, gate_up ? cb + kBrgemmRows * kPanel : nullptr, kPanel, rows, width,
                     bp ? bp + p * kPanel : nullptr, o + t0 * ldo + p * kPanel, ldo);
              }
            }
            continue;
          }
          for (int64_t t0 = 0; t0 < M; t0 += kBf16T) {
            const int64_t T = std::min(kBf16T, M - t0);
            micro_bf16(wp, np_out * static_cast<int>(n_mats), xb + t0 * x.stride(0), x.stride(0), T, K, c);
            for (int qq = 0; qq < np_out; ++qq) {
              const int64_t p = p0 + qq, width = p < n_full ? kPanel : tail;
              emit(c + qq * kPanel, gate_up ? c + (np_out + qq) * kPanel : nullptr, kBf16Panels * kPanel, T, width,
                   bp ? bp + p * kPanel : nullptr, o + t0 * ldo + p * kPanel, ldo);
            }
          }
        }
        if (brgemm) at::native::cpublas::brgemm_release();
      });
      return;
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
      act.B = act_block(G);
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
    // NOTE: units of panels claimed from a shared counter rather than split in halves up front (vnni_gemm.cpp)
    const bool four = kernel == Kernel::kVnni && M == 1;
    const int64_t per_unit = four ? (gate_up ? 2 : 4) : 1, n_units = (n_panels + per_unit - 1) / per_unit;
    std::atomic<int64_t> next{0};
    auto run_panels = [&](int64_t p, int64_t p1) {  // panels [p, p1)
      alignas(64) float c[kVnniT * kPanel], cu[kVnniT * kPanel];
      if (four) {  // decode: four panels (gate_up: two of Wg, two of Wu) at a time
        const int64_t step = per_unit;
        alignas(64) float c4[4 * kPanel];
        for (; p + step <= p1; p += step) {
          Panel ws[4];
          for (int i = 0; i < 4; ++i) ws[i] = gate_up ? panel(i % 2, p + i / 2) : panel(0, p + i);
          micro_vnni4(ws, act, 0, c4);
          for (int64_t i = 0; i < step; ++i) {
            const int64_t pi = p + i, width = pi < n_full ? kPanel : tail;
            emit(c4 + (gate_up ? 2 * i : i) * kPanel, gate_up ? c4 + (2 * i + 1) * kPanel : nullptr, kPanel, 1,
                 width, bp ? bp + pi * kPanel : nullptr, o + pi * kPanel, ldo);
          }
        }
      }
      for (; p < p1; ++p) {
        const Panel wg = panel(0, p);
        const Panel wu = gate_up ? panel(1, p) : wg;
        const int64_t width = p < n_full ? kPanel : tail;
        for (int64_t t0 = 0; t0 < M; t0 += tmax) {
          const int64_t T = std::min(tmax, M - t0);
          micro(wg, act, t0, T, c);
          if (gate_up) micro(wu, act, t0, T, cu);
          emit(c, gate_up ? cu : nullptr, kPanel, T, width, bp ? bp + p * kPanel : nullptr, o + t0 * ldo + p * kPanel,
               ldo);
        }
      }
    };
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_units), 1, [&](int64_t, int64_t) {
      for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1))
        run_panels(u * per_unit, std::min(n_panels, (u + 1) * per_unit));
    });
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
