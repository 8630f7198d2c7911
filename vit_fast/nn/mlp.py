"""Drop-in timm ``Mlp``: fc1 + GELU fused in one Triton matmul, then fc2; timm's names and state_dict."""
import functools

import torch
import torch.nn as nn

from vit_fast import functional as VF
from vit_fast.nn.attention import check_positive_int

ACT_NAMES = {"gelu": "none", "gelu_tanh": "tanh"}  # timm's act_layer strings -> F.gelu's `approximate`


def _module_approximate(module):
    """'none' / 'tanh' for a GELU module instance, None for anything else."""
    if isinstance(module, nn.GELU):
        return module.approximate
    cls = type(module)
    if cls.__name__ == "GELUTanh":  # timm.layers.GELUTanh (matched by name: timm is not a dependency)
        return "tanh"
    if cls.__name__ == "GELU" and cls.__module__.startswith("timm."):  # timm.layers.GELU: erf
        return "none"
    return None


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's activation (timm's ``QuickGELU``, act_layer='quick_gelu')."""

    def forward(self, x):
        return quick_gelu(x)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def is_quick_gelu(act_layer) -> bool:
    """Whether ``act_layer`` asks for quick-GELU: 'quick_gelu', a QuickGELU class (timm's or
    vit_fast's, matched by class name) or partial of one, or such a module instance."""
    if isinstance(act_layer, str):
        return act_layer.lower() == "quick_gelu"
    target = act_layer.func if isinstance(act_layer, functools.partial) else act_layer
    if isinstance(target, nn.Module):
        target = type(target)
    return isinstance(target, type) and target.__name__ == "QuickGELU"


def _is_module_factory(act_layer):
    target = act_layer.func if isinstance(act_layer, functools.partial) else act_layer
    return isinstance(target, type) and issubclass(target, nn.Module)


def gelu_approximate(act_layer) -> str:
    """The GELU flavour an ``act_layer`` asks for: 'none' (exact, erf) or 'tanh'.

    Accepts timm's spellings: 'gelu', 'gelu_tanh'; ``nn.GELU``; a class or ``functools.partial``
    producing ``GELU(approximate='tanh')``; timm's ``GELU`` / ``GELUTanh``; a GELU module instance.
    Anything else raises ValueError (the fused kernels only do GELU; never a silent erf).
    """
    if isinstance(act_layer, str):
        if act_layer.lower() in ACT_NAMES:  # timm lower-cases activation names
            return ACT_NAMES[act_layer.lower()]
    elif isinstance(act_layer, nn.Module):
        approximate = _module_approximate(act_layer)
        if approximate is not None:
            return approximate
    elif _is_module_factory(act_layer):
        try:
            instance = act_layer()
        except TypeError:  # a module class that needs arguments is no activation
            instance = None
        approximate = _module_approximate(instance)
        if approximate is not None:
            return approximate
    raise ValueError(f"act_layer: expected 'gelu', 'gelu_tanh', nn.GELU, a GELU(approximate='tanh') class or "
                     f"partial, or timm's GELU / GELUTanh; got {act_layer!r}")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1 -> act -> drop1 -> norm -> fc2 -> drop2, with fc1 + bias + GELU fused.

    ``act_layer`` quick-GELU (CLIP's 'quick_gelu', ``QuickGELU``): fc1 + bias + x * sigmoid(1.702 x) in
    the fused Linear's quick-GELU epilogue (``VF.linear_act(..., 'quick_gelu')``), its derivative in
    the fused backward, as the GELUs (``quick_gelu`` True, ``approximate`` None).

    Same constructor, submodule names (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``) and
    state_dict (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) as timm. ``act`` is an
    ``nn.GELU`` of the chosen flavour, kept for the repr and for code that inspects it; forward runs
    the fused kernel instead (forward hooks on ``fc1`` / ``act`` / ``fc2`` do not fire).
    ``forward_fused(x, residual=)`` adds a residual in fc2's epilogue (what ``vit_fast.nn.Block`` calls). ``bias`` and
    ``drop`` take a bool / float or a pair (fc1, fc2), as in timm. ``use_conv=True`` (1x1 convs) is
    not supported.
    """

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False):
        super().__init__()
        if use_conv:
            raise ValueError("use_conv: vit_fast.nn.Mlp supports Linear layers only (use_conv=False)")
        check_positive_int("in_features", in_features)
        for name, value in (("hidden_features", hidden_features), ("out_features", out_features)):
            if value is not None and value != 0:  # None (or timm's falsy 0): in_features, as timm
                check_positive_int(name, value)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias1, bias2 = _pair(bias)
        drop1, drop2 = _pair(drop)
        self.quick_gelu = is_quick_gelu(act_layer)
        self.approximate = None if self.quick_gelu else gelu_approximate(act_layer)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1)
        self.act = QuickGELU() if self.quick_gelu else nn.GELU(approximate=self.approximate)
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x):  # [..., in_features] -> [..., out_features]
        return self.forward_fused(x)

    def forward_fused(self, x, residual=None):
        """drop2(fc2(norm(drop1(GELU(fc1(x)))))) + residual: fc1's bias and GELU in its matmul's
        epilogue, and the residual add in fc2's (while drop2 is inactive: eval mode or p = 0; an
        active drop2 comes before a separate add). Without a norm and an active drop1 the whole MLP
        is one op, ``VF.mlp``, with the fused backward. x: [..., in_features]; residual: [..., out_features]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: Mlp expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"x: Mlp expected [..., {self.fc1.in_features}], got shape {tuple(x.shape)}")
        activation = dict(activation="quick_gelu") if self.quick_gelu else dict(approximate=self.approximate)
        if isinstance(self.norm, nn.Identity) and not _active(self.drop1):
            # one op for fc1 -> act -> fc2 (+ residual): its backward forms dpre = (dy @ W2) * act'(pre)
            # and fc1's bias gradient in one matmul's epilogue (no dH pass, no separate dGELU pass)
            weights = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            if residual is not None and not _active(self.drop2):
                return VF.mlp(x, *weights, residual=residual, **activation)
            y = self.drop2(VF.mlp(x, *weights, **activation))
            return y if residual is None else y + residual
        if self.quick_gelu:  # CLIP's activation in fc1's epilogue
            h = VF.linear_act(x, self.fc1.weight, self.fc1.bias, "quick_gelu")
        else:
            h = VF.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.approximate)  # [..., hidden]
        h = self.norm(self.drop1(h))
        if residual is not None and not _active(self.drop2):
            return VF.linear(h, self.fc2.weight, self.fc2.bias, residual=residual)
        y = self.drop2(VF.linear(h, self.fc2.weight, self.fc2.bias))
        return y if residual is None else y + residual


def _active(dropout):
    """Whether a dropout module changes its input now (any module but nn.Identity / nn.Dropout: assumed so)."""
    if isinstance(dropout, nn.Identity):
        return False
    if isinstance(dropout, nn.Dropout):
        return dropout.training and dropout.p > 0.0
    return True


def _check_silu(act_layer):
    target = act_layer.func if isinstance(act_layer, functools.partial) else act_layer
    if isinstance(target, nn.Module):
        target = type(target)
    if not (isinstance(target, type) and target.__name__ == "SiLU") and not (
            isinstance(act_layer, str) and act_layer.lower() in ("silu", "swish")):
        raise ValueError(f"act_layer: the fused SwiGLU kernel computes silu(gate) * x only (nn.SiLU), got {act_layer!r}")


class _GatedMlp(nn.Module):
    """Shared forward of SwiGLU / GluMlp: silu(gate) * x by ``VF.swiglu`` (one kernel), drop1, norm
    (vit_fast's LayerNorm when given one), then fc2 by ``VF.linear`` with the residual in its epilogue."""

    def _gate_x(self):  # -> (gate weight, gate bias, x weight, x bias)
        raise NotImplementedError

    def forward(self, x):
        return self.forward_fused(x)

    def forward_fused(self, x, residual=None):
        """drop2(fc2(norm(drop1(silu(gate(x)) * x_proj(x))))) + residual; the add in fc2's epilogue while
        drop2 is inactive. x: [..., in_features]; residual: [..., out_features]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: {type(self).__name__} expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: {type(self).__name__} expected [..., {self.in_features}], got shape {tuple(x.shape)}")
        h = self.norm(self.drop1(VF.swiglu(x, *self._gate_x())))
        if residual is not None and not _active(self.drop2):
            return VF.linear(h, self.fc2.weight, self.fc2.bias, residual=residual)
        y = self.drop2(VF.linear(h, self.fc2.weight, self.fc2.bias))
        return y if residual is None else y + residual


class SwiGLU(_GatedMlp):
    """timm's ``SwiGLU`` (timm/layers/mlp.py; EVA-02 base / large): fc1_g, fc1_x (each [hidden, in]),
    act (SiLU), drop1, norm (over hidden, when ``norm_layer``), fc2, drop2; the same constructor and
    state_dict. ``align_to`` rounds hidden up to a multiple, as timm's. The gated product runs in one
    fused kernel (``VF.swiglu``), fc2 in the fused Linear (+ residual with ``forward_fused``)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU, norm_layer=None,
                 bias=True, drop=0.0, align_to=0):
        super().__init__()
        check_positive_int("in_features", in_features)
        _check_silu(act_layer)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if align_to:
            hidden_features = hidden_features + (-hidden_features % align_to)
        bias1, bias2 = _pair(bias)
        drop1, drop2 = _pair(drop)
        self.in_features = in_features
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias1)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias1)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2)
        self.drop2 = nn.Dropout(drop2)

    def _gate_x(self):
        return self.fc1_g.weight, self.fc1_g.bias, self.fc1_x.weight, self.fc1_x.bias


class GluMlp(_GatedMlp):
    """timm's ``GluMlp`` with SiLU (timm's ``SwiGLUPacked``: EVA-02 tiny / small): one packed fc1
    [hidden_features, in] whose halves are the gate and the value (``gate_last=False``: the gate is the
    first half, as EVA-02 builds it; True: the second), act, drop1, norm (over hidden_features // 2),
    fc2, drop2; the same state_dict. Only SiLU is fused (timm's class default, Sigmoid, is refused):
    both halves go to ``VF.swiglu`` as row views of fc1, no copy."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False, gate_last=True):
        super().__init__()
        if use_conv:
            raise ValueError("use_conv: vit_fast.nn.GluMlp supports Linear layers only (use_conv=False)")
        check_positive_int("in_features", in_features)
        _check_silu(act_layer)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if hidden_features % 2:
            raise ValueError(f"hidden_features: expected an even number (two halves), got {hidden_features}")
        bias1, bias2 = _pair(bias)
        drop1, drop2 = _pair(drop)
        self.in_features = in_features
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features // 2) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, out_features, bias=bias2)
        self.drop2 = nn.Dropout(drop2)

    def _gate_x(self):
        w, b = self.fc1.weight.chunk(2, 0), (self.fc1.bias.chunk(2, 0) if self.fc1.bias is not None else (None, None))
        g, u = (1, 0) if self.gate_last else (0, 1)
        return w[g], b[g], w[u], b[u]


SwiGLUPacked = functools.partial(GluMlp, act_layer=nn.SiLU, gate_last=False)
