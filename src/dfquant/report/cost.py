"""Compute cost of a quantized model: multiply-accumulates per layer and bit operations (BOPs).

Convention (as in :mod:`dfquant.methods.rex`): a conv/linear layer costs ``BOPs = MACs x weight bits x
activation bits``; a layer holding several terms (a residual expansion) costs the sum over its terms, a term
covering ``c`` of ``C`` output channels costing ``c / C`` of the layer's MACs. The float reference is
``32 x 32`` bits per MAC; "plain" is one term at the rule's bits. Activations are float (32 bits) unless told
otherwise: dfquant quantizes weights only.

MACs are counted on one input: with an example input (image models: ``(1, *input_shape)``) by running the
float model once with forward hooks (``MACs = output elements x input channels per group x kernel taps``);
without one, per output position (per token for text models: ``in x out`` for a linear layer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dfquant.methods.rex import LayerCost, layer_cost, total_cost
from dfquant.nn.base import layer_kind, oriented_weight
from dfquant.pipeline.report import QuantizationReport

__all__ = ["cost_summary", "layer_macs"]


def _per_position_macs(module: nn.Module) -> int:
    w = oriented_weight(module)
    return math.prod(w.shape)


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, int]:
    """MACs of every conv/linear layer of a float ``model`` for one input (see the module docstring).

    Args:
        model: the float model.
        example: one input batch of size 1, or None to count per output position.

    Returns:
        ``{qualified layer name: MACs}`` (embeddings count 0: a lookup multiplies nothing).
    """
    layers = {name: m for name, m in model.named_modules() if layer_kind(m) is not None}
    macs: dict[str, int] = {}
    for name, m in layers.items():
        macs[name] = 0 if layer_kind(m) == "embedding" else _per_position_macs(m)
    if example is None:
        return macs
    hooks = []

    def hook(name: str, module: nn.Module) -> Any:
        def fn(_: nn.Module, __: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or layer_kind(module) == "embedding":
                return
            w = oriented_weight(module)
            per_out = math.prod(w.shape[1:])  # inputs per output element (per group for a grouped conv)
            out_channels = w.shape[0]
            positions = out.numel() // max(out.shape[0], 1) // out_channels
            macs[name] = int(positions * out_channels * per_out)

        return fn

    for name, m in layers.items():
        hooks.append(m.register_forward_hook(hook(name, m)))
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return macs


def cost_summary(report: QuantizationReport, macs: dict[str, int], act_bits: int = 32) -> dict[str, Any]:
    """Per-layer and total BOPs of a quantized model, against float and plain ``b``-bit.

    Args:
        report: the quantization report (each layer's ``weight_bits_per_mac``, bits and bits per weight).
        macs: MACs per layer (:func:`layer_macs`); layers left float cost ``32 x 32`` per MAC in every column.
        act_bits: activation bits of the layers whose report has no input quantization of their own
            (``LayerReport.act_bits`` < 32 wins: an input expansion, :mod:`dfquant.methods.rex_act`).

    Returns:
        ``{"convention": str, "act_bits": int, "layers": [LayerCost as dict], "totals": {...}}``.
    """
    costs: list[LayerCost] = []
    quantized = set()
    for r in report.layers:
        quantized.add(r.name)
        wb = r.weight_bits_per_mac if math.isfinite(r.weight_bits_per_mac) else float(r.bits)
        n = macs.get(r.name, 0)
        ab = r.act_bits if r.act_bits < 32 else act_bits  # a layer with its own input quantization
        costs.append(layer_cost(r.name, n, wb, bits=r.bits, bits_per_weight=r.bits_per_weight, act_bits=ab))
    for name, n in macs.items():  # layers left float cost 32 x 32 in every column
        if name not in quantized and n:
            costs.append(layer_cost(name, n, 32.0, bits=32, bits_per_weight=32.0, act_bits=32))
    return {
        "convention": "BOPs = MACs x weight bits x activation bits, summed over terms; float = 32 x 32",
        "act_bits": act_bits,
        "layers": [vars(c) for c in costs],
        "totals": total_cost(costs),
    }


def model_cost(loaded: Any, report: QuantizationReport) -> dict[str, Any]:
    """The bit-operation cost of a quantized model (:func:`cost_summary`) with MACs counted per input of the
    loaded model's ``input_shape``, or per output position (token) where the model has none or its forward does
    not take a zero input of that shape; ``macs_per`` says which.

    Args:
        loaded: a :class:`dfquant.zoo.LoadedModel` (its float ``model`` and optional ``input_shape``).
        report: the quantization report of that model.
    """
    shape = getattr(loaded, "input_shape", None)
    example = torch.zeros((1, *shape)) if shape else None
    per = "input" if example is not None else "output position (token)"
    try:
        macs = layer_macs(loaded.model, example)
    except (RuntimeError, TypeError, ValueError):  # a forward that does not take a zero input: count per position
        macs, per = layer_macs(loaded.model, None), "output position (token)"
    out = cost_summary(report, macs)
    out["macs_per"] = per
    return out
