"""DF-MPC on a whole model: find the pairs, compensate, then quantize with plain per-layer rules.

:func:`compensate_model` runs, on a copy of the model:

1. :func:`dfquant.graph.pairs.find_compensation_pairs` finds the (low, BatchNorm, high) pairs from the traced graph;
2. each low layer's unfolded weight ``W`` is quantized with the low rule (``W_hat``), its BatchNorm statistics
   are re-derived (:data:`dfquant.methods.dfmpc.STAT_RULES`) and the coefficients ``c`` computed (the paper's
   loss minimum, ``coefficient="loss"``) or left at 1 (``"none"``, the default, which measures better)
   (:func:`dfquant.methods.dfmpc.compensate_layer`);
3. the low layer's BatchNorm is rewritten to ``(mu_bn, sigma_hat^2 - eps, c gamma, c beta)``;
4. :func:`dfquant.quantize_model` folds and quantizes the model with the low rule on the low layers and
   the high rule everywhere else (stem, downsample and final layers included).

Why this order is exact: folding the rewritten BatchNorm gives the filter ``c gamma / sigma_hat * W`` and the
bias ``c (beta - gamma mu_bn / sigma_hat)``. A rule with per-channel (or per-group along output channels)
scales that only rescales with its input (``ternary``, ``dorefa``, ``minmax``, ``mse``, ...) quantizes the
first to ``c gamma / sigma_hat * W_hat``, i.e. ``c x_hat``; :class:`DfmpcPairReport` records the measured
deviation. For the bias:

* bias correction off: ``mu_bn = mu_hat`` of the rule, the folded bias is ``c y_hat``;
* bias correction on (the default): the pipeline subtracts ``(c gamma / sigma_hat) dW m`` from that bias
  (:func:`dfquant.methods.bn.correct_bias`, ``m`` the input channels' means). To keep one mean rather than
  two that fight, ``mu_bn = mu`` and ``c`` is computed with ``mu_hat = mu + dW m``, which the correction
  then realizes exactly: the folded bias is again ``c y_hat``. Bias correction thus chooses the mean
  (the DFQ shift), the rule the deviation.

With a rotation (``rotate`` in the low or high rule, :mod:`dfquant.methods.rotate`) the low layer's ``W_hat`` is
``Q(W R^T) R``, with the rotation the pipeline will use for that layer (seeded by its name). The rotation acts on
the fan-in and the folding on the rows, so they commute: the folded filter still quantizes to
``c gamma / sigma_hat * W_hat``. Balancing is refused (it would move scales into the BatchNorms DF-MPC rewrites).

The result is an ordinary quantized model: mixed precision is per-layer rules, the file format is unchanged.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, DfquantError, ModelError
from dfquant.graph.modules import get_module
from dfquant.graph.pairs import find_compensation_pairs
from dfquant.graph.trace import analyze_graph
from dfquant.methods.bn import expected_output_shift, propagate_moments, relu_gaussian_moments
from dfquant.methods.dfmpc import COEFFICIENT_RULES, STAT_RULES, compensate_layer
from dfquant.methods.rotate import Rotation
from dfquant.nn.base import QuantModule, oriented_weight
from dfquant.pipeline.quantize import Progress, quantize_model
from dfquant.pipeline.report import QuantizationReport
from dfquant.quantizers.registry import get_quantizer

__all__ = ["DfmpcPairReport", "DfmpcReport", "compensate_model", "dfmpc_config"]


@dataclass
class DfmpcPairReport:
    """One compensated pair.

    Attributes:
        low, bn, high: the layers' names. rule: the statistics rule used. mean: ``"bias-correction"`` when the
            pipeline's bias correction set the mean, else the rule's name.
        c_min, c_mean, c_max: statistics of ``c``. zeros: channels with ``c = 0``.
        loss_before, loss_after: the DF-MPC loss at ``c = 1`` and at ``c``.
        weight_dev: ``max |W_folded - c x_hat| / max |c x_hat|`` measured on the quantized model.
        bias_dev: ``max |b_folded - c y_hat| / max(max |c y_hat|, tiny)``.
    """

    low: str
    bn: str
    high: str
    rule: str
    mean: str
    c_min: float
    c_mean: float
    c_max: float
    zeros: int
    loss_before: float
    loss_after: float
    weight_dev: float = math.nan
    bias_dev: float = math.nan


@dataclass
class DfmpcReport:
    """What :func:`compensate_model` did: settings and one :class:`DfmpcPairReport` per pair."""

    low: dict[str, Any]
    high: dict[str, Any]
    stats: str
    lambda1: float
    lambda2: float
    bias_correction: bool
    coefficient: str = "loss"
    pairs: list[DfmpcPairReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p in d["pairs"]:
            for k, v in p.items():
                if isinstance(v, float) and not math.isfinite(v):
                    p[k] = None
        return d

    def to_text(self) -> str:
        head = ("low layer", "high layer", "stats", "mean", "c min", "c mean", "c max", "c=0", "loss 1 -> c", "dev")
        rows = [head]
        for p in self.pairs:
            rows.append(
                (
                    p.low,
                    p.high,
                    p.rule,
                    p.mean,
                    f"{p.c_min:.3f}",
                    f"{p.c_mean:.3f}",
                    f"{p.c_max:.3f}",
                    str(p.zeros),
                    f"{p.loss_before:.3g} -> {p.loss_after:.3g}",
                    f"{max(p.weight_dev, p.bias_dev):.1e}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            f"DF-MPC: {len(self.pairs)} pair(s); low {_rule_text(self.low)}, high {_rule_text(self.high)}; "
            f"coefficients '{self.coefficient}', lambda1 {self.lambda1:g}, lambda2 {self.lambda2:g}; "
            f"BatchNorm statistics '{self.stats}'; "
            f"bias correction {'on' if self.bias_correction else 'off'}"
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _rule_text(rule: dict[str, Any]) -> str:
    rot = f" rotate {rule['rotate']}" if "rotate" in rule else ""
    return f"{rule['quantizer']} {rule['bits']}-bit {rule['granularity']}{rot}"


def _rule_dict(rule: LayerRule) -> dict[str, Any]:
    out = {"quantizer": rule.quantizer, "bits": rule.bits, "granularity": str(rule.granularity)}
    return out if rule.rotate == "none" else {**out, "rotate": rule.rotate}


def dfmpc_config(
    low_layers: list[str], low: LayerRule, high: LayerRule, *, bias_correction: bool = True
) -> QuantConfig:
    """The plain per-layer rules DF-MPC quantizes with: ``high`` by default, ``low`` on each low layer (matched
    by exact name)."""
    rules = tuple(
        PatternRule(
            "re:" + re.escape(name),
            quantizer=low.quantizer,
            bits=low.bits,
            granularity=low.granularity,
            options=dict(low.options),
            scale_dtype=low.scale_dtype,
            rotate=low.rotate,
        )
        for name in low_layers
    )
    return QuantConfig(high, rules=rules, fold_bn=True, bias_correction=bias_correction)


def _bn(model: nn.Module, name: str) -> _BatchNorm:
    m = get_module(model, name)
    if not isinstance(m, _BatchNorm) or m.running_mean is None or m.running_var is None:
        raise ModelError(f"'{name}' is not a BatchNorm with running statistics")
    return m


def _stats(bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(f"'{name}' is not a BatchNorm with running statistics")
    return bn.running_mean, bn.running_var


def _affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
    return beta, gamma


def _input_moments(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per-channel ``(mean, variance or None)`` of each layer's input, from the BatchNorms before it (Gaussian
    BatchNorm outputs through ReLUs, sums, padding; see :func:`dfquant.methods.bn.propagate_moments`)."""
    graph = analyze_graph(model)
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for layer, (bn_name, act) in graph.input_bn.items():
        beta, gamma = _affine(_bn(model, bn_name))
        if act == "relu":
            mean, var = relu_gaussian_moments(beta, gamma.abs())
            out[layer] = (mean, var)
        else:
            out[layer] = (beta.float().clone(), gamma.float() ** 2)
    sources = {op.source for op in graph.moment_program if op.op == "batchnorm"}
    moments = propagate_moments(graph.moment_program, {s: _affine(_bn(model, s)) for s in sources})
    for layer, (node, _, _) in graph.input_moments.items():
        if layer not in out and node in moments:
            out[layer] = (moments[node].mean, moments[node].relative_variance)
    return out


def _check_low_granularity(rule: LayerRule) -> None:
    g = rule.granularity
    if g.kind == "tensor" or g.axis != 0:
        raise ConfigError(
            f"DF-MPC: the low rule's granularity must be 'channel' or 'group:G' along output channels (axis 0), "
            f"got '{rule.granularity}' (c is folded per output channel, which only commutes with per-channel "
            "scales)"
        )


@torch.no_grad()
def compensate_model(
    model: nn.Module,
    *,
    low: LayerRule | None = None,
    high: LayerRule | None = None,
    lambda1: float = 0.5,
    lambda2: float = 0.0,
    stats: str = "projection",
    bias_correction: bool = True,
    progress: Progress | None = None,
    coefficient: str = "none",
) -> tuple[nn.Module, QuantizationReport, DfmpcReport]:
    """Quantize ``model`` with DF-MPC (Chen et al. 2023): low-bit layers compensated by the next high-bit layer.

    Args:
        model: the float model (left unchanged).
        low: the low layers' rule (default ``ternary`` 2-bit per channel).
        high: every other layer's rule (default ``minmax`` 6-bit per channel).
        lambda1, lambda2: the loss weights (defaults 0.5 and 0, the paper's best on ResNet-56/CIFAR-10).
        stats: how the low layers' BatchNorm statistics are re-derived (:data:`dfquant.methods.dfmpc.STAT_RULES`;
            default ``projection``, the better one with bias correction on ResNet-20 at 2 and 3 bits; without
            bias correction ``moments`` is better, see ``benchmarks/dfmpc_table.py``).
        bias_correction: DFQ bias correction of every layer; for the low layers it sets the mean (see the
            module docstring).
        progress: passed to :func:`dfquant.quantize_model`.
        coefficient: ``"none"`` (default: ``c = 1``, the re-derived statistics alone) or ``"loss"`` (the paper's
            closed-form ``c``; :data:`dfquant.methods.dfmpc.COEFFICIENT_RULES`). The paper's ``c`` minimizes a
            bound on the next layer's squared output error, which shrinks each channel toward zero by its noise
            share (``c ~ kappa^2 / (kappa^2 + ||E||^2 / ||W||^2)`` with the projection statistics); the networks
            downstream lose more to the lost variance than they gain in squared error. Measured top-1 on the
            exact CIFAR-10 subset (``benchmarks/dfmpc_table.py``), MP2/6, projection statistics, bias correction:
            ResNet-20 ternary 79.06 (none) vs 55.75 (loss), 2-bit ``lloyd-optimal`` with input-variance weighting
            88.89 vs 85.64; ResNet-32 84.96 vs 54.38 and 91.64 vs 87.81.

    Returns:
        ``(quantized model, quantization report, DF-MPC report)``.

    Raises:
        ConfigError: bad rules, lambdas or rule name.
        ModelError: the model does not trace, or has no pair.
        InputError: non-finite weights or statistics, naming the layer.
    """
    low = low if low is not None else LayerRule("ternary", 2)
    high = high if high is not None else LayerRule("minmax", 6)
    for what, r in (("low", low), ("high", high)):
        if not isinstance(r, LayerRule):
            raise ConfigError(f"DF-MPC: the {what} rule must be a LayerRule, got {type(r).__name__}")
        if r.skip or r.expand != 1:
            raise ConfigError(f"DF-MPC: the {what} rule must quantize plainly (no skip, expand 1)")
        if r.balance is not False:  # a balance would move scales into the BatchNorms DF-MPC rewrites
            raise ConfigError(f"DF-MPC: the {what} rule must not balance (got balance={r.balance!r})")
    if stats not in STAT_RULES:
        raise ConfigError(f"DF-MPC: BatchNorm statistics rule must be one of {', '.join(STAT_RULES)}, got '{stats}'")
    if coefficient not in COEFFICIENT_RULES:
        raise ConfigError(
            f"DF-MPC: coefficient rule must be one of {', '.join(COEFFICIENT_RULES)}, got {coefficient!r}"
        )
    _check_low_granularity(low)
    quantizer = get_quantizer(low.quantizer, low.bits, **dict(low.options))
    pairs = find_compensation_pairs(model)
    if not pairs:
        raise ModelError(
            f"DF-MPC found no layer pair in {type(model).__name__}: it needs a conv/linear layer followed by "
            "BatchNorm -> ReLU -> one conv/linear layer"
        )
    try:
        target = copy.deepcopy(model)
    except Exception as e:
        raise ModelError(f"cannot copy {type(model).__name__} ({type(e).__name__}: {e})") from None
    target.eval()
    moments = _input_moments(target)
    config = dfmpc_config([p.low for p in pairs], low, high, bias_correction=bias_correction)
    report = DfmpcReport(_rule_dict(low), _rule_dict(high), stats, lambda1, lambda2, bias_correction, coefficient)
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    updates = []
    for p in pairs:
        layer = get_module(target, p.low)
        bn = _bn(target, p.bn)
        bn_rm, bn_rv = _stats(bn, p.bn)
        w = oriented_weight(layer).detach().to(torch.float32)
        try:
            rotation = Rotation.for_rule(low.rotate, p.low)
            fitted = w if rotation is None else rotation.apply(w)  # the pipeline fits W R^T and decodes Q R
            w_hat = quantizer.quantize(fitted, low.granularity, name=p.low, scale_dtype=low.scale_dtype).dequantize(
                torch.float32
            )
            w_hat = w_hat if rotation is None else rotation.undo(w_hat)
        except DfquantError as e:
            raise type(e)(f"DF-MPC low layer '{p.low}': {e}") from None
        groups = int(cast(nn.Conv2d, layer).groups) if hasattr(layer, "groups") else 1
        m, v = moments.get(p.low, (None, None))
        rule = stats if (stats != "moments" or m is not None) else "projection"
        delegated = bias_correction and m is not None
        # A layer's own bias b shifts its output: the statistics of ``W x`` alone have the mean ``mu - b``.
        bias = getattr(layer, "bias", None)
        b0 = bias.detach().float() if isinstance(bias, torch.Tensor) else torch.zeros(w.shape[0])
        running_mean = bn_rm.detach().float() - b0
        mean_hat = None
        if delegated:
            assert m is not None
            mean_hat = running_mean + expected_output_shift(w_hat - w, m, groups)
        beta, gamma = _affine(bn)
        comp = compensate_layer(
            w,
            w_hat,
            running_mean,
            bn_rv.detach(),
            gamma,
            beta,
            float(bn.eps),
            rule=rule,
            input_mean=m,
            input_var=v,
            groups=groups,
            lambda1=lambda1,
            lambda2=lambda2,
            mean_hat=mean_hat,
            coefficient=coefficient,
            where=p.low,
        )
        bn_mean = (running_mean if delegated else comp.mean_hat) + b0
        updates.append((bn, bn_rm, bn_rv, bn_mean, comp.std_hat**2 - float(bn.eps), comp.gamma, comp.beta))
        shape = (w.shape[0], *([1] * (w.dim() - 1)))
        expected[p.low] = (
            comp.c.reshape(shape) * gamma.float().reshape(shape) / comp.std_hat.reshape(shape) * w_hat,
            comp.c * (beta.float() - gamma.float() * comp.mean_hat / comp.std_hat),  # b is inside mean_hat
        )
        c = comp.c
        report.pairs.append(
            DfmpcPairReport(
                p.low,
                p.bn,
                p.high,
                rule,
                "bias-correction" if delegated else rule,
                float(c.min()),
                float(c.mean()),
                float(c.max()),
                int((c == 0).sum()),
                comp.loss_before,
                comp.loss_after,
            )
        )
    for bn, rm, rv, mean, var, gamma, beta in updates:
        rm.copy_(mean)
        rv.copy_(var)
        bn.weight = nn.Parameter(gamma.to(rm.dtype), requires_grad=False)
        bn.bias = nn.Parameter(beta.to(rm.dtype), requires_grad=False)
    qmodel, qreport = quantize_model(target, config, progress=progress, inplace=True)
    for pr in report.pairs:
        mod = get_module(qmodel, pr.low)
        if isinstance(mod, QuantModule):
            wx, by = expected[pr.low]
            got_w = mod.dequantize_weight().to(torch.float32)
            got_b = mod.bias.detach().float() if mod.bias is not None else torch.zeros_like(by)
            pr.weight_dev = float((got_w - wx).abs().max()) / max(float(wx.abs().max()), 1e-30)
            pr.bias_dev = float((got_b - by).abs().max()) / max(float(by.abs().max()), 1e-30)
    return qmodel, qreport, report
