"""Build vit_fast: the Python package, the Triton kernels (as `vit_fast.kernels`) and the
patch-embedding extension `vit_fast._C`.

The extension is a CPU `CppExtension` when torch has no CUDA or nvcc is missing, and a
`CUDAExtension` (CPU + CUDA implementations) otherwise; CUDA archs come from
`TORCH_CUDA_ARCH_LIST`, default sm_80 and sm_90.

`python setup.py develop`: setuptools >= 80 turned `develop` into a call of
`pip install -e . --use-pep517` with build isolation, where torch cannot be imported; the
`develop` below runs that editable install without isolation instead. Older setuptools keep the
classic in-place `develop`, which needs no isolation and is used as is (pip would call back into
it: running pip from there would recurse). `vit_fast/kernels` is a link to `kernels/` so that a
checkout on sys.path (the classic develop) finds `vit_fast.kernels` as an install does.
"""
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.develop import develop

import setuptools
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def patch_embed_extension():
    cpu_sources = ["csrc/patch_embed.cpp"]
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if torch.version.cuda and nvcc and os.path.exists(nvcc):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "vit_fast._C",
            cpu_sources + ["csrc/patch_embed_cuda.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    return CppExtension("vit_fast._C", cpu_sources, extra_compile_args=["-O3"])


SETUPTOOLS_DEVELOP_IS_PIP = int(setuptools.__version__.split(".")[0]) >= 80


class DevelopWithoutIsolation(develop):
    def run(self):
        if not SETUPTOOLS_DEVELOP_IS_PIP:
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--use-pep517", "-e", "."]
        if self.no_deps:
            cmd.append("--no-deps")
        subprocess.check_call(cmd)


setup(
    name="vit_fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for Vision Transformers in PyTorch",
    python_requires=">=3.10",
    packages=["vit_fast", "vit_fast.ops", "vit_fast.nn", "vit_fast.kernels"],
    package_dir={"vit_fast.kernels": "kernels"},
    ext_modules=[patch_embed_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "develop": DevelopWithoutIsolation},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={"test": ["pytest", "pytest-xdist", "scipy"], "train": ["pillow", "tqdm", "matplotlib"]},
)
