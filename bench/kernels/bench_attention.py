"""Paged attention on CPU: decode (us per call, GB/s of K/V read against the read bandwidth measured in the same
run) and prefill (GFLOP/s against the torch reference).

    .venv/bin/python bench/kernels/bench_attention.py                # decode table, then prefill
    .venv/bin/python bench/kernels/bench_attention.py --decode --rounds 7 --threads 1,2
    STABLELM_FAST_ISA=avx2 or scalar runs the lower kernels.

Decode: every round measures the read bandwidth, then times each case at each thread count (interleaved, so a
noisy minute hits every case alike); the table gives the median over rounds of each round's median per-call time.
"cold": calls rotate over as many copies of the cache ("layers", distinct blocks of one allocation, as the engine's
per-layer caches) as fill > 96 MB, so K/V come from memory as in a decode step; "hot": one copy, re-read from the
caches, which shows the compute and fixed costs alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _util  # noqa: F401  (sys.path)
import torch

from stablelm_fast.ops import cpu_ops, reference

# (name, batch, ctx, Hq, Hkv, D): 1.6B batch-1 decode at growing contexts, the throughput run's batched step,
# the 3B (D = 80) and 12B (GQA 32:8, D = 160) shapes; ctx 16: one cache block, about the fixed cost of a call.
DECODE_CASES = [
    ("1.6B", 1, 16, 32, 32, 64),
    ("1.6B", 1, 128, 32, 32, 64),
    ("1.6B", 1, 256, 32, 32, 64),
    ("1.6B", 1, 512, 32, 32, 64),
    ("1.6B", 32, 160, 32, 32, 64),
    ("3B", 1, 256, 32, 32, 80),
    ("12B", 1, 512, 32, 8, 160),
    ("12B", 32, 160, 32, 8, 160),
]
COLD_BYTES = 96 << 20  # > the 32 MB L3 of the Zen 4 VM


def _cache(batch, ctx, hkv, d, dtype, layers=1, block_size=16):
    """One cache of layers x batch sequences' blocks in random order -> (k, v, one block table per layer)."""
    blocks_per_seq = (ctx + block_size - 1) // block_size
    num_blocks = layers * batch * blocks_per_seq
    kc = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    perm = torch.randperm(num_blocks).to(torch.int32)
    tables = [perm[i * batch * blocks_per_seq:(i + 1) * batch * blocks_per_seq].view(batch, blocks_per_seq)
              for i in range(layers)]
    return kc, vc, tables


class DecodeCase:
    def __init__(self, name, batch, ctx, hq, hkv, d, dtype, cold):
        es = torch.finfo(dtype).bits // 8
        self.kv_bytes = 2 * batch * ctx * hkv * d * es
        layers = max(2, -(-COLD_BYTES // self.kv_bytes)) if cold else 1
        self.label = f"{name} B={batch:<3d} ctx={ctx:<4d} Hq={hq} Hkv={hkv} D={d:<3d} {'cold' if cold else 'hot '}"
        self.k, self.v, self.tables = _cache(batch, ctx, hkv, d, dtype, layers)
        self.q = torch.randn(batch, hq, d).to(dtype)
        self.lens = torch.full((batch,), ctx, dtype=torch.int32)
        self.scale, self.i = d ** -0.5, 0
        got = self.call()
        want = reference.paged_attention_decode(self.q, self.k, self.v, self.tables[0], self.lens, self.scale)
        self.err = (got.float() - want.float()).abs().max().item()

    def call(self):
        t = self.tables[self.i % len(self.tables)]
        self.i += 1
        return cpu_ops.paged_attention_decode(self.q, self.k, self.v, t, self.lens, self.scale)

    def time_calls(self, min_time=0.03, max_calls=400) -> float:
        """Median seconds per call over about min_time of calls (after len(tables) warm-up calls)."""
        for _ in range(min(len(self.tables), 8)):
            self.call()
        times = []
        start = time.perf_counter()
        while len(times) < max_calls and (time.perf_counter() - start < min_time or len(times) < 5):
            t = time.perf_counter()
            self.call()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def decode_table(dtype, rounds, threads, hot) -> None:
    cases = [DecodeCase(*c, dtype, cold) for c in DECODE_CASES for cold in ((True, False) if hot else (True,))]
    times = {(c.label, n): [] for c in cases for n in threads}
    bws = []
    for _ in range(rounds):
        torch.set_num_threads(max(threads))
        bws.append(_util.memory_bandwidth_gbs(256))
        for n in threads:
            torch.set_num_threads(n)
            for c in cases:
                times[(c.label, n)].append(c.time_calls())
    bw = statistics.median(bws)
    print(f"== paged decode, {str(dtype)[6:]}, {_util.cpu_model()}, {rounds} interleaved rounds: read bandwidth "
          f"median {bw:.1f} GB/s (min {min(bws):.1f}, max {max(bws):.1f}), {max(threads)} threads")
    for c in cases:
        for n in threads:
            ts = times[(c.label, n)]
            t = statistics.median(ts)
            gbs = c.kv_bytes / t / 1e9
            print(f"{c.label} {n}T  {t * 1e6:8.1f} us (min {min(ts) * 1e6:7.1f})  K/V {c.kv_bytes / 1e6:6.2f} MB  "
                  f"{gbs:6.1f} GB/s ({100 * gbs / bw:4.0f}%)  max err {c.err:.1e}", flush=True)
    torch.set_num_threads(max(threads))


def prefill_table() -> None:
    _util.header("paged attention prefill")
    for dtype in (torch.bfloat16, torch.float32):
        for hq, hkv, d in ((32, 32, 64), (32, 8, 160)):
            for t in (128, 512):  # one prompt: the compare benchmark's 128 tokens, and a longer one
                kc, vc, (bt,) = _cache(1, t, hkv, d, dtype)
                q = torch.randn(t, hq, d).to(dtype)
                cu, lens = torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32)
                flops = 2 * 2 * hq * d * t * (t + 1) / 2  # QK^T and PV over the causal half
                _util.row(f"{str(dtype)[6:]} prefill T={t} Hq={hq} Hkv={hkv} D={d}",
                          _util.timeit(lambda: reference.paged_attention(q, kc, vc, bt, cu, lens, d**-0.5),
                                       min_time=0.1),
                          _util.timeit(lambda: cpu_ops.paged_attention(q, kc, vc, bt, cu, lens, d**-0.5),
                                       min_time=0.1), flops=flops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decode", action="store_true", help="the decode table only")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated thread counts")
    p.add_argument("--no-hot", action="store_true", help="cold-cache rows only")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    a = p.parse_args()
    decode_table(getattr(torch, a.dtype), a.rounds, [int(n) for n in a.threads.split(",")], not a.no_hot)
    if not a.decode:
        prefill_table()


if __name__ == "__main__":
    main()
