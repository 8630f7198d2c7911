"""Position embeddings resampled to another patch grid, the way each source of weights does it.

A leaf module (torch only): the model resamples for ``dynamic_img_size`` and for weights of another
image size, the checkpoint loaders for files of another grid; both import it from here.
"""
import math

import torch
import torch.nn.functional as F

POS_RESAMPLE_MODES = ("google", "bilinear", "bicubic")


def _zoom_linear(x, out_size, dim):
    """Linear interpolation of ``x`` along ``dim`` to ``out_size`` points, corners aligned.

    scipy.ndimage.zoom(..., order=1) with its default ``grid_mode=False`` reads output point i
    at input coordinate i * (in - 1) / (out - 1) (and at 0 when out == 1).
    """
    in_size = x.shape[dim]
    step = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    coord = torch.arange(out_size, dtype=x.dtype, device=x.device) * step
    lo = coord.floor().long().clamp_(0, in_size - 1)
    hi = (lo + 1).clamp_(max=in_size - 1)
    shape = [1] * x.ndim
    shape[dim] = out_size
    frac = (coord - lo.to(x.dtype)).view(shape)
    return x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac


def resample_pos_embed(pos_embed, new_grid, num_prefix_tokens=1, mode="bicubic", old_grid=None):
    """Resample a position embedding to another patch grid, the prefix (class) rows kept apart.

    pos_embed: [1, num_prefix_tokens + old_h * old_w, E]; new_grid: (h, w) or an int for a square;
    old_grid: (old_h, old_w), inferred as a square when None. Returns
    [1, num_prefix_tokens + h * w, E] in pos_embed's dtype. ``mode``:

    - ``'google'``: Google's fine-tuning code, ``scipy.ndimage.zoom(grid, (h/old_h, w/old_w, 1),
      order=1)``: bilinear with corners aligned, computed in float64 as scipy does;
    - ``'bilinear'``: timm's .npz loader (bilinear, corners not aligned, no antialias);
    - ``'bicubic'``: timm's .pth loader and the walkthrough (bicubic, corners not aligned).
    """
    if mode not in POS_RESAMPLE_MODES:
        raise ValueError(f"mode: expected one of {POS_RESAMPLE_MODES}, got {mode!r}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected shape [1, tokens, dim], got {list(pos_embed.shape)}")
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_grid, 0))
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed: {num_grid} grid tokens (after {num_prefix_tokens} prefix tokens) are not a "
                f"square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    old_h, old_w = old_grid
    if old_h * old_w != num_grid:
        raise ValueError(f"old_grid: {old_h}x{old_w} does not match the {num_grid} grid tokens of pos_embed")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    compute_dtype = torch.float64 if mode == "google" or pos_embed.dtype == torch.float64 else torch.float32
    grid = grid.to(compute_dtype).reshape(1, old_h, old_w, -1)
    if mode == "google":
        grid = _zoom_linear(_zoom_linear(grid, new_h, dim=1), new_w, dim=2)  # [1, h, w, E]
    else:
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(new_h, new_w), mode=mode, align_corners=False)
        grid = grid.permute(0, 2, 3, 1)  # [1, h, w, E]
    grid = grid.reshape(1, new_h * new_w, -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
