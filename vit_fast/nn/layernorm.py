"""Drop-in LayerNorm (skeleton)."""
import torch.nn as nn

from vit_fast import functional as VF


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return VF.layer_norm(x, self.weight, self.bias, self.eps)
