"""Finds or builds the patch-embedding extension `vit_fast._C`.

`load()` returns `(module, None)` or `(None, error)` and never raises; the caller
(`vit_fast/ops/patch_embed.py`) takes the PyTorch path with one warning when it gets an error.

1. Prebuilt: `import vit_fast._C`, there when the build could import torch (`python setup.py
   develop`, `pip install --no-build-isolation .`, a wheel built that way).
2. Otherwise (`pip install .` builds in an isolated environment without torch, so the wheel holds
   only the sources, `vit_fast/csrc/`), or when the prebuilt module does not load (built for
   another torch): compiled once with `torch.utils.cpp_extension.load` (ninja) into a cache
   directory keyed by the Python and torch versions, the CUDA archs and the sources' hash, and
   loaded from there on later imports without running the compiler. CUDA sources are compiled when
   torch has CUDA and nvcc is found, for `TORCH_CUDA_ARCH_LIST` or else the visible GPUs' archs.
   The cache root: `VIT_FAST_CACHE_DIR`, else `$TORCH_EXTENSIONS_DIR/vit_fast`, else
   `$XDG_CACHE_HOME/vit_fast` (default `~/.cache/vit_fast`). One line on stderr says a compile
   runs.
3. No compiler or ninja, a failed compile, or `VIT_FAST_NO_JIT=1`: the error says why, and
   patch_embed runs the PyTorch pipeline.
"""
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig

import torch

NO_JIT_ENV = "VIT_FAST_NO_JIT"
CACHE_ENV = "VIT_FAST_CACHE_DIR"
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CPU_SOURCES = ("patch_embed.cpp",)
CUDA_SOURCES = ("patch_embed_cuda.cu",)
HEADERS = ("patch_embed.h",)  # included by both sources: part of the cache key, not compiled on its own
CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3", "--use_fast_math"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # setup.py's default, for a machine with a CUDA torch and no visible GPU
_OK_FILE = "vit_fast_build_ok"  # written once a build has loaded; its presence skips the compiler


class ExtensionUnavailable(ImportError):
    """Why vit_fast._C could not be loaded or compiled (the text patch_embed's warning shows)."""


def load():
    """-> (module, None) with `vit_fast._C` loaded (its TORCH_LIBRARY registered), or (None, error)."""
    try:
        return _import_prebuilt(), None
    except ImportError as error:
        prebuilt_error = error
    if os.environ.get(NO_JIT_ENV) == "1":
        return None, ExtensionUnavailable(f"no prebuilt vit_fast._C ({prebuilt_error}) and {NO_JIT_ENV}=1")
    try:
        return jit_load(), None
    except Exception as error:  # noqa: BLE001 -- any failure leaves the PyTorch path standing
        return None, ExtensionUnavailable(
            f"no prebuilt vit_fast._C ({_first_line(prebuilt_error)}); compiling it on first use failed: {error}")


def jit_load():
    """Compiles (once per cache key) and imports `vit_fast._C` from the shipped sources; raises why not."""
    sources = [os.path.join(SOURCE_DIR, name) for name in CPU_SOURCES]
    headers = [os.path.join(SOURCE_DIR, name) for name in HEADERS]
    missing = [path for path in sources + headers if not os.path.isfile(path)]
    if missing:
        raise ExtensionUnavailable(f"the C++ sources are not installed ({', '.join(missing)})")
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which((shlex.split(compiler) or [""])[0]):  # CXX may carry a launcher: "ccache g++"
        raise ExtensionUnavailable(f"no C++ compiler ({compiler!r} not found; set CXX or install g++/clang)")
    ninja_dirs = _ninja_dirs()
    if ninja_dirs is None:
        raise ExtensionUnavailable("ninja not found (pip install ninja)")
    with_cuda, archs = _cuda_build()
    if with_cuda:
        sources += [os.path.join(SOURCE_DIR, name) for name in CUDA_SOURCES]
    build_dir = build_directory(sources + headers, archs)
    library = os.path.join(build_dir, "_C" + _library_suffix())
    if not (os.path.exists(os.path.join(build_dir, _OK_FILE)) and os.path.exists(library)):
        from torch.utils import cpp_extension

        os.makedirs(build_dir, exist_ok=True)
        target = f"CUDA archs {archs}" if with_cuda else "CPU only"
        print(f"vit_fast: compiling the patch-embedding extension once for torch {torch.__version__} ({target}) "
              f"into {build_dir}", file=sys.stderr, flush=True)
        saved = {key: os.environ.get(key) for key in ("PATH", "TORCH_CUDA_ARCH_LIST")}
        try:
            os.environ["PATH"] = os.pathsep.join([*ninja_dirs, os.environ.get("PATH", "")])
            if with_cuda:
                os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            library = cpp_extension.load(
                "_C", sources, extra_cflags=CFLAGS, extra_cuda_cflags=CUDA_CFLAGS, build_directory=build_dir,
                with_cuda=with_cuda, is_python_module=False)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    module = _import_as_vit_fast_C(library)
    ok_file = os.path.join(build_dir, _OK_FILE)
    if not os.path.exists(ok_file):
        try:
            with open(ok_file, "w") as f:
                f.write(library + "\n")
        except OSError:  # a read-only cache: later imports run ninja's no-op check instead
            pass
    return module


def cache_root():
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "vit_fast")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vit_fast")


def build_directory(sources, archs):
    """<cache root>/py311-torch2.13.0+cpu-cpu-<hash of sources (headers included), flags, archs>: one
    build per key."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(repr((CFLAGS, CUDA_CFLAGS, archs, torch.__version__, torch.version.cuda, sys.version)).encode())
    device = "cpu" if archs is None else f"cu{torch.version.cuda}-sm{archs.replace(';', '_').replace('.', '')}"
    name = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{device}-{digest.hexdigest()[:16]}"
    return os.path.join(cache_root(), name)


def _cuda_build():
    """-> (compile the CUDA sources?, arch list or None)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.version.cuda:
        return False, None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not (nvcc and os.path.exists(nvcc)):
        return False, None  # as setup.py: a CPU-only build; patch_embed on a CUDA tensor then says so
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.is_available():
        archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    return True, archs or DEFAULT_CUDA_ARCHS


def _ninja_dirs():
    """Directories to put before PATH so torch finds ninja (a venv's bin is not on PATH unless activated);
    None without ninja."""
    dirs = []
    try:
        import ninja  # the PyPI package: its binary lives in the package

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    dirs.append(os.path.dirname(sys.executable))
    dirs.append(sysconfig.get_path("scripts"))
    search = os.pathsep.join([*dirs, os.environ.get("PATH", "")])
    return dirs if shutil.which("ninja", path=search) else None


def _library_suffix():
    from torch.utils.cpp_extension import LIB_EXT

    return LIB_EXT


def _import_prebuilt():
    """`import vit_fast._C`, looked up in vit_fast's own directory only (a finder further down
    sys.meta_path, e.g. another environment's editable install, must not supply it)."""
    if "vit_fast._C" in sys.modules:
        return sys.modules["vit_fast._C"]
    spec = importlib.machinery.PathFinder.find_spec("vit_fast._C", sys.modules["vit_fast"].__path__)
    if spec is None:
        raise ImportError(f"No module named 'vit_fast._C' in {os.path.dirname(SOURCE_DIR)}")
    return _import_as_vit_fast_C(spec.origin)


def _import_as_vit_fast_C(path):
    spec = importlib.util.spec_from_file_location("vit_fast._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["vit_fast._C"] = module
    setattr(sys.modules["vit_fast"], "_C", module)
    return module


def _first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__
