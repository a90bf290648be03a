// GEMM on vnni-packed bf16 weights (packed.h) with AMX tiles, written out: a vnni panel [K/2][16][2] is an AMX B
// tile every 16 k pairs as it lies (16 rows of 64 bytes, contiguous), so the weights are read in place.
//
// One block: 32 tokens x 32 features in four fp32 C tiles (tmm0-3), two A tiles of 16 tokens x 32 k (tmm4, 5: rows
// of x as they lie; one where 16 tokens or fewer are left) and two B tiles (tmm6, 7: two panels, or a gate_up
// layer's gate and up panels of the same 16 features), four tdpbf16ps per 32 k; then the AVX512-BF16 epilogue
// (emit_bf16_rows: bias, silu(gate) * up, bf16).
// Work items are (chunk of up to kChunkM tokens, block of features), chunk-major: a chunk's x (256 x K bf16, 1 MB
// at K = 2048) stays in L2 while the workers pass every feature block over it, and each block's weights (64 KB a
// panel at K = 2048) come from memory once per chunk and serve its tokens from L2.
//
// Used where amx::use(M, K) (amx.h): an AMX process, above 4 tokens, K % 32 == 0.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/amx.h"
#include "cpu/cpu_types.h"
#include "cpu/packed.h"
#include "cpu/parallel.h"

#define SLF_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace slf::cpu {
namespace amx {
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kTile = 16 * 16;  // fp32 elements of a C tile
// k in front of the tile loads that a first pass prefetches. Intel Xeon with AMX, 1.6B shapes streamed from memory:
// M = 32 665 GFLOP/s against 618-627 without (64 k; 128 k and 256 k no better), no difference at M = 128.
constexpr int64_t kAheadK = 64;

// ldtilecfg's 64-byte operand: palette 1, every tile used here 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr TileConfig kConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// tmm0-3: C (token block i, panel j in tmm 2i + j); tmm4, 5: A (tokens 0-15, 16-31); tmm6, 7: B (b0, b1).
// ahead: prefetch b0 / b1 kAheadK k in front of the tile loads (a pass whose panels come from memory).
template <int kA, int kB>
SLF_AMX void tiles(const bf16* a, int64_t lda, const bf16* b0, const bf16* b1, int64_t K, float* c0, float* c1,
                   bool ahead) {
  const int64_t sa = lda * static_cast<int64_t>(sizeof(bf16));
  const bf16* a1 = a + 16 * lda;
  _tile_zero(0);
  if constexpr (kB == 2) _tile_zero(1);
  if constexpr (kA == 2) _tile_zero(2);
  if constexpr (kA == 2 && kB == 2) _tile_zero(3);
  for (int64_t k = 0; k < K; k += kTileK) {
    if (ahead) {
      const char* p0 = reinterpret_cast<const char*>(b0 + (k + kAheadK) * 16);
      for (int l = 0; l < 16; ++l) _mm_prefetch(p0 + 64 * l, _MM_HINT_T0);
      if constexpr (kB == 2) {
        const char* p1 = reinterpret_cast<const char*>(b1 + (k + kAheadK) * 16);
        for (int l = 0; l < 16; ++l) _mm_prefetch(p1 + 64 * l, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a + k, sa);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kA == 2) {
      _tile_loadd(5, a1 + k, sa);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (kB == 2) {
      _tile_loadd(7, b1 + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kA == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, 64);
  if constexpr (kB == 2) _tile_stored(1, c1, 64);
  if constexpr (kA == 2) _tile_stored(2, c0 + kTile, 64);
  if constexpr (kA == 2 && kB == 2) _tile_stored(3, c1 + kTile, 64);
}

}  // namespace

bool enabled() {
  static const bool off = [] {
    const char* s = std::getenv("STABLELM_FAST_AMX");
    return s != nullptr && std::strcmp(s, "0") == 0;
  }();
  return !off && cpu_isa() == Isa::kAmx;
}

namespace {
SLF_AMX void load_config() { _tile_loadconfig(&kConfig); }
SLF_AMX void release() { _tile_release(); }
}  // namespace

void Tiles::load() {
  if (!loaded_) load_config();
  loaded_ = true;
}

Tiles::~Tiles() {
  if (loaded_) release();
}

Rows::Rows(const bf16* x, int64_t ldx, int64_t M, int64_t K)
    : x_(x), ldx_(ldx), K_(K), whole_(M / kBlockM * kBlockM), rest_(M > whole_ ? kBlockM * K : 0, bf16(0.f)) {
  for (int64_t t = whole_; t < M; ++t) std::memcpy(rest_.data() + (t - whole_) * K, x + t * ldx, K * sizeof(bf16));
  __asm__ volatile("" ::: "memory");  // the tile loads (asm without memory operands) must see rest_ written
}

void block(int64_t rows, const bf16* a, int64_t lda, const bf16* b0, const bf16* b1, int64_t K, float* c0,
           float* c1, bool ahead) {
  if (rows > 16) {
    if (b1 == nullptr) tiles<2, 1>(a, lda, b0, b1, K, c0, c1, ahead);
    else tiles<2, 2>(a, lda, b0, b1, K, c0, c1, ahead);
  } else {
    if (b1 == nullptr) tiles<1, 1>(a, lda, b0, b1, K, c0, c1, ahead);
    else tiles<1, 2>(a, lda, b0, b1, K, c0, c1, ahead);
  }
}

}  // namespace amx

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kChunkM = 256;  // tokens per chunk (x kept in L2 while every feature block passes)

void run(const bf16* x, int64_t ldx, int64_t M, int64_t K, const bf16* packed, int64_t n_out, bool gate_up,
         const float* bias, bf16* out, int64_t ldo) {
  const VnniPanels panels(packed, n_out, K, gate_up);  // the tail panels widened to full ones (B tiles)
  const int64_t n_panels = panels.n_panels;
  auto panel = [&](int64_t m, int64_t p) { return reinterpret_cast<const bf16*>(panels.panel(m, p)); };
  const amx::Rows rows_of_x(x, ldx, M, K);

  // Feature blocks: a gate_up layer's panel p (gate and up side by side), else panels 2j and 2j + 1. A block's first
  // pass over a chunk reads its panels from memory and prefetches them a little ahead of the tile loads; its later
  // passes find them in L2.
  // NOTE: prefetching the next block's panels into L2 during a block's later passes (work items of 8 blocks)
  // measured no faster at M = 128 (1.20-1.22 TFLOP/s with the 1.6B shapes streamed from memory, as without).
  const int64_t n_blocks = gate_up ? n_panels : (n_panels + 1) / 2;
  const int64_t n_chunks = (M + kChunkM - 1) / kChunkM;
  for_each_claimed(n_chunks * n_blocks, [&, tiles = amx::Tiles()](int64_t item) mutable {
    alignas(64) float c[2][amx::kBlockM * kPanel];
    tiles.load();
    const int64_t chunk = item / n_blocks, j = item % n_blocks;
    const int64_t p0 = gate_up ? j : 2 * j, p1 = gate_up ? j : 2 * j + 1;
    const bool one = !gate_up && p1 >= n_panels;
    const bf16* b0 = panel(0, p0);
    const bf16* b1 = one ? nullptr : panel(gate_up ? 1 : 0, p1);
    const int64_t t_begin = chunk * kChunkM, t_end = std::min(M, t_begin + kChunkM);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += amx::kBlockM) {
      const int64_t rows = std::min(amx::kBlockM, M - t0);
      amx::block(rows, rows_of_x.at(t0), rows_of_x.ld(t0), b0, b1, K, c[0], c[1], t0 == t_begin);
      bf16* o = out + t0 * ldo;
      if (gate_up) {
        emit_bf16_rows(c[0], c[1], kPanel, rows, nullptr, panels.width(p0), o + p0 * kPanel, ldo);
      } else {
        emit_bf16_rows(c[0], nullptr, kPanel, rows, bias ? bias + p0 * kPanel : nullptr, panels.width(p0),
                       o + p0 * kPanel, ldo);
        if (!one)
          emit_bf16_rows(c[1], nullptr, kPanel, rows, bias ? bias + p1 * kPanel : nullptr, panels.width(p1),
                         o + p1 * kPanel, ldo);
      }
    }
  });
}

}  // namespace

void amx_gemm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const float* bias,
              bool gate_up) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "vnni-packed weights take bfloat16 x, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) % amx::kTileK == 0, "the AMX GEMM takes K % 32 == 0, got K = ", x.size(1));
  run(reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), x.size(0), x.size(1),
      reinterpret_cast<const bf16*>(packed.data_ptr()), out.size(1), gate_up, bias,
      reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0));
}

}  // namespace slf::cpu
