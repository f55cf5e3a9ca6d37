"""Modules of a model: the quantizable layers (:func:`find_layers`), the ones dfquant cannot quantize, module
lookup and swap by qualified name, the identity a folded BatchNorm becomes, and a state dict's size. Nothing
here computes a scale or touches a weight's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ModelError
from dfquant.nn.base import QuantModule, layer_kind

BATCHNORM_TYPES = nn.modules.batchnorm._BatchNorm
TRANSPARENT_TYPES = (nn.Dropout, nn.Identity)
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


class FoldedBatchNorm(nn.Identity):
    """What a BatchNorm becomes once folded into ``layer`` (an ``nn.Identity`` that remembers where it
    went)."""

    def __init__(self, layer: str = "") -> None:
        super().__init__()
        self.layer = layer

    def extra_repr(self) -> str:
        return f"folded into '{self.layer}'"


# ------------------------------------------------------------------------------------------------------------
# Finding and swapping modules


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: qualified name (``""`` for the root), module and kind (see :func:`layer_kind`)."""

    name: str
    module: nn.Module
    kind: str


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear, Conv1d, Conv2d (grouped and depthwise included), Hugging Face ``Conv1D`` and Embedding
    (without ``max_norm``) in registration order. A module registered under several names is listed once (its
    first name); distinct modules that share one weight tensor (tied weights) are each listed."""
    out = []
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is not None:
            out.append(LayerInfo(name, m, kind))
    return out


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of each module, by ``id`` (a module registered at several places has several)."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def find_unsupported(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules that directly own floating parameters of two or more dimensions but are not quantizable here
    (embedding bags, embeddings with ``max_norm``, transposed or 3-D convolutions, the packed input projection
    of ``nn.MultiheadAttention``, ...), with those parameters' names: they stay float, and the report lists
    them."""
    out = []
    for name, m in model.named_modules():
        if layer_kind(m) is not None or isinstance(m, QuantModule):
            continue
        params = [k for k, p in m._parameters.items() if p is not None and p.is_floating_point() and p.dim() >= 2]
        if params:
            out.append((name, m, params))
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself).

    Raises:
        ModelError: no such submodule.
    """
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"the model has no submodule '{name}'") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name``; returns the root (``new`` itself when ``name == ""``).

    Raises:
        ModelError: no such submodule.
    """
    if name == "":
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = get_module(model, parent_name)
    if attr not in parent._modules:
        raise ModelError(f"the model has no submodule '{name}'")
    setattr(parent, attr, new)
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers; shared tensors counted once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.element_size(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
