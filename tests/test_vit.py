"""The fused ViT (vit_fast.model, vit_fast.nn.Block) against the reference model with the same weights.

On the CPU the kernels run under Triton's interpreter (slow), so the models are small: img 64,
patch 16 (17 tokens), dim 96, depth 2, 3 heads, batch 2.
"""
import contextlib
import copy
import importlib.util
import os
import warnings

import pytest
import torch

import vit_fast
from vit_fast import dispatch, reference
from vit_fast.checkpoint import resample_pos_embed
from vit_fast.nn.block import Block, DropPath

from numerics import DTYPE_BOUND, assert_close_to_ref

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


@contextlib.contextmanager
def torch_in_tf32(device):
    """On a GPU, torch's fp32 matmuls and convs in tf32 as the kernels' fp32 dots may be: the
    "torch in the same dtype" of assert_close_to_ref."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device == "cuda"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp32_tolerance(device):
    """assert_close tolerances for fp32 plumbing checks (numerics are tested against float64 above)."""
    return dict(rtol=1e-2, atol=1e-2) if device == "cuda" else dict(rtol=1e-4, atol=1e-4)  # tf32 on GPUs


def models(device, **extra):
    """(vit_fast model, reference fp32, reference float64), same weights."""
    ref = reference.VisionTransformer(**{**SMALL, **extra}).to(device)
    model = vit_fast.VisionTransformer(**{**SMALL, **extra}).to(device)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref, copy.deepcopy(ref).double()


def run(model, x, g):
    """Forward, then the backward of <out, g>: (out, {name: grad})."""
    out = model(x)
    (out * g.to(out.dtype)).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


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
               "add_layer_norm_bwd", "linear_act_fwd", "linear_act_bwd"):
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
