// Dynamic work sharing for the CPU kernels: items handed out one at a time from a shared counter.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace slf::cpu {

// body(i) for every i in [0, n), by up to at::get_num_threads() workers that each claim the next unclaimed item when
// done with one (items start in order 0, 1, ...). Each worker runs its own copy of body, so a lambda can own
// per-worker scratch: [&, buf = std::vector<float>(size)](int64_t i) mutable { ... }.
// NOTE: not at::parallel_for's even split up front: items differ in cost (causal attention, context lengths, a
// GEMM's tail panels), and on a shared machine one thread is often held up for a while; with a static split the
// other then waits at the end of every call.
template <typename Body>
void for_each_claimed(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    Body mine = body;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      mine(i);
  });
}

}  // namespace slf::cpu
