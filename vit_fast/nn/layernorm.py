"""Drop-in LayerNorm on the fused kernels."""
import torch.nn as nn

from vit_fast import functional as VF


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the same constructor, parameters and state_dict, run by
    ``vit_fast.functional.layer_norm``.

    A normalized_shape over several trailing dims (e.g. ``(N, C)``) normalizes them as one
    flattened row of N*C elements with the flattened weight and bias (the same numbers as torch),
    within the kernels' limit of 16384 elements per row.
    """

    def forward(self, x):
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"x: expected trailing dims {self.normalized_shape}, got shape {tuple(x.shape)}")
        if k == 1:
            return VF.layer_norm(x, self.weight, self.bias, self.eps)
        weight = self.weight.reshape(-1) if self.weight is not None else None
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return VF.layer_norm(x.flatten(x.dim() - k), weight, bias, self.eps).view(x.shape)
