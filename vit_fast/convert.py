"""``convert(model)``: swap vit_fast's fused modules into an existing timm (or reference) ViT in place.

Each known module is rebuilt as its vit_fast twin holding the *same* parameter objects (so an
optimizer built before the conversion still steps them) and the same training mode:

    nn.LayerNorm (any subclass, e.g. timm's)  -> vit_fast.nn.LayerNorm
    Attention (qkv, proj)                     -> vit_fast.nn.Attention
    Mlp (fc1, GELU erf or tanh, fc2)          -> vit_fast.nn.Mlp, keeping the GELU flavour
    Mlp (fc1, QuickGELU, fc2: CLIP)           -> vit_fast.nn.Mlp, quick-GELU in fc1's fused epilogue
    AttentionPoolLatent (SigLIP's MAP head)   -> vit_fast.nn.AttentionPoolLatent (VF.attention, fused norm + MLP)
    PatchEmbed (conv with stride = kernel)    -> vit_fast.nn.PatchEmbed
    Block (norm1, attn, norm2, mlp, ...)      -> vit_fast.nn.Block, once its parts are vit_fast's
    EvaAttention (EVA-02: q_bias / v_bias or
      q/k/v projections, interleaved RoPE)    -> vit_fast.nn.EvaAttention (RoPE inside VF.attention_packed)
    GluMlp (SiLU: timm's SwiGLUPacked)        -> vit_fast.nn.GluMlp (VF.swiglu on fc1's two halves)
    SwiGLU (fc1_g, fc1_x, SiLU, norm, fc2)    -> vit_fast.nn.SwiGLU (VF.swiglu, the norm kept, fused fc2)
    EvaBlock (pre-norm)                       -> vit_fast.eva.EvaBlock, once its parts are vit_fast's

Modules are recognised by class name and structure, so timm need not be importable here. A module
that does not fit (another activation, a norm inside the Mlp, gated attention, ...) is left as it
is; everything left alone is listed at debug level on the ``vit_fast.convert`` logger. Kept as they
are because no kernel of vit_fast's does them: classifier heads (``head``, DeiT's ``head_dist``:
nn.Linear, cuBLAS like vit_fast's own models), dropouts, LayerScale multiplies and the model's own
forward (its token concatenation and position-embedding add, timm's ``_pos_embed``). Every
replacement takes the call of the timm 1.0 module it replaces (``Attention(x, attn_mask=None)``,
``Block(x, attn_mask=None)``, ``Mlp(x)``, ``LayerNorm(x)``, ``PatchEmbed(x)``), so a timm module left
alone (e.g. a Block around a ReLU Mlp) still calls its converted parts as it did.
"""
import functools
import logging

import torch
import torch.nn as nn

from vit_fast.eva import EvaBlock
from vit_fast.nn.attention import Attention, EvaAttention
from vit_fast.nn.attention_pool import AttentionPoolLatent
from vit_fast.nn.block import Block
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.mlp import GluMlp, Mlp, SwiGLU, gelu_approximate, is_quick_gelu
from vit_fast.nn.patch_embed import PatchEmbed

logger = logging.getLogger(__name__)

VIT_FAST_MODULES = (Attention, AttentionPoolLatent, Block, LayerNorm, Mlp, PatchEmbed, EvaAttention, EvaBlock, GluMlp,
                    SwiGLU)
UNREMARKABLE = (nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict)  # not worth listing as left alone


def _is_identity(module):
    return module is None or isinstance(module, nn.Identity)


def _dropout_p(module, name):
    """p of the nn.Dropout ``module.<name>``; None when there is none."""
    dropout = getattr(module, name, None)
    return dropout.p if isinstance(dropout, nn.Dropout) else None


def _twin(old, build):
    """``build()``'s module (constructed on the meta device) taking over ``old``'s parameters and
    buffers, the same objects; None when their state_dicts' names or shapes differ."""
    with torch.device("meta"):
        new = build()
    old_state = old.state_dict(keep_vars=True)
    new_state = new.state_dict()
    if {k: v.shape for k, v in old_state.items()} != {k: v.shape for k, v in new_state.items()}:
        return None
    new.load_state_dict(old_state, strict=True, assign=True)
    left_on_meta = [name for name, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left_on_meta:  # a vit_fast module with state timm's lacks: a bug here, not in the user's model
        raise RuntimeError(f"convert: {type(new).__name__} has tensors with no counterpart in "
                           f"{type(old).__name__}: {left_on_meta}")
    return new.train(old.training)


def _layer_norm(old):
    return _twin(old, lambda: LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                                        bias=getattr(old, "bias", None) is not None))


def _attention(old):
    qkv, proj = getattr(old, "qkv", None), getattr(old, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and hasattr(old, "num_heads")):
        return None
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
        return None
    if getattr(old, "gate", None) is not None or not _is_identity(getattr(old, "norm", None)):
        return None  # timm's gated or scale-normed attention
    attn_drop, proj_drop = _dropout_p(old, "attn_drop"), _dropout_p(old, "proj_drop")
    if attn_drop is None or proj_drop is None:
        return None
    q_norm, k_norm = getattr(old, "q_norm", None), getattr(old, "k_norm", None)
    qk_norm = not (_is_identity(q_norm) and _is_identity(k_norm))
    if qk_norm and not (isinstance(q_norm, nn.LayerNorm) and isinstance(k_norm, nn.LayerNorm)):
        return None
    new = _twin(old, lambda: Attention(dim, old.num_heads, qkv_bias=qkv.bias is not None, qk_norm=qk_norm,
                                       attn_drop=attn_drop, proj_drop=proj_drop))
    if new is not None and qk_norm:
        new.q_norm, new.k_norm = q_norm, k_norm  # the modules themselves: their eps too, not just their tensors
    return new


def _mlp(old):
    fc1, fc2, act = getattr(old, "fc1", None), getattr(old, "fc2", None), getattr(old, "act", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or not _is_identity(getattr(old, "norm", None)):
        return None
    drop = _dropout_p(old, "drop1"), _dropout_p(old, "drop2")
    if None in drop:
        return None
    if not is_quick_gelu(act):  # quick-GELU: in fc1's epilogue (see vit_fast.nn.Mlp)
        try:
            gelu_approximate(act)  # the GELU flavour the new Mlp keeps; the fused kernels do GELU only
        except ValueError:
            return None
    return _twin(old, lambda: Mlp(fc1.in_features, fc1.out_features, fc2.out_features, act_layer=act,
                                  bias=(fc1.bias is not None, fc2.bias is not None), drop=drop))


def _patch_embed(old):
    conv = getattr(old, "proj", None)
    if not isinstance(conv, nn.Conv2d) or not _is_identity(getattr(old, "norm", None)):
        return None
    p = conv.kernel_size[0]
    if conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.dilation != (1, 1):
        return None
    flatten = getattr(old, "flatten", True)
    output_fmt = None if flatten else getattr(old.output_fmt, "value", old.output_fmt)  # timm's Format enum
    return _twin(old, lambda: PatchEmbed(
        getattr(old, "img_size", None), p, conv.in_channels, conv.out_channels, flatten=flatten,
        output_fmt=output_fmt, bias=conv.bias is not None, strict_img_size=getattr(old, "strict_img_size", True),
        dynamic_img_pad=getattr(old, "dynamic_img_pad", False)))


def _attention_pool(old):
    """timm's AttentionPoolLatent with its ViT defaults (q projection, no qk norm, no position
    embedding, embed = out features), once its norm and MLP are vit_fast's."""
    latent, q, kv, proj = (getattr(old, name, None) for name in ("latent", "q", "kv", "proj"))
    norm, mlp = getattr(old, "norm", None), getattr(old, "mlp", None)
    if not (isinstance(latent, nn.Parameter) and latent.dim() == 3 and hasattr(old, "num_heads")
            and all(isinstance(m, nn.Linear) for m in (q, kv, proj))
            and isinstance(norm, LayerNorm) and isinstance(mlp, Mlp)):
        return None
    dim = kv.in_features
    shapes = (q.in_features, q.out_features, kv.out_features, proj.in_features, proj.out_features)
    if shapes != (dim, dim, 2 * dim, dim, dim) or getattr(old, "pos_embed", None) is not None:
        return None
    if not (_is_identity(getattr(old, "q_norm", None)) and _is_identity(getattr(old, "k_norm", None))):
        return None
    pool = getattr(old, "pool", "token")
    if pool not in ("token", "avg", "") or (q.bias is None) != (kv.bias is None):
        return None
    drop = _dropout_p(old, "proj_drop")
    act = "quick_gelu" if mlp.quick_gelu else {"none": "gelu", "tanh": "gelu_tanh"}[mlp.approximate]
    new = _twin(old, lambda: AttentionPoolLatent(
        dim, num_heads=old.num_heads, mlp_ratio=(mlp.fc1.out_features + 0.5) / dim, qkv_bias=q.bias is not None,
        latent_len=latent.shape[1], pool_type=pool, norm_layer=functools.partial(LayerNorm, eps=norm.eps),
        act_layer=act, drop=drop or 0.0))
    if new is not None:
        new.norm, new.mlp = norm, mlp  # the converted modules themselves (their eps, their dropouts)
    return new


def _block(old):
    """A Block around ``old``'s norms, attention and MLP, once they are vit_fast's."""
    parts = {name: getattr(old, name, None) for name in ("norm1", "attn", "norm2", "mlp")}
    if not (isinstance(parts["norm1"], LayerNorm) and isinstance(parts["norm2"], LayerNorm)
            and isinstance(parts["attn"], Attention) and isinstance(parts["mlp"], Mlp)):
        return None
    block = Block.from_parts(**parts, ls1=getattr(old, "ls1", None), ls2=getattr(old, "ls2", None),
                             drop_path1=getattr(old, "drop_path1", None), drop_path2=getattr(old, "drop_path2", None))
    return block.train(old.training)


def _eva_attention(old):
    """timm's EvaAttention without qk norm, gate or rotate_half (EVA-02's), its inner norm (if any) kept."""
    qkv, proj = getattr(old, "qkv", None), getattr(old, "proj", None)
    q_proj, k_proj, v_proj = (getattr(old, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    fused = isinstance(qkv, nn.Linear)
    if not isinstance(proj, nn.Linear) or not hasattr(old, "num_heads") or not hasattr(old, "head_dim"):
        return None
    if fused:
        if qkv.bias is not None or (getattr(old, "q_bias", None) is None) != (getattr(old, "v_bias", None) is None):
            return None
        dim, qkv_bias = qkv.in_features, getattr(old, "q_bias", None) is not None
    else:
        if not all(isinstance(m, nn.Linear) for m in (q_proj, k_proj, v_proj)) or k_proj.bias is not None:
            return None
        if (q_proj.bias is None) != (v_proj.bias is None):
            return None
        dim, qkv_bias = q_proj.in_features, q_proj.bias is not None
    if getattr(old, "gate", None) is not None or getattr(old, "rotate_half", False):
        return None
    if not (_is_identity(getattr(old, "q_norm", None)) and _is_identity(getattr(old, "k_norm", None))):
        return None
    norm = getattr(old, "norm", None)
    if not (_is_identity(norm) or isinstance(norm, LayerNorm)):
        return None
    attn_drop, proj_drop = _dropout_p(old, "attn_drop"), _dropout_p(old, "proj_drop")
    if attn_drop is None or proj_drop is None:
        return None
    attn_dim = old.num_heads * old.head_dim
    new = _twin(old, lambda: EvaAttention(
        dim, old.num_heads, qkv_bias=qkv_bias, qkv_fused=fused, num_prefix_tokens=getattr(old, "num_prefix_tokens", 1),
        attn_drop=attn_drop, proj_drop=proj_drop, attn_head_dim=old.head_dim,
        norm_layer=(lambda n: LayerNorm(n, eps=norm.eps)) if isinstance(norm, LayerNorm) else None,
        scale_norm=isinstance(norm, LayerNorm)))
    if new is not None and isinstance(norm, LayerNorm) and norm.normalized_shape == (attn_dim,):
        new.norm = norm  # the converted module itself
    return new


def _is_silu(act):
    return type(act).__name__ == "SiLU"


def _gated_mlp(old, kind):
    """timm's GluMlp with SiLU (SwiGLUPacked) or SwiGLU, once its norm (if any) is vit_fast's LayerNorm."""
    fc2, act, norm = getattr(old, "fc2", None), getattr(old, "act", None), getattr(old, "norm", None)
    if not isinstance(fc2, nn.Linear) or not _is_silu(act) or not (_is_identity(norm) or isinstance(norm, LayerNorm)):
        return None
    drop = _dropout_p(old, "drop1"), _dropout_p(old, "drop2")
    if None in drop:
        return None
    norm_layer = (lambda n: LayerNorm(n, eps=norm.eps)) if isinstance(norm, LayerNorm) else None
    if kind == "GluMlp":
        fc1 = getattr(old, "fc1", None)
        if not isinstance(fc1, nn.Linear) or getattr(old, "chunk_dim", -1) != -1:
            return None
        new = _twin(old, lambda: GluMlp(fc1.in_features, fc1.out_features, fc2.out_features, norm_layer=norm_layer,
                                        bias=(fc1.bias is not None, fc2.bias is not None), drop=drop,
                                        gate_last=getattr(old, "gate_last", True)))
    else:
        g, x = getattr(old, "fc1_g", None), getattr(old, "fc1_x", None)
        if not (isinstance(g, nn.Linear) and isinstance(x, nn.Linear)) or (g.bias is None) != (x.bias is None):
            return None
        new = _twin(old, lambda: SwiGLU(g.in_features, g.out_features, fc2.out_features, norm_layer=norm_layer,
                                        bias=(g.bias is not None, fc2.bias is not None), drop=drop))
    if new is not None and isinstance(norm, LayerNorm):
        new.norm = norm
    return new


def _eva_block(old):
    """timm's (pre-norm) EvaBlock around vit_fast parts: vit_fast.eva.EvaBlock with the same gamma_1 / gamma_2."""
    parts = {name: getattr(old, name, None) for name in ("norm1", "attn", "norm2", "mlp")}
    if not (isinstance(parts["norm1"], LayerNorm) and isinstance(parts["norm2"], LayerNorm)
            and isinstance(parts["attn"], EvaAttention) and isinstance(parts["mlp"], (GluMlp, SwiGLU, Mlp))):
        return None
    gammas = [getattr(old, name, None) for name in ("gamma_1", "gamma_2")]
    if any(g is not None and not isinstance(g, nn.Parameter) for g in gammas):
        return None
    block = EvaBlock.from_parts(**parts, gamma_1=gammas[0], gamma_2=gammas[1],
                                drop_path1=getattr(old, "drop_path1", None), drop_path2=getattr(old, "drop_path2", None))
    return block.train(old.training)


# timm's class name -> the function that rebuilds such a module (None: it does not fit)
_BY_CLASS_NAME = {
    "Attention": _attention,
    "Mlp": _mlp,
    "PatchEmbed": _patch_embed,
    "Block": _block,
    "AttentionPoolLatent": _attention_pool,
    "EvaAttention": _eva_attention,
    "GluMlp": functools.partial(_gated_mlp, kind="GluMlp"),
    "SwiGLU": functools.partial(_gated_mlp, kind="SwiGLU"),
    "EvaBlock": _eva_block,
}


def _replacement(module):
    """The vit_fast module that takes ``module``'s place, or None to leave it."""
    if isinstance(module, VIT_FAST_MODULES):
        return None
    if isinstance(module, nn.LayerNorm):  # by class, not name: any subclass (timm's LayerNorm too)
        return _layer_norm(module)
    rebuild = _BY_CLASS_NAME.get(type(module).__name__)
    return None if rebuild is None else rebuild(module)


def _convert(module, path, left_alone):
    for name, child in list(module.named_children()):
        new_child = _convert(child, f"{path}.{name}" if path else name, left_alone)
        if new_child is not child:
            setattr(module, name, new_child)
    new = _replacement(module)
    if new is None:
        if not isinstance(module, VIT_FAST_MODULES + UNREMARKABLE):
            left_alone.append(f"{path or '<root>'} ({type(module).__name__})")
        return module
    # its parts now belong to the new module: no longer worth listing
    parts = f"{path}." if path else ""
    left_alone[:] = [entry for entry in left_alone if not entry.startswith(parts)]
    return new


def convert(model):
    """Replace ``model``'s Attention, Mlp, LayerNorm, PatchEmbed, Block and AttentionPoolLatent modules in place with
    vit_fast's, sharing their parameter tensors; returns the model (a new module only when
    ``model`` itself is one of those kinds)."""
    left_alone = []
    model = _convert(model, "", left_alone)
    if left_alone:
        logger.debug("convert: left alone: %s", ", ".join(left_alone))
    return model
