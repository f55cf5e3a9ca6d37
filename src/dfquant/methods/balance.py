"""Row/column balancing (``balance=true``, ``--balance``): a data-free per-input-column scale found by Sinkhorn-style
alternating normalization, quantizing ``W diag(1/c)`` and decoding ``Q diag(c)``.

A weight matrix whose columns differ much in spread (an input channel with large weights in every row) makes
every row group pay for its widest column: the group's scale is set by the outlier column, and the other
weights fall into few levels. SINQ (Muller et al., "SINQ: Sinkhorn-Normalized Quantization for Calibration-Free
Low-Precision LLM Weights", 2025) balances the matrix first with a second, per-column scale: it alternately
divides the rows and the columns by their standard deviations (the Sinkhorn-Knopp iteration, Sinkhorn 1964,
applied to spreads instead of sums) and keeps the iterate with the smallest *imbalance*

.. math::  I(W) = \\frac{\\max(\\sigma_{rows} \\cup \\sigma_{cols})}{\\min(\\sigma_{rows} \\cup \\sigma_{cols})} .

The row factor is left to the quantizer's own per-row (per-group) scales; the column factor ``c`` (geometric mean
one) is stored next to the terms in float16, one value per fan-in column (``in x kh x kw`` for a convolution),
16 bits per column, counted in the layer's bits per weight. The decoded weight is ``(sum of terms) diag(c)``;
the multiplication paths that work on the input (the fused kernel, the int4 kernel) scale the input instead:
``x diag(c) Q^T``. No data is used. DFQ's cross-layer equalization (Nagel et al. 2019) is the same idea with the
scale absorbed into the previous layer; here it is stored, so any layer can take it.

With a rotation too, the balance comes first: the terms hold ``(W diag(1/c)) R^T``, the weight is
``((sum of terms) R) diag(c)``.
"""

from __future__ import annotations

import math

import torch

from dfquant.errors import InputError

#: Sinkhorn iterations (each normalizes the columns, then the rows).
ITERATIONS = 16
#: Smallest spread a row or column is divided by, relative to the matrix's RMS (all-zero columns keep scale 1).
_FLOOR = 1e-6


def _spreads(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column and row spreads of ``m`` (``(rows, cols)``, or ``(rows, cols, taps)``: a column is then every
    tap of one input channel, a row every column and tap of one output channel)."""
    if m.dim() == 2:
        return m.std(dim=0, correction=0), m.std(dim=1, correction=0)
    return m.std(dim=(0, 2), correction=0), m.std(dim=(1, 2), correction=0)


def _imbalance(w: torch.Tensor) -> float:
    s = torch.cat(_spreads(w))
    s = s[s > 0]
    return float(s.max() / s.min()) if s.numel() else 1.0


def _sinkhorn(m: torch.Tensor, iterations: int) -> torch.Tensor:
    """The column factor (float32, one per column, geometric mean one) of the Sinkhorn iterate of least
    imbalance of ``m`` (``(rows, cols)`` or ``(rows, cols, taps)``, see :func:`_spreads`); ones for all-zero
    columns."""
    cshape = (1, m.shape[1]) + (1,) * (m.dim() - 2)
    rshape = (m.shape[0],) + (1,) * (m.dim() - 1)
    floor = _FLOOR * float(m.pow(2).mean().sqrt()) or _FLOOR
    r = torch.ones(rshape)
    c = torch.ones(cshape)
    best_c, best = c.clone(), math.inf
    for _ in range(iterations):
        c = c * _spreads(m / (r * c))[0].reshape(cshape).clamp_min(floor)
        r = r * _spreads(m / (r * c))[1].reshape(rshape).clamp_min(floor)
        c = c / torch.exp(torch.log(c).mean())  # geometric mean one: the row factor keeps the overall scale
        score = _imbalance(m / (r * c))
        if score < best:
            best, best_c = score, c.clone()
    out = best_c.reshape(-1)
    zero = m.abs().amax(dim=(0, *range(2, m.dim()))) == 0
    out[zero] = 1.0
    return out


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    m = w.detach().to(torch.float32).reshape(w.shape[0], -1).cpu()
    if not torch.isfinite(m).all():
        raise InputError("balance: the weight holds NaN or infinite values")
    return m


def column_scale(w: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """The column scale ``c`` (float16, one per fan-in column, geometric mean about one) of the weight ``w``
    (``(out, in, *kernel)``): the Sinkhorn iterate of least imbalance (module docstring). A matrix that is
    already balanced (or has a single row or column) gets ones.

    Raises:
        InputError: a weight with NaN or infinite values.
    """
    m = _as_matrix(w)
    rows, cols = m.shape
    if rows < 2 or cols < 2:
        return torch.ones(cols, dtype=torch.float16)
    return _sinkhorn(m, iterations).clamp(2.0**-14, 65504.0).to(torch.float16)


def channel_scale(w: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """A column scale shared by every kernel tap of one input channel: ``c`` (float32, one per input channel,
    geometric mean about one) of the weight ``w`` (``(out, in, *kernel)``), from the same Sinkhorn iteration with
    an input channel's spread taken over all its taps. This is the scale that can move into the layer before
    (:mod:`dfquant.pipeline.absorb`: a per-channel factor of a BatchNorm's output, which ReLU passes on since
    ``relu(c z) = c relu(z)`` for ``c > 0``); for a linear layer it is :func:`column_scale` before float16
    rounding. Values are kept in ``[2^-14, 2^14]``.

    Raises:
        InputError: a weight with NaN or infinite values.
    """
    m = _as_matrix(w).reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1)
    if m.shape[0] < 2 or m.shape[1] < 2:
        return torch.ones(m.shape[1])
    return _sinkhorn(m, iterations).clamp(2.0**-14, 2.0**14)


def apply_balance(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W diag(1/c)`` along the flattened fan-in of ``w`` (``(out, in, *kernel)``), in float32."""
    c = scale.to(device=w.device, dtype=torch.float32)
    return (w.to(torch.float32).reshape(w.shape[0], -1) / c).reshape(w.shape)


def undo_balance(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W diag(c)``: the decoded weight back in the layer's columns (float32 products)."""
    c = scale.to(device=w.device, dtype=torch.float32)
    return (w.to(torch.float32).reshape(w.shape[0], -1) * c).reshape(w.shape)


def imbalance(w: torch.Tensor) -> float:
    """``I(W)`` of the weight in ``(out, fan-in)`` layout (see the module docstring)."""
    m = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    return _imbalance(m) if min(m.shape) > 1 else 1.0


def channel_imbalance(w: torch.Tensor) -> float:
    """``I(W)`` with an input channel's spread over all its kernel taps (the measure :func:`channel_scale`
    lowers), of the weight ``(out, in, *kernel)``."""
    m = w.detach().to(torch.float32).reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1)
    return _imbalance(m) if min(m.shape[:2]) > 1 else 1.0


__all__ = [
    "ITERATIONS",
    "apply_balance",
    "channel_imbalance",
    "channel_scale",
    "column_scale",
    "imbalance",
    "undo_balance",
]
