"""Drop-in timm ViT Block: pre-norm attention and MLP with the residual adds fused into neighbours.

The residual stream travels between blocks as a pair ``(x, delta)`` meaning ``x + delta``
(``delta`` None: ``x`` alone), as flash-attention's ``modules/block.py`` passes
``(hidden, residual)``: the add that ends one block runs inside the LayerNorm that starts the next
(``LayerNorm.forward_fused``, one add + norm kernel), or inside fc2's epilogue
(``Mlp.forward_fused(h, residual=x)``) when nothing sits between fc2 and the add.
``Block.forward`` keeps timm's ``x -> x`` on top of that.
"""
import functools

import torch
import torch.nn as nn

from vit_fast import functional as VF
from vit_fast.nn.attention import Attention, check_positive_int, check_tokens
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.mlp import Mlp


class LayerScale(nn.Module):
    """x * gamma over the channels (timm's LayerScale, state_dict key ``gamma``)."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's branch with probability ``drop_prob``
    and scale the kept ones by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0.0 else x * mask

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def norm_stream(norm, x, delta=None, out_dtype=None):
    """(norm(x + delta), x + delta) with the add fused into the LayerNorm; ``delta`` None: no add.
    ``out_dtype``: the normed output's dtype (default: the LayerNorm's own). vit_fast's LayerNorm
    does it itself (``LayerNorm.forward_fused``); another ``nn.LayerNorm`` (e.g. ``norm_layer=
    nn.LayerNorm``) is run by the same fused ops on its weight, bias and eps."""
    if isinstance(norm, LayerNorm):
        return norm.forward_fused(x, out_dtype=out_dtype) if delta is None else norm.forward_fused(delta, x, out_dtype)
    if delta is None:  # (LN(x), x), x's two consumers' gradients summed inside the LayerNorm backward
        return VF.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)
    return VF.add_layer_norm(delta, x, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)


def linear_input_dtype(x):
    """Under CUDA autocast a Linear rounds its input to the autocast dtype: a LayerNorm that only
    feeds one can write that dtype itself (the same numbers, without the fp32 round trip)."""
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else None


class Block(nn.Module):
    """timm's ``Block``: x + drop_path(ls1(attn(norm1(x)))), then + drop_path(ls2(mlp(norm2(x)))).

    ``norm_layer`` None: vit_fast's LayerNorm with eps 1e-6, as timm's VisionTransformer builds its
    blocks. ``act_layer``: 'gelu' (erf, timm's) or 'gelu_tanh' (Google's), or anything
    ``vit_fast.nn.mlp.gelu_approximate`` accepts (the MLP runs that flavour).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_drop=0.0, attn_drop=0.0,
                 init_values=None, drop_path=0.0, act_layer="gelu", norm_layer=None):
        super().__init__()
        check_positive_int("dim", dim)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio: expected a number with int(dim * mlp_ratio) >= 1 (dim {dim}), "
                             f"got {mlp_ratio!r}")
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @classmethod
    def from_parts(cls, norm1, attn, norm2, mlp, ls1=None, ls2=None, drop_path1=None, drop_path2=None):
        """A Block around existing modules (``vit_fast.convert`` uses this to keep a model's tensors)."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.norm1, block.attn = norm1, attn
        block.ls1, block.drop_path1 = ls1 or nn.Identity(), drop_path1 or nn.Identity()
        block.norm2, block.mlp = norm2, mlp
        block.ls2, block.drop_path2 = ls2 or nn.Identity(), drop_path2 or nn.Identity()
        return block

    def _fc2_adds_residual(self):
        # fc2's epilogue can add the residual only when no layer scale, dropout or drop path
        # stands between fc2 and the add
        if not isinstance(self.ls2, nn.Identity):
            return False
        return not self.training or (self.mlp.drop2.p == 0.0 and isinstance(self.drop_path2, nn.Identity))

    def forward_fused(self, x, delta=None, attn_mask=None, rows=None):
        """The block on the residual stream ``x + delta`` ([B, N, C]); returns the stream the same way.

        The returned ``delta`` is None when fc2 already added the residual, else the MLP branch,
        which the next LayerNorm adds in its fused add + norm. ``attn_mask``: see ``Attention``.
        ``rows`` r: the stream of the first r tokens only ([B, r, C]): norm1 and qkv on every token,
        the attention for r queries, then proj, norm2 and the MLP on r rows (a model's last block
        when its head reads the prefix tokens alone).
        """
        check_tokens("Block", x, self.attn.qkv.in_features)
        if delta is not None and delta.shape != x.shape:
            raise ValueError(f"delta: expected the shape of x {tuple(x.shape)}, got {tuple(delta.shape)}")
        to_linear = linear_input_dtype(x)  # norm1 feeds attn.qkv, norm2 feeds mlp.fc1
        h, x = norm_stream(self.norm1, x, delta, to_linear)
        if rows is not None and rows < x.shape[1]:
            branch = self.attn(h, attn_mask=attn_mask, query_rows=rows)  # [B, rows, C]
            x = x[:, :rows]
        else:
            branch = self.attn(h, attn_mask=attn_mask)
        h, x = norm_stream(self.norm2, x, self.drop_path1(self.ls1(branch)), to_linear)
        if self._fc2_adds_residual():
            return self.mlp.forward_fused(h, residual=x), None  # the add in fc2's epilogue
        return x, self.drop_path2(self.ls2(self.mlp(h)))

    def forward(self, x, attn_mask=None):
        """timm's ``Block.forward(x, attn_mask=None)``: [B, N, C] -> [B, N, C]."""
        x, delta = self.forward_fused(x, attn_mask=attn_mask)
        return x if delta is None else x + delta
