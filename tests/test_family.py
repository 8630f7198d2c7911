"""The ViT family (DeiT distilled, DINOv2 with and without registers, CLIP, SigLIP MAP / GAP) against the
oracle (vit_fast.reference) with the same state_dict, on both CPU paths: Triton's interpreter
(TRITON_INTERPRET=1, the kernels) and VIT_FAST_FORCE_TORCH=1 (plain PyTorch).

Tiny configs (depth 2, dim 48 or 144, images 28-32 px) of the real factories: every family argument
(distillation token, LayerScale, registers with no_embed_class, norm_pre with eps 1e-5 and no patch
bias, quick-GELU, the MAP head, head dim 72, a 14-px patch over 32 px dropping the remainder) as the
named config sets it. Key names and parameter counts of the full-size configs are timm 1.0's
(timm/models/vision_transformer.py, deit.py, timm/layers/attention_pool.py, read for the facts).
"""
import copy

import pytest
import torch

import vit_fast
from vit_fast import reference

from numerics import (DTYPE_BOUND, assert_model_matches_reference, assert_same_keys_and_shapes, launches_during,
                      select_model_path)

# name -> the overrides that make it tiny (depth 2 and 10 classes for all)
TINY = {
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
    "vit_small_patch14_dinov2": dict(img_size=28, embed_dim=48, num_heads=3),
    "vit_small_patch14_reg4_dinov2": dict(img_size=28, embed_dim=48, num_heads=3),
    "vit_base_patch16_clip_224": dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
    "vit_base_patch16_clip_quickgelu_224": dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
    "vit_base_patch16_siglip_224": dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
    # so400m's head dim 72 and mlp_ratio 3.7362; patch 14 over 32 px: 2 x 2 patches, 4 px dropped
    "vit_so400m_patch14_siglip_384": dict(img_size=32, embed_dim=144, num_heads=2),
    "vit_base_patch16_siglip_gap_224": dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
}

# timm 1.0's parameter counts (its model table), at its default configs' num_classes: 1000 for DeiT,
# 0 (no head) for DINOv2 and SigLIP
PARAM_COUNTS = {
    "deit_tiny_distilled_patch16_224": 5_910_800, "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "vit_small_patch14_dinov2": 22_056_192, "vit_base_patch14_dinov2": 86_579_712,
    "vit_large_patch14_dinov2": 304_367_616, "vit_small_patch14_reg4_dinov2": 22_057_344,
    "vit_base_patch14_reg4_dinov2": 86_582_016, "vit_large_patch14_reg4_dinov2": 304_370_688,
    "vit_base_patch16_siglip_224": 92_884_224, "vit_so400m_patch14_siglip_384": 428_225_600,
    "vit_so400m_patch14_siglip_gap_384": 412_987_248,
}
FAMILY = [name for name in vit_fast.MODELS if not name.startswith("vit_") or "dinov2" in name or "clip" in name
          or "siglip" in name]

# ops each family must run on the kernel path, forward and backward (besides the blocks' usual ones)
MUST_RUN = {
    "deit_tiny_distilled_patch16_224": {"attention_fwd", "attention_bwd"},  # last block: 2 query rows
    "vit_base_patch16_siglip_224": {"attention_fwd", "attention_bwd"},  # the MAP head's latent query
    "vit_so400m_patch14_siglip_384": {"attention_fwd", "attention_bwd"},
}
BLOCK_OPS = {"patch_embed_fwd", "patch_embed_bwd", "attention_packed_fwd", "attention_packed_bwd", "layer_norm_fwd",
             "layer_norm_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd", "mlp_fwd"}


def tiny_models(name):
    """(vit_fast model, reference fp32, reference float64) of the tiny config, the same weights; the
    oracle's near-zero or constant tensors (layer scales, prefix tokens, LayerNorm weights, latent)
    drawn at random so every path carries signal."""
    kwargs = dict(TINY[name], depth=2, num_classes=10)
    ref = reference.create_reference(name, **kwargs)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key.endswith(("gamma", "_token", "latent")):
                p.normal_(0.0, 0.5)
            elif "norm" in key:
                p.add_(torch.randn_like(p) * 0.2)
    model = vit_fast.MODELS[name](**kwargs)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref, copy.deepcopy(ref).double()


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_family_matches_the_reference(name, path, monkeypatch):
    select_model_path(path, monkeypatch)
    model, ref, ref64 = tiny_models(name)
    size = TINY[name]["img_size"]
    x = torch.randn(2, 3, size, size)
    g = torch.randn(2, 10)
    _, counts = launches_during(lambda: assert_model_matches_reference(f"{name} {path}", model, ref, ref64, x, g,
                                                                        DTYPE_BOUND[torch.float32]))
    if path == "torch":
        assert not counts, f"the PyTorch path launched kernels: {counts}"
        return
    # the patch embedding is the C++ op on this path too (counted as patch_embed_*)
    missing = (BLOCK_OPS | MUST_RUN.get(name, set())) - set(counts)
    assert not missing, f"{name}: {sorted(missing)} did not run ({counts})"
    # the fused MLP of each block (quick-GELU's too) and of the MAP head
    assert counts.get("mlp_bwd") == 2 + (model.attn_pool is not None)


@pytest.mark.parametrize("name", sorted(TINY))
def test_state_dict_keys_are_the_oracles(name):
    model, ref, _ = tiny_models(name)
    assert_same_keys_and_shapes(model, ref)


@pytest.mark.parametrize("name", FAMILY)
def test_full_size_keys_shapes_and_counts(name):
    """Full-size configs on the meta device: the oracle's keys and shapes; timm's parameter counts."""
    headless = "dinov2" in name or "siglip" in name
    with torch.device("meta"):
        model = vit_fast.MODELS[name](**({"num_classes": 0} if headless else {}))
        ref = reference.create_reference(name, num_classes=model.num_classes)
    assert_same_keys_and_shapes(model, ref)
    if name in PARAM_COUNTS:
        assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_timm_key_names_and_shapes_by_family():
    """Facts read from timm's source: where each family's extra tensors sit and their shapes."""
    with torch.device("meta"):
        deit = vit_fast.deit_small_distilled_patch16_224()
        reg = vit_fast.vit_small_patch14_reg4_dinov2()
        dino = vit_fast.vit_small_patch14_dinov2()
        clip = vit_fast.vit_base_patch16_clip_quickgelu_224()
        siglip = vit_fast.vit_so400m_patch14_siglip_384()
        gap = vit_fast.vit_base_patch16_siglip_gap_224()
    sd = deit.state_dict()
    assert list(sd)[:4] == ["cls_token", "pos_embed", "dist_token", "patch_embed.proj.weight"]
    assert sd["pos_embed"].shape == (1, 198, 384) and list(sd)[-4:] == ["head.weight", "head.bias",
                                                                         "head_dist.weight", "head_dist.bias"]
    sd = reg.state_dict()
    assert list(sd)[:3] == ["cls_token", "reg_token", "pos_embed"]
    assert sd["reg_token"].shape == (1, 4, 384) and sd["pos_embed"].shape == (1, 37 * 37, 384)  # 518 / 14
    assert dino.state_dict()["pos_embed"].shape == (1, 1 + 37 * 37, 384) and "blocks.0.ls1.gamma" in dino.state_dict()
    assert dino.num_classes == 1000 and vit_fast.vit_small_patch14_dinov2(num_classes=0).num_classes == 0
    sd = clip.state_dict()
    assert "patch_embed.proj.bias" not in sd and list(sd)[3:5] == ["norm_pre.weight", "norm_pre.bias"]
    assert clip.norm_pre.eps == clip.blocks[0].norm1.eps == clip.norm.eps == 1e-5 and clip.blocks[0].mlp.quick_gelu
    sd = siglip.state_dict()
    assert "cls_token" not in sd and sd["pos_embed"].shape == (1, 729, 1152)  # 384 = 27 * 14 + 6
    assert siglip.blocks[0].attn.head_dim == 72 and sd["blocks.0.mlp.fc1.weight"].shape == (4304, 1152)
    assert [k for k in sd if k.startswith("attn_pool.")] == [
        "attn_pool.latent", "attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight", "attn_pool.kv.bias",
        "attn_pool.proj.weight", "attn_pool.proj.bias", "attn_pool.norm.weight", "attn_pool.norm.bias",
        "attn_pool.mlp.fc1.weight", "attn_pool.mlp.fc1.bias", "attn_pool.mlp.fc2.weight", "attn_pool.mlp.fc2.bias"]
    assert sd["attn_pool.latent"].shape == (1, 1, 1152) and sd["attn_pool.kv.weight"].shape == (2304, 1152)
    assert "norm.weight" in sd and "fc_norm.weight" not in sd  # 'map': the final norm before the pool
    assert "norm.weight" in gap.state_dict() and "attn_pool.latent" not in gap.state_dict()  # gap: fc_norm=False


def test_deit_distilled_training_returns_both_heads():
    """timm's deit.py: the mean of the two heads, except in training with distilled training set."""
    model, ref, _ = tiny_models("deit_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        head, head_dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
        torch.testing.assert_close(model.eval()(x), (head + head_dist) / 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.train()(x), (head + head_dist) / 2, rtol=1e-5, atol=1e-5)
        model.set_distilled_training(True)
        out, out_dist = model.train()(x)
        torch.testing.assert_close(out, head, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_dist, head_dist, rtol=1e-5, atol=1e-5)
        assert torch.is_tensor(model.eval()(x))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)


def test_forward_runs_the_last_block_for_the_rows_the_head_reads():
    """DeiT: the last block for the class and distillation rows (attention with 2 queries);
    SigLIP (MAP) and GAP pools read every patch: every block on every token."""
    for name, queries in (("deit_tiny_distilled_patch16_224", 2), ("vit_base_patch16_siglip_gap_224", None)):
        model, _, _ = tiny_models(name)
        seen = []
        real = model.blocks[-1].attn.forward

        def spy(h, *args, _real=real, **kwargs):
            seen.append(kwargs.get("query_rows"))
            return _real(h, *args, **kwargs)

        model.blocks[-1].attn.forward = spy
        with torch.no_grad():
            logits = model.eval()(torch.randn(2, 3, 32, 32))
        assert seen == [queries] and logits.shape == (2, 10)


def test_dinov2_dynamic_img_size_resamples_patches_only_rows():
    """dynamic_img_size (timm's kwarg, off by default): other sizes resample the position embedding,
    with reg4's no_embed_class none of its rows belonging to the prefix tokens."""
    for name in ("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"):
        kwargs = dict(TINY[name], depth=2, num_classes=10, dynamic_img_size=True)
        model = vit_fast.MODELS[name](**kwargs)
        assert model(torch.randn(1, 3, 42, 56)).shape == (1, 10)  # 3 x 4 patches
        with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
            model(torch.randn(1, 3, 40, 56))


def test_create_model_loads_a_headless_timm_checkpoint_strict(tmp_path):
    """DINOv2 / SigLIP checkpoints have no head (timm's default config: num_classes 0)."""
    ref = reference.create_reference("vit_small_patch14_reg4_dinov2", num_classes=0, depth=2, img_size=28,
                                     embed_dim=48, num_heads=3)
    path = tmp_path / "dinov2.pth"
    torch.save(ref.state_dict(), path)
    model = vit_fast.create_model("vit_small_patch14_reg4_dinov2", checkpoint=path, depth=2, img_size=28,
                                  embed_dim=48, num_heads=3)
    assert model.num_classes == 0
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
