"""vit_fast.convert: a reference (or timm) ViT converted in place keeps its tensors and its outputs."""
import collections
import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vit_fast
from vit_fast import dispatch, reference

from numerics import assert_close_to_ref
from test_vit import SMALL, fp32_bound, fp32_tolerance, torch_in_tf32


class GELUTanh(nn.Module):
    """Stands in for timm.layers.GELUTanh (recognised by its class name)."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


def check_converted(model, kinds):
    for name, module in model.named_modules():
        for kind in kinds:
            if type(module).__name__ == kind:
                assert type(module).__module__.startswith("vit_fast.nn"), f"{name} not converted: {type(module)}"


@pytest.mark.parametrize("extra", [{}, dict(init_values=0.1, act_layer="gelu_tanh"), dict(global_pool="avg")])
def test_convert_reference_model(extra, device, caplog):
    model = reference.VisionTransformer(**{**SMALL, **extra}).to(device).eval()
    before = copy.deepcopy(model)
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 64, 64, device=device)
    with caplog.at_level(logging.DEBUG, logger="vit_fast.convert"):
        assert vit_fast.convert(model) is model
    check_converted(model, ("Attention", "Mlp", "LayerNorm", "PatchEmbed", "Block"))
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert model.blocks[0].mlp.approximate == ("tanh" if extra.get("act_layer") == "gelu_tanh" else "none")
    assert "pos_drop (Dropout)" in caplog.text and "head (Linear)" in caplog.text
    launches = sum(dispatch.kernel_launches.values())
    with torch.no_grad():
        out = model(x)
        with torch_in_tf32(device):
            ref_out, out64 = before(x), copy.deepcopy(before).double()(x.double())
    assert device == "cuda" or sum(dispatch.kernel_launches.values()) > launches
    assert_close_to_ref("converted reference", out, ref_out, out64, fp32_bound(device), factor=3)


def test_converted_model_trains_its_own_parameters(device):
    """An optimizer built before convert() still steps the parameters the converted model uses."""
    model = reference.VisionTransformer(**SMALL).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    vit_fast.convert(model)
    x = torch.randn(2, 3, 64, 64, device=device)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    weight = model.blocks[0].mlp.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, weight)


def test_unknown_modules_left_alone(caplog):
    model = reference.VisionTransformer(**SMALL)
    model.blocks[1].mlp.act = nn.ReLU()  # no fused kernel for it
    model.blocks[0].mlp.act = GELUTanh()
    with caplog.at_level(logging.DEBUG, logger="vit_fast.convert"):
        vit_fast.convert(model)
    assert type(model.blocks[0]) is vit_fast.nn.Block and model.blocks[0].mlp.approximate == "tanh"
    assert type(model.blocks[1]) is reference.Block and type(model.blocks[1].mlp) is reference.Mlp
    assert type(model.blocks[1].attn) is vit_fast.nn.Attention  # its other parts are still converted
    assert "blocks.1.mlp (Mlp)" in caplog.text and "blocks.1 (Block)" in caplog.text


def test_convert_is_idempotent_and_takes_a_block(device):
    block = reference.Block(96, 3, qkv_bias=True).to(device)
    x = torch.randn(2, 17, 96, device=device)
    expected = block(x)
    new = vit_fast.convert(block)
    assert type(new) is vit_fast.nn.Block and new.norm1.weight is block.norm1.weight
    assert vit_fast.convert(new) is new and new.attn is vit_fast.convert(new).attn
    torch.testing.assert_close(new(x), expected, **fp32_tolerance(device))


TIMM_VARIANTS = {
    "gelu": dict(act_layer="gelu"),
    "gelu_tanh_init_values": dict(act_layer="gelu_tanh", init_values=0.1),
    "dynamic_img_size_avg": dict(dynamic_img_size=True, global_pool="avg", class_token=False),  # NHWC patch embed
}


@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
def test_convert_timm_model(variant, device):
    timm = pytest.importorskip("timm")
    extra = TIMM_VARIANTS[variant]
    model = timm.models.vision_transformer.VisionTransformer(**SMALL, **extra).to(device).eval()
    before = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 96 if extra.get("dynamic_img_size") else 64, device=device)
    vit_fast.convert(model)
    check_converted(model, ("Attention", "Mlp", "LayerNorm", "PatchEmbed", "Block"))
    assert model.blocks[0].mlp.approximate == ("tanh" if extra.get("act_layer") == "gelu_tanh" else "none")
    with torch.no_grad():
        out = model(x)
        with torch_in_tf32(device):
            ref_out, out64 = before(x), copy.deepcopy(before).double()(x.double())
    assert_close_to_ref(f"converted timm ({variant})", out, ref_out, out64, fp32_bound(device), factor=3)


class QuickGELU(nn.Module):
    """Stands in for timm.layers.QuickGELU (CLIP's x * sigmoid(1.702 x)), recognised by its class name."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class timm_like:  # noqa: N801 -- stand-ins for timm 1.0's modules, recognised by convert by class name
    class Attention(nn.Module):
        """timm 1.0's Attention: forward(x, attn_mask=None), the mask handed to SDPA."""

        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, 3 * dim, bias=True)
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
            self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

        def forward(self, x, attn_mask=None):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    class Mlp(nn.Module):
        def __init__(self, dim, hidden, act):
            super().__init__()
            self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), act, nn.Dropout(0.0)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    class Block(nn.Module):
        """timm 1.0's Block: forward(x, attn_mask=None) calls self.attn(x, attn_mask=attn_mask)."""

        def __init__(self, dim, num_heads, act):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), timm_like.Attention(dim, num_heads)
            self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
            self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), timm_like.Mlp(dim, 4 * dim, act)
            self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

        def forward(self, x, attn_mask=None):
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _attn_masks(n, device):
    keep = torch.rand(2, 1, n, n, device=device) > 0.3
    keep |= torch.eye(n, dtype=torch.bool, device=device)  # no fully masked row
    return {"bool": keep, "additive": torch.zeros(2, 1, n, n, device=device).masked_fill(~keep, float("-inf"))}


@pytest.mark.parametrize("act", ["relu", "quick_gelu", "gelu"])
def test_converted_modules_take_timms_call_signatures(act, device, monkeypatch):
    """A timm Block that convert keeps (a ReLU MLP has no fused kernel) calls its
    converted Attention as self.attn(x, attn_mask=attn_mask); a fully fused one is called as timm's
    Block(x, attn_mask=...). Both run and match; a mask is applied on the PyTorch path and refused
    by name on the kernel path, never ignored."""
    act_module = {"relu": nn.ReLU(), "quick_gelu": QuickGELU(), "gelu": nn.GELU()}[act]
    block = timm_like.Block(96, 3, act_module).to(device).eval()
    before = copy.deepcopy(block)
    x = torch.randn(2, 17, 96, device=device)
    masks = _attn_masks(17, device)
    with torch.no_grad():
        expected = {None: before(x), **{kind: before(x, attn_mask=m) for kind, m in masks.items()}}
        expected64 = {None: copy.deepcopy(before).double()(x.double()),
                      **{kind: copy.deepcopy(before).double()(x.double(), attn_mask=m if m.dtype == torch.bool
                                                              else m.double()) for kind, m in masks.items()}}
    converted = vit_fast.convert(block)
    assert type(converted.attn) is vit_fast.nn.Attention and type(converted.norm1) is vit_fast.nn.LayerNorm
    if act == "relu":
        assert converted is block and type(block.mlp) is timm_like.Mlp  # kept: timm's Block and Mlp
    else:  # CLIP's quick-GELU too: in fc1's fused epilogue
        assert type(converted) is vit_fast.nn.Block and converted.mlp.quick_gelu == (act == "quick_gelu")
    with torch.no_grad():
        for out in (converted(x), converted(x, attn_mask=None)):
            assert_close_to_ref(f"{act} block", out, expected[None], expected64[None], fp32_bound(device), factor=3)
        if device == "cuda" or dispatch.interpreter_enabled():
            with pytest.raises(NotImplementedError, match=r"attn_mask: the fused attention kernels apply no mask"):
                converted(x, attn_mask=masks["bool"])
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
        for kind, mask in masks.items():
            assert_close_to_ref(f"{act} block, {kind} mask", converted(x, attn_mask=mask), expected[kind],
                                expected64[kind], fp32_bound(device), factor=3)


# ----------------------------------------------------------------------------- the family

FAMILY_KINDS = ("Attention", "Mlp", "LayerNorm", "PatchEmbed", "Block", "AttentionPoolLatent")


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
                                  "vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_siglip_224",
                                  "vit_so400m_patch14_siglip_384", "vit_base_patch16_siglip_gap_224"])
def test_convert_family(name, device, caplog):
    """convert() on the oracle's family models (stand-ins of timm's: the same class names and
    structure, QuickGELU and AttentionPoolLatent included): every block's attention and MLP and the
    MAP head fused, the same parameter objects, the same outputs; the heads (nn.Linear) kept."""
    from test_family import TINY, tiny_models
    _, model, _ = tiny_models(name)
    model = model.to(device).eval()
    before = copy.deepcopy(model)
    params = dict(model.named_parameters())
    size = TINY[name]["img_size"]
    x = torch.randn(2, 3, size, size, device=device)
    with caplog.at_level(logging.DEBUG, logger="vit_fast.convert"):
        assert vit_fast.convert(model) is model
    check_converted(model, FAMILY_KINDS)
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert "head (Linear)" in caplog.text
    if "quickgelu" in name:
        assert all(block.mlp.quick_gelu for block in model.blocks)
    if "siglip_2" in name or "so400m" in name:
        assert type(model.attn_pool) is vit_fast.nn.AttentionPoolLatent and model.attn_pool.mlp is not None
    before_launches = collections.Counter(dispatch.kernel_launches)
    with torch.no_grad():
        out = model(x)
        with torch_in_tf32(device):
            ref_out, out64 = before(x), copy.deepcopy(before).double()(x.double())
    ran = {op for op, n in dispatch.kernel_launches.items() if n > before_launches[op]}
    if device == "cuda" or dispatch.interpreter_enabled():
        assert {"attention_packed_fwd", "mlp_fwd", "add_layer_norm_fwd"} <= ran, ran
        if "siglip_2" in name or "so400m" in name:
            assert "attention_fwd" in ran  # the MAP head's latent query
    assert_close_to_ref(f"converted {name}", out, ref_out, out64, fp32_bound(device), factor=3)
