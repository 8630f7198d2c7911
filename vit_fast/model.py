"""The Vision Transformer (Dosovitskiy et al., arXiv 2010.11929) on vit_fast's fused ops.

Same constructor arguments, module names, state_dict and outputs as timm's ``VisionTransformer``
(and the tests' oracle model), so timm weights load strict. The forward, with B
images, E = embed_dim, L patches and N = prefix tokens + L:

    images [B, C, H, W], uint8 (normalized inside with pixel_mean / pixel_std) or float (already normalized)
    -> patch embedding + class token + position embedding, one fused op       [B, N, E]
       (``PatchEmbed.forward(x, mean, std, cls_token=, pos_embed=)``)
    -> blocks: the residual stream passed as (x, delta), each residual add fused
       into the next LayerNorm or into fc2's epilogue (see vit_fast/nn/block.py)
    -> final LayerNorm, fused with the last residual add                      [B, N, E]
       (``forward``, class-token pooling: on the class token's row only, the one the head reads)
    -> pool (class token, or mean of the patch tokens) -> fc_norm -> pre_logits -> head   [B, classes]

Factories: one plain function per name in ``vit_fast.configs.CONFIGS`` (``vit_base_patch16_224(
num_classes=1000, **kwargs)`` ...), gathered in ``MODELS`` (name -> factory). ``create_model`` (a
name and a checkpoint in one call) is in ``vit_fast.factory``, above this module and the loaders.
"""
import collections
import functools
import math
import warnings

import torch
import torch.nn as nn
import torch.utils.checkpoint

from vit_fast.configs import CONFIGS
from vit_fast.nn.attention import check_positive_int
from vit_fast.nn.attention_pool import AttentionPoolLatent
from vit_fast.nn.block import Block, norm_stream
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.patch_embed import PatchEmbed
from vit_fast.pos_embed import resample_pos_embed

GLOBAL_POOLS = ("token", "avg", "map")


class VisionTransformer(nn.Module):
    """timm's VisionTransformer, fused. Beyond timm's arguments:

    representation_size: a pre-logits layer (Linear + tanh, ``pre_logits.fc``) of this width before
        the head, as in the original ImageNet-21k checkpoints.
    dynamic_img_size: accept other image sizes at run time, the position embedding resampled
        (bicubic, class token kept apart) to each input's patch grid.
    fc_norm: None (timm's rule): the final LayerNorm goes after the pool when global_pool='avg'.
    pixel_mean, pixel_std: per-channel statistics that normalize uint8 images
        ((x / 255 - mean) / std); default 0.5 each, as timm's augreg ViTs. Kept as float32 buffers
        (float64 in a float64 model) whatever ``.half()`` / ``.to(dtype)`` does to the rest.

    ``forward(x, attn_mask=None)``, ``forward_features(x, attn_mask=None)`` and
    ``forward_head(x, pre_logits=False)`` as timm 1.0's; ``attn_mask`` goes to every block's
    attention (see ``vit_fast.nn.Attention``: applied on the PyTorch path, refused by the kernels).
    ``forward_features`` returns every token normed; ``forward`` with global_pool='token' norms only
    the class token's row (the same logits, 1/N of the final LayerNorm's work).
    ``set_grad_checkpointing(enable=True)``: as timm's, each block recomputed in the backward
    (``torch.utils.checkpoint``, non-reentrant) instead of keeping its activations.

    timm's family arguments, same names and semantics: ``reg_tokens`` (register tokens after the
    class token, ``reg_token`` [1, R, E]), ``no_embed_class`` (the position embedding covers the
    patches only: added before the prefix tokens are prepended), ``pre_norm`` (``norm_pre``
    LayerNorm before the blocks; the patch embedding then has no bias), ``final_norm``,
    ``global_pool='map'`` (``attn_pool``: timm's AttentionPoolLatent, see vit_fast.nn.attention_pool),
    ``act_layer='quick_gelu'`` (see vit_fast.nn.Mlp), ``norm_layer`` (a LayerNorm class or partial;
    None: vit_fast's LayerNorm with ``norm_eps``, 1e-6 as timm's, 1e-5 for CLIP).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None, act_layer="gelu",
                 representation_size=None, dynamic_img_size=False, fc_norm=None, pixel_mean=None, pixel_std=None,
                 reg_tokens=0, no_embed_class=False, pre_norm=False, final_norm=True, norm_layer=None, norm_eps=1e-6):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool: 'token' needs class_token=True (use global_pool='avg')")
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: {embed_dim} is not divisible by num_heads {num_heads}")
        for name, value in (("depth", depth), ("num_classes", num_classes), ("reg_tokens", reg_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        if representation_size is not None and representation_size != 0:
            check_positive_int("representation_size", representation_size)
        pixel_mean = (0.5,) * in_chans if pixel_mean is None else tuple(pixel_mean)
        pixel_std = (0.5,) * in_chans if pixel_std is None else tuple(pixel_std)
        if len(pixel_mean) != in_chans or len(pixel_std) != in_chans:
            raise ValueError(f"pixel_mean, pixel_std: expected {in_chans} values each (in_chans), "
                             f"got {len(pixel_mean)} and {len(pixel_std)}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=norm_eps)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = representation_size or embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size

        self.grad_checkpointing = False
        # other image sizes are checked against the position embedding (_pos_embed_for), as timm's
        # (pre_norm: no patch-embedding bias, as timm's CLIP towers)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                      strict_img_size=not dynamic_img_size)
        if not self.patch_embed.num_patches:
            raise ValueError(f"img_size: {img_size!r} holds no {patch_size}x{patch_size} patch")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        num_tokens = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  init_values=init_values, drop_path=drop_path_rate * i / max(depth - 1, 1), act_layer=act_layer,
                  norm_layer=norm_layer)  # drop path rising linearly with depth, as timm
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None
        if global_pool == "map":  # SigLIP's MAP head over the patch tokens
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                                 norm_layer=norm_layer, act_layer=act_layer)
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.pre_logits = nn.Identity()
        if representation_size:
            self.pre_logits = nn.Sequential(collections.OrderedDict(
                fc=nn.Linear(embed_dim, representation_size), act=nn.Tanh()))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # not in the state_dict, so timm checkpoints load strict
        self._pixel_stats = pixel_mean, pixel_std
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std), persistent=False)
        self._init_weights()

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would round the pixel statistics too: after a cast, rebuild them from
        # their exact values, in float32 (float64 when the model is), on the device they went to
        before = (self.pixel_mean, self.pixel_std)
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.pos_embed.dtype == torch.float64 else torch.float32
        stats = []
        for name, old, values in zip(("pixel_mean", "pixel_std"), before, self._pixel_stats):
            if not old.is_meta and not torch.equal(old, torch.tensor(values, dtype=old.dtype, device=old.device)):
                values = tuple(old.tolist())  # set by hand since construction: those are the values to keep
            stats.append(values)
            new = getattr(self, name)
            if new.dtype != dtype or new.dtype != old.dtype:
                setattr(self, name, torch.tensor(values, dtype=dtype, device=new.device))
        self._pixel_stats = tuple(stats)
        return self

    def _init_weights(self):
        # timm's default ('' mode): truncated normal (std .02) Linear weights and position
        # embedding, zero biases, class token near zero
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        """Parameter names that optimizers usually exempt from weight decay (timm's convention)."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def reset_classifier(self, num_classes, global_pool=None):
        """A fresh head for ``num_classes`` (0: none, forward returns the pooled features)."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
            if (global_pool == "map") != (self.attn_pool is not None):
                raise ValueError(f"global_pool: {global_pool!r} needs a model built with it (the attention pool "
                                 "is made at construction)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.pos_embed
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())

    def _pos_embed_for(self, height, width):
        """The position embedding for images of height x width pixels: [1, N, E]."""
        p = self.patch_embed.patch_size[0]
        if (height % p or width % p) and not self.patch_embed.strict_img_size:  # as timm's PatchEmbed asserts
            raise ValueError(f"x: image size {height}x{width} is not a multiple of the patch size {p}")
        # at the model's own size a remainder is dropped, as timm's conv does (e.g. 384 px, patch 14)
        grid = (height // p, width // p)
        if grid == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        if not self.dynamic_img_size:
            size = self.patch_embed.img_size
            raise ValueError(f"x: expected {size[0]}x{size[1]} images, got {height}x{width} "
                             "(build the model with dynamic_img_size=True to take other sizes)")
        return resample_pos_embed(self.pos_embed, grid, self._pos_prefix_rows(), mode="bicubic",
                                  old_grid=self.patch_embed.grid_size)

    def _pos_prefix_rows(self):
        """Rows of pos_embed for prefix tokens: none with no_embed_class, else every prefix token."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def _prefix_tokens(self):
        """The prefix tokens in timm's order, [1, P, E] each: class token, then registers."""
        return [t for t in (self.cls_token, self.reg_token) if t is not None]

    def _embed(self, x, pos_embed):
        """Images -> tokens [B, P + L, E] with timm's ``_pos_embed`` order: the prefix tokens (class,
        then register / distillation tokens) before the patches; the position embedding over the
        patches only (``no_embed_class``) or over every token. The fused op prepends one class token
        and adds the position embedding; more prefix tokens are concatenated after it."""
        mean, std = self.pixel_mean, self.pixel_std
        prefix = self._prefix_tokens()
        if not prefix:
            return self.patch_embed(x, mean, std, pos_embed=pos_embed)
        if self.no_embed_class:  # add, then prepend the prefix tokens (no position for them)
            tokens = self.patch_embed(x, mean, std, pos_embed=pos_embed)
            return torch.cat([t.expand(tokens.shape[0], -1, -1).to(tokens.dtype) for t in prefix] + [tokens], dim=1)
        if len(prefix) == 1 and self.cls_token is not None:  # one op: patches, class token, position embedding
            return self.patch_embed(x, mean, std, cls_token=self.cls_token, pos_embed=pos_embed)
        P = self.num_prefix_tokens  # prepend, then add: the prefix rows get their position rows
        tokens = self.patch_embed(x, mean, std, pos_embed=pos_embed[:, P:])
        head = torch.cat(prefix, dim=1) + pos_embed[:, :P]  # [1, P, E]
        return torch.cat([head.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's forward in the backward instead of saving its activations (timm's
        ``set_grad_checkpointing``): a training step keeps only the blocks' inputs, at the cost of a
        second forward through them."""
        self.grad_checkpointing = enable

    def _tokens(self, x):
        """Images [B, C, H, W] (checked here) -> the first block's input [B, N, E]: embedded, then
        pos_drop and norm_pre."""
        proj = self.patch_embed.proj
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != proj.in_channels:
            raise ValueError(f"x: expected images [B, C, H, W] with C = {proj.in_channels}, "
                             f"got shape {tuple(x.shape)}")
        pos_embed = self._pos_embed_for(*x.shape[-2:])
        x = self._embed(x, pos_embed)
        if x.dtype != self.pos_embed.dtype:
            # autocast only (the op then runs and returns the autocast dtype): the stream goes on in the
            # parameters' dtype, as timm's conv output + float32 pos_embed promotes (one cast here
            # instead of one in each of the first LayerNorm and the first add + LayerNorm)
            x = x.to(self.pos_embed.dtype)
        return self.norm_pre(self.pos_drop(x))

    def _forward_stream(self, x, attn_mask, rows=None):
        """Images [B, C, H, W] -> the residual stream after the last block, as (x, delta): x + delta.
        ``rows`` r: the last block computes (and this returns) the first r tokens' stream only."""
        x = self._tokens(x)  # [B, N, E]
        delta = None
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            block_rows = rows if i == last else None  # the last block: only the rows the head reads
            if checkpointed:
                x, delta = torch.utils.checkpoint.checkpoint(block.forward_fused, x, delta, attn_mask, block_rows,
                                                             use_reentrant=False)
            else:
                x, delta = block.forward_fused(x, delta, attn_mask=attn_mask, rows=block_rows)
        if rows is not None and x.shape[1] > rows:  # depth 0: no block to take the rows
            x, delta = x[:, :rows], (None if delta is None else delta[:, :rows])
        return x, delta

    def _final_norm(self, x, delta):
        if isinstance(self.norm, nn.Identity):  # fc_norm: the final norm comes after the pool
            return x if delta is None else x + delta
        return norm_stream(self.norm, x, delta)[0]

    def forward_features(self, x, attn_mask=None):
        """Images [B, C, H, W] -> normed tokens [B, N, E] (not normed when fc_norm is used).

        ``attn_mask``: passed to every block's attention (timm's ``forward_features(x, attn_mask)``)."""
        return self._final_norm(*self._forward_stream(x, attn_mask))

    def _check_tokens(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected tokens [B, N, {self.embed_dim}], got {shape}")

    def pool(self, x):
        """Tokens [B, N, E] -> [B, E]: the class token, the mean of the patch tokens ('avg'), or the
        attention pool over the patch tokens ('map'), as timm's ``pool``."""
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        return x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]

    def _head_rows(self):
        """How many leading tokens ``forward_head`` reads (None: all): the class token for 'token'."""
        return 1 if self.global_pool == "token" else None

    def forward_head(self, x, pre_logits=False):
        """Tokens [B, N, E] -> logits [B, num_classes] (pre_logits: the features the head would take)."""
        self._check_tokens(x)
        x = self.head_drop(self.pre_logits(self.fc_norm(self.pool(x))))
        return x if pre_logits else self.head(x)

    def forward(self, x, attn_mask=None):
        """Images [B, C, H, W] -> logits [B, num_classes] (timm's ``forward(x, attn_mask=None)``):
        ``forward_head(forward_features(x))``, with the final norm on the rows the head reads."""
        # global_pool='token': the head reads the class token's row alone, so the last block computes
        # only that row's output (its keys and values still from every token), and the final norm too
        x, delta = self._forward_stream(x, attn_mask, rows=self._head_rows())
        return self.forward_head(self._final_norm(x, delta))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # weights made for another image size: resample their position embedding to this grid
        key = prefix + "pos_embed"
        pos_embed = state_dict.get(key)
        if pos_embed is not None and pos_embed.dim() == 3 and pos_embed.shape[1:] != self.pos_embed.shape[1:]:
            prefix_rows = self._pos_prefix_rows()
            side = math.isqrt(max(pos_embed.shape[1] - prefix_rows, 0))
            if side * side == pos_embed.shape[1] - prefix_rows and pos_embed.shape[2] == self.embed_dim:
                grid = tuple(self.patch_embed.grid_size)
                state_dict[key] = resample_pos_embed(pos_embed, grid, prefix_rows, mode="bicubic")
                warnings.warn(f"{key}: resampled from a {side}x{side} patch grid to {grid[0]}x{grid[1]} "
                              "(bicubic, class token kept apart)", stacklevel=2)
            # anything else is left to the size-mismatch error below, which names the key
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class VisionTransformerDistilled(VisionTransformer):
    """timm's VisionTransformerDistilled (DeiT, timm/models/deit.py): a distillation token
    (``dist_token`` [1, 1, E]) after the class token, both with position rows (``pos_embed``
    [1, 2 + L, E]), and a second head ``head_dist`` on it. Output: in eval mode, or in training
    without ``set_distilled_training(True)``, the mean of the two heads' logits; in training with
    distilled training set, the pair (head logits, head_dist logits). ``forward_head(x,
    pre_logits=True)``: the mean of the two tokens' features. ``forward`` computes the last block
    for those two rows only. global_pool must be 'token', as timm asserts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.global_pool != "token":
            raise ValueError(f"global_pool: VisionTransformerDistilled needs 'token', got {self.global_pool!r}")
        if self.num_reg_tokens or self.no_embed_class or not isinstance(self.pre_logits, nn.Identity):
            raise ValueError("VisionTransformerDistilled: reg_tokens, no_embed_class and representation_size "
                             "are not supported (timm's DeiT has none)")
        E = self.embed_dim
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, E))
        # replaces the parent's (same place in the state_dict, as timm's), one row longer
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, E))
        self.head_dist = nn.Linear(E, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head_dist, nn.Linear):
            nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)

    def set_distilled_training(self, enable=True):
        """Training returns (head logits, head_dist logits) when enabled (timm's switch)."""
        self.distilled_training = enable

    def _prefix_tokens(self):
        return [self.cls_token, self.dist_token]

    def _head_rows(self):
        return 2  # the class and distillation tokens

    def reset_classifier(self, num_classes, global_pool=None):
        super().reset_classifier(num_classes, global_pool)
        like = self.pos_embed
        self.head_dist = (nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
                          if num_classes > 0 else nn.Identity())

    def forward_head(self, x, pre_logits=False):
        self._check_tokens(x)
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2


def from_config(cls, config, num_classes, kwargs):
    """The body of every factory (these and vit_fast.eva's): ``cls`` built from a named config, with the
    factory's ``num_classes`` and the caller's keywords on top (the caller's win)."""
    return cls(**{**config, "num_classes": num_classes, **kwargs})


def vit_tiny_patch16_224(num_classes=1000, **kwargs):
    """ViT-Ti/16, 224x224 (embed 192, depth 12, 3 heads), as timm's vit_tiny_patch16_224."""
    return from_config(VisionTransformer, CONFIGS["vit_tiny_patch16_224"], num_classes, kwargs)


def vit_small_patch16_224(num_classes=1000, **kwargs):
    """ViT-S/16, 224x224 (embed 384, depth 12, 6 heads), as timm's vit_small_patch16_224."""
    return from_config(VisionTransformer, CONFIGS["vit_small_patch16_224"], num_classes, kwargs)


def vit_base_patch16_224(num_classes=1000, **kwargs):
    """ViT-B/16, 224x224 (embed 768, depth 12, 12 heads), as timm's vit_base_patch16_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_224"], num_classes, kwargs)


def vit_base_patch32_224(num_classes=1000, **kwargs):
    """ViT-B/32, 224x224 (embed 768, depth 12, 12 heads), as timm's vit_base_patch32_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch32_224"], num_classes, kwargs)


def vit_large_patch16_224(num_classes=1000, **kwargs):
    """ViT-L/16, 224x224 (embed 1024, depth 24, 16 heads), as timm's vit_large_patch16_224."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch16_224"], num_classes, kwargs)


def vit_huge_patch14_224(num_classes=1000, **kwargs):
    """ViT-H/14, 224x224 (embed 1280, depth 32, 16 heads), as timm's vit_huge_patch14_224."""
    return from_config(VisionTransformer, CONFIGS["vit_huge_patch14_224"], num_classes, kwargs)


def vit_tiny_patch16_384(num_classes=1000, **kwargs):
    """ViT-Ti/16, 384x384 (embed 192, depth 12, 3 heads), as timm's vit_tiny_patch16_384."""
    return from_config(VisionTransformer, CONFIGS["vit_tiny_patch16_384"], num_classes, kwargs)


def vit_small_patch16_384(num_classes=1000, **kwargs):
    """ViT-S/16, 384x384 (embed 384, depth 12, 6 heads), as timm's vit_small_patch16_384."""
    return from_config(VisionTransformer, CONFIGS["vit_small_patch16_384"], num_classes, kwargs)


def vit_base_patch16_384(num_classes=1000, **kwargs):
    """ViT-B/16, 384x384 (embed 768, depth 12, 12 heads), as timm's vit_base_patch16_384."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_384"], num_classes, kwargs)


def vit_base_patch32_384(num_classes=1000, **kwargs):
    """ViT-B/32, 384x384 (embed 768, depth 12, 12 heads), as timm's vit_base_patch32_384."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch32_384"], num_classes, kwargs)


def vit_large_patch16_384(num_classes=1000, **kwargs):
    """ViT-L/16, 384x384 (embed 1024, depth 24, 16 heads), as timm's vit_large_patch16_384."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch16_384"], num_classes, kwargs)


# ----------------------------------------------------------------------------- the family (timm's names)
# num_classes: 1000 by default as every factory here (timm's DINOv2 / SigLIP configs say 0: pass num_classes=0,
# or load their headless checkpoints with vit_fast.create_model, which then builds no head)


def deit_tiny_distilled_patch16_224(num_classes=1000, **kwargs):
    """DeiT-Ti/16 distilled, 224x224 (embed 192, depth 12, 3 heads; class + distillation token, head_dist), as timm's deit_tiny_distilled_patch16_224."""
    return from_config(VisionTransformerDistilled, CONFIGS["deit_tiny_distilled_patch16_224"], num_classes, kwargs)


def deit_small_distilled_patch16_224(num_classes=1000, **kwargs):
    """DeiT-S/16 distilled, 224x224 (embed 384, depth 12, 6 heads; class + distillation token, head_dist), as timm's deit_small_distilled_patch16_224."""
    return from_config(VisionTransformerDistilled, CONFIGS["deit_small_distilled_patch16_224"], num_classes, kwargs)


def deit_base_distilled_patch16_224(num_classes=1000, **kwargs):
    """DeiT-B/16 distilled, 224x224 (embed 768, depth 12, 12 heads; class + distillation token, head_dist), as timm's deit_base_distilled_patch16_224."""
    return from_config(VisionTransformerDistilled, CONFIGS["deit_base_distilled_patch16_224"], num_classes, kwargs)


def vit_small_patch14_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-S/14, 518x518 (embed 384, depth 12, 6 heads, LayerScale 1e-5), as timm's vit_small_patch14_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_small_patch14_dinov2"], num_classes, kwargs)


def vit_base_patch14_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-B/14, 518x518 (embed 768, depth 12, 12 heads, LayerScale 1e-5), as timm's vit_base_patch14_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch14_dinov2"], num_classes, kwargs)


def vit_large_patch14_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-L/14, 518x518 (embed 1024, depth 24, 16 heads, LayerScale 1e-5), as timm's vit_large_patch14_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch14_dinov2"], num_classes, kwargs)


def vit_small_patch14_reg4_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-S/14 with 4 registers, 518x518 (no_embed_class), as timm's vit_small_patch14_reg4_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_small_patch14_reg4_dinov2"], num_classes, kwargs)


def vit_base_patch14_reg4_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-B/14 with 4 registers, 518x518 (no_embed_class), as timm's vit_base_patch14_reg4_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch14_reg4_dinov2"], num_classes, kwargs)


def vit_large_patch14_reg4_dinov2(num_classes=1000, **kwargs):
    """DINOv2 ViT-L/14 with 4 registers, 518x518 (no_embed_class), as timm's vit_large_patch14_reg4_dinov2."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch14_reg4_dinov2"], num_classes, kwargs)


def vit_base_patch16_clip_224(num_classes=1000, **kwargs):
    """CLIP ViT-B/16 image tower, 224x224 (norm_pre, LayerNorm eps 1e-5, no patch bias, GELU), as timm's vit_base_patch16_clip_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_clip_224"], num_classes, kwargs)


def vit_large_patch14_clip_224(num_classes=1000, **kwargs):
    """CLIP ViT-L/14 image tower, 224x224 (norm_pre, LayerNorm eps 1e-5, no patch bias, GELU), as timm's vit_large_patch14_clip_224."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch14_clip_224"], num_classes, kwargs)


def vit_base_patch16_clip_quickgelu_224(num_classes=1000, **kwargs):
    """CLIP ViT-B/16 image tower with quick-GELU (OpenAI's activation), as timm's vit_base_patch16_clip_quickgelu_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_clip_quickgelu_224"], num_classes, kwargs)


def vit_large_patch14_clip_quickgelu_224(num_classes=1000, **kwargs):
    """CLIP ViT-L/14 image tower with quick-GELU (OpenAI's activation), as timm's vit_large_patch14_clip_quickgelu_224."""
    return from_config(VisionTransformer, CONFIGS["vit_large_patch14_clip_quickgelu_224"], num_classes, kwargs)


def vit_base_patch16_siglip_224(num_classes=1000, **kwargs):
    """SigLIP ViT-B/16, 224x224 (no class token, MAP attention-pool head), as timm's vit_base_patch16_siglip_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_siglip_224"], num_classes, kwargs)


def vit_base_patch16_siglip_384(num_classes=1000, **kwargs):
    """SigLIP ViT-B/16, 384x384 (no class token, MAP attention-pool head), as timm's vit_base_patch16_siglip_384."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_siglip_384"], num_classes, kwargs)


def vit_so400m_patch14_siglip_384(num_classes=1000, **kwargs):
    """SigLIP SoViT-400m/14, 384x384 (27x27 patches, head dim 72, MAP head), as timm's vit_so400m_patch14_siglip_384."""
    return from_config(VisionTransformer, CONFIGS["vit_so400m_patch14_siglip_384"], num_classes, kwargs)


def vit_base_patch16_siglip_gap_224(num_classes=1000, **kwargs):
    """SigLIP ViT-B/16, 224x224, global average pooling (no MAP head), as timm's vit_base_patch16_siglip_gap_224."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_siglip_gap_224"], num_classes, kwargs)


def vit_base_patch16_siglip_gap_384(num_classes=1000, **kwargs):
    """SigLIP ViT-B/16, 384x384, global average pooling, as timm's vit_base_patch16_siglip_gap_384."""
    return from_config(VisionTransformer, CONFIGS["vit_base_patch16_siglip_gap_384"], num_classes, kwargs)


def vit_so400m_patch14_siglip_gap_384(num_classes=1000, **kwargs):
    """SigLIP SoViT-400m/14, 384x384, global average pooling, as timm's vit_so400m_patch14_siglip_gap_384."""
    return from_config(VisionTransformer, CONFIGS["vit_so400m_patch14_siglip_gap_384"], num_classes, kwargs)


# name -> factory(num_classes=..., **kwargs); one per name in CONFIGS (tests/test_vit.py checks both ways)
MODELS = {factory.__name__: factory for factory in (
    vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, vit_base_patch32_224, vit_large_patch16_224,
    vit_huge_patch14_224, vit_tiny_patch16_384, vit_small_patch16_384, vit_base_patch16_384, vit_base_patch32_384,
    vit_large_patch16_384,
    deit_tiny_distilled_patch16_224,
    deit_small_distilled_patch16_224,
    deit_base_distilled_patch16_224,
    vit_small_patch14_dinov2,
    vit_base_patch14_dinov2,
    vit_large_patch14_dinov2,
    vit_small_patch14_reg4_dinov2,
    vit_base_patch14_reg4_dinov2,
    vit_large_patch14_reg4_dinov2,
    vit_base_patch16_clip_224,
    vit_large_patch14_clip_224,
    vit_base_patch16_clip_quickgelu_224,
    vit_large_patch14_clip_quickgelu_224,
    vit_base_patch16_siglip_224,
    vit_base_patch16_siglip_384,
    vit_so400m_patch14_siglip_384,
    vit_base_patch16_siglip_gap_224,
    vit_base_patch16_siglip_gap_384,
    vit_so400m_patch14_siglip_gap_384,
)}

__all__ = ["VisionTransformer", "VisionTransformerDistilled", "MODELS", *MODELS]
