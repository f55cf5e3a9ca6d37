"""The report :func:`dfquant.quantize_model` returns: one :class:`LayerReport` per quantized layer (rule, error,
bits, sizes, code statistics), the layers skipped and why, the BatchNorms folded and the biases corrected,
with totals and a JSON form (:meth:`QuantizationReport.to_dict`) that files and the CLI record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dfquant.errors import DfquantError
from dfquant.nn.terms import term_layout
from dfquant.quantizers.registry import quantizer_class

# ------------------------------------------------------------------------------------------------------------
# Report

DIST_NAMES = {0: "gaussian", 1: "laplace", 2: "empirical"}


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        name: qualified name. type: the float layer's class name. shape: its weight shape (as stored).
        quantizer, bits, granularity, options: the rule applied. terms: number of quantized terms.
        params: weights quantized. rel_mse: measured ``||W_hat - W||^2 / ||W||^2`` (W after BatchNorm
            folding).
        bits_per_weight: storage bits of the terms (codes, scales, offsets, fitted levels) per weight.
        bytes: bytes the terms occupy in a file. float_bytes: bytes of the float weight.
        dist: fraction of groups fitted with each distribution (``gaussian``/``laplace``/``empirical``) when
            the quantizer reports it, else None.
        tied_to: the layer whose quantized terms this one shares (their float weights were tied), else
            ``""``; such a layer is not counted again in the report's totals.
        order: residual expansion order ``K`` of the rule (1: plain). sparsity: fraction of output channels
            dropped from each expansion order ``k >= 2`` in this layer (after the split across layers).
        weight_bits_per_mac: ``sum_k bits_k c_k / C`` over the terms (``c_k`` of ``C`` output channels): a MAC
            of the layer costs this many weight bits, so ``BOPs = MACs x weight_bits_per_mac x activation
            bits`` (see :mod:`dfquant.methods.rex`).
        act_bits: input bits (32: float input); act: the input expansion's spec (bits, order, range mode,
            static range and where it comes from), see :mod:`dfquant.methods.rex_act`; with an input
            expansion a MAC costs :func:`~dfquant.methods.rex_act.pair_bits_per_mac` bit products, reported
            as ``weight_bits_per_mac = pair bits / act_bits``. outliers: weights in the sparse outlier residual.
        rotate: the rule's rotation (``"none"`` or ``"hadamard:B"``, :mod:`dfquant.methods.rotate`).
        balance: whether the layer stores a column scale (:mod:`dfquant.methods.balance`). balance_absorbed: the
            BatchNorm that took the layer's column scale instead (:mod:`dfquant.pipeline.absorb`), or ``""``.
        matmul: how the layer multiplies on the model's device: ``"kernel"`` (the fused decode-in-matmul kernel,
            :mod:`dfquant.nn.kernel`) or ``"decode: why"``.
        predicted_rel_mse: the error model's relative MSE for the layer (:func:`predicted_rel_mse`; of the
            rotated weight for a rotated layer), None where the rule has no model.
        ks_before, ks_after: for a rotated layer, the mean Gaussian KS statistic of its groups before and after
            the rotation (:func:`dfquant.methods.rotate.gaussian_ks`), else None.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    quantizer: str
    bits: int
    granularity: str
    terms: int
    params: int
    rel_mse: float
    bits_per_weight: float
    bytes: int
    float_bytes: int
    dist: dict[str, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tied_to: str = ""
    order: int = 1
    sparsity: float = 0.0
    weight_bits_per_mac: float = math.nan
    act_bits: int = 32
    act: dict[str, Any] | None = None
    outliers: int = 0
    rotate: str = "none"
    balance: bool = False
    balance_absorbed: str = ""
    matmul: str = "decode"
    predicted_rel_mse: float | None = None
    ks_before: float | None = None
    ks_after: float | None = None


def predicted_rel_mse(layer: dict[str, Any]) -> float | None:
    """The error model's relative MSE of a layer (a :class:`LayerReport` as a dict: ``quantizer``, ``bits``,
    ``options``, ``shape``, ``granularity``, ``dist``, ``order``), or None where the rule has no model.

    ``sum_d f_d E_d[(Q(X) - X)^2]`` over the fraction ``f_d`` of groups fitted with each unit-variance
    distribution ``d`` (:meth:`dfquant.quantizers.base.Quantizer.expected_mse`: the tables of Lloyd 1982 / Max
    1960, the ACIQ clip of Banner et al. 2019, depending on the rule; empirical groups counted as Gaussian), to
    the power ``K`` for a residual expansion of order ``K`` (each order quantizes the previous residual again).
    """
    try:
        q = quantizer_class(layer["quantizer"])(layer["bits"], **dict(layer.get("options") or {}))
        _, cols, groups = term_layout(layer["shape"], layer["granularity"])
        n = -(-cols // groups)
        mix = layer.get("dist") or {"gaussian": 1.0}
        pred = sum(frac * q.expected_mse(d if d != "empirical" else "gaussian", n) for d, frac in mix.items())
        pred **= int(layer.get("order") or 1)
    except (NotImplementedError, DfquantError, KeyError, TypeError, ValueError):
        return None
    return float(pred) if math.isfinite(pred) else None


@dataclass
class SkippedLayer:
    """A layer left in float, and why."""

    name: str
    type: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class FoldedBN:
    """A BatchNorm folded into the layer before it."""

    layer: str
    bn: str


@dataclass
class BiasCorrectionRecord:
    """A bias corrected for the expected output shift ``dW E[x]`` (``shift`` is what was subtracted).

    Attributes:
        layer, bn, activation: the corrected layer and the chain its input statistics come from.
        shift_l2, shift_max_abs: size of the correction. bias_l2: size of the bias before correction.
    """

    layer: str
    bn: str
    activation: str
    shift_l2: float
    shift_max_abs: float
    bias_l2: float


def dist_summary(codes: torch.Tensor | None) -> dict[str, float] | None:
    """Fractions of groups per distribution code (0 gaussian, 1 laplace, 2 empirical), or None."""
    if codes is None or codes.numel() == 0:
        return None
    flat = codes.reshape(-1).round().to(torch.int64)
    return {DIST_NAMES.get(k, str(k)): float((flat == k).sum()) / flat.numel() for k in sorted(set(flat.tolist()))}


@dataclass
class QuantizationReport:
    """What :func:`dfquant.quantize_model` did, with measured errors and sizes.

    Attributes:
        layers: quantized layers. skipped: layers left float by a rule. unsupported: modules with a weight
            matrix the pipeline does not quantize (they stay float). folded_bn, bias_corrected: methods
            applied.
        graph_method, graph_note: how graph facts were found (see :class:`GraphInfo`).
        total_params: parameters of the float model. float_model_bytes / model_bytes: state-dict bytes of the
            float and the quantized model.
        device: where the model was quantized and where the quantized model lives (``cpu``, ``cuda:0``).
        allocation: the bit allocation under ``config.budget`` (see :func:`dfquant.pipeline.allocate.allocate_bits`),
            or None.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    unsupported: list[SkippedLayer] = field(default_factory=list)
    folded_bn: list[FoldedBN] = field(default_factory=list)
    bias_corrected: list[BiasCorrectionRecord] = field(default_factory=list)
    graph_method: str = "none"
    graph_note: str = ""
    total_params: int = 0
    float_model_bytes: int = 0
    model_bytes: int = 0
    device: str = "cpu"
    allocation: dict[str, Any] | None = None

    def _own(self) -> list[LayerReport]:
        """The layers that hold their own terms (tied layers share another's and are counted once)."""
        return [r for r in self.layers if not r.tied_to]

    @property
    def quantized_params(self) -> int:
        return sum(r.params for r in self._own())

    @property
    def bits_per_weight(self) -> float:
        """Storage bits of all quantized layers over their weights (scales and fitted levels included)."""
        n = self.quantized_params
        return sum(r.bits_per_weight * r.params for r in self._own()) / n if n else math.nan

    @property
    def quantized_bytes(self) -> int:
        return sum(r.bytes for r in self._own())

    @property
    def quantized_float_bytes(self) -> int:
        return sum(r.float_bytes for r in self._own())

    def totals(self) -> dict[str, Any]:
        """Whole-model figures."""
        return {
            "total_params": self.total_params,
            "quantized_params": self.quantized_params,
            "bits_per_weight": self.bits_per_weight,
            "quantized_bytes": self.quantized_bytes,
            "quantized_float_bytes": self.quantized_float_bytes,
            "model_bytes": self.model_bytes,
            "float_model_bytes": self.float_model_bytes,
            "compression": self.float_model_bytes / self.model_bytes if self.model_bytes else math.nan,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shapes as lists, NaN as None)."""
        return _jsonable(
            {
                "layers": [asdict(r) for r in self.layers],
                "skipped": [asdict(r) for r in self.skipped],
                "unsupported": [asdict(r) for r in self.unsupported],
                "folded_bn": [asdict(r) for r in self.folded_bn],
                "bias_corrected": [asdict(r) for r in self.bias_corrected],
                "graph": {"method": self.graph_method, "note": self.graph_note},
                "device": self.device,
                "allocation": self.allocation,
                "totals": self.totals(),
            }
        )

    def to_text(self) -> str:
        """A plain-text table of the layers followed by skipped layers, methods applied and totals."""
        head = (
            "layer",
            "type",
            "shape",
            "quantizer",
            "bits",
            "granularity",
            "dist",
            "rel.MSE",
            "bits/w",
            "bytes",
        )
        rows = [head]
        for r in self.layers:
            dist = "-" if not r.dist else " ".join(f"{k[0]}{v:.0%}" for k, v in r.dist.items())
            q = r.quantizer + (f" x{r.terms}" if r.terms > 1 else "")
            if r.order > 1:
                q += f" (K={r.order}" + (f", {r.sparsity:.0%} sparse)" if r.sparsity > 0 else ")")
            q += f" +{r.outliers} outliers" if r.outliers else ""
            q += f" rot{r.rotate.partition(':')[2]}" if r.rotate != "none" else ""
            q += f" bal>{r.balance_absorbed}" if r.balance_absorbed else " bal" if r.balance else ""
            q += f" A{r.act_bits} {r.act['mode']}" if r.act else ""
            q += f" (tied to {r.tied_to})" if r.tied_to else ""
            shape = "x".join(str(s) for s in r.shape)
            rows.append(
                (
                    r.name or "<root>",
                    r.type,
                    shape,
                    q,
                    str(r.bits),
                    r.granularity,
                    dist,
                    f"{r.rel_mse:.3e}",
                    f"{r.bits_per_weight:.3f}",
                    str(r.bytes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for title, items in (("skipped (float)", self.skipped), ("not supported (float)", self.unsupported)):
            for s in items:
                shape = "x".join(str(d) for d in s.shape)
                lines.append(f"{title}: {s.name or '<root>'} ({s.type} {shape}): {s.reason}")
        if self.folded_bn:
            lines.append("BatchNorm folded: " + ", ".join(f"{f.bn} -> {f.layer}" for f in self.folded_bn))
        for b in self.bias_corrected:
            lines.append(
                f"bias corrected: {b.layer} (from {b.bn}, {b.activation}): |shift| = {b.shift_l2:.3e} "
                f"(max {b.shift_max_abs:.3e}), |bias| = {b.bias_l2:.3e}"
            )
        for r in self.layers:
            if r.ks_before is not None and r.ks_after is not None and not r.tied_to:
                pred = "-" if r.predicted_rel_mse is None else f"{r.predicted_rel_mse:.3e}"
                lines.append(
                    f"rotated {r.name or '<root>'} ({r.rotate}): Gaussian KS of its groups {r.ks_before:.4f} -> "
                    f"{r.ks_after:.4f}; rel.MSE predicted {pred}, measured {r.rel_mse:.3e}"
                )
        if self.allocation is not None:
            lines.extend(_allocation_lines(self.allocation))
        t = self.totals()
        lines.append(f"graph: {self.graph_method}" + (f" ({self.graph_note})" if self.graph_note else ""))
        lines.append(f"device: {self.device}")
        kernel = sum(1 for r in self.layers if r.matmul == "kernel")
        reasons = sorted({r.matmul.partition(": ")[2] for r in self.layers if r.matmul != "kernel"})
        lines.append(
            f"matmul: {kernel} layer(s) in the fused kernel, {len(self.layers) - kernel} decode"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
        lines.append(
            f"total: {t['quantized_params']:,} of {t['total_params']:,} parameters quantized at "
            f"{t['bits_per_weight']:.3f} bits/weight; quantized weights {t['quantized_bytes']:,} B vs "
            f"{t['quantized_float_bytes']:,} B float; model {t['model_bytes']:,} B vs "
            f"{t['float_model_bytes']:,} B float ({t['compression']:.2f}x smaller)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _allocation_lines(a: dict[str, Any]) -> list[str]:
    lines = [
        f"bit allocation: budget {a['budget']:.3f} bits/weight, plan {a['bits_per_weight']:.3f}; predicted output "
        f"error {a['predicted_error']:.3e} (sum of sensitivity x rel.MSE; sensitivities from noise of rel.MSE "
        f"{a['noise']:g} on synthetic inputs)"
    ]
    rows = [("  layer", "bits", "rotate", "sensitivity", "rel.MSE", "bits/w")]
    for u in a["layers"]:
        rows.append(
            (
                "  " + ", ".join(n or "<root>" for n in u["names"]),
                str(u["bits"]),
                u["rotate"],
                f"{u['sensitivity']:.3e}",
                f"{u['rel_mse']:.3e}",
                f"{u['bits_per_weight']:.3f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
