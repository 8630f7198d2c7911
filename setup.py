"""Build vit_fast's patch-embedding extension `vit_fast._C` when torch can be imported here.

The metadata lives in pyproject.toml; this file only adds the extension and `develop`.

torch is not a build requirement: `pip install .` and `pip wheel .` build in an isolated
environment without it, and then the wheel holds the Python package and the C++/CUDA sources
(`vit_fast/csrc/`), which `vit_fast/_extension.py` compiles once on first use. Where torch is
importable at build time (`python setup.py develop`, `pip install --no-build-isolation .`) the
extension is built here, as a CPU `CppExtension` when torch has no CUDA or nvcc is missing, and a
`CUDAExtension` (CPU + CUDA implementations) otherwise; CUDA archs come from
`TORCH_CUDA_ARCH_LIST`, default sm_80 and sm_90.

`python setup.py develop`: setuptools >= 80 turned `develop` into a call of
`pip install -e . --use-pep517` with build isolation, where torch cannot be imported; the
`develop` below runs that editable install without isolation instead. Older setuptools keep the
classic in-place `develop`, which needs no isolation and is used as is (pip would call back into
it: running pip from there would recurse).

`vit_fast/kernels` and `vit_fast/csrc` are links to the top-level `kernels/` and `csrc/`: a
checkout on sys.path finds `vit_fast.kernels` and the sources where an install has them, and the
sdist and wheel hold copies of the files.
"""
import os
import shutil
import subprocess
import sys

import setuptools
from setuptools import setup
from setuptools.command.develop import develop

SOURCES = "vit_fast/csrc"


def torch_build():
    """-> (ext_modules, build_ext command) built against the importable torch, or ([], None) without it."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("vit_fast: torch is not importable in this build environment, so vit_fast._C is not built "
              "here; it is compiled on first use from the installed sources", file=sys.stderr)
        return [], None
    cpu_sources = [f"{SOURCES}/patch_embed.cpp"]
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if torch.version.cuda and nvcc and os.path.exists(nvcc):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "vit_fast._C",
            cpu_sources + [f"{SOURCES}/patch_embed_cuda.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        ext = CppExtension("vit_fast._C", cpu_sources, extra_compile_args=["-O3"])
    return [ext], BuildExtension.with_options(use_ninja=True)


SETUPTOOLS_DEVELOP_IS_PIP = int(setuptools.__version__.split(".")[0]) >= 80


class DevelopWithoutIsolation(develop):
    def run(self):
        if not SETUPTOOLS_DEVELOP_IS_PIP:
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--use-pep517", "-e", "."]
        if self.no_deps:
            cmd.append("--no-deps")
        subprocess.check_call(cmd)


ext_modules, build_ext = torch_build()
cmdclass = {"develop": DevelopWithoutIsolation}
if build_ext is not None:
    cmdclass["build_ext"] = build_ext
setup(ext_modules=ext_modules, cmdclass=cmdclass)
