"""REx: residual quantization error expansion of a weight, group-sparse, with its cost and its error bound.

Pure tensor math (no module walking). Reference: E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "REx: Data-Free
Residual Quantization Error Expansion", NeurIPS 2023.

**Expansion** of order ``K`` over any quantizer ``Q`` (each order fitted on its own, with its own scales)::

    R_1 = Q(W),    R_k = Q(W - sum_{i<k} R_i)   (k = 2..K),    W^(K) = sum_{k<=K} R_k.

With a uniform rule whose top level sits on the group's maximum (``minmax``), the residual after order ``k``
is at most half a step, so the next order's step is ``1 / (2^b - 1)`` of the previous one on the default
mid-rise grid (about ``1 / (2 (2^(b-1) - 1))`` on a symmetric grid with a zero level, the paper's lemma): the
error falls at least ``2^(b-1)``-fold per order. Rules with non-uniform levels converge more slowly (see the
integration tests for measured rates).

**Group sparsity**: for orders ``k >= 2`` only the output channels (rows along axis 0) whose *current*
residual ``W - sum_{i<k} R_i`` has the largest L2 norm are expanded; ranking on the current residual means a
later order may pick channels an earlier one skipped. ``sparsity`` ``s`` is the fraction of channels
*dropped* from each extra order, so ``s = 0`` is the dense expansion; each extra order keeps
``round((1 - s) C)`` of the ``C`` channels. In terms of an expansion budget ``gamma`` (channel-terms of all
extra orders together, in units of one full order) split equally over the ``K - 1`` extra orders,
``gamma / (K - 1)`` each, ``1 - s = gamma / (K - 1)``. Across layers the model's budget is split linearly in
depth, more toward the head (:func:`layer_sparsities`, configurable).

**Cost** (:func:`expansion_cost`): a conv/linear costs ``BOPs = MACs x weight bits x activation bits``; a
term covering ``c`` of ``C`` output channels costs ``MACs c / C b_k b_a``, so an expanded layer costs
``MACs b_a sum_k b_k c_k / C``. The float reference is 32 x 32 bits per MAC; plain ``b``-bit is
``b x b_a``. Activations are float (``b_a = 32``) unless an activation width is given: weight-only
quantization.

**Error bound** (:func:`error_bound`, see its docstring); :func:`max_output_change` measures the quantity it
bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dfquant.errors import ConfigError, InputError, check_finite
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor

__all__ = [
    "SPLIT_RULES",
    "BoundLayer",
    "BoundResidual",
    "ExpansionTerm",
    "LayerCost",
    "concat_forward",
    "error_bound",
    "expand",
    "expansion_cost",
    "kept_channels",
    "layer_cost",
    "layer_sparsities",
    "max_output_change",
    "operator_norm_inf",
    "reconstruct",
    "relative_error",
    "termwise_forward",
    "total_cost",
]


@dataclass(frozen=True)
class ExpansionTerm:
    """One order of an expansion.

    Attributes:
        qtensor: the quantized residual (shape ``(len(channels), ...)`` for a channel-subset term).
        order: 1-based expansion order ``k``.
        channels: int64 output-channel indices (axis 0) this term covers, sorted, or None for all.
    """

    qtensor: QTensor
    order: int
    channels: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.qtensor.bits

    def num_channels(self, total: int) -> int:
        """Output channels covered, out of ``total``."""
        return total if self.channels is None else int(self.channels.numel())

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (float32, full shape) plus this term, scattered into its channels."""
        values = self.qtensor.dequantize(torch.float32)
        return w + values if self.channels is None else w.index_add(0, self.channels, values)


def kept_channels(total: int, fraction: float) -> int:
    """Channels an extra order keeps: ``floor(fraction * total + 1/2)`` clamped to ``[0, total]``."""
    return max(0, min(total, math.floor(fraction * total + 0.5)))


def _check_sparsity(sparsity: float, where: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"{where}: sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _check_order(order: int, where: str) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 16:
        raise ConfigError(f"{where}: expansion order must be an integer in 1..16, got {order!r}")
    return order


def expand(
    weight: torch.Tensor,
    quantizer: Quantizer,
    order: int,
    *,
    granularity: str | Granularity = "channel",
    sparsity: float = 0.0,
    name: str = "weight",
    scale_dtype: str | torch.dtype = torch.float32,
    residual_quantizer: Quantizer | None = None,
) -> list[ExpansionTerm]:
    """Residual expansion of ``weight`` to ``order`` terms (Yvinec et al. 2023, eq. of the expansion).

    ``R_1 = Q(W)``, ``R_k = Q(W - sum_{i<k} R_i)``; for ``k >= 2`` with ``sparsity > 0`` only the
    ``round((1 - sparsity) C)`` output channels with the largest L2 norm of the current residual are quantized
    (an order that keeps no channel adds no term).

    Args:
        weight: float tensor in ``(out, in, *kernel)`` layout (not modified).
        quantizer: any registered rule; every order uses it with its own freshly fitted scales.
        order: ``K >= 1``.
        granularity: where scales are shared (axis 0 rows when sparse).
        sparsity: fraction of output channels dropped from each order ``k >= 2`` (0 = dense).
        name: used in error messages.
        scale_dtype: storage dtype of the scales (see :meth:`Quantizer.quantize`).
        residual_quantizer: the rule of orders ``k >= 2`` (default ``quantizer``): e.g. an error-minimizing
            rule for the first order and ``minmax`` (whose top level bounds the residual) for the others.

    Returns:
        The terms in order; ``sum`` of their dequantized values (scattered) approximates ``weight``.

    Raises:
        ConfigError: a bad order or sparsity, or a sparse expansion whose granularity runs along another axis.
        InputError: a non-finite or empty weight.
    """
    _check_order(order, name)
    sparsity = _check_sparsity(sparsity, name)
    gran = Granularity.parse(granularity)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        raise InputError(f"'{name}': weight must be a non-empty floating-point tensor")
    check_finite(weight, name)
    if sparsity > 0 and order > 1 and gran.kind != "tensor" and gran.axis not in (0, -weight.dim()):
        raise ConfigError(
            f"'{name}': a sparse expansion selects output channels (axis 0); granularity '{gran}' runs along "
            "another axis"
        )
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    C = w.shape[0] if w.dim() else 1
    approx = torch.zeros_like(w)
    terms: list[ExpansionTerm] = []
    for k in range(1, order + 1):
        res = w - approx
        where = f"{name} (order {k})"
        n_keep = C if k == 1 or sparsity == 0 or w.dim() == 0 else kept_channels(C, 1.0 - sparsity)
        if n_keep == 0:
            continue
        q = quantizer if k == 1 or residual_quantizer is None else residual_quantizer
        if n_keep == C:
            qt = q.quantize(res, gran, name=where, scale_dtype=scale_dtype)
            term = ExpansionTerm(qt, k, None)
        else:
            norms = res.reshape(C, -1).norm(dim=1)
            idx = torch.sort(torch.topk(norms, n_keep, sorted=False).indices).values
            qt = q.quantize(res[idx].contiguous(), gran, name=where, scale_dtype=scale_dtype)
            term = ExpansionTerm(qt, k, idx)
        approx = term.add_to(approx)
        terms.append(term)
    return terms


def reconstruct(terms: Sequence[ExpansionTerm], shape: Sequence[int]) -> torch.Tensor:
    """``W^(K) = sum_k R_k`` in float32, subset terms scattered into their channels."""
    w = torch.zeros(tuple(shape), dtype=torch.float32)
    for t in terms:
        w = t.add_to(w)
    return w


def relative_error(weight: torch.Tensor, terms: Sequence[ExpansionTerm]) -> float:
    """``||W - W^(K)||_F / ||W||_F`` (the relative weight error, not squared)."""
    ref = weight.detach().to(torch.float32).cpu()
    den = float(ref.norm())
    num = float((reconstruct(terms, ref.shape) - ref).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ------------------------------------------------------------------------------------------------------------
# Budget split across layers

#: Rules splitting a model's sparsity budget across its layers (``kept_l`` proportional to the weight).
SPLIT_RULES: dict[str, Callable[[int, int], float]] = {
    "uniform": lambda i, n: 1.0,
    "linear": lambda i, n: float(i + 1),  # linear in depth: layer i of n (0 = input side) weighs i + 1
}


def layer_sparsities(
    n_layers: int,
    sparsity: float,
    rule: str | Callable[[int, int], float] = "linear",
    *,
    sizes: Sequence[float] | None = None,
) -> list[float]:
    """Split a model's sparsity budget over its layers (input side first).

    Layer ``l`` keeps the fraction ``rho_l = min(1, t w_l)`` of its channels in each extra order, with
    ``w_l = rule(l, n)`` (``linear``: ``l + 1``, so kept fractions grow linearly with depth, more toward the
    head, as in the paper; ``uniform``: 1) and ``t`` chosen so that the size-weighted mean kept fraction is
    ``1 - sparsity`` (``sum_l size_l rho_l = (1 - sparsity) sum_l size_l``). Layers capped at 1 hand their
    excess to the others (water filling), so the budget is met exactly whenever it is reachable.

    Args:
        n_layers: number of expanded layers, in depth order.
        sparsity: the model's fraction of dropped channels in [0, 1].
        rule: a name of :data:`SPLIT_RULES`, or ``rule(index, n_layers) -> weight > 0``.
        sizes: what a channel of each layer costs (parameters per channel x channels, or MACs); default 1.

    Returns:
        Per-layer sparsity ``1 - rho_l``.

    Raises:
        ConfigError: an unknown rule, a bad sparsity or sizes of the wrong length.
    """
    sparsity = _check_sparsity(sparsity, "layer split")
    if isinstance(rule, str):
        if rule not in SPLIT_RULES:
            raise ConfigError(f"unknown sparsity split rule '{rule}'; allowed: {', '.join(SPLIT_RULES)}")
        rule = SPLIT_RULES[rule]
    if n_layers <= 0:
        return []
    size = [1.0] * n_layers if sizes is None else [float(s) for s in sizes]
    if len(size) != n_layers:
        raise ConfigError(f"sizes has {len(size)} entries for {n_layers} layers")
    w = [float(rule(i, n_layers)) for i in range(n_layers)]
    if any(not math.isfinite(x) or x <= 0 for x in w):
        raise ConfigError("a split rule must give finite positive weights")
    target = (1.0 - sparsity) * sum(size)
    kept = [0.0] * n_layers
    free = list(range(n_layers))
    budget = target
    while free:  # water filling: scale the free layers to the remaining budget, cap at 1, repeat
        denom = sum(size[i] * w[i] for i in free)
        t = budget / denom if denom > 0 else 0.0
        capped = [i for i in free if t * w[i] >= 1.0]
        if not capped:
            for i in free:
                kept[i] = t * w[i]
            break
        for i in capped:
            kept[i] = 1.0
            budget -= size[i]
        free = [i for i in free if i not in capped]
    return [min(1.0, max(0.0, 1.0 - k)) for k in kept]


# ------------------------------------------------------------------------------------------------------------
# Cost accounting


@dataclass
class LayerCost:
    """Cost of one layer.

    Attributes:
        name: layer name. macs: multiply-accumulates per input (per sample, or per token for text).
        weight_bits_per_mac: ``sum_k b_k c_k / C``, the weight bits one MAC of the layer costs over all terms.
        bits_per_weight: storage bits over all terms (codes, scales, channel indices) per weight.
        bops: ``macs x weight_bits_per_mac x act_bits``.
        float_bops: ``macs x 32 x 32``. plain_bops: ``macs x bits x act_bits`` (one term at the rule's bits).
    """

    name: str
    macs: int
    weight_bits_per_mac: float
    bits_per_weight: float
    bops: float
    float_bops: float
    plain_bops: float
    extra: dict[str, float] = field(default_factory=dict)


def expansion_cost(
    name: str,
    macs: int,
    term_bits: Sequence[tuple[int, int]],
    out_channels: int,
    *,
    bits: int,
    bits_per_weight: float,
    act_bits: int = 32,
) -> LayerCost:
    """The BOPs of one layer computed as ``sum`` of its terms.

    Args:
        name: the layer.
        macs: its multiply-accumulates per input.
        term_bits: ``(bits, channels covered)`` of each term.
        out_channels: the layer's output channels ``C``.
        bits: the rule's bits (for the plain reference).
        bits_per_weight: storage bits per weight, all terms counted.
        act_bits: activation bits (32: float activations, weight-only quantization).

    Returns:
        A :class:`LayerCost` (``BOPs = MACs x weight bits x activation bits``).
    """
    wb = sum(b * c for b, c in term_bits) / max(out_channels, 1)
    return layer_cost(name, macs, wb, bits=bits, bits_per_weight=bits_per_weight, act_bits=act_bits)


def layer_cost(
    name: str,
    macs: int,
    weight_bits_per_mac: float,
    *,
    bits: int,
    bits_per_weight: float,
    act_bits: int = 32,
) -> LayerCost:
    """A :class:`LayerCost` from the layer's weight bits per MAC (``sum_k b_k c_k / C``)."""
    return LayerCost(
        name=name,
        macs=int(macs),
        weight_bits_per_mac=weight_bits_per_mac,
        bits_per_weight=bits_per_weight,
        bops=macs * weight_bits_per_mac * act_bits,
        float_bops=macs * 32.0 * 32.0,
        plain_bops=macs * bits * act_bits,
    )


def total_cost(costs: Sequence[LayerCost]) -> dict[str, float]:
    """Whole-model totals: BOPs, float and plain BOPs, their ratios, MAC-weighted weight bits per MAC."""
    macs = sum(c.macs for c in costs)
    bops = sum(c.bops for c in costs)
    fl = sum(c.float_bops for c in costs)
    pl = sum(c.plain_bops for c in costs)
    return {
        "macs": float(macs),
        "bops": bops,
        "float_bops": fl,
        "plain_bops": pl,
        "bops_vs_float": bops / fl if fl else math.nan,
        "bops_vs_plain": bops / pl if pl else math.nan,
        "weight_bits_per_mac": sum(c.weight_bits_per_mac * c.macs for c in costs) / macs if macs else math.nan,
    }


# ------------------------------------------------------------------------------------------------------------
# One kernel per layer


def termwise_forward(
    x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], **conv: int
) -> torch.Tensor:
    """Reference: ``sum_k`` of each term's own conv/matmul (``(weight_k, channels_k)``; no bias).

    ``conv`` holds ``stride``, ``padding``, ``dilation`` for a convolution (weights of rank 3 or 4); a rank-2
    weight is a linear layer.
    """
    out: torch.Tensor | None = None
    for wk, ch in weights:
        y = _apply(x, wk, conv)
        if ch is not None:
            y = _scatter(y, ch, _out_total(weights), 1 if wk.dim() > 2 else y.dim() - 1)
        out = y if out is None else out + y
    if out is None:
        raise InputError("no terms to apply")
    return out


def concat_forward(
    x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], **conv: int
) -> torch.Tensor:
    """One kernel: the terms' kernels concatenated along the output dimension, one conv/matmul, then a sum.

    ``Y_cat = op(x, cat_k W_k)`` has ``sum_k c_k`` output channels; slice ``k`` is added into its channels
    (all of them for a dense term). Equal to :func:`termwise_forward` up to float rounding.
    """
    if not weights:
        raise InputError("no terms to apply")
    total = _out_total(weights)
    cat = torch.cat([wk for wk, _ in weights], dim=0)
    y = _apply(x, cat, conv)
    dim = 1 if cat.dim() > 2 else y.dim() - 1
    out_shape = list(y.shape)
    out_shape[dim] = total
    out = torch.zeros(out_shape, dtype=y.dtype, device=y.device)
    start = 0
    for wk, ch in weights:
        n = wk.shape[0]
        part = y.narrow(dim, start, n)
        idx = torch.arange(total, device=y.device) if ch is None else ch.to(y.device)
        out = out.index_add(dim, idx, part)
        start += n
    return out


def _out_total(weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> int:
    dense = [wk.shape[0] for wk, ch in weights if ch is None]
    if not dense:
        raise InputError("the first order of an expansion covers every channel")
    return dense[0]


def _scatter(y: torch.Tensor, ch: torch.Tensor, total: int, dim: int) -> torch.Tensor:
    shape = list(y.shape)
    shape[dim] = total
    return torch.zeros(shape, dtype=y.dtype, device=y.device).index_add(dim, ch.to(y.device), y)


def _apply(x: torch.Tensor, w: torch.Tensor, conv: dict[str, int]) -> torch.Tensor:
    if w.dim() == 2:
        return F.linear(x, w)
    if conv.get("groups", 1) != 1:
        raise InputError("the concatenated kernel is implemented for groups = 1")
    stride, padding, dilation = conv.get("stride", 1), conv.get("padding", 0), conv.get("dilation", 1)
    if w.dim() == 4:
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    if w.dim() == 3:
        return F.conv1d(x, w, stride=stride, padding=padding, dilation=dilation)
    raise InputError(f"weights of rank {w.dim()} are not a linear or convolution kernel")


# ------------------------------------------------------------------------------------------------------------
# Error bound


def operator_norm_inf(weight: torch.Tensor) -> float:
    """The l-inf operator norm of a linear layer or convolution: ``max_o sum_{i, taps} |W[o, i, taps]|``.

    For a linear map this is the induced ``||.||_inf`` norm exactly (the largest absolute row sum). For a
    convolution with zero padding (any stride, dilation), every output is a sum over at most one row of the
    kernel, so this is an upper bound, attained at outputs whose receptive field lies inside the input.
    """
    w = weight.detach().to(torch.float32)
    return float(w.reshape(w.shape[0], -1).abs().sum(dim=1).max()) if w.numel() else 0.0


@dataclass(frozen=True)
class BoundLayer:
    """A conv/linear layer ``x -> act(W x + b)`` of a chain, float and quantized.

    The activation (ReLU, or none for the last layer) must be 1-Lipschitz in l-inf with ``|act(z)| <= |z|``;
    pooling, flattening and option-A shortcuts between layers are l-inf non-expansive linear maps applied
    identically to both models, so they may be left out of the chain.

    Attributes:
        weight, quantized: float weight ``W`` and quantized weight ``W^(K)`` (same shape).
        bias, quantized_bias: the float bias and the quantized model's bias (differs after bias correction).
    """

    weight: torch.Tensor
    quantized: torch.Tensor
    bias: torch.Tensor | None = None
    quantized_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class BoundResidual:
    """A residual block ``x -> act(main(x) + shortcut(x))``; ``shortcut`` None is the identity (or any
    parameter-free non-expansive map, such as ResNet's option-A subsample-and-pad)."""

    main: tuple[BoundLayer | BoundResidual, ...]
    shortcut: tuple[BoundLayer | BoundResidual, ...] | None = None


def _vec_inf(t: torch.Tensor | None) -> float:
    return 0.0 if t is None or t.numel() == 0 else float(t.detach().to(torch.float32).abs().max())


def _bias_change(b0: torch.Tensor | None, b1: torch.Tensor | None) -> float:
    """``||b1 - b0||_inf`` (an absent bias is zero)."""
    if b0 is None and b1 is None:
        return 0.0
    if b0 is None or b1 is None:
        return _vec_inf(b1 if b0 is None else b0)
    return _vec_inf(b1.detach().to(torch.float32) - b0.detach().to(torch.float32))


def _propagate(nodes: Sequence[BoundLayer | BoundResidual], m: float, d: float) -> tuple[float, float]:
    for node in nodes:
        if isinstance(node, BoundResidual):
            m1, d1 = _propagate(node.main, m, d)
            m2, d2 = (m, d) if node.shortcut is None else _propagate(node.shortcut, m, d)
            m, d = m1 + m2, d1 + d2
        else:
            a = operator_norm_inf(node.weight)
            aq = operator_norm_inf(node.quantized)
            e = operator_norm_inf(node.quantized.to(torch.float32) - node.weight.to(torch.float32))
            beta = _vec_inf(node.bias)
            dbeta = _bias_change(node.bias, node.quantized_bias)
            m, d = a * m + beta, aq * d + e * m + dbeta
    return m, d


def error_bound(chain: Sequence[BoundLayer | BoundResidual], input_norm: float) -> float:
    """Upper bound ``U`` on ``max |F(X) - F^(K)(X)|`` (l-inf: the largest change of any output) over inputs
    with ``||X||_inf <= input_norm``.

    The paper's bound (Yvinec et al. 2023, theorem on the expansion's error) for a sequential network of ``L``
    layers with ReLU activations and no biases is the perturbation of a product of layer operator norms::

        U = ( prod_l (||W_l|| + ||W_l - W_l^(K)||) - prod_l ||W_l|| ) ||X||,

    with ``||W_l - W_l^(K)||`` falling geometrically in ``K`` by the paper's lemma on the residuals. It
    follows from ``||W~ x~ - W x|| <= ||W~|| ||x~ - x|| + ||W~ - W|| ||x||`` and ReLU being 1-Lipschitz.
    Here it is computed with the same recursion, with l-inf operator norms (:func:`operator_norm_inf`,
    computable exactly from the weights), generalized to what real networks have:

    * biases: ``m_l = ||W_l|| m_{l-1} + ||b_l||`` bounds the float activations, and a changed bias (bias
      correction) adds ``||b~_l - b_l||``:
      ``d_l = ||W~_l|| d_{l-1} + ||W~_l - W_l|| m_{l-1} + ||b~_l - b_l||``, ``m_0 = ||X||``, ``d_0 = 0``;
    * ``||W~_l||`` is computed (it is at most ``||W_l|| + ||W~_l - W_l||``, so for a bias-free chain ``U`` is
      never above the paper's product form);
    * residual blocks ``act(main(x) + shortcut(x))``: both branches are bounded from the same ``(m, d)`` and
      their bounds add.

    Assumptions: activations 1-Lipschitz in each coordinate with ``|act(z)| <= |z|`` (ReLU, identity),
    non-expansive parameter-free maps between layers (average pooling, flatten, option-A shortcut), inference
    mode (BatchNorm folded into the weights); the bound holds for every input of the given norm, so on real
    networks it is far above measured changes.

    Args:
        chain: the layers in order (:class:`BoundLayer`, :class:`BoundResidual`).
        input_norm: ``||X||_inf``.

    Returns:
        ``U = d_L``.
    """
    if input_norm < 0 or not math.isfinite(input_norm):
        raise InputError(f"input_norm must be finite and >= 0, got {input_norm}")
    return _propagate(chain, float(input_norm), 0.0)[1]


@torch.no_grad()
def max_output_change(
    float_fn: Callable[[torch.Tensor], torch.Tensor],
    quant_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int = 256,
) -> tuple[float, float]:
    """The measured maximum change of any output over ``inputs``, and the largest ``||X||_inf`` among them.

    Returns:
        ``(max_{i, j} |F(X_i)_j - F^(K)(X_i)_j|, max_i ||X_i||_inf)``, to compare with
        ``error_bound(chain, input_norm=...)``.
    """
    worst, norm = 0.0, 0.0
    for s in range(0, inputs.shape[0], batch_size):
        xb = inputs[s : s + batch_size]
        diff = (float_fn(xb).to(torch.float64) - quant_fn(xb).to(torch.float64)).abs()
        worst = max(worst, float(diff.max()))
        norm = max(norm, float(xb.abs().max()))
    return worst, norm
