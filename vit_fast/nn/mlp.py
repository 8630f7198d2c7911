"""Drop-in timm Mlp (skeleton)."""
import torch.nn as nn

from vit_fast import functional as VF


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, bias=True, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x):
        return self.fc2(VF.linear_gelu(x, self.fc1.weight, self.fc1.bias))
