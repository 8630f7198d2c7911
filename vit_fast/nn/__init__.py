"""Drop-in modules with timm's constructors, names and state_dicts, over the fused ops."""
from vit_fast.nn.attention import Attention, EvaAttention
from vit_fast.nn.attention_pool import AttentionPoolLatent
from vit_fast.nn.block import Block
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.mlp import GluMlp, Mlp, QuickGELU, SwiGLU, SwiGLUPacked
from vit_fast.nn.patch_embed import PatchEmbed

__all__ = ["Attention", "AttentionPoolLatent", "Block", "EvaAttention", "GluMlp", "LayerNorm", "Mlp", "PatchEmbed",
           "QuickGELU", "SwiGLU", "SwiGLUPacked"]
