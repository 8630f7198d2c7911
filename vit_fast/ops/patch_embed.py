"""Patch embedding: images [B, C, H, W] -> tokens [B, (1+)L, E] through the C++/CUDA extension.

The op is defined in C++ (`csrc/patch_embed.cpp`, `TORCH_LIBRARY(vit_fast, ...)`:
`torch.ops.vit_fast.patch_embed_fwd` and `torch.ops.vit_fast.patch_embed_bwd`), with CPU and
CUDA implementations there. This module registers what torch.compile and autograd need from
Python: the fake impls and `register_autograd` (its backward recomputes the patch matrix from x
instead of saving it; see `patch_embed_bwd` in the .cpp for why), and picks the path:

- extension built: `torch.ops.vit_fast.patch_embed_fwd` on CPU and CUDA tensors (a CUDA tensor with a
  CPU-only build raises);
- extension missing: the PyTorch pipeline (`torch_patch_embed`, this module's own), with one warning;
- `VIT_FAST_FORCE_TORCH=1`, or another device: the PyTorch pipeline.
The tests check both paths against `vit_fast.reference.patch_embed` (the oracle, which the library
never imports).
"""
import warnings

import torch

import torch.nn.functional as F

from vit_fast import _extension, dispatch
from vit_fast.ops import checks

# vit_fast._C prebuilt, else compiled once from the installed sources (loading it runs the
# TORCH_LIBRARY registrations); without a compiler the error says why and the PyTorch path stands in
_, EXTENSION_ERROR = _extension.load()

HAS_EXTENSION = EXTENSION_ERROR is None
# False for a build without nvcc or with a CPU-only torch (a constant, so torch.compile reads it freely)
EXTENSION_HAS_CUDA = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("vit_fast::patch_embed_fwd", "CUDA")
_warned_missing_extension = False


def patch_embed(x, weight, bias=None, *, cls_token=None, pos_embed=None, mean=None, std=None):
    """Conv2d(kernel = stride = p) + flatten + transpose (+ cat cls_token) (+ pos_embed), fused.

    x: [B, C, H, W], any memory format; uint8, normalized as (x / 255 - mean[c]) / std[c] (mean,
    std: C values each, a sequence or a tensor; tensors on x's device avoid a copy per call), or
    floating point in the weight's dtype, taken as normalized already (mean and std are ignored).
    weight: [E, C, p, p] (a Conv2d weight); bias: [E]; cls_token: [1, 1, E];
    pos_embed: [1, T, E] with T = L (+ 1 with cls_token), L = (H / p) * (W / p).
    Returns [B, T, E] in the weight's dtype, patches in row-major grid order.
    Under autocast, weight, bias, cls_token, pos_embed and floating x run in the autocast dtype (the
    output too), as F.conv2d would: the op registers no autocast kernel, so it is done here.
    """
    checks.check_tensor("x", x)
    checks.check_tensor("weight", weight)
    if torch.is_autocast_enabled(x.device.type) and weight.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype) if x.is_floating_point() else x
        weight, bias, cls_token, pos_embed = (t.to(dtype) if isinstance(t, torch.Tensor) else t
                                              for t in (weight, bias, cls_token, pos_embed))
    if dispatch.force_torch() or x.device.type not in ("cpu", "cuda"):
        return torch_patch_embed(x, weight, bias, cls_token, pos_embed, mean, std)
    if not HAS_EXTENSION:
        _warn_missing_extension()
        return torch_patch_embed(x, weight, bias, cls_token, pos_embed, mean, std)
    if x.device.type == "cuda" and not EXTENSION_HAS_CUDA:
        raise RuntimeError(
            "patch_embed: vit_fast._C was built without CUDA (CPU-only torch or no nvcc at build time); "
            "rebuild it with a CUDA torch and nvcc, or set VIT_FAST_FORCE_TORCH=1 for the PyTorch path")
    if x.dtype == torch.uint8:
        mean, std = _channel_values("mean", mean, x, weight), _channel_values("std", std, x, weight)
    else:
        mean = std = None
    if not torch.compiler.is_compiling():
        dispatch.record_launch("patch_embed_fwd")
    return torch.ops.vit_fast.patch_embed_fwd(x, weight, bias, cls_token, pos_embed, mean, std)


def _warn_missing_extension():
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(f"vit_fast._C is not available ({EXTENSION_ERROR}); patch_embed runs the PyTorch pipeline "
                      "(the extension is prebuilt by `python setup.py develop` or `pip install --no-build-isolation .`, "
                      f"and otherwise compiled on first use, which needs a C++ compiler and ninja and is off with "
                      f"{_extension.NO_JIT_ENV}=1)", RuntimeWarning, stacklevel=3)


def torch_patch_embed(x, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
    """The op in PyTorch ops, the steps of the C++ forward: uint8 x normalized into the weight's dtype,
    the patch matrix [B, L, C*p*p] (columns (c, i, j), as the Conv2d weight flattens; the H % p last
    rows and W % p last columns dropped, as Conv2d(stride = p) drops them), one matmul with the bias
    over it, then the class token in front and the position embedding added. Autograd does the
    backward."""
    if x.dtype == torch.uint8:
        x = normalize_uint8(x, mean, std, weight.dtype)
    E, C, p = weight.shape[0], weight.shape[1], weight.shape[-1]
    B, grid_h, grid_w = x.shape[0], x.shape[2] // p, x.shape[3] // p
    if x.shape[1] != C:  # the C++ op's checks, where the steps below would fail with less to say
        raise ValueError(f"patch_embed: x has {x.shape[1]} channels but weight [E, C, p, p] = {list(weight.shape)} "
                         f"expects {C}")
    if grid_h == 0 or grid_w == 0:
        raise ValueError(f"patch_embed: expected H and W of at least the patch size {p}, got H = {x.shape[2]}, "
                         f"W = {x.shape[3]}")
    patches = (x[:, :, :grid_h * p, :grid_w * p].reshape(B, C, grid_h, p, grid_w, p)
               .permute(0, 2, 4, 1, 3, 5).reshape(B, grid_h * grid_w, C * p * p))
    tokens = F.linear(patches, weight.reshape(E, C * p * p), bias)
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(B, -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def _channel_values(name, values, x, weight):
    """mean / std as a tensor on x's device (a sequence becomes one, in the precision the kernel uses)."""
    if values is None or isinstance(values, torch.Tensor):
        return values
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    try:
        return torch.tensor(values, dtype=dtype, device=x.device)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a sequence of numbers or a tensor, got {values!r}") from error


def normalize_uint8(x, mean, std, dtype):
    """(x / 255 - mean[c]) / std[c] in `dtype`: the normalization the op fuses, as a separate pass."""
    if mean is None or std is None:
        raise ValueError("mean, std: uint8 x needs both, one value per channel")
    mean = torch.as_tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x.to(dtype) / 255.0 - mean) / std


def _dx_memory_format(x):
    """dx's memory format, as the C++ backward chooses it."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


if HAS_EXTENSION:

    @torch.library.register_fake("vit_fast::patch_embed_fwd")
    def _patch_embed_fwd_fake(x, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
        p = weight.shape[-1]
        tokens = (x.shape[2] // p) * (x.shape[3] // p) + (0 if cls_token is None else 1)
        return weight.new_empty((x.shape[0], tokens, weight.shape[0]))

    @torch.library.register_fake("vit_fast::patch_embed_bwd")
    def _patch_embed_bwd_fake(grad_out, x, weight, mean, std, output_mask):
        unused = weight.new_empty((0,))
        E = weight.shape[0]
        return (
            torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_dx_memory_format(x))
            if output_mask[0] else unused,
            weight.new_empty(weight.shape) if output_mask[1] else unused,
            weight.new_empty((E,)) if output_mask[2] else unused,
            weight.new_empty((1, 1, E)) if output_mask[3] else unused,
            weight.new_empty((1, grad_out.shape[1], E)) if output_mask[4] else unused,
        )

    def _setup_context(ctx, inputs, output):
        x, weight, bias, cls_token, pos_embed, mean, std = inputs
        ctx.save_for_backward(x, weight, mean, std)

    def _backward(ctx, grad_out):
        x, weight, mean, std = ctx.saved_tensors
        # needs_input_grad covers the arguments the caller passed; the rest (defaults) need none
        output_mask = [*ctx.needs_input_grad[:5], *[False] * (5 - len(ctx.needs_input_grad[:5]))]
        output_mask[0] = output_mask[0] and x.is_floating_point()
        if not any(output_mask):
            return (None,) * 7
        if not torch.compiler.is_compiling():
            dispatch.record_launch("patch_embed_bwd")
        grads = torch.ops.vit_fast.patch_embed_bwd(grad_out, x, weight, mean, std, output_mask)
        return *(g if needed else None for g, needed in zip(grads, output_mask)), None, None

    torch.library.register_autograd("vit_fast::patch_embed_fwd", _backward, setup_context=_setup_context)
