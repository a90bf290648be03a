"""Builds stablelm_fast with its C++ extension `stablelm_fast._C` (torch cpp_extension + ninja).

CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu) are added when torch was
built with CUDA and nvcc is found (under CUDA_HOME, located as torch locates it; STABLELM_FAST_NO_CUDA=1 turns
them off); TORCH_CUDA_ARCH_LIST picks the archs, else sm_80 + sm_90. `make cuda-check` compiles them standalone on
any machine with nvcc; `make gpu-check` builds in place for the GPU present (gpu/detect.py) and tests them.
Install with `pip install --no-build-isolation -e .` so the build uses the torch already in the environment
(build isolation would pull a CUDA torch wheel into a temporary build env).
"""

import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvcc() -> str | None:
    """The nvcc torch's cpp_extension will use (CUDA_HOME/bin/nvcc, CUDA_HOME found as torch finds it), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def _extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    # NOTE: kernels pick their ISA at run time (AVX-512/AVX2 paths are compiled per function with target
    # attributes), so the binary stays portable; no -march=native here.
    with_cuda = torch.version.cuda is not None and _nvcc() is not None and os.environ.get(
        "STABLELM_FAST_NO_CUDA", "0") != "1"
    if with_cuda:
        # TORCH_CUDA_ARCH_LIST set (e.g. "9.0" by `make gpu-check` for the GPU present): torch adds the gencode
        # flags for exactly those archs. Unset: a portable build for A100 (sm_80) and H100/H200 (sm_90).
        # NOTE: any -gencode in extra_compile_args makes torch ignore TORCH_CUDA_ARCH_LIST, hence the either/or.
        arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else ["-gencode=arch=compute_80,code=sm_80",
                                                                   "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension(
            "stablelm_fast._C",
            cpu_sources + _sources("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("SLF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *arch]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "stablelm_fast._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
