"""Data-free bit allocation under a budget: per-layer sensitivities from noise injection on synthetic inputs, and
the choice of each layer's setting (bits, rotation) minimizing the predicted output error at a given number of
stored bits per weight.

**The linearity model** (Malinovskii et al., "Pushing the Limits of Large Language Model Quantization via the
Linearity Theorem", 2024, the HIGGS paper): for small weight errors, the increase of a model's loss is about a
weighted sum of the layers' relative weight errors,

.. math::  \\Delta L \\approx \\sum_l \\alpha_l \\, t_l, \\qquad t_l = \\|\\hat W_l - W_l\\|_F^2 / \\|W_l\\|_F^2 .

Here the loss is data-free: the relative squared change of the model's outputs on fixed synthetic inputs (those of
the fidelity check, :func:`dfquant.eval.fidelity.synthetic_inputs`),
``D = ||f(W_hat) - f(W)||^2 / ||f(W)||^2``. Each layer's ``alpha_l`` is measured by injecting noise into that
layer alone (:func:`layer_sensitivities`): Gaussian noise of relative MSE ``t`` (default ``1e-3``), each output
channel's noise proportional to that channel's RMS (as a per-channel or per-group quantizer's error is, so the
figure does not depend on how BatchNorm folding scales the rows), ``alpha_l = D_l / t``.

**The choice** (:func:`allocate`): each layer ``l`` has candidates ``c`` (bits, rotation) with a measured weight
error ``t_l(c)`` and stored bits ``b_l(c)`` per weight (codes, scales, offsets, levels: what the file holds). The
plan minimizes ``sum_l alpha_l t_l(c_l)`` subject to ``sum_l n_l b_l(c_l) <= B sum_l n_l``: a multiple-choice
knapsack, solved by dynamic programming over the budget in ``resolution`` steps, each candidate's cost rounded
up, so the plan never exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dfquant.errors import ConfigError
from dfquant.nn.base import oriented_weight

#: ``probe(model)``: the model's outputs on fixed inputs, as one float tensor.
Probe = Callable[[nn.Module], torch.Tensor]

#: Relative MSE of the noise injected to measure a layer's sensitivity.
NOISE = 1e-3


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may take: its bits, rotation, measured relative weight MSE and stored bits/weight."""

    bits: int
    rotate: str
    rel_mse: float
    bits_per_weight: float


@dataclass
class LayerOptions:
    """One allocation unit (a layer, or layers sharing one weight tensor).

    Attributes:
        names: the layers of the unit (tied layers share one choice). params: weights stored once.
        sensitivity: ``alpha``, the predicted output error per unit of relative weight MSE.
        candidates: the settings the unit may take. chosen: the index of the chosen one (set by :func:`allocate`).
    """

    names: tuple[str, ...]
    params: int
    sensitivity: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: int = -1

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]


def _noise_like(w: torch.Tensor, t: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of relative MSE ``t`` for ``w`` (``(out, ...)`` layout), each row's proportional to its RMS."""
    rows = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt()
    z = torch.randn(rows.shape, generator=gen, dtype=torch.float32).to(w.device)
    return (math.sqrt(t) * rms * z).reshape(w.shape)


def output_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref||^2 / ||ref||^2`` in float64."""
    den = float(ref.double().pow(2).sum())
    return float((y.double() - ref.double()).pow(2).sum()) / den if den > 0 else 0.0


@torch.no_grad()
def layer_sensitivities(
    model: nn.Module,
    units: Sequence[Sequence[str]],
    probe: Probe,
    *,
    noise: float = NOISE,
    seed: int = 0,
) -> list[float]:
    """``alpha`` of each unit: the probe's relative output error with noise of relative MSE ``noise`` injected
    into that unit's weights alone, divided by ``noise`` (see the module docstring). The model's weights are
    restored after each unit, bit for bit.

    Args:
        model: the float model (its layers still ``nn.Linear``/``nn.Conv*``).
        units: the layers of each unit, by qualified name (tied layers share one tensor: noised once).
        probe: ``probe(model)``, the outputs on fixed inputs.
        noise: the injected relative MSE (small: the linear regime).
        seed: the noise generator's seed.

    Raises:
        ConfigError: ``noise`` not in (0, 1), or a probe whose output does not depend on the weights.
    """
    if not 0 < noise < 1:
        raise ConfigError(f"sensitivity noise must be in (0, 1), got {noise}")
    ref = probe(model).detach()
    if float(ref.double().pow(2).sum()) == 0:
        raise ConfigError("the probe's outputs are all zero: no sensitivity can be measured")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for names in units:
        layer = model.get_submodule(names[0])
        w = oriented_weight(layer)
        kept = w.detach().clone()
        try:
            w.data.add_(_noise_like(w, noise, gen).to(w.dtype))
            out.append(output_error(probe(model), ref) / noise)
        finally:
            w.data.copy_(kept)
    return out


def allocate(units: Sequence[LayerOptions], budget: float, *, resolution: int | None = None) -> float:
    """Choose each unit's candidate (sets ``unit.chosen``) minimizing ``sum alpha t`` within ``budget`` bits per
    weight, and return the plan's bits per weight.

    Each candidate's cost ``n_l b_l(c)`` is rounded up to a step of ``budget * N / resolution`` bits
    (``N = sum n_l``; default ``resolution = max(4096, 256 L)`` for ``L`` units, so the rounding costs at most
    1/256 of the budget), so the plan found fits the budget exactly counted; the objective is exact. The bits
    the rounding left are then spent greedily with exact costs: the change of one unit's candidate that lowers
    the objective most per bit and still fits, until none does.

    Raises:
        ConfigError: a budget below what the cheapest candidates of every unit need together (naming that
            minimum), or a unit without candidates.
    """
    if not units:
        return math.nan
    for u in units:
        if not u.candidates:
            raise ConfigError(f"layer '{u.names[0]}' has no candidate setting for the bit allocation")
    total = sum(u.params for u in units)
    cheapest = sum(u.params * min(c.bits_per_weight for c in u.candidates) for u in units) / total
    if not budget > 0 or budget < cheapest - 1e-12:
        raise ConfigError(
            f"budget {budget} bits per weight is below the {cheapest:.4f} the cheapest settings need (scales and "
            "offsets counted); raise --budget or allow fewer bits (--budget-bits)"
        )
    resolution = resolution or max(4096, 256 * len(units))
    step = budget * total / resolution
    inf = math.inf
    # best[j]: the least objective at a cost of exactly j steps; each unit's choice per j kept for the backtrack
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks: list[torch.Tensor] = []
    costs: list[list[int]] = []
    for u in units:
        cost = [math.ceil(u.params * c.bits_per_weight / step - 1e-9) for c in u.candidates]
        options = torch.full((len(cost), resolution + 1), inf, dtype=torch.float64)
        for k, (ck, c) in enumerate(zip(cost, u.candidates, strict=True)):
            if ck <= resolution:
                options[k, ck:] = best[: resolution + 1 - ck] + u.sensitivity * c.rel_mse
        best, pick = options.min(dim=0)
        picks.append(pick.to(torch.int16))
        costs.append(cost)
    if not math.isfinite(float(best.min())):  # rounding up left no room: the cheapest candidate of every unit
        for u in units:
            u.chosen = min(range(len(u.candidates)), key=lambda k: u.candidates[k].bits_per_weight)
    else:
        end = int(torch.argmin(best))  # the first of equal minima: the cheapest plan among the best
        for u, pick, cost in zip(reversed(units), reversed(picks), reversed(costs), strict=True):
            u.chosen = int(pick[end])
            end -= cost[u.chosen]
    _spend_rest(units, budget * total)
    return sum(u.params * u.choice.bits_per_weight for u in units) / total


def _spend_rest(units: Sequence[LayerOptions], capacity: float) -> None:
    """Greedy exact-cost upgrades after the rounded dynamic program: the best gain per bit that fits, repeated."""
    used = sum(u.params * u.choice.bits_per_weight for u in units)
    while True:
        best: tuple[float, LayerOptions, int] | None = None
        for u in units:
            now = u.choice
            for k, c in enumerate(u.candidates):
                extra = u.params * (c.bits_per_weight - now.bits_per_weight)
                gain = u.sensitivity * (now.rel_mse - c.rel_mse)
                if gain <= 0 or used + extra > capacity * (1 + 1e-12):
                    continue
                rate = gain / max(extra, 1e-12)
                if best is None or rate > best[0]:
                    best = (rate, u, k)
        if best is None:
            return
        _, u, k = best
        used += u.params * (u.candidates[k].bits_per_weight - u.choice.bits_per_weight)
        u.chosen = k
