// Weight-only int8 / int6 / int4 linear layers on the CPU: the packed layout, and the micro-kernels of each ISA that
// the driver (quant_linear.cpp) calls per panel of 16 output features.
//
// Packed layout (stablelm_fast/ops/cpu_quant.py packs it at load; canonical form in ops/quant_reference.py). W [N, K]
// is cut into panels of 16 features, the last one holding the N % 16 left (width w); per panel:
//   q       "quad rows" of 4 bytes per feature, [R][w][4] with R = K / 4 (int8), 3 K / 16 (int6) or K / 8 (int4):
//           int8: byte i of feature f in row r is W's quantized value at k = 4r + i, stored as u = q + offset
//                 (offset 128, unsigned, in the vnni layout: the u8 operand of vpdpbusd; 0, signed, in the avx2 /
//                 scalar layout: vpmaddubsw's sign trick needs |q| <= 128);
//           int4: byte i of feature f in row r holds k = 8r + i in its low nibble and k = 8r + 4 + i in its high one
//                 (one 64-byte load of a full panel = two int8-style quad rows after a mask and a shift).
//           int6 (every layout; u in [0, 63]): per 16 k (three rows, 192 bytes of a full panel), rows 3c and
//                 3c + 1 hold the low nibbles of k = 16c .. 16c + 7 and 16c + 8 .. 16c + 15 as int4 does, and
//                 byte i of feature f in row 3c + 2 the top two bits of k = 16c + i (bits 0-1), 16c + 4 + i
//                 (bits 2-3), 16c + 8 + i (bits 4-5) and 16c + 12 + i (bits 6-7): each int8-style quad row is
//                 a nibble (mask / shift) ORed with two bits of the third row (one uniform shift, a mask).
//   scales  fp16 [K / G][w] (as GPTQ / AWQ store them; quantization at load rounds scales to fp16 values, so that
//           packing loses nothing: ops/quant_reference.py);  zeros  uint8 [K / G][w] (or none: every zero is the
//           default, 0 for int8, 32 for int6, 8 for int4).
// Packed qweight tensors are 3-D, [N, R, 4] with R = K bits / 32: uint8 (int4, int6, or int8 + 128: vnni) or int8
// (int8, signed: avx2 / scalar); packed scales / zeros keep their canonical shape [N, K / G] in the order above. A
// gate_up weight [Wg; Wu] is packed as two such matrices of N / 2 rows, stacked.
//
// W[n, k] = (u - offset - zero) * scale. With int8 activations (xq = round(x / sx) per block of B k, sx = max|x| / 127),
//   y[n] = sum_g s[n,g] * (sum_{b in g} sx_b * dot_b(u, xq) - (zero + offset) * X_g),  X_g = sum_{b in g} sx_b * sum_b(xq)
// with dot_b the int32 dot product of a block: vpdpbusd (AVX512-VNNI) or vpmaddubsw + vpmaddwd (AVX2). Without
// zero points (zero + offset constant) the correction is exact, in int32 per block: dot_b - (zero + offset) sum_b(xq).
#pragma once
// NOTE: no torch/all.h here: the micro-kernel files include only this, c10's BFloat16 / TORCH_CHECK and the
// intrinsics, and compile in seconds.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

namespace slf::cpu::quant {

constexpr int64_t kPanel = 16;

// One full panel (16 features; the driver widens the tail panel to 16 with zero scales).
struct Panel {
  const uint8_t* q;   // [R][16][4]
  const uint16_t* s;  // [K / G][16] fp16 (bits)
  const uint8_t* z;   // [K / G][16] or nullptr
  int64_t K, G;
  int bits;           // 8, 6 or 4
  int offset;         // stored u = q + offset
  int zero;           // the zero point when z == nullptr
};

// x of one call, quantized per block of B k (int kernels), and as fp32 rows (scalar / fp32-dequant kernels).
struct Act {
  const int8_t* q = nullptr;   // [M][K]
  const float* bs = nullptr;   // [M][K / B]: sx per block
  const int32_t* bsum = nullptr;  // [M][K / B]: sum of xq over the block
  const float* gs = nullptr;   // [M][K / G]: X_g
  const float* f = nullptr;    // [M][K] fp32
  int64_t K = 0, B = 0, ng = 0;
  bool stream = false;  // few tokens (M <= kVnniT): W streams from DRAM once; the kernels prefetch it into L2
  // token t's part of each of the above
  const int8_t* q_row(int64_t t) const { return q + t * K; }
  const float* bs_row(int64_t t) const { return bs + t * (K / B); }
  const int32_t* bsum_row(int64_t t) const { return bsum + t * (K / B); }
  const float* gs_row(int64_t t) const { return gs + t * ng; }
  const float* f_row(int64_t t) const { return f + t * K; }
};

// An fp16 scale (its bits) as fp32.
inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// 4 bytes of xq as one int32 (the operand broadcast to every lane of vpdpbusd / vpmaddubsw).
inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The decode kernels (micro_vnni4, micro_avx2_4) prefetch each stream of W this far ahead into L2, once per 64 bytes
// read. NOTE: measured in the engine (1.6B shape, int4, Zen 4, 2 threads, alternated in one process): decode 26.4 /
// 27.9 -> 29.6 / 30.6 tok/s (AVX-512), 24.7 -> 30.1 (AVX2 mode); 2 KB about the same, into L1 (1 KB) slower; no
// change for bf16 weights, whose kernels do less work per byte and keep up with the hardware prefetchers alone.
// prefetch_l2(p, lines): the `lines` 64-byte lines of one kernel step at p, that far ahead.
constexpr int64_t kL2Ahead = 4096;
inline void prefetch_l2(const uint8_t* p, int lines = 1) {
  for (int l = 0; l < lines; ++l) __builtin_prefetch(p + 64 * l + kL2Ahead, 0, 2);
}

// c[t][0:16] = panel . x[t0 + t] for t < T, fp32. T <= the kernel's kMaxT.
using Micro = void (*)(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c);

// AVX512-VNNI: int8 activations, vpdpbusd (T <= 4); the in-register dequantization to fp32 FMAs (T <= 4).
void micro_vnni(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c);
void micro_fp32_avx512(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c);
// AVX512-VNNI, one token (decode): four panels at once, c: [4][16].
void micro_vnni4(const Panel* w, const Act& x, int64_t t0, float* c);
// AVX2: int8 activations, vpmaddubsw (T <= 2; signed int8 layout).
void micro_avx2(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c);
// AVX2, one token (decode): four panels at once, c: [4][16].
void micro_avx2_4(const Panel* w, const Act& x, int64_t t0, float* c);
// Portable: fp32 dequantization, any T.
void micro_scalar(const Panel& w, const Act& x, int64_t t0, int64_t T, float* c);
constexpr int64_t kVnniT = 4, kAvx2T = 2, kScalarT = 4;

// x in int8 per block of B (rows of x in fp32, already converted), X_g per group (M K work): per row with AVX2 where
// B is a multiple of 8 (quantize_row_avx2, the same results), scalar C++ otherwise.
void quantize_row_avx2(const float* x, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum, float* gs);
void quantize_rows(const float* xf, int64_t M, int64_t K, int64_t B, int64_t G, int8_t* q, float* bs, int32_t* bsum,
                   float* gs);

// Prefill (AVX512-BF16): a panel dequantized to bf16 pairs [K / 2][16] (32-bit words, k even in the low half),
// then c[t][q * 16 + j] = sum over K of x[t] . panel q, for T <= 6 tokens and np <= 4 dequantized panels.
void dequant_bf16(const Panel& w, uint32_t* dst);
void micro_bf16(const uint32_t* const* w, int np, const c10::BFloat16* x, int64_t ldx, int64_t T, int64_t K,
                float* c);
constexpr int64_t kBf16T = 6, kBf16Panels = 4;

// The driver's epilogue for bf16 x on AVX512-VNNI machines (they have AVX512-BF16: cpu_isa() >= avx512bf16):
// out[t][0:width] (row stride ldo) for t < T from fp32 c (row stride ldc): + bias, or silu(c) * cu (gate_up), fp32
// math as quant_gemm.h's scalar emit, rounded to bf16 to nearest even.
void emit_bf16(const float* c, const float* cu, int64_t ldc, int64_t T, int64_t width, const float* bias,
               c10::BFloat16* out, int64_t ldo);

// Whether the CPU has AVX512-VNNI on top of the process's ISA (cpu_isa() >= avx512bf16).
bool has_vnni();

}  // namespace slf::cpu::quant
