"""Weights from files: Google .npz in every layout, PyTorch checkpoints, position resampling, create_model.

Checkpoints are written here from a reference model with random weights (`to_npz` below is the
inverse of the loader's mapping, one layout at a time); loading one into a fresh model must give
the reference model's outputs.
"""
import copy
import os
import pickle

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast import dispatch, reference
from vit_fast.checkpoint import resample_pos_embed
from numerics import DTYPE_BOUND, assert_close_to_ref, rel_err, torch_tf32

# small model: 4x4 patch grid; MODEL builds the model under test
CFG = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
MODEL = vit_fast.VisionTransformer
FACTORY = "vit_tiny_patch16_224"  # create_model's name; CFG overrides its sizes

# a block's submodules as Flax names them: pre-Linen flax.nn counts all of a block's submodules with
# one counter (the released vision_transformer checkpoints); Linen counts per module type
BLOCK_NAMINGS = {
    "pre-Linen": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "Linen": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
# flavour -> (block naming, whether the position embedding sits at Transformer/posembed_input with the
# class token's row (vision_transformer) rather than top-level pos_embedding without it (big_vision))
NPZ_FLAVOURS = {
    "vision_transformer": ("pre-Linen", True),  # google-research/vision_transformer's released files
    "big_vision": ("Linen", False),
    "vit_jax_linen": ("Linen", True),  # vit_jax's Linen models (models_vit.py), as its test_utils write them
    "pre_linen_top_pos": ("pre-Linen", False),  # no codebase writes it; read all the same
}
NPZ_BLOCK_MODULES = {flavour: BLOCK_NAMINGS[naming] for flavour, (naming, _) in NPZ_FLAVOURS.items()}
# (flavour, prefix, scanned): every layout the loader reads
NPZ_LAYOUTS = [
    ("vision_transformer", "", False),
    ("vision_transformer", "opt/target/", False),
    ("big_vision", "params/", False),
    ("big_vision", "params/img/", False),
    ("big_vision", "params/", True),
    # every other combination of position-embedding place, block naming and scanning
    ("vit_jax_linen", "", False),
    ("vit_jax_linen", "opt/target/", False),
    ("vit_jax_linen", "params/", True),
    ("pre_linen_top_pos", "params/", False),
    ("pre_linen_top_pos", "", True),
    ("vision_transformer", "", True),
]


def randomized(model):
    """Weights large enough that every layer, GELU included, works away from its linear regime."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model.eval()


def source_model(flavour="vision_transformer", **kw):
    """A reference model with random weights that the given layout can represent exactly."""
    model = randomized(reference.VisionTransformer(**{**CFG, "act_layer": "gelu_tanh", **kw}))
    if not NPZ_FLAVOURS[flavour][1] and model.cls_token is not None:
        with torch.no_grad():
            model.pos_embed[:, 0].zero_()  # big_vision adds no position embedding to the class token
    return model


def to_npz(model, path, flavour="vision_transformer", prefix="", scanned=False, num_heads=CFG["num_heads"],
           extra=None, drop=(), replace=None, block_namings=None):
    """Write `model` (timm names) as a Google .npz of the given layout; `drop`/`replace` spoil it.
    `block_namings`: one key of BLOCK_NAMINGS per block, instead of the flavour's for all."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    E = sd["patch_embed.proj.weight"].shape[0]
    H, D = num_heads, E // num_heads
    naming, posembed_input = NPZ_FLAVOURS[flavour]
    block_namings = block_namings or [naming] * len(model.blocks)
    arrays = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # [E, C, p, p] -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        arrays["cls"] = sd["cls_token"]
    if posembed_input:
        arrays["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    else:
        arrays["pos_embedding"] = sd["pos_embed"][:, model.num_prefix_tokens:]
    for npz_name, key in (("head", "head"), ("pre_logits", "pre_logits.fc")):
        if f"{key}.weight" in sd:
            arrays[f"{npz_name}/kernel"] = sd[f"{key}.weight"].T
            arrays[f"{npz_name}/bias"] = sd[f"{key}.bias"]
    blocks = []
    for i in range(len(model.blocks)):
        b = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        norm1, attn, norm2, mlp = BLOCK_NAMINGS[block_namings[i]]
        block = {
            f"{norm1}/scale": b("norm1.weight"), f"{norm1}/bias": b("norm1.bias"),
            f"{norm2}/scale": b("norm2.weight"), f"{norm2}/bias": b("norm2.bias"),
            f"{attn}/out/kernel": b("attn.proj.weight").T.reshape(H, D, E),
            f"{attn}/out/bias": b("attn.proj.bias"),
            f"{mlp}/Dense_0/kernel": b("mlp.fc1.weight").T, f"{mlp}/Dense_0/bias": b("mlp.fc1.bias"),
            f"{mlp}/Dense_1/kernel": b("mlp.fc2.weight").T, f"{mlp}/Dense_1/bias": b("mlp.fc2.bias"),
        }
        for name, w, bias in zip(("query", "key", "value"), np.split(b("attn.qkv.weight"), 3),
                                 np.split(b("attn.qkv.bias"), 3)):
            block[f"{attn}/{name}/kernel"] = w.T.reshape(E, H, D)  # Dense kernel [in, heads, head_dim]
            block[f"{attn}/{name}/bias"] = bias.reshape(H, D)
        blocks.append(block)
    if scanned:
        arrays.update({f"Transformer/encoderblock/{n}": np.stack([blk[n] for blk in blocks]) for n in blocks[0]})
    else:
        arrays.update({f"Transformer/encoderblock_{i}/{n}": v for i, blk in enumerate(blocks) for n, v in blk.items()})
    arrays.update(replace or {})
    for name in drop:
        del arrays[name]
    np.savez(path, **{prefix + k: v for k, v in arrays.items()}, **(extra or {}))
    return path


def images(n=2, size=CFG["img_size"]):
    return torch.randn(n, 3, size, size)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    """The exact check: the model under test on its PyTorch path (the kernel path is tested apart)."""
    monkeypatch.setenv("VIT_FAST_FORCE_TORCH", "1")


def assert_same_function(model, ref, x, bound=1e-5):
    with torch.no_grad():
        err = rel_err(model(x), ref(x))
    assert err <= bound, f"rel err {err:.2e} > {bound:.0e}"


def assert_exactly_one_warning(records, *fragments):
    messages = [str(r.message) for r in records]
    assert len(messages) == 1, messages
    for fragment in fragments:
        assert fragment in messages[0], messages[0]


# --------------------------------------------------------------------------- resample_pos_embed

GRIDS = [((4, 4), (6, 6)), ((6, 6), (4, 4)), ((7, 7), (12, 12)), ((14, 14), (24, 24)), ((3, 3), (1, 1)),
         ((1, 1), (3, 3)), ((4, 4), (3, 5)), ((3, 5), (6, 4))]


@pytest.mark.parametrize("old,new", GRIDS)
def test_google_resampling_equals_scipy_zoom(old, new):
    pos = torch.randn(1, 1 + old[0] * old[1], 20)
    out = resample_pos_embed(pos, new, num_prefix_tokens=1, mode="google", old_grid=old)
    grid = pos[0, 1:].reshape(*old, 20).numpy()
    expected = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert expected.shape == (*new, 20)
    assert out.dtype == torch.float32 and out.shape == (1, 1 + new[0] * new[1], 20)
    assert rel_err(out[0, 1:].reshape(*new, 20), torch.from_numpy(expected)) <= 1e-6
    assert torch.equal(out[:, :1], pos[:, :1])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old,new", GRIDS[:4] + GRIDS[-2:])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_torch_resampling_equals_interpolate(mode, old, new, prefix):
    pos = torch.randn(1, prefix + old[0] * old[1], 20)
    out = resample_pos_embed(pos, new, num_prefix_tokens=prefix, mode=mode, old_grid=old)
    grid = pos[:, prefix:].reshape(1, *old, 20).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=new, mode=mode, align_corners=False, antialias=False)
    assert torch.equal(out[:, :prefix], pos[:, :prefix])
    assert rel_err(out[:, prefix:], expected.permute(0, 2, 3, 1).reshape(1, -1, 20)) <= 1e-6


@pytest.mark.parametrize("mode", ["google", "bilinear", "bicubic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_resampling_keeps_the_dtype_and_computes_in_float32_or_more(mode, dtype):
    pos = torch.randn(1, 1 + 16, 8, dtype=torch.float64)
    out = resample_pos_embed(pos.to(dtype), 6, mode=mode)
    assert out.dtype == dtype
    exact = resample_pos_embed(pos, 6, mode=mode)
    assert rel_err(out, exact) <= {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}[dtype]


def test_resampling_to_the_same_grid_is_the_identity():
    pos = torch.randn(1, 17, 8)
    assert torch.equal(resample_pos_embed(pos, (4, 4), mode="google"), pos)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pos_embed=torch.randn(1, 1 + 15, 8), new_grid=(4, 4)), "not a square grid"),
    (dict(pos_embed=torch.randn(1, 1 + 16, 8), new_grid=(5, 5), old_grid=(3, 5)), "old_grid"),
    (dict(pos_embed=torch.randn(17, 8), new_grid=(5, 5)), "pos_embed: expected shape"),
    (dict(pos_embed=torch.randn(1, 17, 8), new_grid=(5, 5), mode="nearest"), "mode: expected one of"),
])
def test_resampling_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample_pos_embed(**kwargs)


# --------------------------------------------------------------------------- load_npz


@pytest.mark.parametrize("flavour,prefix,scanned", NPZ_LAYOUTS)
def test_load_npz_every_layout(tmp_path, flavour, prefix, scanned):
    ref = source_model(flavour)
    # optimizer state, a text tower: outside the model's prefix, ignored
    extra = {"opt/state/step": np.zeros(1)} if prefix == "opt/target/" else {}
    if prefix == "params/img/":
        extra = {"params/txt/Embed_0/embedding": np.zeros((5, 4)), "params/t": np.ones(1)}
    path = to_npz(ref, tmp_path / "vit.npz", flavour, prefix, scanned, extra=extra)
    model = randomized(MODEL(**CFG, act_layer="gelu_tanh"))
    assert vit_fast.load_npz(model, path) is model
    assert_same_function(model, ref, images())


def test_every_layout_loads_the_same_weights(tmp_path):
    """The same model written in every layout (and with its blocks named each way in one file) loads
    to the same state_dict, bit for bit; the layout each was read as is said in the messages."""
    ref = source_model("big_vision")  # class-token row zero: every layout holds it exactly
    loaded = {}
    for flavour, prefix, scanned in NPZ_LAYOUTS:
        path = to_npz(ref, tmp_path / f"{flavour}-{prefix.replace('/', '_')}-{scanned}.npz", flavour, prefix, scanned)
        loaded[(flavour, prefix, scanned)] = vit_fast.load_npz(MODEL(**CFG, act_layer="gelu_tanh"), path).state_dict()
    for namings in (["pre-Linen", "Linen"], ["Linen", "pre-Linen"]):
        for flavour in ("vision_transformer", "big_vision"):
            path = to_npz(ref, tmp_path / f"mixed-{flavour}-{namings[0]}.npz", flavour, block_namings=namings)
            loaded[(flavour, "mixed", tuple(namings))] = vit_fast.load_npz(MODEL(**CFG), path).state_dict()
    expected = ref.state_dict()
    for layout, state in loaded.items():
        assert list(state) == list(expected), layout
        for key, value in state.items():
            assert torch.equal(value, expected[key]), (layout, key)


def test_load_npz_names_the_layout_it_read(tmp_path):
    path = to_npz(source_model(), tmp_path / "linen.npz", "vit_jax_linen", "opt/target/", drop=["embedding/bias"])
    with pytest.raises(RuntimeError) as info:
        vit_fast.load_npz(MODEL(**CFG), path)
    assert "(Transformer/posembed_input/pos_embedding, Linen block names, prefix 'opt/target/')" in str(info.value)
    assert "missing (1): patch_embed.proj.bias (npz 'opt/target/embedding/bias' absent)" in str(info.value)


def test_load_npz_pre_logits_with_representation_size(tmp_path):
    ref = source_model(representation_size=24)
    path = to_npz(ref, tmp_path / "vit21k.npz")
    model = vit_fast.load_npz(MODEL(**CFG, act_layer="gelu_tanh", representation_size=24), path)
    assert_same_function(model, ref, images())


def test_load_npz_drops_pre_logits_the_model_lacks_with_one_message(tmp_path):
    path = to_npz(source_model(representation_size=24), tmp_path / "vit21k.npz")
    model = MODEL(**{**CFG, "num_classes": 7})
    with pytest.warns(UserWarning) as records:
        vit_fast.load_npz(model, path)
    assert_exactly_one_warning(records, "pre-logits", "head")


def test_load_npz_keeps_the_models_head_of_another_size_with_one_message(tmp_path):
    ref = source_model()
    path = to_npz(ref, tmp_path / "vit.npz")
    model = randomized(MODEL(**{**CFG, "num_classes": 5}, act_layer="gelu_tanh"))
    head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning) as records:
        vit_fast.load_npz(model, path)
    assert_exactly_one_warning(records, "head", "[5, 48]", "[10, 48]")
    assert torch.equal(model.head.weight, head)
    with torch.no_grad():
        x = images()
        assert rel_err(model.forward_features(x), ref.forward_features(x)) <= 1e-5


@pytest.mark.parametrize("pos_resample", ["google", "bilinear", "bicubic"])
@pytest.mark.parametrize("flavour,prefix,scanned", [NPZ_LAYOUTS[0], ("big_vision", "params/", True),
                                                    ("vit_jax_linen", "", False)])
def test_load_npz_resamples_the_position_grid(tmp_path, pos_resample, flavour, prefix, scanned):
    ref = source_model(flavour)
    path = to_npz(ref, tmp_path / "vit.npz", flavour, prefix, scanned)
    model = vit_fast.load_npz(MODEL(**{**CFG, "img_size": 48}), path, pos_resample=pos_resample)  # grid 4 -> 6
    old = ref.pos_embed.detach()
    if pos_resample == "google":  # Google's fine-tuning code, verbatim
        grid = scipy.ndimage.zoom(old[0, 1:].reshape(4, 4, -1).numpy(), (6 / 4, 6 / 4, 1), order=1)
        expected = torch.cat([old[:, :1], torch.from_numpy(grid).reshape(1, 36, -1)], dim=1)
    else:
        expected = resample_pos_embed(old, (6, 6), 1, mode=pos_resample)
    assert rel_err(model.pos_embed, expected) <= 1e-6
    assert torch.equal(model.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)


def test_erf_and_tanh_models_differ_on_the_same_weights(tmp_path):
    ref = source_model()
    path = to_npz(ref, tmp_path / "vit.npz")
    tanh = vit_fast.load_npz(MODEL(**CFG, act_layer="gelu_tanh"), path)
    erf = vit_fast.load_npz(MODEL(**CFG, act_layer="gelu"), path)
    x = images()
    with torch.no_grad():
        assert rel_err(tanh(x), ref(x)) <= 1e-5
        assert rel_err(erf(x), ref(x)) >= 3e-5  # ~8e-5 here: well outside the fp32 agreement above


def test_load_npz_on_the_kernel_path(tmp_path, monkeypatch, device):
    """The loaded model on its kernels (Triton's interpreter on CPU): within the fp32 tolerance, against
    torch fp32 on the same device with tf32 off (the kernels' fp32 dots are exact fp32, not tf32)."""
    monkeypatch.delenv("VIT_FAST_FORCE_TORCH")
    with torch_tf32(False):
        _check_npz_on_the_kernel_path(tmp_path, device)


def _check_npz_on_the_kernel_path(tmp_path, device):
    cfg = {**CFG, "img_size": 16}  # 2x2 patches: the interpreter is slow
    ref = source_model(**cfg)
    model = vit_fast.load_npz(MODEL(**cfg, act_layer="gelu_tanh"), to_npz(ref, tmp_path / "vit.npz")).to(device)
    x = images(size=16)
    launches = sum(dispatch.kernel_launches.values())
    with torch.no_grad():
        out = model(x.to(device))
        assert sum(dispatch.kernel_launches.values()) > launches
        torch_out = copy.deepcopy(ref).to(device)(x.to(device))
        assert_close_to_ref("logits", out, torch_out, copy.deepcopy(ref).double()(x.double()),
                            DTYPE_BOUND[torch.float32])


def _load_bad_npz(tmp_path, model=None, ref=None, **to_npz_kwargs):
    path = to_npz(ref or source_model(), tmp_path / "bad.npz", **to_npz_kwargs)
    with pytest.raises(RuntimeError) as info:
        vit_fast.load_npz(model or MODEL(**CFG), path)
    return str(info.value)


@pytest.mark.parametrize("flavour,prefix,scanned", [NPZ_LAYOUTS[1], NPZ_LAYOUTS[3]])
def test_load_npz_names_a_missing_weight(tmp_path, flavour, prefix, scanned):
    norm2 = NPZ_BLOCK_MODULES[flavour][2]
    msg = _load_bad_npz(tmp_path, flavour=flavour, prefix=prefix, drop=[f"Transformer/encoderblock_1/{norm2}/scale"])
    assert "missing (1)" in msg and "blocks.1.norm2.weight" in msg
    assert f"'{prefix}Transformer/encoderblock_1/{norm2}/scale'" in msg


def test_load_npz_names_a_missing_value_projection(tmp_path):
    msg = _load_bad_npz(tmp_path, drop=["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel"])
    assert "blocks.0.attn.qkv.weight" in msg and "value/kernel" in msg


def test_load_npz_names_a_misshapen_weight(tmp_path):
    bad = {"Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros((48, 100), np.float32)}
    msg = _load_bad_npz(tmp_path, replace=bad)
    assert "misshapen (1)" in msg and "blocks.0.mlp.fc1.weight" in msg and "[100, 48]" in msg and "[192, 48]" in msg


def test_load_npz_names_an_array_of_the_wrong_rank(tmp_path):
    msg = _load_bad_npz(tmp_path, replace={"embedding/kernel": np.zeros((8, 8), np.float32)})
    assert "patch_embed.proj.weight" in msg and "'embedding/kernel' [8, 8]" in msg


def test_load_npz_names_an_unknown_array(tmp_path):
    msg = _load_bad_npz(tmp_path, prefix="params/", flavour="big_vision",
                        extra={"params/Transformer/encoderblock_0/LayerScale_0/scale": np.zeros(48)})
    assert "unexpected (1)" in msg and "'params/Transformer/encoderblock_0/LayerScale_0/scale'" in msg


@pytest.mark.parametrize("scanned", [False, True])
def test_load_npz_names_the_blocks_of_a_deeper_checkpoint(tmp_path, scanned):
    msg = _load_bad_npz(tmp_path, ref=source_model("big_vision", depth=3), flavour="big_vision", prefix="params/",
                        scanned=scanned)
    assert "unexpected (12)" in msg and "blocks.2.attn.qkv.weight" in msg and "blocks.2.mlp.fc2.bias" in msg
    assert ("'params/Transformer/encoderblock/MlpBlock_0/Dense_1/bias' layer 2" in msg) == scanned


def test_load_npz_names_the_blocks_a_shallower_checkpoint_lacks(tmp_path):
    msg = _load_bad_npz(tmp_path, ref=source_model(depth=1))
    assert "missing (12)" in msg and "blocks.1.norm1.weight" in msg and "blocks.1.attn.proj.bias" in msg


def test_load_npz_names_a_class_token_the_checkpoint_lacks(tmp_path):
    ref = source_model("big_vision", class_token=False, global_pool="avg", fc_norm=False)
    msg = _load_bad_npz(tmp_path, ref=ref, flavour="big_vision", prefix="params/")
    assert "missing (1): cls_token (npz 'params/cls' absent)" in msg


def test_load_npz_without_class_token(tmp_path):
    """big_vision's global-average-pool models: no class token, encoder norm before the pool."""
    ref = source_model("big_vision", class_token=False, global_pool="avg", fc_norm=False)
    path = to_npz(ref, tmp_path / "gap.npz", "big_vision", "params/")
    model = vit_fast.load_npz(MODEL(**CFG, class_token=False, global_pool="avg", fc_norm=False,
                                    act_layer="gelu_tanh"), path)
    assert_same_function(model, ref, images())


def test_load_npz_rejects_a_file_that_is_not_a_vit(tmp_path):
    np.savez(tmp_path / "other.npz", **{"conv1/kernel": np.zeros(3)})
    with pytest.raises(ValueError, match="no embedding/kernel"):
        vit_fast.load_npz(MODEL(**CFG), tmp_path / "other.npz")


# --------------------------------------------------------------------------- load_checkpoint


def _wrapped(state, wrapper):
    return {
        "plain": lambda: state,
        "model": lambda: {"model": state, "epoch": 3},
        "state_dict": lambda: {"state_dict": state},
        "module": lambda: {"module": state},
        "ddp": lambda: {f"module.{k}": v for k, v in state.items()},
        "state_dict+ddp": lambda: {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[wrapper]()


@pytest.mark.parametrize("ext", [".pth", ".pt", ".bin"])
@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "module", "ddp", "state_dict+ddp"])
def test_load_checkpoint_wrappers_and_prefixes(tmp_path, ext, wrapper):
    ref = randomized(reference.VisionTransformer(**CFG))
    torch.save(_wrapped(ref.state_dict(), wrapper), tmp_path / f"ckpt{ext}")
    model = vit_fast.load_checkpoint(randomized(MODEL(**CFG)), tmp_path / f"ckpt{ext}")
    assert_same_function(model, ref, images())


@pytest.mark.parametrize("wrapper", ["plain", "ddp"])
def test_load_checkpoint_safetensors(tmp_path, wrapper):
    from safetensors.torch import save_file

    ref = randomized(reference.VisionTransformer(**CFG))
    save_file(_wrapped(ref.state_dict(), wrapper), tmp_path / "ckpt.safetensors")
    model = vit_fast.load_checkpoint(randomized(MODEL(**CFG)), str(tmp_path / "ckpt.safetensors"))
    assert_same_function(model, ref, images())


class _NotATensor:
    pass


def test_load_checkpoint_reads_weights_only(tmp_path):
    torch.save({"model": reference.VisionTransformer(**CFG).state_dict(), "args": _NotATensor()}, tmp_path / "c.pth")
    with pytest.raises(pickle.UnpicklingError):
        vit_fast.load_checkpoint(MODEL(**CFG), tmp_path / "c.pth")


class _Payload:
    """Unpickling this calls os.mkdir(marker): proof, if the directory appears, that the file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("ext", [".pth", ".bin"])
def test_load_checkpoint_refuses_a_pickle_that_runs_code(tmp_path, writer, ext):
    marker = tmp_path / "payload_ran"
    state = {**reference.VisionTransformer(**CFG).state_dict(), "x": _Payload(marker)}
    path = tmp_path / f"crafted{ext}"
    if writer == "torch.save":
        torch.save({"model": state}, path)
    else:  # the legacy (non-zip) format: a bare pickle stream, the payload alone
        with open(path, "wb") as f:
            pickle.dump({"model": {"x": _Payload(marker)}}, f, protocol=2)
    for load in (lambda: vit_fast.load_checkpoint(MODEL(**CFG), path),
                 lambda: vit_fast.create_model(FACTORY, checkpoint=path, **SIZES)):
        with pytest.raises(pickle.UnpicklingError, match=r"crafted.*refused.*weights_only=True.*never runs code"):
            load()
        assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("pos_resample", ["bicubic", "bilinear"])
def test_load_checkpoint_resamples_the_position_grid(tmp_path, pos_resample):
    ref = randomized(reference.VisionTransformer(**CFG))
    torch.save(ref.state_dict(), tmp_path / "c.pth")
    kwargs = {} if pos_resample == "bicubic" else {"pos_resample": pos_resample}  # bicubic: the default
    model = vit_fast.load_checkpoint(MODEL(**{**CFG, "img_size": 48}), tmp_path / "c.pth", **kwargs)
    grid = ref.pos_embed.detach()[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode=pos_resample, align_corners=False)
    assert rel_err(model.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, -1)) <= 1e-6
    assert torch.equal(model.pos_embed[:, :1], ref.pos_embed[:, :1])


def _spoiled_state():
    state = dict(reference.VisionTransformer(**CFG).state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(3)
    state["blocks.0.norm2.weight"] = torch.zeros(7)
    state["head.weight"], state["head.bias"] = torch.zeros(7, 48), torch.zeros(7)  # another head: replaced
    return state


def test_load_checkpoint_strict_names_missing_unexpected_and_misshapen_keys(tmp_path):
    torch.save(_spoiled_state(), tmp_path / "c.pth")
    with pytest.raises(RuntimeError) as info:
        vit_fast.load_checkpoint(MODEL(**CFG), tmp_path / "c.pth")
    msg = str(info.value)
    assert "missing (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected (1): blocks.0.attn.extra" in msg
    assert "misshapen (1): blocks.0.norm2.weight: checkpoint [7], model [48]" in msg
    assert "head not loaded: checkpoint [7, 48], model [10, 48]" in msg  # the head rule, said in the same message


def test_load_checkpoint_not_strict_warns_once_and_loads_the_rest(tmp_path):
    state = _spoiled_state()
    torch.save(state, tmp_path / "c.pth")
    model = MODEL(**CFG)
    head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning) as records:
        vit_fast.load_checkpoint(model, tmp_path / "c.pth", strict=False)
    assert_exactly_one_warning(records, "blocks.1.mlp.fc2.bias", "blocks.0.attn.extra", "blocks.0.norm2.weight",
                               "head not loaded: checkpoint [7, 48], model [10, 48]")
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.head.weight, head)


def _write_checkpoint(ref, path):
    if path.suffix == ".npz":
        return to_npz(ref, path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(ref.state_dict(), path)
    else:
        torch.save(ref.state_dict(), path)
    return path


def _load(path, model, **kwargs):
    loader = vit_fast.load_npz if path.suffix == ".npz" else vit_fast.load_checkpoint
    return loader(model, path, **kwargs)


@pytest.mark.parametrize("ext,strict", [(".npz", None), (".pth", True), (".pth", False), (".safetensors", True)])
@pytest.mark.parametrize("num_classes", [5, 0])
def test_both_loaders_replace_a_head_of_another_size_with_one_warning(tmp_path, ext, strict, num_classes):
    """One rule for load_npz and load_checkpoint (strict or not): a head of another size, or a model
    without one, keeps the model's own head, said in one warning; the rest loads."""
    ref = source_model()
    path = _write_checkpoint(ref, tmp_path / f"c{ext}")
    model = randomized(MODEL(**{**CFG, "num_classes": num_classes}, act_layer="gelu_tanh"))
    head = copy.deepcopy(model.head)
    with pytest.warns(UserWarning) as records:
        _load(path, model, **({} if strict is None else {"strict": strict}))
    assert_exactly_one_warning(records, "head not loaded", "checkpoint [10, 48]",
                               f"model {[num_classes, 48] if num_classes else 'none'}")
    assert type(model.head) is type(head)
    if num_classes:
        assert torch.equal(model.head.weight, head.weight) and torch.equal(model.head.bias, head.bias)
    with torch.no_grad():
        x = images()
        assert rel_err(model.forward_features(x), ref.forward_features(x)) <= 1e-5


@pytest.mark.parametrize("ext", [".npz", ".pth"])
def test_both_loaders_load_a_head_of_the_same_size_silently(tmp_path, ext, recwarn):
    ref = source_model()
    model = _load(_write_checkpoint(ref, tmp_path / f"c{ext}"), MODEL(**CFG, act_layer="gelu_tanh"))
    assert not [str(w.message) for w in recwarn.list]
    assert torch.equal(model.head.weight, ref.head.weight)


@pytest.mark.parametrize("name,match", [("c.npz", "load_npz"), ("c.ckpt", "expected a file ending in")])
def test_load_checkpoint_rejects_other_formats(tmp_path, name, match):
    with pytest.raises(ValueError, match=match):
        vit_fast.load_checkpoint(MODEL(**CFG), tmp_path / name)


def test_load_checkpoint_rejects_a_file_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": torch.tensor(0.1)}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"expected a state_dict of tensors .* found \['epoch', 'lr'\]"):
        vit_fast.load_checkpoint(MODEL(**CFG), tmp_path / "c.pth")


# --------------------------------------------------------------------------- create_model

SIZES = {k: v for k, v in CFG.items() if k not in ("num_classes", "img_size")}


def test_create_model_npz_defaults_to_tanh_and_google_resampling(tmp_path):
    ref = source_model()
    path = to_npz(ref, tmp_path / "vit.npz")
    model = vit_fast.create_model(FACTORY, checkpoint=path, img_size=32, **SIZES)
    assert_same_function(model, ref, images())  # tanh GELU, the checkpoint's 10-class head
    bigger = vit_fast.create_model(FACTORY, checkpoint=str(path), img_size=48, **SIZES)
    assert rel_err(bigger.pos_embed, resample_pos_embed(ref.pos_embed, (6, 6), mode="google")) <= 1e-6


def test_create_model_npz_overrides(tmp_path):
    ref = source_model()
    path = to_npz(ref, tmp_path / "vit.npz")
    erf = randomized(reference.VisionTransformer(**CFG, act_layer="gelu"))
    erf.load_state_dict(ref.state_dict())
    model = vit_fast.create_model(FACTORY, checkpoint=path, img_size=32, act_layer="gelu", **SIZES)
    assert_same_function(model, erf, images())
    bilinear = vit_fast.create_model(FACTORY, checkpoint=path, img_size=48, pos_resample="bilinear", **SIZES)
    assert rel_err(bilinear.pos_embed, resample_pos_embed(ref.pos_embed, (6, 6), mode="bilinear")) <= 1e-6


def test_create_model_npz_takes_the_checkpoints_pre_logits(tmp_path):
    ref = source_model(representation_size=24)
    model = vit_fast.create_model(FACTORY, checkpoint=to_npz(ref, tmp_path / "vit21k.npz"), img_size=32, **SIZES)
    assert_same_function(model, ref, images())


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_create_model_torch_checkpoint_defaults_to_erf_and_bicubic(tmp_path, ext):
    from safetensors.torch import save_file

    ref = randomized(reference.VisionTransformer(**CFG))  # erf GELU
    path = tmp_path / f"c{ext}"
    torch.save(ref.state_dict(), path) if ext == ".pth" else save_file(ref.state_dict(), path)
    assert_same_function(vit_fast.create_model(FACTORY, checkpoint=path, img_size=32, **SIZES), ref, images())
    bigger = vit_fast.create_model(FACTORY, checkpoint=path, img_size=48, **SIZES)
    assert rel_err(bigger.pos_embed, resample_pos_embed(ref.pos_embed, (6, 6), mode="bicubic")) <= 1e-6


def test_create_model_walkthrough_checkpoint_with_tanh(tmp_path):
    """The walkthrough's checkpoints: timm names, tanh GELU."""
    ref = source_model()
    torch.save(ref.state_dict(), tmp_path / "vit-patch_16.pth")
    model = vit_fast.create_model(FACTORY, checkpoint=tmp_path / "vit-patch_16.pth", img_size=32,
                                  act_layer="gelu_tanh", **SIZES)
    assert_same_function(model, ref, images())


@pytest.mark.parametrize("ext", [".npz", ".pth"])
def test_create_model_new_num_classes_replaces_the_head_with_one_message(tmp_path, ext):
    ref = source_model()
    path = to_npz(ref, tmp_path / "c.npz") if ext == ".npz" else tmp_path / "c.pth"
    if ext == ".pth":
        torch.save(ref.state_dict(), path)
    with pytest.warns(UserWarning) as records:
        model = vit_fast.create_model(FACTORY, checkpoint=path, num_classes=4, img_size=32,
                                      act_layer="gelu_tanh", **SIZES)
    assert_exactly_one_warning(records, "head", "[4, 48]", "[10, 48]")
    assert model.head.weight.shape == (4, 48)
    x = images()
    with torch.no_grad():
        assert rel_err(model.forward_features(x), ref.forward_features(x)) <= 1e-5


def test_create_model_without_checkpoint_and_bad_names(tmp_path):
    model = vit_fast.create_model(FACTORY, num_classes=3, img_size=32, **SIZES)
    assert model.head.weight.shape == (3, 48) and model.pos_embed.shape == (1, 17, 48)
    with pytest.raises(ValueError, match="name: expected one of"):
        vit_fast.create_model("vit_gigantic")
    torch.save(reference.VisionTransformer(**CFG).state_dict(), tmp_path / "c.pth")
    with pytest.raises(ValueError, match="pos_resample"):
        vit_fast.create_model(FACTORY, checkpoint=tmp_path / "c.pth", pos_resample="nearest", **SIZES)
