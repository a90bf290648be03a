// Memory for weights that stream from DRAM at every decode step: anonymous pages aligned to 2 MiB and marked
// MADV_HUGEPAGE, so that Linux backs them with transparent huge pages where it allows (THP "madvise" or "always").
// Streaming ~1-3 GB a token through 4 KiB pages costs a TLB miss every 4 KiB per stream, a nested page walk under a
// hypervisor; 2 MiB pages leave one every 2 MiB. Measured on a 2-core Zen 4 VM (KVM): an fp32 sum over 600 MiB
// 28-30 -> 31-33 GB/s, the int4 / bf16 linear layers of 24 1.6B blocks ~3% faster (medians of 20 interleaved
// sweeps). Only the 2 MiB-aligned whole pages inside the tensor become huge, so resident memory stays the
// tensor's size (no page straddles its end). Later, alternated runs: 32 x 128 / 64 throughput of the 1.6B in bf16
// 33.1-33.7 -> 37.6-40.9 tok/s. The cost is at load, on that VM: the first touch of each huge page (3 GiB 10.8-17.9 s
// against 0.9 s in 4 KiB pages); STABLELM_FAST_HUGE_PAGES=0 (ops/cpu_memory.py) skips this memory.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#include "ops.h"

namespace {

constexpr int64_t kHuge = int64_t(2) << 20;
constexpr int64_t kSmall = 4096;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

torch::Tensor cpu_weight_empty(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "cpu_weight_empty: nbytes must be >= 0, got ", nbytes);
  const auto opts = torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCPU);
  if (nbytes < kHuge) return torch::empty({nbytes}, opts);
  const int64_t size = round_up(nbytes, kSmall), span = size + kHuge;
  void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return torch::empty({nbytes}, opts);
  // keep [start, start + size) with start 2 MiB-aligned; give the rest back
  const auto b = reinterpret_cast<uintptr_t>(base);
  const uintptr_t start = static_cast<uintptr_t>(round_up(static_cast<int64_t>(b), kHuge));
  if (start > b) munmap(base, start - b);
  if (b + span > start + size) munmap(reinterpret_cast<void*>(start + size), b + span - (start + size));
  void* p = reinterpret_cast<void*>(start);
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);  // advice: where THP is off this fails, and the pages stay small
#endif
  return torch::from_blob(p, {nbytes}, [size](void* q) { munmap(q, size); }, opts);
}
