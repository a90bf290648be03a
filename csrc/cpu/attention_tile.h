// Prefill / extend attention of one work item computed tile by tile as small GEMMs (csrc/cpu/attention_tile.cpp):
// the item's q rows (tokens x the q heads of one kv head) against tiles of kKeys keys, S = Q K^T and O += P V with
// register-blocked AVX-512 or AVX2 micro-kernels on fp32 copies of the tile, online softmax between them.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace slf::cpu {

struct TileGeom {
  int64_t group, head_dim, block_size;
  int64_t q_tok_stride, q_head_stride, out_tok_stride, out_head_stride;
  int64_t c_block_stride, c_tok_stride, c_head_stride;
  float scale;
};

constexpr int64_t kTileKeys = 32;
constexpr int64_t kTileMaxRows = 64;

// fp32 elements of one thread's workspace for head size d.
int64_t tile_workspace_floats(int64_t head_dim);

// Rows r of the item: token t0 + r / group, q head kv_head * group + r % group; row r attends keys
// 0 .. ctx - q_len + (t - q_start). avx512: use the 16-lane kernels (else the 8-lane AVX2 ones).
template <typename scalar_t>
void tile_attention_item(bool avx512, int64_t t0, int64_t t1, int64_t kv_head, scalar_t* out, const scalar_t* q,
                         const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* block_table,
                         int64_t q_start, int64_t q_len, int64_t ctx, const TileGeom& g, float* workspace);

// The same item with AMX tiles (attention_amx.cpp): bf16 caches on AMX CPUs, head size % 32 == 0 (amx_attention_takes;
// STABLELM_FAST_AMX=0 turns it off).
bool amx_attention_takes(int64_t head_dim);
void amx_attention_item(int64_t t0, int64_t t1, int64_t kv_head, c10::BFloat16* out, const c10::BFloat16* q,
                        const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, const int32_t* block_table,
                        int64_t q_start, int64_t q_len, int64_t ctx, const TileGeom& g);

}  // namespace slf::cpu
