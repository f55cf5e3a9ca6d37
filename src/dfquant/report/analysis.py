"""Error analysis: expected MSE/SQNR of every quantizer for a unit-variance source, and per-tensor predicted vs
measured error.

Prediction for a real tensor (``analyze_tensor``): each group ``g`` of ``n_g`` weights is modelled as a
location-scale copy of the unit-variance distribution that fits it best (Kolmogorov-Smirnov), so its expected
squared error is ``n_g * s_g^2 * D_q(dist_g, n_g)`` with ``D_q`` the rule's error model
(:meth:`Quantizer.expected_mse`) and ``s_g`` the group's spread: the standard deviation about the mean for rules
that fit a location (an offset), the root mean square for symmetric rules (which quantize about zero). The
predicted relative MSE is the sum over groups divided by ``sum x^2``; the measured one is
``||Q(x) - x||^2 / ||x||^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dfquant.errors import ConfigError
from dfquant.grids.distributions import DIST_CODES, DISTRIBUTIONS, check_dist, fit_groups
from dfquant.grids.formats import MINIFLOATS
from dfquant.quantizers import Granularity, Quantizer, available, quantizer_class
from dfquant.quantizers.qtensor import group_batches, to_rows


def quantizer_variants(bits: int, names: list[str] | None = None) -> dict[str, Quantizer]:
    """The rules to compare at ``bits``: every registered quantizer that supports it, plus ``statq`` on each
    minifloat format of that width (named ``statq[FORMAT]``)."""
    out: dict[str, Quantizer] = {}
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in 1..8, got {bits!r}")
    for name in names or available():
        cls = quantizer_class(name)
        if bits not in cls.supported_bits:
            continue
        out[name] = cls(bits)
        if name == "statq":
            for fmt in MINIFLOATS:
                if int(fmt[2]) == bits:
                    out[f"statq[{fmt}]"] = cls(bits, format=fmt)
    if names is not None:
        missing = [n for n in names if n not in out]
        if missing:
            raise ConfigError(f"quantizer(s) {missing} do not support {bits} bits")
    return out


def theory(dist: str, bits: int, group_size: int = 1024, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Expected MSE and SQNR of each rule for a unit-variance ``dist`` source at ``bits``.

    Args:
        dist: ``"gaussian"`` or ``"laplace"``.
        bits: code bits.
        group_size: samples per group, for rules whose clip depends on the sample (``minmax``, ``nf4``, ...).
        names: restrict to these registered rules.

    Returns:
        ``{name: {"grid", "covered", "mse", "sqnr_db", "levels" (where fixed), "clip" (largest level magnitude,
        where fixed)}}``. A rule the error model does not cover (``ternary``, ``dorefa``, the block formats) has
        ``covered: False``, ``mse`` and ``sqnr_db`` None and a ``reason``.

    Raises:
        ConfigError: the error model covers none of the rules asked for.
    """
    check_dist(dist)
    out: dict[str, dict[str, Any]] = {}
    for name, q in quantizer_variants(bits, names).items():
        try:
            mse = q.expected_mse(dist, group_size)
        except NotImplementedError as e:
            out[name] = {"grid": q.grid_name, "covered": False, "mse": None, "sqnr_db": None, "reason": str(e)}
            continue
        row: dict[str, Any] = {"covered": True, "mse": mse, "sqnr_db": 10 * math.log10(1 / mse) if mse > 0 else None}
        lv = q.unit_levels(dist, group_size)
        if lv is not None:
            row["levels"] = [float(v) for v in lv]
            row["clip"] = float(lv.abs().max())
        row["grid"] = q.grid_name
        out[name] = row
    if not any(row["covered"] for row in out.values()):
        raise ConfigError(
            f"the error model covers none of the rules asked for ({', '.join(out)}) at {bits} bits: "
            + "; ".join(str(row["reason"]) for row in out.values())
        )
    return out


@dataclass
class TensorAnalysis:
    """Fitted distribution and per-rule measured vs predicted relative MSE of one tensor."""

    name: str
    shape: tuple[int, ...]
    dist: str
    dist_fractions: dict[str, float]
    ks_gaussian: float
    ks_laplace: float
    energy: float = 0.0
    methods: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dist": self.dist,
            "dist_fractions": self.dist_fractions,
            "ks_gaussian": self.ks_gaussian,
            "ks_laplace": self.ks_laplace,
            "numel": int(math.prod(self.shape)),
            "methods": self.methods,
        }


def analyze_tensor(
    w: torch.Tensor,
    bits: int,
    granularity: str | Granularity = "channel",
    quantizers: dict[str, Quantizer] | None = None,
    name: str = "tensor",
) -> TensorAnalysis:
    """Fit the distribution of each group of ``w`` and compare each rule's measured and predicted error."""
    gran = Granularity.parse(granularity)
    x = w.detach().to(torch.float32)
    rows = to_rows(x, gran if x.dim() > 0 else Granularity("tensor"))
    G = gran.group_size if gran.kind == "group" else None
    batches = []
    for batch, _ in group_batches(rows, G):
        fit = fit_groups(batch)
        batches.append((batch, fit, fit.best()))
    choices = torch.cat([c for _, _, c in batches])
    ks_g = torch.cat([f.ks_gaussian for _, f, _ in batches])
    ks_l = torch.cat([f.ks_laplace for _, f, _ in batches])
    fractions: dict[str, float] = {d: float((choices == DIST_CODES[d]).float().mean()) for d in DISTRIBUTIONS}
    dist = max(fractions, key=lambda d: fractions[d])
    total = float((x * x).sum())
    result = TensorAnalysis(name, tuple(w.shape), dist, fractions, float(ks_g.mean()), float(ks_l.mean()), energy=total)
    for qname, q in (quantizers or quantizer_variants(bits)).items():
        qt = q.quantize(x, gran, name=name)
        measured = qt.rel_mse(x)
        located = qt.offset is not None or q.name.startswith("lloyd")
        pred_sum = 0.0
        cache: dict[tuple[str, int], float] = {}
        try:
            for batch, fit, choice in batches:
                n = batch.shape[1]
                spread2 = fit.std**2 if located else (batch * batch).mean(dim=1)
                for d in DISTRIBUTIONS:
                    sel = choice == DIST_CODES[d]
                    if bool(sel.any()):
                        key = (d, n)
                        if key not in cache:
                            cache[key] = q.expected_mse(d, n)
                        pred_sum += float(spread2[sel].sum()) * n * cache[key]
            predicted = pred_sum / total if total > 0 else 0.0
        except NotImplementedError:
            predicted = math.nan
        result.methods[qname] = {
            "rel_mse": measured,
            "pred_rel_mse": predicted,
            "bits_per_weight": qt.bits_per_weight(),
        }
    return result


def weight_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight matrices and kernels of a state dict: floating tensors with at least 2 dimensions."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2}


def summarize(layers: list[TensorAnalysis]) -> dict[str, dict[str, float]]:
    """Per rule, over all layers: the total relative MSE ``sum_l ||Q(W_l) - W_l||^2 / sum_l ||W_l||^2`` (measured
    and predicted), the mean of the per-layer relative MSEs, and on how many layers the rule is the best."""
    names = list(layers[0].methods) if layers else []
    energy = sum(lay.energy for lay in layers) or 1.0
    out: dict[str, dict[str, float]] = {}
    for n in names:
        err = sum(lay.methods[n]["rel_mse"] * lay.energy for lay in layers)
        pred = sum(lay.methods[n]["pred_rel_mse"] * lay.energy for lay in layers)
        wins = sum(1 for lay in layers if min(lay.methods, key=lambda m: lay.methods[m]["rel_mse"]) == n)
        out[n] = {
            "rel_mse": err / energy,
            "pred_rel_mse": pred / energy,
            "mean_layer_rel_mse": sum(lay.methods[n]["rel_mse"] for lay in layers) / len(layers),
            "best_on_layers": wins,
        }
    return out
