"""Drop-in for timm's `PatchEmbed` over the fused patch-embedding op.

The constructor arguments, attributes (img_size, patch_size, grid_size, num_patches, flatten,
output_fmt, ...) and state_dict (`proj.weight` [E, C, p, p], `proj.bias` [E], `norm.*` with a
norm layer) of `timm.layers.PatchEmbed`, so timm weights load strict; square patches only. The
forward runs `vit_fast.functional.patch_embed`, which also takes uint8 images with their mean and std,
and the model's class token and position embedding (`forward(x, mean, std, cls_token=, pos_embed=)`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import functional as VF
from vit_fast.nn.attention import check_positive_int
from vit_fast.ops.patch_embed import normalize_uint8

OUTPUT_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class PatchEmbed(nn.Module):
    """Images [B, C, H, W] -> patch tokens [B, L, E] (or the grid in `output_fmt`)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False, device=None, dtype=None):
        super().__init__()
        self.patch_size = _pair(patch_size)
        for p in self.patch_size:
            check_positive_int("patch_size", p)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size: expected a square patch, got {self.patch_size}")
        check_positive_int("in_chans", in_chans)
        check_positive_int("embed_dim", embed_dim)
        if img_size is not None:
            for s in _pair(img_size):
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(f"img_size: expected None, a positive int or a pair of them, got {img_size!r}")
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
        else:
            self.img_size = _pair(img_size)
            self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        if output_fmt is not None:
            if output_fmt not in OUTPUT_FORMATS:
                raise ValueError(f"output_fmt: expected one of {OUTPUT_FORMATS} or None, got {output_fmt!r}")
            self.flatten, self.output_fmt = False, output_fmt
        else:
            self.flatten, self.output_fmt = flatten, "NCHW"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        p = self.patch_size[0]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias, device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x, mean=None, std=None, *, cls_token=None, pos_embed=None):
        """x: [B, C, H, W] float, or uint8 with `mean` and `std` (C values each: (x / 255 - mean) / std).

        ``cls_token`` [1, 1, E] and ``pos_embed`` [1, T, E] (T = L, + 1 with a class token): the
        model's prefix and position embedding, prepended and added in the same op (tokens output
        only: flatten=True or output_fmt='NLC'). Returns [B, T, E]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: PatchEmbed expected a torch.Tensor, got {type(x).__name__}")
        in_chans = self.proj.in_channels
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(f"x: PatchEmbed expected images [B, {in_chans}, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size[0]
        if self.img_size is not None:
            if self.strict_img_size and (H, W) != self.img_size:
                raise ValueError(f"x: expected images of size {self.img_size}, got {(H, W)}")
            if not self.strict_img_size and not self.dynamic_img_pad and (H % p or W % p):
                raise ValueError(f"x: expected H and W divisible by the patch size {p}, got {(H, W)}")
        if self.dynamic_img_pad and (H % p or W % p):
            if x.dtype == torch.uint8:  # timm pads the normalized image with zeros: normalize first
                x, mean, std = normalize_uint8(x, mean, std, self.proj.weight.dtype), None, None
            x = F.pad(x, (0, -W % p, 0, -H % p))
        if cls_token is not None or pos_embed is not None:
            return self._tokens_with_prefix(x, mean, std, cls_token, pos_embed)
        tokens = VF.patch_embed(x, self.proj.weight, self.proj.bias, mean=mean, std=std)  # [B, L, E]
        grid_h, grid_w = x.shape[2] // p, x.shape[3] // p
        if self.flatten:
            return self.norm(tokens)
        if self.output_fmt == "NLC":
            out = tokens
        elif self.output_fmt == "NCL":
            out = tokens.transpose(1, 2)
        elif self.output_fmt == "NHWC":
            out = tokens.reshape(B, grid_h, grid_w, -1)
        else:
            out = tokens.transpose(1, 2).reshape(B, -1, grid_h, grid_w)
        return self.norm(out)

    def _tokens_with_prefix(self, x, mean, std, cls_token, pos_embed):
        if not (self.flatten or self.output_fmt == "NLC"):
            raise ValueError(f"cls_token, pos_embed: PatchEmbed adds them to tokens [B, L, E] only "
                             f"(flatten=True or output_fmt='NLC'), not to output_fmt={self.output_fmt!r}")
        weight, bias = self.proj.weight, self.proj.bias
        if isinstance(self.norm, nn.Identity):  # one op: patches, GEMM, class token, position embedding
            return VF.patch_embed(x, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
        tokens = self.norm(VF.patch_embed(x, weight, bias, mean=mean, std=std))  # the norm comes first, as timm
        if cls_token is not None:
            tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens if pos_embed is None else tokens + pos_embed
