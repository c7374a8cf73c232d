"""Builds fp8_backend._C (csrc/cpu) with torch.utils.cpp_extension.

The AVX-512 code paths are compiled with per-function target attributes and picked at run time
by CPUID, so one binary runs on any x86-64 CPU (portable path where AVX-512 is missing).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
extra_compile_args = {"cxx": ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]}


def cuda_extensions():
    """fp8_backend._C_cuda (csrc/cuda: torch-free .cu kernels + bindings.cpp), only when torch is
    built with CUDA and nvcc is on PATH; the CPU wheel cannot build a CUDAExtension."""
    import shutil

    import torch

    if not (torch.version.cuda and shutil.which("nvcc")):
        return []
    from torch.utils.cpp_extension import CUDAExtension

    cuda_dir = os.path.join("csrc", "cuda")
    return [
        CUDAExtension(
            "fp8_backend._C_cuda",
            sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))) + [os.path.join(cuda_dir, "bindings.cpp")],
            include_dirs=[os.path.abspath(cuda_dir)],
            # no fast math: x / scale must be IEEE-rounded to match numerics.py bit for bit
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        )
    ]


setup(
    ext_modules=[
        CppExtension(
            "fp8_backend._C",
            sources,
            include_dirs=[os.path.abspath(os.path.join("csrc", "cpu"))],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]
    + cuda_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
