"""Host (Python) cost per call of the Triton-backed ops, with every kernel launch stubbed out.

    python benchmarks/host_overhead.py

Several GPU rows are launch-bound (their `host_ms` reaches `ms`, see benchmarks/NOTES.md): this
isolates what the op wrappers, the custom-op dispatch and autograd cost on the host, on any
machine, without a GPU. Kernels run nowhere: the numbers are the floor of a call's host time.

The last rows take a whole ViT forward the same way (ViT-B/16's depth and blocks at a tiny width
and image, so CPU arithmetic stays small; the patch embedding and the plain torch ops still run):
microseconds of host time per forward, torch function calls made from Python per forward, and
vit_fast kernel-path op calls per forward. That is the launch-path cost a CUDA graph
(`vit_fast.inference`) removes; at small batches it is what bounds eager latency.
"""
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the kernel path (stubbed below)

import torch  # noqa: E402

import vit_fast  # noqa: E402
import vit_fast.functional as VF  # noqa: E402
from vit_fast import dispatch  # noqa: E402
from vit_fast.kernels import attention as attention_kernels  # noqa: E402
from vit_fast.kernels import layer_norm as layer_norm_kernels  # noqa: E402
from vit_fast.kernels import mlp as mlp_kernels  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels():
    for module in (attention_kernels, layer_norm_kernels, mlp_kernels):
        for name in dir(module):
            if name.endswith("_kernel") and not name.startswith("select"):
                setattr(module, name, _NoLaunch())


def _us_per_call(fn, calls=200, batches=5):
    """Best of `batches` batches of `calls` calls, as timeit reports: the least-disturbed batch."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


class _CountTorchCalls(torch.overrides.TorchFunctionMode):
    """Counts torch function calls made from Python: ops (torch.*, F.*, Tensor methods) apart from
    tensor attribute reads (.shape, .dtype, .device ...), which also pass through __torch_function__."""

    def __init__(self):
        super().__init__()
        self.ops = self.attributes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "__get__":
            self.attributes += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def vit_forward_rows():
    """Host cost of one whole ViT forward (no grad), kernels stubbed:
    (name, mode, us, torch op calls, tensor attribute reads, vit_fast kernel-path ops)."""
    # ViT-B/16's structure (12 blocks, 12 heads, MLP ratio 4) at width 192 and a 32x32 image (5 tokens)
    model = vit_fast.VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=12).eval()
    x = torch.randn(1, 3, 32, 32)
    rows = []
    with torch.no_grad():
        for mode, fn in (("fwd, no grad", lambda: model(x)),):
            us = _us_per_call(fn, calls=20, batches=5)
            counter = _CountTorchCalls()
            before = sum(dispatch.kernel_launches.values())
            with counter:
                fn()
            kernel_ops = sum(dispatch.kernel_launches.values()) - before
            rows.append(("ViT forward (12 blocks)", mode, us, counter.ops, counter.attributes, kernel_ops))
    return rows


def main():
    _stub_kernels()
    torch.set_num_threads(1)  # host cost, not CPU arithmetic: one thread keeps the rows steady
    B, H, N, D, C = 1, 2, 8, 32, 64  # tiny: the host path, not CPU arithmetic, dominates
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    x = torch.randn(B * N, C, requires_grad=True)
    residual = torch.randn(B * N, C, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    w1, b1 = torch.randn(4 * C, C, requires_grad=True), torch.randn(4 * C, requires_grad=True)
    grad_attn, grad_x, grad_h = torch.ones(B, N, H * D), torch.ones(B * N, C), torch.ones(B * N, 4 * C)

    def fwd_bwd(fn, grad):
        return lambda: torch.autograd.backward(fn(), grad)

    rows = []
    with torch.no_grad():
        rows += [("attention_packed", "fwd, no grad", _us_per_call(lambda: VF.attention_packed(qkv, H))),
                 ("layer_norm", "fwd, no grad", _us_per_call(lambda: VF.layer_norm(x, w, b))),
                 ("linear_gelu", "fwd, no grad", _us_per_call(lambda: VF.linear_gelu(x, w1, b1)))]
    rows += [
        ("attention_packed", "fwd+bwd", _us_per_call(fwd_bwd(lambda: VF.attention_packed(qkv, H), grad_attn))),
        ("layer_norm", "fwd+bwd", _us_per_call(fwd_bwd(lambda: VF.layer_norm(x, w, b), grad_x))),
        ("add_layer_norm", "fwd+bwd", _us_per_call(fwd_bwd(lambda: VF.add_layer_norm(x, residual, w, b)[0], grad_x))),
        ("linear_gelu", "fwd+bwd", _us_per_call(fwd_bwd(lambda: VF.linear_gelu(x, w1, b1), grad_h))),
        ("F.layer_norm (torch, for scale)", "fwd+bwd",
         _us_per_call(fwd_bwd(lambda: torch.nn.functional.layer_norm(x, (C,), w, b), grad_x))),
    ]
    print(f"host cost per call, kernel launches stubbed ({torch.get_num_threads()} CPU threads)")
    for op, mode, us in rows:
        print(f"{op:34s} {mode:14s} {us:8.1f} us")
    print("\nwhole model, per forward (kernel launches stubbed; patch embedding and plain torch ops run)")
    for op, mode, us, ops, attributes, kernel_ops in vit_forward_rows():
        print(f"{op:34s} {mode:14s} {us:8.1f} us   {ops} torch op calls and {attributes} tensor attribute reads "
              f"from Python, {kernel_ops} vit_fast kernel-path ops")


if __name__ == "__main__":
    main()
