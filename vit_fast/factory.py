"""``create_model(name, checkpoint=...)``: a named ViT, built and loaded in one call (timm's ``_factory``).

It sits above both halves it joins: the factories (``vit_fast.model.MODELS``) and the loaders
(``vit_fast.checkpoint``), neither of which imports the other or this module.
"""
import os

from vit_fast.checkpoint import (_apply_state_dict, _check_pos_resample, _load_npz_state, _read_npz,
                                 _read_torch_checkpoint)
from vit_fast.eva import EVA_MODELS
from vit_fast.model import MODELS


def _factory(name):
    factories = {**MODELS, **EVA_MODELS}  # the ViTs and timm's eva.py family (vit_fast.eva)
    if name not in factories:
        raise ValueError(f"name: expected one of {sorted(factories)}, got {name!r}")
    return factories[name]


def create_model(name, checkpoint=None, num_classes=None, img_size=None, **kwargs):
    """Build the ViT ``name`` and, with ``checkpoint``, load it.

    A ``.npz`` checkpoint (Google's) defaults to ``act_layer='gelu_tanh'`` and
    ``pos_resample='google'``, as Google trained and fine-tuned it; ``.pth``/``.pt``/``.bin``/
    ``.safetensors`` to timm's ``'gelu'`` and ``'bicubic'``; keywords override both
    (``pos_resample`` is taken here, every other keyword goes to the factory). ``num_classes``
    None takes the checkpoint's head (and its pre-logits layer, as ``representation_size``);
    another ``num_classes`` gets a fresh head, said in one warning. ``img_size`` other than the
    checkpoint's resamples the position embeddings. A ``.pth``-family checkpoint without ``head.weight``
    (timm's DINOv2 and SigLIP: features only) builds a model without a head (``num_classes=0``)
    unless ``num_classes`` is given. Returns the model.
    """
    factory = _factory(name)
    pos_resample = kwargs.pop("pos_resample", None)
    if pos_resample is not None:
        _check_pos_resample(pos_resample)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint is None:
        return factory(**kwargs)

    source = os.fspath(checkpoint)
    is_npz = source.lower().endswith(".npz")
    if is_npz:
        npz = _read_npz(checkpoint)
        state = npz.state
    else:
        state = _read_torch_checkpoint(checkpoint)
    kwargs.setdefault("act_layer", "gelu_tanh" if is_npz else "gelu")
    pos_resample = pos_resample or ("google" if is_npz else "bicubic")
    if "head.weight" not in state and not is_npz:
        kwargs.setdefault("num_classes", 0)  # a headless checkpoint (timm's DINOv2, SigLIP): a headless model
    if "head.weight" in state:
        kwargs.setdefault("num_classes", state["head.weight"].shape[0])
        if kwargs["num_classes"] == state["head.weight"].shape[0] and "pre_logits.fc.weight" in state:
            kwargs.setdefault("representation_size", state["pre_logits.fc.weight"].shape[0])  # the head's input
    model = factory(**kwargs)
    if is_npz:
        return _load_npz_state(model, npz, pos_resample, source)
    return _apply_state_dict(model, state, strict=True, pos_resample=pos_resample, replace_head=True, source=source)
