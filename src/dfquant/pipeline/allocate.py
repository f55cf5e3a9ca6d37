"""The bit-allocation stage of the pipeline (``config.budget``): each layer's candidate settings quantized and
measured, its sensitivity measured on synthetic inputs, and the plan that fits the budget
(:func:`allocate_bits`; the method is :mod:`dfquant.methods.allocate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dfquant.config import QuantConfig
from dfquant.errors import ConfigError
from dfquant.methods.allocate import Candidate, LayerOptions, Probe, allocate, layer_sensitivities
from dfquant.pipeline.plan import LayerPlan, layer_label

#: ``measure(plan) -> (relative weight MSE, stored bits per weight)`` of one layer quantized by ``plan``.
Measure = Callable[[LayerPlan], tuple[float, float]]


def _variants(p: LayerPlan, config: QuantConfig, label: str) -> list[LayerPlan]:
    """The plans a layer may take: each of ``config.budget_bits`` its quantizer supports, rotated as its rule
    says and (for a rotated rule) not rotated."""
    rotations = [p.rule.rotate] + (["none"] if p.rule.rotate != "none" else [])
    out = []
    for bits in config.budget_bits:
        for rotate in rotations:
            rule = dataclasses.replace(p.rule, bits=bits, rotate=rotate)
            try:
                q = rule.check_layer(p.oriented_shape, label)
            except ConfigError:  # bits this quantizer (or grid) does not take: not a candidate
                continue
            out.append(dataclasses.replace(p, rule=rule, quantizer=q))
    return out


def allocate_bits(
    model: nn.Module,
    units: list[list[LayerPlan]],
    config: QuantConfig,
    probe: Probe,
    measure: Measure,
) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
    """Choose each layer's bits (and rotation on or off) within ``config.budget`` bits per weight.

    Args:
        model: the float model (before any swap or fold: its outputs are the reference of the sensitivities).
        units: the active layers' plans, grouped so that layers sharing one weight tensor form one unit.
        config: ``budget`` (stored bits per weight over the quantized layers, scales and offsets counted) and
            ``budget_bits`` (the bit widths a layer may take).
        probe: ``probe(model)``, the outputs on fixed synthetic inputs
            (:func:`dfquant.eval.fidelity.fidelity_probe`).
        measure: quantizes one layer by a plan and returns its relative weight MSE and stored bits per weight.

    Returns:
        The new plan of every active layer, and the allocation as the report shows it (``budget``,
        ``bits_per_weight``, ``predicted_error``, ``noise`` and per unit its layers, parameters, sensitivity,
        bits, rotation, relative MSE and bits per weight).

    Raises:
        ConfigError: no budget in ``config``, a layer with no candidate, or a budget below the cheapest plan.
    """
    if config.budget is None:
        raise ConfigError("allocate_bits needs config.budget (bits per weight)")
    options = []
    for members in units:
        p = members[0]
        module = model.get_submodule(p.name)
        label = layer_label(p.name, module, p.shape)
        cands = []
        for v in _variants(p, config, label):
            rel_mse, bpw = measure(v)
            cands.append(Candidate(v.rule.bits, v.rule.rotate, rel_mse, bpw))
        if not cands:
            raise ConfigError(
                f"{label}: its rule ({p.rule.quantizer}) takes none of the budget's bit widths "
                f"{', '.join(map(str, config.budget_bits))}"
            )
        options.append(LayerOptions(tuple(m.name for m in members), p.params, 0.0, cands))
    alphas = layer_sensitivities(model, [u.names for u in options], probe)
    for u, a in zip(options, alphas, strict=True):
        u.sensitivity = a
    reached = allocate(options, config.budget)
    plans: dict[str, LayerPlan] = {}
    for u, members in zip(options, units, strict=True):
        c = u.choice
        for p in members:
            rule = dataclasses.replace(p.rule, bits=c.bits, rotate=c.rotate)
            label = layer_label(p.name, model.get_submodule(p.name), p.shape)
            plans[p.name] = dataclasses.replace(p, rule=rule, quantizer=rule.check_layer(p.oriented_shape, label))
    return plans, allocation_dict(options, config.budget, reached)


def allocation_dict(options: list[LayerOptions], budget: float, reached: float) -> dict[str, Any]:
    """The allocation as reports and JSON keep it."""
    from dfquant.methods.allocate import NOISE

    return {
        "budget": budget,
        "bits_per_weight": reached,
        "predicted_error": sum(u.sensitivity * u.choice.rel_mse for u in options),
        "noise": NOISE,
        "layers": [
            {
                "names": list(u.names),
                "params": u.params,
                "sensitivity": u.sensitivity,
                "bits": u.choice.bits,
                "rotate": u.choice.rotate,
                "rel_mse": u.choice.rel_mse,
                "bits_per_weight": u.choice.bits_per_weight,
            }
            for u in options
        ],
    }


def group_units(plans: Mapping[str, LayerPlan], tie_of: Callable[[str], object | None]) -> list[list[LayerPlan]]:
    """Group the active plans into allocation units: layers with the same tie key (one weight tensor) together,
    in registration order."""
    units: list[list[LayerPlan]] = []
    where: dict[object, int] = {}
    for name, p in plans.items():
        key = tie_of(name)
        if key is not None and key in where:
            units[where[key]].append(p)
            continue
        if key is not None:
            where[key] = len(units)
        units.append([p])
    return units
