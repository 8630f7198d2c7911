"""The fused ViT (vit_fast.model, vit_fast.nn.Block) against the reference model with the same weights.

On the CPU the kernels run under Triton's interpreter (slow), so the models are small: img 64,
patch 16 (17 tokens), dim 96, depth 2, 3 heads, batch 2.
"""
import collections
import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_fast
from vit_fast import dispatch, reference
from vit_fast.checkpoint import resample_pos_embed
from vit_fast.nn.block import Block, DropPath

from numerics import DTYPE_BOUND, assert_close_to_ref, launches_during, torch_tf32
from numerics import forward_backward as run

SMALL = dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# timm's parameter counts for the same names, 1000 classes
PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664, "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232, "vit_large_patch16_224": 304_326_632, "vit_huge_patch14_224": 632_045_800,
    "vit_tiny_patch16_384": 5_790_376, "vit_small_patch16_384": 22_196_584, "vit_base_patch16_384": 86_859_496,
    "vit_base_patch32_384": 88_297_192, "vit_large_patch16_384": 304_715_752,
}


def fp32_bound(device):
    return DTYPE_BOUND["tf32" if device == "cuda" else torch.float32]


def torch_in_tf32(device):
    """On a GPU, torch's fp32 matmuls and convs in tf32 as the kernels' fp32 dots may be: the
    "torch in the same dtype" of assert_close_to_ref."""
    return torch_tf32(device == "cuda")


def fp32_tolerance(device):
    """assert_close tolerances for fp32 plumbing checks (numerics are tested against float64 above)."""
    return dict(rtol=1e-2, atol=1e-2) if device == "cuda" else dict(rtol=1e-4, atol=1e-4)  # tf32 on GPUs


def models(device, **extra):
    """(vit_fast model, reference fp32, reference float64), same weights."""
    ref = reference.VisionTransformer(**{**SMALL, **extra}).to(device)
    model = vit_fast.VisionTransformer(**{**SMALL, **extra}).to(device)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref, copy.deepcopy(ref).double()


VARIANTS = {
    "token": {},
    "avg_no_class_token": dict(global_pool="avg", class_token=False),
    "init_values_gelu_tanh": dict(init_values=0.1, act_layer="gelu_tanh"),
    "representation_size": dict(representation_size=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_and_grads_match_reference(variant, device):
    model, ref, ref64 = models(device, **VARIANTS[variant])
    x = torch.randn(2, 3, 64, 64, device=device)
    g = torch.randn(2, SMALL["num_classes"], device=device)
    before = dict(dispatch.kernel_launches)
    out, grads = run(model, x, g)
    grew = {op for op, n in dispatch.kernel_launches.items() if n > before.get(op, 0)}
    with torch_in_tf32(device):
        ref_out, ref_grads = run(ref, x, g)
    out64, grads64 = run(ref64, x.double(), g.double())
    bound = fp32_bound(device)
    assert_close_to_ref(f"{variant} logits", out, ref_out, out64, bound)
    assert grads.keys() == grads64.keys()
    for name, grad in grads.items():
        assert_close_to_ref(f"{variant} grad {name}", grad, ref_grads[name], grads64[name], bound, factor=3)
    # the fused kernels ran, forward and backward
    for op in ("attention_packed_fwd", "attention_packed_bwd", "layer_norm_fwd", "add_layer_norm_fwd",
               "add_layer_norm_bwd", "mlp_fwd", "mlp_bwd"):
        assert op in grew, f"{op} did not run: {sorted(grew)}"


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_factories(name, count):
    with torch.device("meta"):
        model = getattr(vit_fast, name)()
        small_head = vit_fast.MODELS[name](num_classes=10, drop_path_rate=0.1)
        keys = list(reference.create_reference(name).state_dict())
    assert isinstance(model, vit_fast.VisionTransformer)
    assert sum(p.numel() for p in model.parameters()) == count
    assert list(model.state_dict()) == keys
    assert small_head.head.out_features == 10 and isinstance(small_head.blocks[-1].drop_path2, DropPath)


@pytest.mark.parametrize("extra", [{}, dict(global_pool="avg"), dict(global_pool="avg", fc_norm=False),
                                   dict(init_values=1e-5), dict(representation_size=48), dict(num_classes=0)])
def test_state_dict_keys_are_timms(extra):
    ref = reference.VisionTransformer(**{**SMALL, **extra})
    model = vit_fast.VisionTransformer(**{**SMALL, **extra})
    assert list(model.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    model.load_state_dict(ref.state_dict(), strict=True)
    if extra.get("init_values"):
        assert "blocks.1.ls2.gamma" in model.state_dict()
        assert torch.equal(model.blocks[0].ls1.gamma, torch.full((96,), 1e-5))


def test_pos_embed_resampled_on_load():
    ref = reference.VisionTransformer(**SMALL)  # 4x4 patch grid
    model = vit_fast.VisionTransformer(**{**SMALL, "img_size": 96})  # 6x6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(ref.state_dict(), strict=True)
    messages = [str(w.message) for w in caught]
    assert messages == ["pos_embed: resampled from a 4x4 patch grid to 6x6 (bicubic, class token kept apart)"]
    expected = resample_pos_embed(ref.pos_embed.detach(), (6, 6), num_prefix_tokens=1, mode="bicubic")
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    assert torch.equal(model.pos_embed[0, 0], ref.pos_embed[0, 0])  # the class token's row kept apart
    # a grid of one vector everywhere stays that vector: no edge effects, no class-token bleed
    state = ref.state_dict()
    state["pos_embed"] = torch.cat([torch.full((1, 1, 96), 5.0), torch.ones(1, 16, 96)], dim=1)
    with pytest.warns(UserWarning, match="resampled"):
        model.load_state_dict(state)
    torch.testing.assert_close(model.pos_embed[0, 1:].detach(), torch.ones(36, 96))
    state["pos_embed"] = torch.zeros(1, 1 + 15, 96)  # no square grid: refused, naming the key
    with pytest.raises(RuntimeError, match="pos_embed"):
        model.load_state_dict(state)


def test_dynamic_img_size(device):
    model = vit_fast.VisionTransformer(**SMALL, dynamic_img_size=True).to(device).eval()
    x = torch.randn(2, 3, 96, 96, device=device)
    ref96 = reference.VisionTransformer(**{**SMALL, "img_size": 96}).to(device).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (6, 6), num_prefix_tokens=1, mode="bicubic")
    ref96.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref96(x), **fp32_tolerance(device))
        assert model(x[..., :64, :]).shape == (2, 10)  # 4x6 grid, not square
    fixed = vit_fast.VisionTransformer(**SMALL)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(x.cpu())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(x[..., :70])


def test_uint8_images_normalized_inside(device):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = reference.VisionTransformer(**SMALL).to(device).eval()
    model = vit_fast.VisionTransformer(**SMALL, pixel_mean=mean, pixel_std=std).to(device).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert "pixel_mean" not in model.state_dict()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=device)
    normalized = (images.float() / 255 - torch.tensor(mean, device=device).view(3, 1, 1)) / torch.tensor(
        std, device=device).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref(normalized), **fp32_tolerance(device))


def test_training_mode_dropout_and_drop_path(device):
    # attn_drop_rate stays 0: the fused attention has no attention dropout (it raises in training)
    model = vit_fast.VisionTransformer(**SMALL, drop_rate=0.1, drop_path_rate=0.3).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    out, grads = run(model.train(), x, torch.ones(2, 10, device=device))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        assert not torch.equal(model(x), out)  # the random masks differ call to call
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_attn_drop_rate_raises_in_training_only(device):
    """No attention-dropout kernel: training with attn_drop_rate > 0 fails clearly; eval ignores it."""
    model = vit_fast.VisionTransformer(**SMALL, attn_drop_rate=0.1).to(device)
    plain = vit_fast.VisionTransformer(**SMALL).to(device)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, device=device)
    with pytest.raises(NotImplementedError, match=r"attn_drop=0.1: the fused attention kernels have no attention "
                                                  r"dropout; use attn_drop=0 for training"):
        model.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("drop", [dict(drop_path=1.0), dict(proj_drop=1.0)])
def test_block_drops_its_branches_in_training(drop, device):
    """Dropping everything leaves the residual stream: proves drop path and dropout are applied."""
    block = Block(96, 3, qkv_bias=True, **drop).to(device)
    x = torch.randn(2, 17, 96, device=device)
    torch.testing.assert_close(block.train()(x), x, rtol=0, atol=0)
    assert not torch.allclose(block.eval()(x), x)


def test_drop_path_keeps_expectation():
    drop = DropPath(0.25).train()
    y = drop(torch.ones(4000, 1, 1))
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(drop.eval()(y), y)


def test_block_matches_reference_block(device):
    ref = reference.Block(96, 3, qkv_bias=True, init_values=0.5, act_layer="gelu_tanh").to(device)
    block = Block(96, 3, qkv_bias=True, init_values=0.5, act_layer="gelu_tanh").to(device)
    block.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 17, 96, device=device)
    torch.testing.assert_close(block(x), ref(x), **fp32_tolerance(device))


def test_bad_arguments():
    with pytest.raises(ValueError, match="global_pool"):
        vit_fast.VisionTransformer(**SMALL, global_pool="max")
    with pytest.raises(ValueError, match="class_token"):
        vit_fast.VisionTransformer(**SMALL, class_token=False)
    with pytest.raises(ValueError, match="pixel_mean"):
        vit_fast.VisionTransformer(**SMALL, pixel_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="act_layer"):
        vit_fast.VisionTransformer(**SMALL, act_layer="relu")
    with pytest.raises(ValueError, match=r"x: expected images \[B, C, H, W\]"):
        vit_fast.VisionTransformer(**SMALL)(torch.zeros(3, 64, 64))


def test_reset_classifier_and_head_features():
    model = vit_fast.VisionTransformer(**SMALL, representation_size=32)
    model.reset_classifier(5)
    assert model.head.in_features == 32 and model.head.out_features == 5
    model.reset_classifier(0)
    feats = torch.randn(2, 17, 96)
    assert model.forward_head(feats).shape == (2, 32)
    assert torch.equal(model.forward_head(feats), model.forward_head(feats, pre_logits=True))


@pytest.mark.parametrize("extra", [{}, dict(global_pool="avg", init_values=0.1),
                                   dict(global_pool="avg", fc_norm=False, class_token=False, act_layer="gelu_tanh")])
def test_timm_model_parity(extra, device):
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(**SMALL, **extra).to(device).eval()
    model = vit_fast.VisionTransformer(**SMALL, **extra).to(device).eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad(), torch_in_tf32(device):
        ref_out, ref64 = ref(x), copy.deepcopy(ref).double()(x.double())
    with torch.no_grad():
        assert_close_to_ref(f"vs timm {extra}", model(x), ref_out, ref64, fp32_bound(device))


def test_train_digits_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")  # a smoke test of the script: the kernels are tested above
    spec = importlib.util.spec_from_file_location("train_digits", os.path.join(EXAMPLES, "train_digits.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main(["--epochs", "1", "--max-steps", "2", "--depth", "1", "--out", str(tmp_path)])
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "train_digits.png").stat().st_size > 0


# ----------------------------------------------------------------------------- bad arguments, per module

TOKENS = torch.zeros(2, 17, 96)
IMAGES = torch.zeros(2, 3, 64, 64)
BAD_INPUTS = {  # name -> (a call that must fail, what the ValueError must say)
    "attention num_heads=0": (lambda: vit_fast.nn.Attention(96, num_heads=0), r"num_heads: expected a positive int, got 0"),
    "attention num_heads<0": (lambda: vit_fast.nn.Attention(96, num_heads=-3), r"num_heads: expected a positive int"),
    "attention num_heads float": (lambda: vit_fast.nn.Attention(96, num_heads=3.0), r"num_heads: expected a positive int"),
    "attention dim=0": (lambda: vit_fast.nn.Attention(0, num_heads=1), r"dim: expected a positive int, got 0"),
    "attention dim % heads": (lambda: vit_fast.nn.Attention(96, num_heads=5), r"dim: 96 is not divisible by num_heads 5"),
    "attention 2-D x": (lambda: vit_fast.nn.Attention(96, 3)(TOKENS[0]), r"x: Attention expected tokens \[B, N, 96\], got shape \(17, 96\)"),
    "attention 4-D x": (lambda: vit_fast.nn.Attention(96, 3)(TOKENS[None]), r"x: Attention expected tokens \[B, N, 96\]"),
    "attention last dim": (lambda: vit_fast.nn.Attention(96, 3)(TOKENS[..., :48]), r"x: Attention expected tokens \[B, N, 96\], got shape \(2, 17, 48\)"),
    "layer_norm last dim": (lambda: vit_fast.nn.LayerNorm(96)(TOKENS[..., :48]), r"x: expected trailing dims \(96,\)"),
    "layer_norm 0-D x": (lambda: vit_fast.nn.LayerNorm(96)(torch.zeros(())), r"x: expected trailing dims \(96,\)"),
    "mlp in_features=0": (lambda: vit_fast.nn.Mlp(0), r"in_features: expected a positive int, got 0"),
    "mlp hidden_features<0": (lambda: vit_fast.nn.Mlp(96, -4), r"hidden_features: expected a positive int, got -4"),
    "mlp out_features float": (lambda: vit_fast.nn.Mlp(96, 192, 2.5), r"out_features: expected a positive int, got 2.5"),
    "mlp last dim": (lambda: vit_fast.nn.Mlp(96, 192)(TOKENS[..., :48]), r"x: Mlp expected \[\.\.\., 96\], got shape \(2, 17, 48\)"),
    "mlp 0-D x": (lambda: vit_fast.nn.Mlp(96, 192)(torch.zeros(())), r"x: Mlp expected \[\.\.\., 96\]"),
    "patch_embed patch_size=0": (lambda: vit_fast.nn.PatchEmbed(64, 0, 3, 96), r"patch_size: expected a positive int, got 0"),
    "patch_embed in_chans=0": (lambda: vit_fast.nn.PatchEmbed(64, 16, 0, 96), r"in_chans: expected a positive int"),
    "patch_embed embed_dim=0": (lambda: vit_fast.nn.PatchEmbed(64, 16, 3, 0), r"embed_dim: expected a positive int"),
    "patch_embed img_size=0": (lambda: vit_fast.nn.PatchEmbed(0, 16, 3, 96), r"img_size: expected None, a positive int"),
    "patch_embed 3-D x": (lambda: vit_fast.nn.PatchEmbed(64, 16, 3, 96)(IMAGES[0]), r"x: PatchEmbed expected images \[B, 3, H, W\], got shape \(3, 64, 64\)"),
    "patch_embed channels": (lambda: vit_fast.nn.PatchEmbed(64, 16, 3, 96)(IMAGES[:, :1]), r"x: PatchEmbed expected images \[B, 3, H, W\], got shape \(2, 1, 64, 64\)"),
    "block num_heads=0": (lambda: Block(96, 0), r"num_heads: expected a positive int, got 0"),
    "block dim % heads": (lambda: Block(96, 5), r"dim: 96 is not divisible by num_heads 5"),
    "block dim=0": (lambda: Block(0, 1), r"dim: expected a positive int, got 0"),
    "block mlp_ratio=0": (lambda: Block(96, 3, mlp_ratio=0), r"mlp_ratio: expected a number with int\(dim \* mlp_ratio\) >= 1"),
    "block 2-D x": (lambda: Block(96, 3)(TOKENS[0]), r"x: Block expected tokens \[B, N, 96\], got shape \(17, 96\)"),
    "block last dim": (lambda: Block(96, 3)(TOKENS[..., :48]), r"x: Block expected tokens \[B, N, 96\]"),
    "vit num_heads=0": (lambda: vit_fast.VisionTransformer(**{**SMALL, "num_heads": 0}), r"num_heads: expected a positive int"),
    "vit embed_dim % heads": (lambda: vit_fast.VisionTransformer(**{**SMALL, "embed_dim": 100}), r"embed_dim: 100 is not divisible by num_heads 3"),
    "vit depth<0": (lambda: vit_fast.VisionTransformer(**{**SMALL, "depth": -1}), r"depth: expected an int >= 0, got -1"),
    "vit num_classes<0": (lambda: vit_fast.VisionTransformer(**{**SMALL, "num_classes": -1}), r"num_classes: expected an int >= 0"),
    "vit img_size < patch": (lambda: vit_fast.VisionTransformer(**{**SMALL, "img_size": 8}), r"img_size: 8 holds no 16x16 patch"),
    "vit 3-D x": (lambda: vit_fast.VisionTransformer(**SMALL)(IMAGES[0]), r"x: expected images \[B, C, H, W\] with C = 3, got shape \(3, 64, 64\)"),
    "vit channels": (lambda: vit_fast.VisionTransformer(**SMALL)(IMAGES[:, :1]), r"x: expected images \[B, C, H, W\] with C = 3, got shape \(2, 1, 64, 64\)"),
    "vit forward_head 2-D": (lambda: vit_fast.VisionTransformer(**SMALL).forward_head(TOKENS[0]), r"x: expected tokens \[B, N, 96\], got \(17, 96\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_name_the_argument(case):
    call, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- empty batches

EMPTY_BATCH = {  # name -> (module factory, input of batch 0, output shape)
    "attention": (lambda: vit_fast.nn.Attention(96, 3, qkv_bias=True), torch.randn(0, 17, 96), (0, 17, 96)),
    "attention_qk_norm": (lambda: vit_fast.nn.Attention(96, 3, qk_norm=True), torch.randn(0, 17, 96), (0, 17, 96)),
    "layer_norm": (lambda: vit_fast.nn.LayerNorm(96, eps=1e-6), torch.randn(0, 17, 96), (0, 17, 96)),
    "mlp": (lambda: vit_fast.nn.Mlp(96, 192), torch.randn(0, 17, 96), (0, 17, 96)),
    "patch_embed": (lambda: vit_fast.nn.PatchEmbed(64, 16, 3, 96), torch.randn(0, 3, 64, 64), (0, 16, 96)),
    "block": (lambda: Block(96, 3, qkv_bias=True, init_values=0.1), torch.randn(0, 17, 96), (0, 17, 96)),
    "model": (lambda: vit_fast.VisionTransformer(**SMALL), torch.randn(0, 3, 64, 64), (0, 10)),
    "model_avg": (lambda: vit_fast.VisionTransformer(**SMALL, global_pool="avg", class_token=False),
                  torch.randn(0, 3, 64, 64), (0, 10)),
    "model_uint8": (lambda: vit_fast.VisionTransformer(**SMALL), torch.zeros(0, 3, 64, 64, dtype=torch.uint8), (0, 10)),
}


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("case", sorted(EMPTY_BATCH))
def test_empty_batch_forward_and_backward(case, path, device, monkeypatch):
    """B = 0 through every module and the model: an empty output of the right shape, and a
    backward that gives an empty input gradient and zero parameter gradients; on the kernels
    (Triton's interpreter on CPU) and on the PyTorch path."""
    if path == "torch":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    build, x, shape = EMPTY_BATCH[case]
    module = build().to(device)
    x = x.to(device).requires_grad_(x.is_floating_point())
    out = module(x)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == x.device.type
    out.sum().backward()
    if x.is_floating_point():
        assert x.grad is not None and x.grad.shape == x.shape
    for name, p in module.named_parameters():
        assert p.grad is None or (p.grad.shape == p.shape and not p.grad.any()), name


# ----------------------------------------------------------------------------- float64


@pytest.mark.parametrize("extra", [{}, dict(global_pool="avg", class_token=False, init_values=0.1, act_layer="gelu_tanh"),
                                   dict(representation_size=32)])
def test_float64_model_matches_the_reference_forward_and_backward(extra, monkeypatch):
    """model.double() on the PyTorch path: float64 all through, within float64 rounding of the
    reference model in float64 (float images and uint8 images)."""
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")  # the kernels have no float64; dispatch reads it per call
    model, _, ref64 = models("cpu", **extra)
    model = model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.pixel_mean.dtype == model.pixel_std.dtype == torch.float64
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    g = torch.randn(2, SMALL["num_classes"], dtype=torch.float64)
    out, grads = run(model, x, g)
    out64, grads64 = run(ref64, x, g)
    assert out.dtype == torch.float64
    bound = DTYPE_BOUND[torch.float64]
    assert_close_to_ref("float64 logits", out, out64, out64, bound)
    assert grads.keys() == grads64.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float64
        assert_close_to_ref(f"float64 grad {name}", grad, grads64[name], grads64[name], bound)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = ref64(images.double() / 255 * 2 - 1)
        assert_close_to_ref("float64 uint8 images", model(images), expected, expected, bound)


PLAIN_CPU_SCRIPT = r"""
import copy, torch, vit_fast
from vit_fast import dispatch, reference
assert not dispatch.use_kernels(torch.zeros(1))  # the plain CPU path: no interpreter, nothing forced
cfg = dict(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=3, num_classes=5)
ref = reference.VisionTransformer(**cfg).double()
model = vit_fast.VisionTransformer(**cfg)
model.load_state_dict(ref.state_dict())
model = model.double()
for x in (torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(0, 3, 32, 32, dtype=torch.float64)):
    out, want = model(x), ref(x)
    assert out.dtype == torch.float64 and out.shape == want.shape == (x.shape[0], 5)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
        assert p.grad.dtype == torch.float64 and err <= 1e-10, (name, err)
        p.grad = q.grad = None
    if x.shape[0]:
        err = ((out - want).norm() / want.norm()).item()
        assert err <= 1e-10, err
images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
with torch.no_grad():
    err = ((model(images) - ref(images.double() / 255 * 2 - 1)).norm() / ref(images.double() / 255 * 2 - 1).norm()).item()
assert err <= 1e-10, err
print("ok")
"""


def test_float64_and_empty_batch_on_the_plain_cpu_path():
    """The path a CPU user gets (no TRITON_INTERPRET, nothing forced; the C++ patch embedding):
    model.double() and B = 0, forward and backward, against the float64 reference. A subprocess,
    since this test process imported triton under the interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.FORCE_TORCH_ENV)}
    result = subprocess.run([sys.executable, "-c", PLAIN_CPU_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(EXAMPLES))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_pixel_statistics_keep_their_precision_through_dtype_casts():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = vit_fast.VisionTransformer(**SMALL, pixel_mean=mean, pixel_std=std)
    for cast, dtype in ((model.half, torch.float32), (model.bfloat16, torch.float32), (model.double, torch.float64),
                        (model.float, torch.float32)):
        cast()
        assert model.pixel_mean.dtype == model.pixel_std.dtype == dtype
        assert torch.equal(model.pixel_mean, torch.tensor(mean, dtype=dtype))
        assert torch.equal(model.pixel_std, torch.tensor(std, dtype=dtype))
    assert "pixel_mean" not in model.state_dict()


# ----------------------------------------------------------------------------- attn_mask, timm's signature


def _masked_reference_block(block, x, mask):
    """What timm's Block computes with attn_mask: SDPA with the mask, in float64."""
    sd = {k: v.double() for k, v in block.state_dict().items()}
    x = x.double()
    C, H = x.shape[-1], block.attn.num_heads
    ln = torch.nn.functional.layer_norm
    h = ln(x, (C,), sd["norm1.weight"], sd["norm1.bias"], 1e-6)
    q, k, v = (h @ sd["attn.qkv.weight"].t() + sd["attn.qkv.bias"]).unflatten(-1, (3, H, C // H)).permute(2, 0, 3, 1, 4)
    m = mask if mask.dtype == torch.bool else mask.double()
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).flatten(2)
    x = x + a @ sd["attn.proj.weight"].t() + sd["attn.proj.bias"]
    h = ln(x, (C,), sd["norm2.weight"], sd["norm2.bias"], 1e-6)
    h = torch.nn.functional.gelu(h @ sd["mlp.fc1.weight"].t() + sd["mlp.fc1.bias"])
    return x + h @ sd["mlp.fc2.weight"].t() + sd["mlp.fc2.bias"]


def _masks(n, device):
    keep = torch.rand(2, 1, n, n, device=device) > 0.3
    keep |= torch.eye(n, dtype=torch.bool, device=device)  # every query sees itself: no empty row
    return {"bool": keep, "additive": torch.zeros(2, 1, n, n, device=device).masked_fill(~keep, float("-inf"))}


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_block_and_model_take_timms_attn_mask(kind, device, monkeypatch):
    """timm 1.0's signatures: Attention/Block forward(x, attn_mask=None), VisionTransformer
    forward(x, attn_mask=None) / forward_features(x, attn_mask=None). The PyTorch path applies the
    mask (as timm, with SDPA); the kernel path refuses it by name; None is the fused path."""
    block = Block(96, 3, qkv_bias=True).to(device)
    x = torch.randn(2, 17, 96, device=device)
    mask = _masks(17, device)[kind]
    unmasked = block(x, attn_mask=None)
    torch.testing.assert_close(unmasked, block(x), rtol=0, atol=0)
    if device == "cuda" or dispatch.interpreter_enabled():
        for call in (lambda: block(x, attn_mask=mask), lambda: block.attn(x, attn_mask=mask)):
            with pytest.raises(NotImplementedError, match=r"attn_mask: the fused attention kernels apply no mask"):
                call()
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    out = block(x, attn_mask=mask)
    assert_close_to_ref(f"masked block ({kind})", out, out, _masked_reference_block(block, x, mask),
                        fp32_bound(device))
    assert (out - unmasked).abs().max() > 1e-3  # the mask was applied, not ignored
    qk_norm = vit_fast.nn.Attention(96, 3, qk_norm=True).to(device)
    assert qk_norm(x, attn_mask=mask).shape == x.shape

    model = vit_fast.VisionTransformer(**SMALL).to(device).eval()
    images = torch.randn(2, 3, 64, 64, device=device)
    model_mask = _masks(17, device)[kind]
    with torch.no_grad():
        all_true = torch.ones(17, 17, dtype=torch.bool, device=device)
        torch.testing.assert_close(model(images, attn_mask=all_true), model(images), **fp32_tolerance(device))
        feats = model.forward_features(images, attn_mask=model_mask)
        tokens = model.pos_drop(vit_fast.functional.patch_embed(
            images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, cls_token=model.cls_token,
            pos_embed=model.pos_embed))
        for blk in model.blocks:
            tokens = blk(tokens, attn_mask=model_mask)
        torch.testing.assert_close(feats, model.norm(tokens), **fp32_tolerance(device))
        torch.testing.assert_close(model(images, attn_mask=model_mask), model.forward_head(feats),
                                   **fp32_tolerance(device))


# ----------------------------------------------------------------------------- GPU


def _vit_s(device, **extra):
    ref = reference.create_reference("vit_small_patch16_224", num_classes=100, **extra).to(device)
    model = vit_fast.vit_small_patch16_224(num_classes=100, **extra).to(device)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


@pytest.mark.gpu
def test_bf16_autocast_forward_and_grads_gpu():
    model, ref = _vit_s("cuda")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    g = torch.randn(16, 100, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = run(model, x, g)
        ref_out, ref_grads = run(ref, x, g)
    out64, grads64 = run(ref64, x.double(), g.double())
    bound = DTYPE_BOUND[torch.bfloat16]
    assert_close_to_ref("bf16 autocast logits", out, ref_out, out64, bound)
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc1.weight", "head.weight"):
        assert_close_to_ref(f"bf16 grad {name}", grads[name], ref_grads[name], grads64[name], bound, factor=3)


@pytest.mark.gpu
def test_bf16_weights_uint8_images_gpu():
    model, ref = _vit_s("cuda")
    model, ref = model.eval(), ref.eval()
    images = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
    normalized = images.double() / 255 * 2 - 1
    with torch.no_grad():
        out64 = copy.deepcopy(ref).double()(normalized)
        ref_out = ref.bfloat16()(normalized.bfloat16())
        out = model.bfloat16()(images)
    assert_close_to_ref("bf16 weights, uint8 images", out, ref_out, out64, DTYPE_BOUND[torch.bfloat16])


@pytest.mark.gpu
def test_compile_fullgraph_gpu():
    model, _ = _vit_s("cuda", dynamic_img_size=True)
    model = model.bfloat16().eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for size in (224, 160):
            images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, device="cuda")
            torch.testing.assert_close(compiled(images), model(images), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_training_steps_gpu():
    """AMP bf16 + fused AdamW, eager and compiled: the loss on a fixed batch falls."""
    for compile_model in (False, True):
        torch.manual_seed(0)
        model = vit_fast.vit_small_patch16_224(num_classes=10, drop_path_rate=0.1).cuda().train()
        step_model = torch.compile(model, fullgraph=True) if compile_model else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        images = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, device="cuda")
        labels = torch.randint(0, 10, (32,), device="cuda")
        losses = []
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(step_model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.gpu
def test_eager_forward_backward_replays_from_a_cuda_graph_gpu():
    """The eager kernel path has no host syncs: a whole fwd + bwd captures in a CUDA graph (as
    benchmarks' graph_ms and users' manual graphs do) and its replay on new inputs matches eager."""
    model, _ = _vit_s("cuda")
    model = model.bfloat16().train()
    static_images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
    static_g = torch.randn(8, 100, device="cuda", dtype=torch.bfloat16)

    def step():
        out = model(static_images)
        grads = torch.autograd.grad(out, list(model.parameters()), static_g)
        return out, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_grads = step()
    static_images.copy_(torch.randint(0, 256, static_images.shape, dtype=torch.uint8, device="cuda"))
    static_g.normal_()
    graph.replay()
    want_out, want_grads = step()
    # the same kernels on the same inputs: equal up to cuBLAS's choices (a stale capture is far off)
    for got, want in zip([graph_out, *graph_grads], [want_out, *want_grads]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-3


# ----------------------------------------------------------------------------- no wasted work in forward()


def launches_per_forward(depth, backward=False):
    """vit_fast op calls (``dispatch.kernel_launches``) per forward of a ViT with the default config
    (class token, no layer scale) in eval mode or training without dropout: fc2 adds the residual in
    its epilogue, so each block starts with a plain LayerNorm and its second norm adds the attention
    branch; one final LayerNorm. ``forward`` (class-token pooling): the last block's attention runs
    the class token's query alone against every key (``attention_fwd``, N_q = 1), not the packed op.
    The README's "Where an op runs" gives these for ViT-B/16 (depth 12)."""
    counts = {"patch_embed_fwd": 1, "attention_packed_fwd": depth - 1, "attention_fwd": 1,
              "layer_norm_fwd": depth + 1, "add_layer_norm_fwd": depth,
              "mlp_fwd": depth}  # fc1 + GELU, fc2 + bias + residual: one op, two fused matmuls
    if backward:  # the MLP's backward: one op, dpre and fc1's bias gradient in one matmul's epilogue
        counts.update({"patch_embed_bwd": 1, "attention_packed_bwd": depth - 1, "attention_bwd": 1,
                       "layer_norm_bwd": depth + 1, "add_layer_norm_bwd": depth, "mlp_bwd": depth})
    return {op: n for op, n in counts.items() if n}


@pytest.mark.parametrize("images", ["float", "uint8"])
def test_kernel_launches_per_forward_are_exact(images, device):
    if not (device == "cuda" or dispatch.interpreter_enabled()):
        pytest.skip("counts the kernel path")
    model = vit_fast.VisionTransformer(**SMALL).to(device)  # depth 2
    x = (torch.randn(2, 3, 64, 64, device=device) if images == "float"
         else torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=device))
    with torch.no_grad():
        _, counts = launches_during(lambda: model.eval()(x))
    assert counts == launches_per_forward(SMALL["depth"])
    out, counts = launches_during(lambda: model.train()(x))
    assert counts == launches_per_forward(SMALL["depth"])
    _, counts = launches_during(lambda: out.sum().backward())
    assert counts == {op: n for op, n in launches_per_forward(SMALL["depth"], backward=True).items()
                      if op.endswith("_bwd")}  # uint8 images too: patch_embed_bwd gives the weight's gradient
    assert launches_per_forward(12) == {"patch_embed_fwd": 1, "attention_packed_fwd": 11, "attention_fwd": 1,
                                        "layer_norm_fwd": 13, "add_layer_norm_fwd": 12,
                                        "mlp_fwd": 12}  # ViT-B/16: README
    assert sum(launches_per_forward(12).values()) == 50
    with torch.no_grad():  # forward_features: every token through every block (timm's semantics)
        _, counts = launches_during(lambda: model.eval().forward_features(x))
    assert counts["attention_packed_fwd"] == SMALL["depth"] and "attention_fwd" not in counts


@pytest.mark.parametrize("variant", ["token", "init_values_gelu_tanh", "representation_size"])
def test_forward_norms_only_the_rows_the_head_reads(variant, device, monkeypatch):
    """global_pool='token': forward() runs the final (add +) LayerNorm on the class token's row
    alone, forward_features() on every token; the logits are the same."""
    model, ref, ref64 = models(device, **VARIANTS[variant])
    model.eval()
    x = torch.randn(2, 3, 64, 64, device=device)
    final_norm_rows = []
    for name in ("layer_norm", "add_layer_norm"):
        real = getattr(vit_fast.functional, name)

        def spy(t, *args, _real=real, **kwargs):
            if any(a is model.norm.weight for a in args):
                final_norm_rows.append(t.shape[:-1].numel())
            return _real(t, *args, **kwargs)

        monkeypatch.setattr(vit_fast.functional, name, spy)
    with torch.no_grad():
        logits = model(x)
        assert final_norm_rows == [2]  # B rows, not B * 17
        feats = model.forward_features(x)
        assert final_norm_rows == [2, 2 * 17] and feats.shape == (2, 17, 96)
        torch.testing.assert_close(logits, model.forward_head(feats), rtol=1e-6, atol=1e-6)
        with torch_in_tf32(device):
            ref_out = ref.eval()(x)
        assert_close_to_ref(f"{variant} logits, class-token row normed", logits, ref_out, ref64.eval()(x.double()),
                            fp32_bound(device))
    if device == "cpu":  # same rows on the PyTorch path
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
        with torch.no_grad():
            torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), rtol=1e-6, atol=1e-6)


# aten ops that launch no kernel: allocation, views, metadata
NO_KERNEL_OPS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
                 "aten.view", "aten._unsafe_view", "aten.reshape", "aten.t", "aten.permute", "aten.transpose",
                 "aten.unbind", "aten.select", "aten.slice", "aten.alias", "aten.detach", "aten.expand",
                 "aten.as_strided", "aten.unsqueeze", "aten.squeeze", "aten.promote_types", "aten.result_type",
                 "aten.lift_fresh", "aten.split", "aten.split_with_sizes", "aten.unflatten"}


class _TorchOps(TorchDispatchMode):
    """Counts the aten (and vit_fast C++) ops a forward issues, except those Triton's interpreter
    issues itself to move a kernel's arguments to and from the host (on a GPU there are none)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.in_interpreter = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_interpreter:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def torch_ops(monkeypatch):
    mode = _TorchOps()
    if dispatch.interpreter_enabled():
        from triton.runtime import interpreter
        launch = interpreter.GridExecutor.__call__

        def counted_launch(self, *args, **kwargs):
            mode.in_interpreter += 1
            try:
                return launch(self, *args, **kwargs)
            finally:
                mode.in_interpreter -= 1

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted_launch)
    with mode:
        yield mode.ops


@pytest.mark.parametrize("images", ["float", "uint8"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_half_model_forward_issues_no_casts_or_copies(images, mode, device, monkeypatch):
    """model.half() (bf16 on a GPU; fp16 under the interpreter, whose bf16 dots are broken) on the
    kernel path: besides the fused ops, the forward's only torch kernels are the qkv / proj / head
    matmuls (aten.addmm), 2 * depth + 1: no aten._to_copy / copy_ casts, no adds or clones."""
    if not (device == "cuda" or dispatch.interpreter_enabled()):
        pytest.skip("counts the kernel path")
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    model = vit_fast.VisionTransformer(**SMALL).to(device=device, dtype=dtype)
    model.train(mode == "train")
    x = (torch.randn(2, 3, 64, 64, device=device, dtype=dtype) if images == "float"
         else torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=device))
    with torch.set_grad_enabled(mode == "train"), torch_ops(monkeypatch) as ops:
        out = model(x)
    assert out.dtype == dtype and out.shape == (2, 10)
    kernels = {op: n for op, n in ops.items() if op not in NO_KERNEL_OPS}
    assert kernels == {"vit_fast.patch_embed_fwd": 1, "aten.addmm": 2 * SMALL["depth"] + 1}, kernels


# ----------------------------------------------------------------------------- gradient checkpointing


def _saved_activation_bytes(model, step):
    """Bytes of the tensors autograd saves for backward during ``step()``, parameters (and views
    of them) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return out, sum(saved), len(saved)


@pytest.mark.parametrize("extra", [{}, dict(init_values=0.1, drop_path_rate=0.2, drop_rate=0.1)])
@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_grad_checkpointing_same_grads_fewer_saved_activations(path, extra, device, monkeypatch):
    """set_grad_checkpointing() (timm's): the same output and gradients (drop path and dropout
    masks replayed in the recompute), while the forward keeps only what lies outside the blocks."""
    if path == "torch":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    model = vit_fast.VisionTransformer(**SMALL, **extra).to(device).train()
    assert model.grad_checkpointing is False
    x = torch.randn(2, 3, 64, 64, device=device, requires_grad=True)
    g = torch.randn(2, 10, device=device)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        out, nbytes, count = _saved_activation_bytes(model, lambda: model(x))
        (out * g).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, x.grad, nbytes, count))
    (out0, grads0, dx0, bytes0, count0), (out1, grads1, dx1, bytes1, count1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=1e-6, atol=1e-7)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    print(f"{path} {extra}: saved {bytes0} bytes in {count0} tensors, checkpointed {bytes1} in {count1}")
    assert bytes1 < bytes0 / 2 and count1 < count0 / 2
    model.eval()
    with torch.no_grad():  # nothing to checkpoint without autograd: the plain forward
        checkpointed = model(x)
        model.set_grad_checkpointing(False)
        torch.testing.assert_close(checkpointed, model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the modules' fused forwards


def test_patch_embed_forward_takes_the_models_prefix_and_position_embedding(device):
    embed = vit_fast.nn.PatchEmbed(64, 16, 3, 96).to(device)
    cls, pos = torch.randn(1, 1, 96, device=device), torch.randn(1, 17, 96, device=device)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=device)
    half = torch.full((3,), 0.5, device=device)
    got = embed(images, half, half, cls_token=cls, pos_embed=pos)
    want = vit_fast.functional.patch_embed(images, embed.proj.weight, embed.proj.bias, cls_token=cls, pos_embed=pos,
                                           mean=half, std=half)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    tokens = embed(images, half, half)  # timm's forward(x): patch tokens only
    torch.testing.assert_close(got, torch.cat([cls.expand(2, -1, -1), tokens], 1) + pos, **fp32_tolerance(device))
    normed = vit_fast.nn.PatchEmbed(64, 16, 3, 96, norm_layer=vit_fast.nn.LayerNorm).to(device)  # norm, then prefix
    x = torch.randn(2, 3, 64, 64, device=device)
    torch.testing.assert_close(normed(x, cls_token=cls, pos_embed=pos),
                               torch.cat([cls.expand(2, -1, -1), normed(x)], 1) + pos, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cls_token, pos_embed: PatchEmbed adds them to tokens \[B, L, E\] only"):
        vit_fast.nn.PatchEmbed(64, 16, 3, 96, output_fmt="NCHW").to(device)(x, cls_token=cls)


@pytest.mark.parametrize("train", [False, True])
def test_mlp_forward_fused_adds_the_residual(train, device):
    mlp = vit_fast.nn.Mlp(96, 192, drop=0.25 if train else 0.0).to(device).train(train)
    x, residual = torch.randn(2, 17, 96, device=device), torch.randn(2, 17, 96, device=device)
    torch.manual_seed(3)
    fused = mlp.forward_fused(x, residual=residual)
    torch.manual_seed(3)
    plain = mlp(x) + residual  # an active drop2 (training, p > 0) comes before the add
    torch.testing.assert_close(fused, plain, **fp32_tolerance(device))
    if not train:
        torch.testing.assert_close(mlp.forward_fused(x), mlp(x), rtol=0, atol=0)


def test_layer_norm_forward_fused_is_the_add_then_the_norm(device):
    norm = vit_fast.nn.LayerNorm(96, eps=1e-6).to(device)
    x, residual = torch.randn(2, 17, 96, device=device), torch.randn(2, 17, 96, device=device)
    y, s = norm.forward_fused(x, residual)
    torch.testing.assert_close(s, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + residual), **fp32_tolerance(device))
    y, s = norm.forward_fused(x)  # the stream comes back uncopied (x itself, or its alias on the kernel path)
    assert s.data_ptr() == x.data_ptr() and s.shape == x.shape and torch.equal(s, x) and torch.equal(y, norm(x))
    wide = vit_fast.nn.LayerNorm((17, 96)).to(device)  # several normalized dims: the add, then forward
    y, s = wide.forward_fused(x, residual)
    torch.testing.assert_close(y, wide(x + residual), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("variant", ["token", "init_values_gelu_tanh"])
def test_last_block_computes_the_class_row_only(variant, path, monkeypatch):
    """forward() with global_pool='token': the last block's attention takes the class token's query
    alone (qkv, keys and values from every token), then proj, norm2, the MLP and the final norm run
    on that row; the logits and every parameter's gradient match the reference, on the interpreter's
    kernels and on the PyTorch path (VIT_FAST_FORCE_TORCH=1)."""
    if path == "torch":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    elif not dispatch.interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    model, ref, ref64 = models("cpu", **VARIANTS[variant])
    rows = []
    real = model.blocks[-1].mlp.forward_fused

    def spy(h, *args, **kwargs):
        rows.append(h.shape[1])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(model.blocks[-1].mlp, "forward_fused", spy)
    if variant != "token":
        monkeypatch.setattr(model.blocks[-1].mlp, "forward", spy)
    x = torch.randn(2, 3, 64, 64)
    g = torch.randn(2, SMALL["num_classes"])
    out, grads = run(model, x, g)
    assert rows == [1]  # the last block's MLP on the class token's row only
    ref_out, ref_grads = run(ref, x, g)
    out64, grads64 = run(ref64, x.double(), g.double())
    assert_close_to_ref(f"{path} {variant} logits", out, ref_out, out64, DTYPE_BOUND[torch.float32])
    assert grads.keys() == grads64.keys()
    for name, grad in grads.items():
        assert_close_to_ref(f"{path} {variant} grad {name}", grad, ref_grads[name], grads64[name],
                            DTYPE_BOUND[torch.float32], factor=3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.forward_head(model.forward_features(x)), rtol=1e-5, atol=1e-5)
