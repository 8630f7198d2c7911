"""The public functional API: autograd-capable, kernel-backed where `vit_fast.dispatch` says so.

Shapes: B batch, N tokens, H heads, D head dim, C / E channels, p patch size.
"""
from vit_fast.ops.attention import attention, attention_packed  # [B,H,N,D]x3 -> [B,H,N,D]; [B,N,3HD] -> [B,N,HD]
from vit_fast.ops.layer_norm import add_layer_norm, layer_norm  # [..., C] -> [..., C]
from vit_fast.ops.mlp import linear, linear_act, linear_gelu  # [..., K] x [N, K] -> [..., N]
from vit_fast.ops.mlp import mlp  # fc2(act(fc1(x))) (+ residual): [..., C] -> [..., C2]
from vit_fast.ops.mlp import swiglu  # silu(fc1_g(x)) * fc1_x(x): [..., C] -> [..., H]
from vit_fast.ops.patch_embed import patch_embed  # [B, C, H, W] x [E, C, p, p] -> [B, (1+)L, E]

__all__ = ["attention", "attention_packed", "layer_norm", "add_layer_norm", "linear", "linear_act", "linear_gelu", "mlp",
           "patch_embed", "swiglu"]
