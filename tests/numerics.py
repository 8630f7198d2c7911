"""Error measures shared by the op tests: the kernel, torch in the same dtype, and float64."""
import contextlib

import pytest
import torch

from vit_fast import dispatch

# relative-error bound by dtype; the 'tf32' row is for fp32 checks where cuBLAS/cuDNN may run tf32
# (the vit_fast Triton kernels run exact fp32 dots for fp32 inputs)
DTYPE_BOUND = {torch.float64: 1e-10, torch.float32: 1e-5, "tf32": 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}

FP32_UNIT_ROUNDOFF = 2.0**-24
# The "no worse than k x torch's error" clause gets a floor in units of fp32's rounding: torch's own
# fp32 error depends on the CPU's kernels (BLAS blocking, vector widths), so k x a lucky torch run
# alone would fail an implementation that is as exact as fp32 allows. 32 u (1.9e-6) is the floor a
# well-conditioned output gets from the op tests' measured one (opnumerics.rounding_floors: 32 x a
# sensitivity of ~0.6-1 u); whole-model checks, which have no cheap sensitivity run, take it as is.
# It stays 5x below the fp32 bound, so a lost term (1e-3) or a 5e-6 drift still fails.
FLOOR_FACTOR = 32.0
FP32_FLOOR = FLOOR_FACTOR * FP32_UNIT_ROUNDOFF


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64; NaN or Inf in `out` gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_to_ref(name, out, torch_out, ref, bound, factor=2.0, floor=FP32_FLOOR):
    """`out` within `bound` of float64 `ref`, and no worse than `factor` x torch's own error + `floor`."""
    err, torch_err = rel_err(out, ref), rel_err(torch_out, ref)
    max_abs = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if out.numel() else 0.0
    print(f"{name}: rel err {err:.2e} (torch same dtype {torch_err:.2e}), max abs {max_abs:.2e}")
    assert err <= bound, f"{name}: rel err {err:.3e} > bound {bound:.1e}"
    assert err <= factor * torch_err + floor, f"{name}: rel err {err:.3e} > {factor} x torch's {torch_err:.3e}"


def forward_backward(model, x, g):
    """A whole model's forward, then the backward of <out, g>: (out, {parameter name: grad})."""
    out = model(x)
    (out * g.to(out.dtype)).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_model_matches_reference(label, model, ref, ref64, x, g, bound):
    """``model`` (vit_fast) against ``ref`` (the oracle, same dtype) and ``ref64`` (the oracle in
    float64) on input x and output gradient g: the logits and every parameter's gradient (each
    present) within ``bound`` and 2x / 3x the oracle's own error. Returns (out, grads) of ``model``."""
    out, grads = forward_backward(model, x, g)
    ref_out, ref_grads = forward_backward(ref, x, g)
    out64, grads64 = forward_backward(ref64, x.double(), g.double())
    assert_close_to_ref(f"{label} logits", out, ref_out, out64, bound)
    assert grads.keys() == grads64.keys()
    for key, grad in grads.items():
        assert grad is not None, f"{key}: no gradient"
        assert_close_to_ref(f"{label} grad {key}", grad, ref_grads[key], grads64[key], bound, factor=3)
    return out, grads


def select_model_path(path, monkeypatch):
    """A CPU model test's path: 'torch' sets VIT_FAST_FORCE_TORCH=1 for the test; 'kernels' skips the
    test unless Triton's interpreter runs the kernels (TRITON_INTERPRET=1)."""
    if path == "torch":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    elif not dispatch.interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")


def assert_same_keys_and_shapes(model, ref):
    """``model``'s state_dict has ``ref``'s keys, in ``ref``'s order, with ``ref``'s shapes."""
    assert list(model.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def launches_during(call):
    """``call()``'s result and the kernel launches it made: (result, {op: count}), ops that ran only."""
    before = dict(dispatch.kernel_launches)
    result = call()
    return result, {op: n - before.get(op, 0) for op, n in dispatch.kernel_launches.items() if n != before.get(op, 0)}


@contextlib.contextmanager
def torch_tf32(enabled):
    """torch's fp32 matmuls and convs with tf32 ``enabled`` or not inside the block. Restored by hand:
    cuda.matmul's allow_tf32 is no plain attribute, and monkeypatch's undo fails on it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
