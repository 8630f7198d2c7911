"""Test setup: without a GPU, Triton's interpreter runs the kernels on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
GPU-only tests carry `@pytest.mark.gpu` and run with `pytest -m gpu` on a machine with CUDA.
Tests that take over ~5 s (sm_90 compiles, torch.compile, the install test) carry `@pytest.mark.slow`:
`pytest -m "not slow"` is the quick developer subset.

The `interpreter` marker is added here, without CUDA only (with CUDA nothing runs on the interpreter),
to every test that is not gpu-marked and that
- is parametrized by `path` with the Triton path, "kernel" (tests/opnumerics.py PATHS) or "kernels"
  (a `path` parameter decides alone: its "torch-forced" / "torch-cpu" / "torch" cases are not marked), or
- has no `path` parameter and takes the `device` fixture, which is then the CPU under the interpreter.
So `-m interpreter` selects the tests declared to run the Triton kernels; a test that runs them on CPU
tensors without saying so (neither the fixture nor `path`) is not marked.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


TRITON_PATHS = ("kernel", "kernels")  # the values of a test's `path` parameter that take the Triton kernels


def runs_on_the_interpreter(item) -> bool:
    """The module docstring's rule for the `interpreter` marker (without CUDA; gpu tests excluded)."""
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    if "path" in params:
        return params["path"] in TRITON_PATHS
    return "device" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; CPU runs prove the kernels under TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        elif runs_on_the_interpreter(item):
            item.add_marker(pytest.mark.interpreter)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
