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


setup(
    ext_modules=[
        CppExtension(
            "fp8_backend._C",
            sources,
            include_dirs=[os.path.abspath(os.path.join("csrc", "cpu"))],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
