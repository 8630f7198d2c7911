"""Offline sm_90 compiles for the kernel tests. Triton compiles and ptxas assembles on a machine
with no GPU, so CI checks that every Hopper table entry compiles, fits an H100's shared memory and
(where a test asks) keeps its tiles in registers. The compile scripts run in a subprocess
(`run_script`), where Triton's interpreter is off, and import this module as `sm90`. They are files
in tests/sm90_scripts/ (`script(name)`), or a test's own string.
"""
import os
import shutil
import subprocess
import sys

SMEM_LIMIT = 232448  # bytes of shared memory one H100 block may use
HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "sm90_scripts")


def script(name: str) -> str:
    """The path of the compile script tests/sm90_scripts/<name>.py (for `run_script`)."""
    path = os.path.join(SCRIPTS, name + ".py")
    assert os.path.isfile(path), path
    return path


def run_script(script: str, tmp_path) -> str:
    """Runs a compile script, a file path from `script(name)` or the script's source as a string, with
    the interpreter off and a fresh Triton cache; returns its stdout."""
    command = [script] if script.endswith(".py") and os.path.isfile(script) else ["-c", script]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "cache"), SM90_CUBIN_DIR=str(tmp_path),
               # this checkout's vit_fast, whichever one an editable install points at
               PYTHONPATH=os.pathsep.join(p for p in (HERE, REPO_ROOT, env.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")  # Triton's own, else CUDA's
    assert path, "cuobjdump: neither Triton's bundled one nor one on PATH"
    return path


def compile_sm90(fn, types, constexprs, divisible, num_warps, num_stages, tag):
    """Triton kernel `fn` compiled for sm_90 -> (compiled kernel, resources from `cuobjdump -res-usage`,
    e.g. {"REG": "126", "STACK": "0"}); asserts it fits an H100 block's shared memory.

    types: the runtime arguments' Triton types (every other parameter is a constexpr); divisible: the
    arguments a launch at ViT shapes specializes as multiples of 16 (as Triton does at run time, which
    lets the loads vectorize and pipeline).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.metadata.shared <= SMEM_LIMIT, (tag, "shared memory", compiled.metadata.shared)
    cubin = os.path.join(os.environ["SM90_CUBIN_DIR"], tag + ".cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    resources = dict(item.split(":", 1) for item in usage.strip().splitlines()[-1].split() if ":" in item)
    return compiled, resources
