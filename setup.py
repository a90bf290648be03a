"""Builds stablelm_fast with its C++ extension `stablelm_fast._C` (torch cpp_extension + ninja).

CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels (csrc/cuda/*.cu) are added when torch was
built with CUDA and nvcc is found; `make cuda-check` compiles them standalone on any machine with nvcc.
Install with `pip install --no-build-isolation -e .` so the build uses the torch already in the environment
(build isolation would pull a CUDA torch wheel into a temporary build env).
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    # NOTE: kernels pick their ISA at run time (AVX-512/AVX2 paths are compiled per function with target
    # attributes), so the binary stays portable; no -march=native here.
    with_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None and os.environ.get(
        "STABLELM_FAST_NO_CUDA", "0") != "1"
    if with_cuda:
        return CUDAExtension(
            "stablelm_fast._C",
            cpu_sources + _sources("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("SLF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17",
                                                            "-gencode=arch=compute_80,code=sm_80",
                                                            "-gencode=arch=compute_90,code=sm_90"]},
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
