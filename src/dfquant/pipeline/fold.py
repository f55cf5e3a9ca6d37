"""The BatchNorm-folding stage of the pipeline, shared by :func:`dfquant.quantize_model`, DF-MPC and QAT.

A BatchNorm that directly follows a conv / linear layer (found by :func:`dfquant.graph.trace.analyze_graph`) is
folded into it with its running statistics (:func:`dfquant.methods.bn.fold_batchnorm`):
``W' = W * gamma / sqrt(var + eps)`` per output channel and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
:func:`plan_folds` computes the folded weights without touching the model; :func:`apply_folds` writes them into
the float layers (those not replaced by quantized layers) and turns each BatchNorm into a
:class:`~dfquant.graph.modules.FoldedBatchNorm` identity that records the layer it was folded into.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from dfquant.errors import InputError, ModelError
from dfquant.graph.modules import FoldedBatchNorm, get_module, replace_module
from dfquant.graph.trace import GraphInfo, analyze_graph
from dfquant.methods.bn import fold_batchnorm
from dfquant.nn.base import oriented_weight, weight_of


@dataclass(frozen=True)
class Fold:
    """A BatchNorm folded into the layer before it: the layer's new oriented weight and bias (in the weight's
    dtype) and the BatchNorm's name."""

    layer: str
    bn: str
    weight: torch.Tensor
    bias: torch.Tensor


def plan_folds(model: nn.Module, graph: GraphInfo | None = None) -> dict[str, Fold]:
    """The fold of every layer -> BatchNorm pair of ``model`` (``graph``: its analysis, computed when None),
    by layer name. The model is not changed.

    Raises:
        ModelError: a paired module that is not a BatchNorm.
        InputError: a BatchNorm whose statistics cannot be folded (non-finite, negative variance), naming it.
    """
    graph = analyze_graph(model) if graph is None else graph
    out: dict[str, Fold] = {}
    for layer_name, bn_name in graph.bn_pairs:
        layer, bn = get_module(model, layer_name), get_module(model, bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ModelError(f"'{bn_name}' is a {type(bn).__name__}, not a BatchNorm")
        if bn.running_mean is None or bn.running_var is None:  # analyze_graph pairs only BNs with statistics
            continue
        bias = getattr(layer, "bias", None)
        try:
            w, b = fold_batchnorm(
                oriented_weight(layer).detach(),
                bias.detach() if isinstance(bias, torch.Tensor) else None,
                bn.running_mean.detach(),
                bn.running_var.detach(),
                None if bn.weight is None else bn.weight.detach(),
                None if bn.bias is None else bn.bias.detach(),
                float(bn.eps),
            )
        except InputError as e:
            raise InputError(f"BatchNorm '{bn_name}' after layer '{layer_name}': {e}") from None
        out[layer_name] = Fold(layer_name, bn_name, w, b)
    return out


def apply_folds(model: nn.Module, folds: dict[str, Fold], replaced: Collection[str] = ()) -> nn.Module:
    """Write each fold into ``model`` in place: the layer's weight and bias (unless the layer is in
    ``replaced``: a quantized layer built from the folded weight takes its place), and the BatchNorm becomes a
    :class:`~dfquant.graph.modules.FoldedBatchNorm`. Returns the model (a new root if the root was replaced)."""
    for name, fold in folds.items():
        if name not in replaced:
            layer = get_module(model, name)
            weight = weight_of(layer)
            with torch.no_grad():
                oriented_weight(layer).copy_(fold.weight)
            current = getattr(layer, "bias", None)
            if isinstance(current, torch.Tensor):
                with torch.no_grad():
                    current.copy_(fold.bias)
            else:
                layer.register_parameter("bias", nn.Parameter(fold.bias.clone(), requires_grad=weight.requires_grad))
        model = replace_module(model, fold.bn, FoldedBatchNorm(name))
    return model


def fold_batchnorms(model: nn.Module, graph: GraphInfo | None = None) -> tuple[nn.Module, list[Fold]]:
    """Fold every BatchNorm of ``model`` that directly follows a conv / linear into it, in place
    (:func:`plan_folds` then :func:`apply_folds`); returns the model and the folds."""
    folds = plan_folds(model, graph)
    return apply_folds(model, folds), list(folds.values())
