"""The plan stage of the pipeline: each quantizable layer's resolved rule, its quantizer and granularity,
checked against the layer before anything changes (:func:`plan_quantization`), and the per-layer split of a
rule's expansion sparsity (:func:`split_sparsity`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import InputError, ModelError, check_finite
from dfquant.graph.modules import (
    find_layers,
)
from dfquant.methods.rex import layer_sparsities
from dfquant.nn.base import QuantModule, oriented_weight, weight_of
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.granularity import Granularity


@dataclass(frozen=True)
class LayerPlan:
    """The validated plan of one layer.

    Attributes:
        name: qualified name. kind: ``linear``/``conv1d``/``conv2d``/``hf-conv1d``. type: the class name.
        shape: the weight's stored shape. rule: the resolved rule.
        quantizer, granularity: built from the rule (None for a skipped layer).
    """

    name: str
    kind: str
    type: str
    shape: tuple[int, ...]
    rule: LayerRule
    quantizer: Quantizer | None
    granularity: Granularity | None

    @property
    def skip(self) -> bool:
        return self.quantizer is None

    @property
    def oriented_shape(self) -> tuple[int, ...]:
        """The weight's shape in ``(out, in, *kernel)`` layout (the HF ``Conv1D`` stores ``(in, out)``)."""
        return (self.shape[1], self.shape[0]) if self.kind == "hf-conv1d" else self.shape

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def layer_label(name: str, module: nn.Module, shape: tuple[int, ...]) -> str:
    return f"layer '{name or '<root>'}' ({type(module).__name__} {'x'.join(map(str, shape))})"


def plan_quantization(model: nn.Module, config: QuantConfig) -> list[LayerPlan]:
    """Resolve and validate the rule of every quantizable layer, without changing anything.

    Args:
        model: the float model.
        config: the rules.

    Returns:
        One :class:`LayerPlan` per quantizable layer, in registration order.

    Raises:
        ConfigError: an unknown quantizer, unsupported bits, unknown options, or a granularity that does not
            fit a layer's weight (the message names the layer and what is allowed).
        InputError: a layer's weight is not floating point, or holds NaN or infinite values.
        ModelError: the model has no quantizable layer.
    """
    layers = find_layers(model)
    done = [n or "<root>" for n, m in model.named_modules() if isinstance(m, QuantModule)]
    if not layers and done:
        raise ModelError(
            f"{type(model).__name__} is already quantized ({len(done)} quantized layer(s): {', '.join(done[:5])}"
            f"{', ...' if len(done) > 5 else ''}); quantize the float model instead"
        )
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding "
            "or a Hugging Face Conv1D)"
        )
    plans = []
    for info in layers:
        w = oriented_weight(info.module)
        shape = tuple(weight_of(info.module).shape)
        label = layer_label(info.name, info.module, shape)
        rule = config.rule_for(info.name)
        if not rule.skip and math.prod(shape) == 0:  # nothing to quantize: the layer stays float, exactly
            rule = dataclasses.replace(rule, skip=True, reason=f"empty weight (shape {list(shape)})")
        if rule.skip:
            plans.append(LayerPlan(info.name, info.kind, type(info.module).__name__, shape, rule, None, None))
            continue
        q = rule.check_layer(tuple(w.shape), label)
        gran = rule.granularity
        if not w.is_floating_point():
            raise InputError(f"{label}: weight must be floating point, got {w.dtype}")
        check_finite(w.detach(), f"{info.name}.weight" if info.name else "weight")
        plans.append(LayerPlan(info.name, info.kind, type(info.module).__name__, shape, rule, q, gran))
    return plans


def split_sparsity(plans: list[LayerPlan], split: str) -> dict[str, float]:
    """Per-layer expansion sparsity: each rule's budget split over the layers that share it (in registration
    order, taken as depth), weighted by parameters (:func:`dfquant.methods.rex.layer_sparsities`)."""
    groups: dict[float, list[LayerPlan]] = {}
    for p in plans:
        if not p.skip and p.rule.expand > 1 and p.rule.sparsity > 0:
            groups.setdefault(p.rule.sparsity, []).append(p)
    out: dict[str, float] = {}
    for sparsity, members in groups.items():
        sizes = [float(math.prod(p.shape)) for p in members]
        for p, s in zip(members, layer_sparsities(len(members), sparsity, split, sizes=sizes), strict=True):
            out[p.name] = s
    return out
