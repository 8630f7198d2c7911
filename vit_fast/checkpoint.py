"""Weights from a file: timm/PyTorch checkpoints and Google's .npz in every layout, the position
embeddings resampled the way each source does it (``vit_fast.pos_embed``). Building a named model
and loading it in one call is ``vit_fast.factory.create_model``; this module imports no model.

Everything here works on any ``nn.Module`` with timm's ``VisionTransformer`` key names
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1|attn.qkv|attn.proj|norm2|
mlp.fc1|mlp.fc2``, ``norm``, ``pre_logits.fc``, ``head``).

Google's checkpoints vary in three ways, each detected from the file itself and read in any
combination: where the model sits (top level, ``opt/target/``, ``params/``, ``params/img/``); where
the position embedding sits (``Transformer/posembed_input/pos_embedding`` with the class token's
row, as google-research/vision_transformer, or top-level ``pos_embedding`` without it, as
big_vision); and how each block's submodules are named: pre-Linen ``flax.nn`` names (one counter
per block: ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``,
the released vision_transformer checkpoints) or Flax Linen names (a counter per module type:
``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``, what
big_vision and vit_jax's Linen models save), chosen per block. Blocks are either one
``Transformer/encoderblock_{i}/`` per layer or big_vision's scanned form, whose
``Transformer/encoderblock/...`` arrays hold every layer stacked on a leading axis. The tables
``_NPZ_*`` below map them to timm's keys.
"""
import math
import os
import pickle
import re
import warnings

import numpy as np
import torch

from vit_fast.pos_embed import POS_RESAMPLE_MODES, resample_pos_embed  # resample_pos_embed: public here too

TORCH_CHECKPOINT_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors")

# --------------------------------------------------------------------------- position embeddings


def _check_pos_resample(pos_resample):
    if pos_resample not in POS_RESAMPLE_MODES:
        raise ValueError(f"pos_resample: expected one of {POS_RESAMPLE_MODES}, got {pos_resample!r}")


def _pos_prefix_rows(model):
    """Rows of ``model.pos_embed`` that belong to prefix tokens (timm's ``no_embed_class`` has none)."""
    if getattr(model, "no_embed_class", False):
        return 0
    return getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)


def _model_grid(model, pos_embed_rows, prefix_rows):
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return tuple(grid)
    side = math.isqrt(pos_embed_rows - prefix_rows)
    return side, side


# --------------------------------------------------------------------------- applying a state_dict


def _apply_state_dict(model, state, *, strict, pos_resample, source, replace_head=False, origin=None,
                      unexpected=(), malformed=None, stacklevel=3):
    """Copy ``state`` (timm key names) into ``model``, resampling ``pos_embed`` to the model's grid.

    replace_head: a head (or pre-logits layer) that does not fit the model is skipped and the
    model's own kept, said once: in the one warning (or the error) that also names any other problem. ``origin`` names, per model key, where a checkpoint holds it
    (used in messages); ``unexpected`` (names) and ``malformed`` (key -> message) are problems found
    while reading the file. ``stacklevel``: of the warnings, to point at the user's call.
    Problems: a RuntimeError naming every key when ``strict``, else one warning and the rest loaded.
    """
    origin = origin or {}
    model_state = model.state_dict()
    state = dict(state)
    model_pos = model_state.get("pos_embed")
    if "pos_embed" in state and model_pos is not None and state["pos_embed"].shape != model_pos.shape:
        prefix_rows = _pos_prefix_rows(model)
        try:
            state["pos_embed"] = resample_pos_embed(
                state["pos_embed"], _model_grid(model, model_pos.shape[1], prefix_rows),
                num_prefix_tokens=prefix_rows, mode=pos_resample)
        except ValueError:  # not a grid this model can take: reported below as misshapen
            pass
    malformed = malformed or {}

    notes = []  # what replace_head left out, said in one warning
    if replace_head:
        head_keys = ("head.weight", "head.bias")
        ckpt_head = {k: list(state[k].shape) for k in head_keys if k in state}
        model_head = {k: list(model_state[k].shape) for k in head_keys if k in model_state}
        if ckpt_head != model_head:
            notes.append(f"head not loaded: checkpoint {ckpt_head.get('head.weight', 'none')}, model "
                         f"{model_head.get('head.weight', 'none')} (the model's own head kept)")
            state = {k: v for k, v in state.items() if k not in head_keys}
            state.update({k: model_state[k] for k in model_head})  # the model's own: loads as itself
        extra_pre_logits = [k for k in state if k.startswith("pre_logits.")]
        if extra_pre_logits and not any(k.startswith("pre_logits.") for k in model_state):
            notes.append("pre-logits layer not loaded (the model has no representation_size)")
            state = {k: v for k, v in state.items() if k not in extra_pre_logits}

    def named(key):
        return f"{key} ({origin[key]})" if key in origin else key

    missing = [named(k) for k in model_state if k not in state and k not in malformed]
    unexpected = [*unexpected, *(named(k) for k in state if k not in model_state)]
    misshapen = [*malformed.values(), *(f"{named(k)}: checkpoint {list(v.shape)}, model {list(model_state[k].shape)}"
                               for k, v in state.items() if k in model_state and v.shape != model_state[k].shape)]
    problems = [f"{what} ({len(keys)}): {', '.join(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:  # one message for everything, the replaced head included
        message = f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems + notes)
        if strict:
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=stacklevel)
    elif notes:
        warnings.warn(f"{source}: {'; '.join(notes)}", stacklevel=stacklevel)
    fitting = {k: v for k, v in state.items() if k in model_state and v.shape == model_state[k].shape}
    model.load_state_dict(fitting, strict=False)
    return model


# --------------------------------------------------------------------------- Google .npz


def _same(x):
    return x


def _dense_kernel(kernel):  # Flax Dense [in, out] -> nn.Linear.weight [out, in]
    return kernel.t()


def _conv_kernel(kernel):  # Flax Conv HWIO [p, p, C, E] -> nn.Conv2d.weight [E, C, p, p]
    return kernel.permute(3, 2, 0, 1)


def _qkv_kernel(q, k, v):  # 3 x DenseGeneral [E, H, D] -> qkv.weight [3*H*D, E], rows q | k | v
    return torch.cat([w.reshape(w.shape[0], -1).t() for w in (q, k, v)])


def _qkv_bias(q, k, v):  # 3 x [H, D] -> [3*H*D]
    return torch.cat([b.reshape(-1) for b in (q, k, v)])


def _attn_out_kernel(kernel):  # DenseGeneral [H, D, E] -> proj.weight [E, H*D]
    return kernel.reshape(-1, kernel.shape[-1]).t()


def _npz_norm(key, name):
    """A Flax LayerNorm (``name/scale``, ``name/bias``) as timm's ``key.weight``, ``key.bias``."""
    return {f"{key}.weight": ((f"{name}/scale",), _same), f"{key}.bias": ((f"{name}/bias",), _same)}


def _npz_dense(key, name, kernel=_dense_kernel):
    """A Flax Dense / Conv / DenseGeneral (``name/kernel``, ``name/bias``) as timm's ``key.weight``
    (the kernel through ``kernel``), ``key.bias``."""
    return {f"{key}.weight": ((f"{name}/kernel",), kernel), f"{key}.bias": ((f"{name}/bias",), _same)}


# The block's submodules as each Flax auto-naming spells them: pre-Linen flax.nn counts every
# submodule of the block with one counter, Linen counts per module type.
_NPZ_BLOCK_MODULES = {
    "pre-Linen": dict(norm1="LayerNorm_0", attn="MultiHeadDotProductAttention_1", norm2="LayerNorm_2",
                      mlp="MlpBlock_3"),
    "Linen": dict(norm1="LayerNorm_0", attn="MultiHeadDotProductAttention_0", norm2="LayerNorm_1",
                  mlp="MlpBlock_0"),
}
# position embedding name -> whether it has rows for the prefix (class) token: vision_transformer
# adds it after prepending the class token, big_vision before
_NPZ_POS_NAMES = {"Transformer/posembed_input/pos_embedding": True, "pos_embedding": False}
# timm key inside ``blocks.{i}.`` -> (.npz names inside the block, conversion of those arrays); the
# names hold the block's module placeholders ({norm1}, {attn}, ...) that _NPZ_BLOCK_MODULES fills
_NPZ_BLOCK_KEYS = {
    **_npz_norm("norm1", "{norm1}"),
    "attn.qkv.weight": (("{attn}/query/kernel", "{attn}/key/kernel", "{attn}/value/kernel"), _qkv_kernel),
    "attn.qkv.bias": (("{attn}/query/bias", "{attn}/key/bias", "{attn}/value/bias"), _qkv_bias),
    **_npz_dense("attn.proj", "{attn}/out", _attn_out_kernel),
    **_npz_norm("norm2", "{norm2}"),
    **_npz_dense("mlp.fc1", "{mlp}/Dense_0"),
    **_npz_dense("mlp.fc2", "{mlp}/Dense_1"),
}
# timm key -> (.npz names, conversion) outside the blocks; pos_embed is handled apart
_NPZ_TOP_KEYS = {
    **_npz_dense("patch_embed.proj", "embedding", _conv_kernel),
    "cls_token": (("cls",), _same),
    **_npz_norm("norm", "Transformer/encoder_norm"),
    **_npz_dense("pre_logits.fc", "pre_logits"),
    **_npz_dense("head", "head"),
}
# where the model lives inside the file: checkpoints saved with optimizer state, big_vision, its
# image tower of a two-tower model; the first with an embedding/kernel wins
_NPZ_PREFIXES = ("opt/target/", "params/img/", "params/", "")
_SCANNED_BLOCK = "Transformer/encoderblock/"
_BLOCK_RE = re.compile(r"Transformer/encoderblock_(\d+)/")


def _block_naming(names, block, default):
    """The naming (a key of _NPZ_BLOCK_MODULES) whose arrays ``block`` holds most of; ``default`` on a tie."""
    def score(naming):
        modules = _NPZ_BLOCK_MODULES[naming]
        return sum(block + n.format(**modules) in names for npz_names, _ in _NPZ_BLOCK_KEYS.values() for n in npz_names)

    scores = {naming: score(naming) for naming in _NPZ_BLOCK_MODULES}
    best = max(scores.values())
    return default if scores[default] == best else max(scores, key=scores.get)


class _NpzState:
    """A Google .npz read into timm key names, with what did not convert.

    state: timm key -> tensor; origin: timm key -> the .npz name(s) it comes (or should come)
    from; unexpected: .npz names under the model's prefix that map to nothing; malformed: timm
    key -> message, for arrays of a rank that does not convert; layout: e.g. "pos_embedding,
    Linen block names, scanned, prefix 'params/'"; pos_without_prefix_rows: big_vision adds the
    position embedding before it prepends the class token, so its pos_embedding has no row for it.
    The block naming is chosen per block, from the arrays the block holds.
    """

    def __init__(self, arrays):
        self.prefix = next((p for p in _NPZ_PREFIXES if p + "embedding/kernel" in arrays), None)
        if self.prefix is None:
            sample = ", ".join(sorted(arrays)[:8])
            raise ValueError(f"not a Google ViT .npz: no embedding/kernel under any of {list(_NPZ_PREFIXES)} "
                             f"(first keys: {sample})")
        p = self.prefix
        self.arrays = {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}
        names = self.arrays
        self.scanned = any(k.startswith(_SCANNED_BLOCK) for k in names)
        if self.scanned:
            depth = max(v.shape[0] for k, v in names.items() if k.startswith(_SCANNED_BLOCK))
            blocks = [(i, _SCANNED_BLOCK, i) for i in range(depth)]
        else:
            indices = sorted({int(m.group(1)) for k in names if (m := _BLOCK_RE.match(k))})
            blocks = [(i, f"Transformer/encoderblock_{i}/", None) for i in indices]
        # each block's naming from its own arrays; a tie (e.g. a block with nothing but LayerNorm_0)
        # goes to the naming most blocks use, then to the one the position embedding's place suggests
        pos_names = [n for n in _NPZ_POS_NAMES if n in names]
        hint = "pre-Linen" if not pos_names or _NPZ_POS_NAMES[pos_names[0]] else "Linen"
        counts = {naming: 0 for naming in _NPZ_BLOCK_MODULES}
        for _, block, _ in blocks:
            counts[_block_naming(names, block, hint)] += 1
        common = hint if counts[hint] == max(counts.values()) else max(counts, key=counts.get)
        namings = [_block_naming(names, block, common) for _, block, _ in blocks]
        # the position embedding where it is; when absent, named (in the message) where the blocks suggest
        self.pos_name = pos_names[0] if pos_names else next(
            n for n, rows in _NPZ_POS_NAMES.items() if rows == (common == "pre-Linen"))
        self.pos_without_prefix_rows = not _NPZ_POS_NAMES[self.pos_name]
        used = " and ".join(n for n in _NPZ_BLOCK_MODULES if n in namings) or common
        self.layout = f"{self.pos_name}, {used} block names{', scanned' if self.scanned else ''}, prefix {p!r}"
        self.state, self.origin, self.malformed = {}, {}, {}
        self.read = set()

        for key, (npz_names, convert) in _NPZ_TOP_KEYS.items():
            self._convert(key, npz_names, convert)
        self._convert("pos_embed", (self.pos_name,), _same)
        for (i, block, layer), naming in zip(blocks, namings):
            modules = _NPZ_BLOCK_MODULES[naming]
            for key, (npz_names, convert) in _NPZ_BLOCK_KEYS.items():
                self._convert(f"blocks.{i}.{key}", [block + n.format(**modules) for n in npz_names], convert, layer)
        self.unexpected = sorted(repr(p + k) for k in names if k not in self.read)

    def _convert(self, key, npz_names, convert, layer=None):
        present = [n for n in npz_names if n in self.arrays and (layer is None or self.arrays[n].shape[0] > layer)]
        self.read.update(present)
        absent = [n for n in npz_names if n not in present]
        where = ", ".join(repr(self.prefix + n) for n in absent or npz_names)
        self.origin[key] = f"npz {where}{f' layer {layer}' if layer is not None else ''}{' absent' if absent else ''}"
        if absent:
            return  # reported as missing once compared with the model
        tensors = [torch.from_numpy(np.asarray(self.arrays[n] if layer is None else self.arrays[n][layer]))
                   for n in npz_names]
        try:
            self.state[key] = convert(*tensors).contiguous()
        except RuntimeError:
            shapes = ", ".join(f"{self.prefix + n!r} {list(t.shape)}" for n, t in zip(npz_names, tensors))
            self.malformed[key] = f"{key}: npz {shapes} do not convert"


def _load_npz_state(model, npz, pos_resample, source):
    state = dict(npz.state)
    prefix_rows = _pos_prefix_rows(model)
    if npz.pos_without_prefix_rows and "pos_embed" in state and prefix_rows:
        pos = state["pos_embed"]  # the class token gets no position embedding in big_vision: zero rows
        state["pos_embed"] = torch.cat([pos.new_zeros(1, prefix_rows, pos.shape[-1]), pos], dim=1)
    return _apply_state_dict(model, state, strict=True, pos_resample=pos_resample, replace_head=True,
                             source=f"{source} ({npz.layout})", origin=npz.origin,
                             unexpected=npz.unexpected, malformed=npz.malformed, stacklevel=4)


def _read_npz(path):
    with np.load(path) as f:
        return _NpzState({k: f[k] for k in f.files})


def load_npz(model, path, pos_resample="google"):
    """Load a google-research/vision_transformer or big_vision ``.npz`` into ``model`` (timm names).

    Reads the original Flax layout (also under ``opt/target/``), big_vision's (under ``params/``
    or ``params/img/``) and its scanned form. The position grid is resampled by ``pos_resample``
    (see :func:`resample_pos_embed`) when it differs from the model's. A head of another size (or
    none) is skipped with one warning and the model's kept; so is a pre-logits layer the model
    lacks (the rule of :func:`load_checkpoint`). Missing, unexpected or misshapen weights raise a
    RuntimeError naming them. Any combination of model prefix, position-embedding place and
    block naming (pre-Linen or Linen, detected per block) is read.
    Google trained with the tanh GELU: build the model with ``act_layer='gelu_tanh'`` to reproduce
    its outputs (``vit_fast.create_model`` does). Returns ``model``.
    """
    _check_pos_resample(pos_resample)
    return _load_npz_state(model, _read_npz(path), pos_resample, source=os.fspath(path))


# --------------------------------------------------------------------------- PyTorch checkpoints

_WRAPPER_KEYS = ("model", "state_dict", "module")  # training scripts, Lightning, DeepSpeed
_DDP_PREFIX = "module."


def _read_torch_checkpoint(path):
    """A .pth/.pt/.bin (torch.load, weights_only) or .safetensors file -> a flat state_dict."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file  # optional dependency, needed only for this format

        state = load_file(os.fspath(path))
    elif ext in TORCH_CHECKPOINT_EXTENSIONS:
        try:  # weights_only: a crafted pickle cannot run code here, whatever torch's default
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()
            raise pickle.UnpicklingError(
                f"{os.fspath(path)}: refused: it pickles objects other than tensors and plain containers, and "
                "vit_fast reads checkpoints with torch.load(weights_only=True), which never runs code from the "
                f"file (save the state_dict alone). torch said: {reason[0] if reason else type(error).__name__}"
            ) from error
    else:
        raise ValueError(f"path: expected a file ending in {TORCH_CHECKPOINT_EXTENSIONS} (Google .npz: use "
                         f"vit_fast.load_npz), got {os.fspath(path)!r}")
    while isinstance(state, dict) and (key := next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)):
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{os.fspath(path)}: expected a state_dict of tensors (optionally under "
                         f"{list(_WRAPPER_KEYS)}), found {found}")
    if state and all(k.startswith(_DDP_PREFIX) for k in state):  # saved from DistributedDataParallel
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    return state


def load_checkpoint(model, path, strict=True, pos_resample="bicubic"):
    """Load a PyTorch checkpoint with timm's key names into ``model``.

    ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``;
    unwraps ``{"model": ...}``, ``{"state_dict": ...}``, ``{"module": ...}`` and a ``module.``
    prefix. ``pos_embed`` is resampled by ``pos_resample`` when the patch grid differs. A head
    of another size (or none) is skipped and the model's own kept, and so is a pre-logits layer
    the model lacks, with one warning: the rule of :func:`load_npz`, strict or not (``strict``
    is about the rest of the model). Missing, unexpected and misshapen keys are named: a
    RuntimeError when ``strict``, else one warning (which also says what the head rule did; the
    keys that fit are loaded). A file that pickles anything but tensors and plain containers
    is refused with a ``pickle.UnpicklingError`` and none of its code runs. Returns ``model``.
    """
    _check_pos_resample(pos_resample)
    return _apply_state_dict(model, _read_torch_checkpoint(path), strict=strict, pos_resample=pos_resample,
                             replace_head=True, source=os.fspath(path))
