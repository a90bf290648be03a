"""add_layernorm / layernorm / silu_and_mul: reference vs C++ kernels.  .venv/bin/python bench/kernels/bench_layernorm.py"""

from __future__ import annotations

import _util  # noqa: F401  (sys.path)
import torch

from stablelm_fast.ops import cpu_ops, reference


def main() -> None:
    bw = _util.header("layernorm / add_layernorm / silu_and_mul")
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for t in (1, 8, 512):
            h = 2048
            x, r, w, b = torch.randn(t, h).to(dtype), torch.randn(t, h).to(dtype), torch.randn(h), torch.randn(h)
            name = f"{str(dtype)[6:]} add_layernorm T={t} H={h}"
            _util.row(name, _util.timeit(lambda: reference.add_layernorm(x, r, w, b, 1e-5)),
                      _util.timeit(lambda: cpu_ops.add_layernorm(x, r, w, b, 1e-5)), 4 * t * h * es, bw)
            _util.row(f"{str(dtype)[6:]} layernorm T={t} H={h}", _util.timeit(lambda: reference.layernorm(x, w, b, 1e-5)),
                      _util.timeit(lambda: cpu_ops.layernorm(x, w, b, 1e-5)), 2 * t * h * es, bw)
            gu = torch.randn(t, 11264).to(dtype)
            _util.row(f"{str(dtype)[6:]} silu_and_mul T={t} I=5632", _util.timeit(lambda: reference.silu_and_mul(gu)),
                      _util.timeit(lambda: cpu_ops.silu_and_mul(gu)), t * 3 * 5632 * es, bw)


if __name__ == "__main__":
    main()
