"""Drop-in LayerNorm on the fused kernels."""
import torch.nn as nn

from vit_fast import functional as VF


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the same constructor, parameters and state_dict, run by
    ``vit_fast.functional.layer_norm``.

    A normalized_shape over several trailing dims (e.g. ``(N, C)``) normalizes them as one
    flattened row of N*C elements with the flattened weight and bias (the same numbers as torch),
    within the kernels' limit of 16384 elements per row.

    ``forward_fused(x, residual=None, out_dtype=None)`` -> ``(LN(x + residual), x + residual)``,
    the add fused into the norm (one kernel): x a branch's output, residual the residual stream
    (as ``vit_fast.nn.Block`` calls it).
    """

    def _check(self, x):
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"x: expected trailing dims {self.normalized_shape}, got shape {tuple(x.shape)}")
        return k

    def forward_fused(self, x, residual=None, out_dtype=None):
        """(LN(x + residual), x + residual) with the add inside the norm's kernel; residual None: (LN(x), x).
        ``out_dtype``: the normed output's dtype (default: the promoted dtype of x and residual)."""
        if self._check(x) != 1:  # several normalized dims: the add, then forward
            s = x if residual is None else x + residual
            y = self.forward(s)
            return (y if out_dtype is None else y.to(out_dtype)), s
        # residual None: the stream x comes back through the op, so its gradient joins dx in the LayerNorm backward
        return VF.add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype=out_dtype)

    def forward(self, x):
        k = self._check(x)
        if k == 1:
            return VF.layer_norm(x, self.weight, self.bias, self.eps)
        weight = self.weight.reshape(-1) if self.weight is not None else None
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return VF.layer_norm(x.flatten(x.dim() - k), weight, bias, self.eps).view(x.shape)
