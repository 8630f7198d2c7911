"""EVA-02 (vit_fast.eva, timm's Eva) against the oracle (vit_fast.reference.Eva) on both CPU paths:
Triton's interpreter (the kernels) and VIT_FAST_FORCE_TORCH=1, logits and every parameter gradient vs
float64. Tiny configs (depth 2, dim 64, 2 heads of 32, 28-px images over patch 14: a 2 x 2 grid, so
RoPE's ref_feat_shape (16, 16) rescale is exercised) of the real factories: tiny / small's packed
SwiGLU (GluMlp) and fused qkv with q_bias / v_bias, base / large's q/k/v projections and SwiGLU with
its norm. Key names and shapes are timm's (timm/models/eva.py: EvaAttention, EvaBlock, Eva; the rope
buffer is non-persistent, so not in the state_dict), read for the facts.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vit_fast
from vit_fast import dispatch, eva, reference
from vit_fast import functional as VF

from numerics import (DTYPE_BOUND, assert_model_matches_reference, assert_same_keys_and_shapes, launches_during,
                      select_model_path)

TINY = dict(img_size=28, embed_dim=64, num_heads=2, depth=2, num_classes=10)
NAMES = ["eva02_tiny_patch14_224", "eva02_base_patch14_224"]  # the two block layouts (small / large: same code)
EVA_OPS = {"patch_embed_fwd", "patch_embed_bwd", "attention_packed_fwd", "attention_packed_bwd", "swiglu_fwd",
           "swiglu_bwd", "linear_act_fwd", "layer_norm_fwd", "layer_norm_bwd",
           "add_layer_norm_fwd", "add_layer_norm_bwd"}


def tiny_models(name):
    ref = reference.create_reference(name, **TINY)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key.endswith(("_token", "q_bias", "v_bias")) or "norm" in key or key.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)  # zeros / ones in the oracle's init: give them signal
    model = eva.EVA_MODELS[name](**TINY)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref, copy.deepcopy(ref).double()


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_eva_matches_the_reference(name, path, monkeypatch):
    select_model_path(path, monkeypatch)
    model, ref, ref64 = tiny_models(name)
    ropes = []
    real = VF.attention_packed

    def spy(qkv, num_heads, scale=None, rope=None, num_prefix_tokens=0):
        ropes.append((None if rope is None else tuple(t.shape for t in rope), num_prefix_tokens))
        return real(qkv, num_heads, scale, rope=rope, num_prefix_tokens=num_prefix_tokens)

    monkeypatch.setattr(VF, "attention_packed", spy)
    x, g = torch.randn(2, 3, 28, 28), torch.randn(2, 10)
    _, counts = launches_during(lambda: assert_model_matches_reference(f"{name} {path}", model, ref, ref64, x, g,
                                                                        DTYPE_BOUND[torch.float32]))
    # every block's attention got the grid's table ([4 patches, head dim 32] each) past the class token
    assert ropes == [(((4, 32), (4, 32)), 1)] * 2
    if path == "torch":
        assert not counts, f"the PyTorch path launched kernels: {counts}"
        return
    missing = EVA_OPS - set(counts)
    assert not missing, f"{name}: {sorted(missing)} did not run ({counts})"
    assert counts["attention_packed_fwd"] == counts["attention_packed_bwd"] == 2  # one per block, with rope
    assert counts["swiglu_fwd"] == counts["swiglu_bwd"] == 2  # every block's SwiGLU
    assert counts["linear_act_fwd"] == 2  # every block's fc2 (+ bias + residual in the epilogue)
    assert "mlp_fwd" not in counts and "attention_fwd" not in counts


@pytest.mark.parametrize("name", sorted(eva.EVA_MODELS))
def test_full_size_keys_shapes_are_the_oracles(name):
    with torch.device("meta"):
        model = eva.EVA_MODELS[name]()
        ref = reference.create_reference(name)
    assert_same_keys_and_shapes(model, ref)


def test_timm_key_names_and_shapes():
    """Facts read from timm/models/eva.py and timm/layers/mlp.py."""
    with torch.device("meta"):
        tiny, base = vit_fast.eva02_tiny_patch14_224(), vit_fast.eva02_base_patch14_224()
    sd = tiny.state_dict()
    assert list(sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert sd["pos_embed"].shape == (1, 1 + 16 * 16, 192)
    assert [k for k in sd if k.startswith("blocks.0.")] == [
        "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight",
        "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias"]
    assert sd["blocks.0.mlp.fc1.weight"].shape == (1024, 192) and sd["blocks.0.mlp.fc2.weight"].shape == (192, 512)
    assert list(sd)[-4:] == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]  # 'avg': no norm
    assert "blocks.0.attn.k_bias" not in sd and not any("rope" in k for k in sd)  # non-persistent in timm
    sd = base.state_dict()
    assert [k for k in sd if k.startswith("blocks.0.attn.")] == [
        "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias", "blocks.0.attn.k_proj.weight",
        "blocks.0.attn.v_proj.weight", "blocks.0.attn.v_proj.bias", "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias"]
    assert [k for k in sd if k.startswith("blocks.0.mlp.")] == [
        "blocks.0.mlp.fc1_g.weight", "blocks.0.mlp.fc1_g.bias", "blocks.0.mlp.fc1_x.weight", "blocks.0.mlp.fc1_x.bias",
        "blocks.0.mlp.norm.weight", "blocks.0.mlp.norm.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"]
    assert sd["blocks.0.mlp.fc1_g.weight"].shape == (2048, 768)  # int(768 * 4 * 2 / 3)
    assert tiny.blocks[0].norm1.eps == tiny.fc_norm.eps == 1e-6


def test_rope_tables_are_timms_layout():
    """RotaryEmbeddingCat (in_pixels=False): 16 x 16 reference grid, row bands then column bands,
    each frequency on an interleaved pair; cached per grid."""
    sin, cos = eva.rope_tables((16, 16), 64, ref_feat_shape=(16, 16))
    assert sin.shape == cos.shape == (256, 64) and sin.dtype == torch.float32
    assert torch.equal(sin[:, 0::2], sin[:, 1::2])
    token = 2 * 16 + 5  # row 2, column 5: angles 2 * f_k then 5 * f_k
    f = 1.0 / (10000.0 ** (torch.arange(16, dtype=torch.float32) / 16))
    torch.testing.assert_close(sin[token, 0::2], torch.cat([(2 * f).sin(), (5 * f).sin()]))
    torch.testing.assert_close(cos[token, 0::2], torch.cat([(2 * f).cos(), (5 * f).cos()]))
    model = vit_fast.eva02_tiny_patch14_224(**TINY)
    assert model.rope((2, 2), torch.device("cpu")) is model.rope((2, 2), torch.device("cpu"))
    torch.testing.assert_close(torch.cat(model.rope((2, 2), "cpu"), -1),
                               reference.eva_rope((2, 2), 32, ref_feat_shape=(16, 16)), rtol=0, atol=0)


def test_create_model_loads_an_eva_checkpoint_strict(tmp_path):
    ref = reference.create_reference("eva02_tiny_patch14_224", **TINY)
    path = tmp_path / "eva02.pth"
    torch.save(ref.state_dict(), path)
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    model = vit_fast.create_model("eva02_tiny_patch14_224", checkpoint=path, **kwargs)
    assert model.num_classes == 10 and isinstance(model, vit_fast.Eva)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------- convert() on stand-ins
# Stand-ins of timm's classes (timm/models/eva.py, timm/layers/mlp.py), matched by convert() by class
# name and attributes as the real ones would be: the attribute names and forward math are timm's.


class LayerNorm(nn.LayerNorm):  # timm.layers.LayerNorm: an nn.LayerNorm subclass, eps 1e-6
    def __init__(self, n, eps=1e-6):
        super().__init__(n, eps=eps)


class EvaAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_fused=True, scale_norm=False):
        super().__init__()
        self.num_heads, self.head_dim, self.num_prefix_tokens = num_heads, dim // num_heads, 1
        self.rotate_half, self.gate = False, None
        if qkv_fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_proj = self.k_proj = self.v_proj = None
            self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
            self.qkv = self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = LayerNorm(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        if self.qkv is not None:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        P = self.num_prefix_tokens
        q = torch.cat([q[:, :, :P], reference.rotate_pairs(q[:, :, P:], rope)], 2)
        k = torch.cat([k[:, :, :P], reference.rotate_pairs(k[:, :, P:], rope)], 2)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))


class GluMlp(nn.Module):  # as timm builds it for EVA-02 tiny / small: SiLU, gate_last=False
    def __init__(self, dim, hidden2):
        super().__init__()
        self.chunk_dim, self.gate_last = -1, False
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden2), nn.SiLU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden2 // 2, dim), nn.Dropout(0.0)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(x1) * x2))))


class SwiGLU(nn.Module):  # base / large: split fc1, a LayerNorm before fc2
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1_g, self.fc1_x, self.act = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.SiLU()
        self.drop1, self.norm, self.fc2, self.drop2 = nn.Dropout(0.0), LayerNorm(hidden), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, base, init_values=None):
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), EvaAttention(dim, heads, qkv_fused=not base, scale_norm=base)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values)) if init_values else None
        self.drop_path1, self.norm2 = nn.Identity(), LayerNorm(dim)
        self.mlp = SwiGLU(dim, 2 * dim) if base else GluMlp(dim, 4 * dim)
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values)) if init_values else None
        self.drop_path2 = nn.Identity()

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if self.gamma_1 is None:
            x = x + self.drop_path1(self.attn(self.norm1(x), rope=rope))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.gamma_1 * self.attn(self.norm1(x), rope=rope))
        return x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))


class StandInEva(nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 14, 14)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.ModuleList([EvaBlock(dim, heads, base=False), EvaBlock(dim, heads, base=True, init_values=0.5)])
        self.register_buffer("rope", reference.eva_rope((2, 2), dim // heads, ref_feat_shape=(16, 16)), persistent=False)
        self.fc_norm, self.head = LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x, rope=self.rope, attn_mask=None, is_causal=False)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


def test_convert_fuses_timm_eva_blocks():
    if not dispatch.interpreter_enabled():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    model = StandInEva()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(x)
    params = {n: p for n, p in model.named_parameters()}
    vit_fast.convert(model)
    assert all(type(b) is vit_fast.eva.EvaBlock for b in model.blocks)
    assert isinstance(model.blocks[0].attn, vit_fast.nn.EvaAttention) and isinstance(model.blocks[0].mlp, vit_fast.nn.GluMlp)
    assert isinstance(model.blocks[1].mlp, vit_fast.nn.SwiGLU) and isinstance(model.blocks[1].mlp.norm, vit_fast.nn.LayerNorm)
    assert isinstance(model.blocks[1].attn.norm, vit_fast.nn.LayerNorm)
    assert all(p is params[n] for n, p in model.named_parameters()) and params.keys() == dict(model.named_parameters()).keys()
    with torch.no_grad():
        out, counts = launches_during(lambda: model(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert counts.get("attention_packed_fwd") == 2 and counts.get("swiglu_fwd") == 2, counts
