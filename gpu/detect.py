"""What `make gpu-check` finds on this machine, as shell assignments (eval'd by gpu/check.sh) or human lines:
whether torch sees a CUDA GPU, its name and compute capability (-> TORCH_CUDA_ARCH_LIST for the build), the CUDA
version torch was built with, and the nvcc the extension build would use (setup.py's rule: CUDA_HOME/bin/nvcc).

    python -m gpu.detect [--shell]
"""

from __future__ import annotations

import os
import shlex
import sys


def detect() -> dict:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda or "", "gpu": "", "capability": "",
            "arch_list": "", "cuda_home": CUDA_HOME or "", "nvcc": "", "build_cuda": "0"}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else ""
    info["nvcc"] = nvcc if nvcc and os.path.exists(nvcc) else ""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}", arch_list=f"{major}.{minor}")
    info["build_cuda"] = "1" if info["torch_cuda"] and info["nvcc"] else "0"
    return info


def main(argv: list[str]) -> int:
    try:
        info = detect()
    except ImportError as e:  # this python has no torch
        info = {"torch": "", "gpu": "", "line": f"no torch in {sys.executable}: {e}"}
    else:
        info["line"] = describe(info)
    if "--shell" in argv:
        print("\n".join(f"SLF_{k.upper()}={shlex.quote(v)}" for k, v in info.items()))
    else:
        print(info["line"])
    return 0


def describe(info: dict) -> str:
    why = ("CUDA kernels will be built" if info["build_cuda"] == "1" else
           "CUDA kernels will NOT be built: " + ("torch is a CPU build" if not info["torch_cuda"] else
                                                  "nvcc not found (CUDA_HOME/bin/nvcc)"))
    return (f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}); GPU: {info['gpu'] or 'none'}"
            f"{' sm_' + info['capability'].replace('.', '') if info['gpu'] else ''}; "
            f"nvcc: {info['nvcc'] or 'none'}; {why}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
