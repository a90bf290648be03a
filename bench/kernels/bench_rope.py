"""qk_norm_rope_cache (QK-norm + partial rotary + paged KV write): reference vs C++.  .venv/bin/python bench/kernels/bench_rope.py"""

from __future__ import annotations

import _util  # noqa: F401  (sys.path)
import torch

from stablelm_fast.ops import cpu_ops, reference


def main() -> None:
    bw = _util.header("qk_norm_rope_cache")
    for dtype in (torch.bfloat16, torch.float32):
        # 1.6B: 32 heads x 64 (no GQA, no QK-norm); 12B-like: 32 q / 8 kv heads x 160 with QK-norm.
        for hq, hkv, d, qk_norm in ((32, 32, 64, False), (32, 8, 160, True)):
            for t in (1, 8, 512):
                block_size, num_blocks = 16, 64
                qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
                pos = torch.randint(0, 4096, (t,))
                cs = reference.rotary_cos_sin(4096, d // 4, 10000.0)
                qn = torch.randn(hq, d) if qk_norm else None
                kn = torch.randn(hkv, d) if qk_norm else None
                kc = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype)
                vc = torch.zeros_like(kc)
                slots = torch.randperm(num_blocks * block_size)[:t]
                args = (qkv, pos, cs, qn, kn, 1e-5, kc, vc, slots, hq, hkv, d)
                nbytes = 2 * qkv.numel() * qkv.element_size()  # read qkv, write q + k + v
                _util.row(f"{str(dtype)[6:]} Hq={hq} Hkv={hkv} D={d} norm={int(qk_norm)} T={t}",
                          _util.timeit(lambda: reference.qk_norm_rope_cache(*args)),
                          _util.timeit(lambda: cpu_ops.qk_norm_rope_cache(*args)), nbytes, bw)


if __name__ == "__main__":
    main()
