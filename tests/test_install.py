"""Packaging: what a user gets from `pip install <path or URL>` with torch already installed.

The slow test builds the sdist and the wheel from a clone of HEAD (committed work only) in a fresh
venv that sees the installed torch, installs the wheel into another one, compiles vit_fast._C on
first use and runs the console scripts; the fast ones cover the loader's failure paths in-process.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vit_fast import _extension

ROOT = Path(__file__).resolve().parents[1]


def test_no_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_extension.ExtensionUnavailable, match="no C\\+\\+ compiler .'/nonexistent/c\\+\\+' not found"):
        _extension.jit_load()


def test_missing_prebuilt_without_compiler_reports_both(monkeypatch):
    def no_prebuilt():
        raise ImportError("No module named 'vit_fast._C'")

    monkeypatch.setattr(_extension, "_import_prebuilt", no_prebuilt)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    module, error = _extension.load()
    assert module is None
    assert isinstance(error, ImportError)
    assert "no prebuilt vit_fast._C (No module named 'vit_fast._C')" in str(error)
    assert "compiling it on first use failed: no C++ compiler" in str(error)
    monkeypatch.setenv(_extension.NO_JIT_ENV, "1")
    assert f"{_extension.NO_JIT_ENV}=1" in str(_extension.load()[1])


def test_cache_directory_is_keyed_by_torch_archs_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    source = tmp_path / "a.cpp"
    source.write_text("int a;")
    cpu = _extension.build_directory([str(source)], None)
    assert os.path.dirname(cpu) == str(tmp_path) and "-cpu-" in cpu
    assert _extension.build_directory([str(source)], "9.0") != cpu
    source.write_text("int b;")
    assert _extension.build_directory([str(source)], None) != cpu
    monkeypatch.delenv(_extension.CACHE_ENV)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert _extension.cache_root() == str(tmp_path / "te" / "vit_fast")


FIRST_USE = r"""
import sys, warnings
import torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import vit_fast
    import vit_fast.functional as VF
    from vit_fast import dispatch, reference
    from vit_fast.ops import patch_embed as op
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    w, b, half = torch.randn(8, 3, 16, 16), torch.randn(8), torch.full((3,), 0.5)
    before = dispatch.kernel_launches["patch_embed_fwd"]
    out = VF.patch_embed(x, w, b, mean=half, std=half)
    VF.patch_embed(x, w, b, mean=half, std=half)
    torch.testing.assert_close(out, reference.patch_embed(x, w, b, None, None, half, half), atol=1e-4, rtol=1e-4)
assert out.shape == (2, 4, 8), out.shape
assert vit_fast.__file__.startswith(sys.prefix), (vit_fast.__file__, sys.prefix)
assert torch.__file__.startswith(sys.base_prefix), ("torch was installed into the venv", torch.__file__)
runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
launches = dispatch.kernel_launches["patch_embed_fwd"] - before
if sys.argv[1] == "extension":
    assert op.HAS_EXTENSION, op.EXTENSION_ERROR
    import vit_fast._C
    assert vit_fast._C.__file__.startswith(sys.argv[2]), vit_fast._C.__file__
    assert launches == 2 and not runtime, (launches, runtime)
else:
    assert not op.HAS_EXTENSION and launches == 0, launches
    assert len(runtime) == 1 and "no C++ compiler" in runtime[0], runtime
print("ok", launches, runtime)
"""


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _venv(path):
    """A fresh venv that sees the installed torch (and pip, setuptools: a venv's own older setuptools would
    not satisfy torch's requirement on it offline). -> its python."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path])
    return path / "bin" / "python"


@pytest.mark.slow
def test_sdist_and_wheel_from_a_clean_clone_install_and_compile_on_first_use(tmp_path):
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIT_FAST_NO_JIT")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src = tmp_path / "src"
    _run(["git", "clone", "-q", ROOT, src])

    build = _venv(tmp_path / "build-env")
    # the sdist, then the wheel from it as pip builds one: isolated, so torch is not importable there
    sdist = _run([build, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                  tmp_path / "sdist"], cwd=src, env=env).stdout.split()[-1]
    _run([build, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheels", tmp_path / "sdist" / sdist], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "wheels").glob("vit_fast-*.whl")
    with tarfile.open(tmp_path / "sdist" / sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    # what the first-use build compiles and includes (_extension's lists, the header among them), and
    # every committed file of csrc/: a source or header left out of either archive breaks that build
    extension_files = {f"vit_fast/csrc/{name}" for name in (*_extension.CPU_SOURCES, *_extension.CUDA_SOURCES,
                                                            *_extension.HEADERS)}
    assert "vit_fast/csrc/patch_embed.h" in extension_files, sorted(extension_files)
    extension_files |= {f"vit_fast/csrc/{path.name}" for path in (src / "csrc").iterdir() if path.is_file()}
    for files in (in_sdist, in_wheel):
        for name in ("vit_fast/kernels/attention.py", "vit_fast/kernels/host.py", "vit_fast/_extension.py",
                     *sorted(extension_files)):
            assert name in files, name
        assert not [n for n in files if n.startswith(("tests/", "benchmarks/", "examples/", "kernels/", "csrc/"))
                    or n.endswith((".so", ".o", ".pyc", ".png", ".csv", ".json"))], sorted(files)
    assert {"pyproject.toml", "setup.py", "README.md"} <= in_sdist, sorted(in_sdist)  # README.md: pyproject's readme
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # built without torch: sources only

    user = _venv(tmp_path / "user-env")
    site = Path(_run([user, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # offline: the dependencies (torch, triton, numpy, ninja) must be satisfied by what is installed
    _run([user, "-m", "pip", "install", "-q", "--no-index", wheel], cwd=tmp_path, env=env)
    if not (site / "vit_fast").is_dir():  # pip skips a wheel whose version the environment already has
        _run([user, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall", wheel], cwd=tmp_path, env=env)
    assert not list(site.glob("torch*")), "the install put a torch into the venv"

    cache = tmp_path / "cache"
    run_env = dict(env, VIT_FAST_CACHE_DIR=str(cache))
    first = _run([user, "-c", FIRST_USE, "extension", cache], cwd=tmp_path, env=run_env)
    assert first.stderr.count("vit_fast: compiling the patch-embedding extension once") == 1, first.stderr
    again = _run([user, "-c", FIRST_USE, "extension", cache], cwd=tmp_path, env=run_env)
    assert "compiling" not in again.stderr, again.stderr  # the cached build is loaded as is

    no_compiler = dict(env, VIT_FAST_CACHE_DIR=str(tmp_path / "empty-cache"), CXX="/nonexistent/c++")
    _run([user, "-c", FIRST_USE, "pytorch"], cwd=tmp_path, env=no_compiler)

    for script in ("vit-fast-train", "vit-fast-evaluate", "vit-fast-predict"):
        assert "usage:" in _run([user.parent / script, "--help"], cwd=tmp_path, env=env).stdout
