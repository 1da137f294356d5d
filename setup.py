"""Builds the C++ extension megafork._C (radix-select histograms, SGLang reply parsing) with pybind11.

The extension works on numpy buffers, so it compiles without torch headers.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "megafork._C",
    sources=["csrc/radix_hist.cpp", "csrc/sglang_reply.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
