"""The absorption stage of the pipeline: a balanced layer's column scale moved into the BatchNorm before it,
so that nothing is stored for it.

A balanced layer (``balance=true``, :mod:`dfquant.methods.balance`) decodes ``Q diag(c)`` and stores ``c``, 16 bits
per fan-in column. When the layer's input is ``relu(BN(z))`` or ``BN(z)`` and the layer is the only reader of that
BatchNorm's output (:attr:`dfquant.graph.trace.GraphInfo.sole_input_bn`: no residual sum, no second reader),
a scale shared by the kernel taps of each input channel (:func:`dfquant.methods.balance.channel_scale`) can move
into the BatchNorm instead, as in DFQ's cross-layer equalization (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019):

.. math::  \\gamma_j \\leftarrow c_j \\gamma_j, \\quad \\beta_j \\leftarrow c_j \\beta_j, \\qquad
           W_{:, j} \\leftarrow W_{:, j} / c_j ,

so the layer's input becomes ``c_j x_j`` (``relu(c z) = c relu(z)`` for ``c > 0``) and ``W diag(1/c) (c x) = W x``:
the float model computes the same function (up to float32 rounding), and the balanced weight ``W diag(1/c)`` is
quantized like any weight. With BatchNorm folding the scaled BatchNorm is then folded into the layer before it,
whose per-output-channel scales take ``c_j`` at no cost in bits. Everything downstream (folding, bias
correction's ``E[x]``, propagated moments, input ranges) reads the scaled BatchNorm, so it stays consistent.

Layers whose BatchNorm has no affine parameters, grouped convolutions, and layers the graph cannot vouch for keep
the stored column scale. :func:`absorb_column_scales` returns what it changed, with the values it replaced, so
that :func:`restore` can undo it (an ``inplace`` quantization that fails leaves the model as it was).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dfquant.graph.modules import get_module
from dfquant.graph.trace import GraphInfo
from dfquant.methods.balance import channel_scale
from dfquant.nn.base import layer_kind, oriented_weight
from dfquant.pipeline.fold import Fold
from dfquant.pipeline.plan import LayerPlan


@dataclass(frozen=True)
class Absorbed:
    """A layer's column scale moved into the BatchNorm before it.

    Attributes:
        layer: the balanced layer. bn: the BatchNorm that took the scale. act: ``"relu"`` or ``"none"`` between
        them. scale: ``c`` (float32, one per input channel). kept: the layer's weight and the BatchNorm's weight
        and bias before the change (for :func:`restore`).
    """

    layer: str
    bn: str
    act: str
    scale: torch.Tensor
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _absorbable(model: nn.Module, name: str, bn_name: str) -> bool:
    layer, bn = get_module(model, name), get_module(model, bn_name)
    if layer_kind(layer) not in ("linear", "conv1d", "conv2d") or int(getattr(layer, "groups", 1)) != 1:
        return False
    return isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.weight is not None and bn.bias is not None


@torch.no_grad()
def absorb_column_scales(
    model: nn.Module,
    graph: GraphInfo | None,
    plans: Mapping[str, LayerPlan],
    folds: Mapping[str, Fold] | None = None,
) -> dict[str, Absorbed]:
    """Move the column scale of each balanced layer that the graph allows into the BatchNorm before it, in place
    (module docstring).

    Args:
        model: the model being quantized (its float layers and BatchNorms are changed).
        graph: its analysis (:func:`dfquant.graph.trace.analyze_graph`); None absorbs nothing.
        plans: the active layers' plans; those whose rule has ``balance`` true or ``"absorbed"`` are candidates
            (``"stored"`` keeps every scale with its layer).
        folds: the BatchNorm folds planned for ``model`` (:func:`dfquant.pipeline.fold.plan_folds`): the scale is
            found on the weight the layer will quantize, its own BatchNorm folded in (folding scales rows, which
            the quantizer's per-row scales absorb, but it changes the spreads the iteration balances).

    Returns:
        The absorbed layers by name; the other balanced layers store their scale.
    """
    out: dict[str, Absorbed] = {}
    if graph is None:
        return out
    for p in plans.values():
        if not p.rule.moves_balance or p.skip or p.name not in graph.sole_input_bn:
            continue
        bn_name, act = graph.sole_input_bn[p.name]
        if not _absorbable(model, p.name, bn_name):
            continue
        layer, bn = get_module(model, p.name), get_module(model, bn_name)
        w = oriented_weight(layer)
        fitted = folds[p.name].weight if folds is not None and p.name in folds else w
        c = channel_scale(fitted)
        assert isinstance(bn.weight, torch.Tensor) and isinstance(bn.bias, torch.Tensor)
        kept = (w.detach().clone(), bn.weight.detach().clone(), bn.bias.detach().clone())
        cw = c.to(device=w.device, dtype=torch.float32)
        shape = (1, -1) + (1,) * (w.dim() - 2)
        w.copy_((w.to(torch.float32) / cw.reshape(shape)).to(w.dtype))
        cb = c.to(device=bn.weight.device, dtype=torch.float32)
        bn.weight.copy_((bn.weight.to(torch.float32) * cb).to(bn.weight.dtype))
        bn.bias.copy_((bn.bias.to(torch.float32) * cb).to(bn.bias.dtype))
        out[p.name] = Absorbed(p.name, bn_name, act, c, kept)
    return out


@torch.no_grad()
def restore(model: nn.Module, absorbed: Mapping[str, Absorbed]) -> None:
    """Undo :func:`absorb_column_scales` on ``model``: the kept weights and BatchNorm parameters back, bit for
    bit."""
    for a in absorbed.values():
        layer, bn = get_module(model, a.layer), get_module(model, a.bn)
        oriented_weight(layer).copy_(a.kept[0])
        assert isinstance(bn.weight, torch.Tensor) and isinstance(bn.bias, torch.Tensor)
        bn.weight.copy_(a.kept[1])
        bn.bias.copy_(a.kept[2])
