// AMX tile blocks for bf16 GEMMs whose weights lie as vnni panels ([K/2][16][2] bf16: every 16 k pairs an AMX B
// tile, 16 rows of 64 bytes, as it lies): the bf16 linear layers (amx_gemm.cpp, which holds the code below) and the
// dequantized panels of the int8 / int6 / int4 ones (quant_bf16_gemm.cpp). Runs only where cpu_isa() is kAmx.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace slf::cpu::amx {

constexpr int64_t kTileK = 32;   // k per step: an A tile is 16 tokens x 32 bf16, a B tile 16 k pairs x 16 features
constexpr int64_t kBlockM = 32;  // tokens per block: two A tiles, two C tiles high
constexpr int64_t kMinM = 4;     // the AMX GEMMs run above this many tokens (decode streams weights: vnni_gemm.cpp)

// Whether this process runs AMX tiles: an AMX CPU (cpu_isa()), unless STABLELM_FAST_AMX=0.
bool enabled();

// Whether a GEMM of M tokens and K features takes the AMX tiles: enabled(), M > kMinM, K % 32 == 0 (else
// vnni_gemm.cpp / vdpbf16ps blocks).
inline bool use(int64_t M, int64_t K) { return M > kMinM && K % kTileK == 0 && enabled(); }

// One worker's tile configuration (every tile 16 rows x 64 bytes): load() before the first block, released when
// the object goes; a copy starts unloaded (for_each_claimed copies its body once per worker).
class Tiles {
 public:
  Tiles() = default;
  Tiles(const Tiles&) {}
  Tiles& operator=(const Tiles&) = delete;
  ~Tiles();
  void load();

 private:
  bool loaded_ = false;
};

// x's tokens in blocks of 32 as the A tiles read them (16 whole rows a tile): whole blocks in place, the last
// partial block copied and zero-padded.
class Rows {
 public:
  Rows(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K);
  const c10::BFloat16* at(int64_t t0) const { return t0 < whole_ ? x_ + t0 * ldx_ : rest_.data(); }
  int64_t ld(int64_t t0) const { return t0 < whole_ ? ldx_ : K_; }

 private:
  const c10::BFloat16* x_;
  int64_t ldx_, K_, whole_;
  std::vector<c10::BFloat16> rest_;
};

// c0 (and c1) [32][16] fp32 = the `rows` (<= 32) tokens at a (row stride lda, 32 rows readable when rows > 16, else
// 16: Rows) times the vnni panel b0 (and b1, unless null); K % 32 == 0; the worker's Tiles loaded. ahead: prefetch
// b0 / b1 a little in front of their tile loads (a first pass over panels that come from memory).
void block(int64_t rows, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b0, const c10::BFloat16* b1,
           int64_t K, float* c0, float* c1, bool ahead = false);

}  // namespace slf::cpu::amx
