"""vit_fast.convert: a reference (or timm) ViT converted in place keeps its tensors and its outputs."""
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
