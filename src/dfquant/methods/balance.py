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


def _imbalance(w: torch.Tensor) -> float:
    s = torch.cat([w.std(dim=0, correction=0), w.std(dim=1, correction=0)])
    s = s[s > 0]
    return float(s.max() / s.min()) if s.numel() else 1.0


def column_scale(w: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """The column scale ``c`` (float16, one per fan-in column, geometric mean about one) of the weight ``w``
    (``(out, in, *kernel)``): the Sinkhorn iterate of least imbalance (module docstring). A matrix that is
    already balanced (or has a single row or column) gets ones.

    Raises:
        InputError: a weight with NaN or infinite values.
    """
    m = w.detach().to(torch.float32).reshape(w.shape[0], -1).cpu()
    if not torch.isfinite(m).all():
        raise InputError("balance: the weight holds NaN or infinite values")
    rows, cols = m.shape
    if rows < 2 or cols < 2:
        return torch.ones(cols, dtype=torch.float16)
    floor = _FLOOR * float(m.pow(2).mean().sqrt()) or _FLOOR
    r = torch.ones(rows, 1)
    c = torch.ones(1, cols)
    best_c, best = c.clone(), math.inf
    for _ in range(iterations):
        c = c * (m / (r * c)).std(dim=0, correction=0, keepdim=True).clamp_min(floor)
        r = r * (m / (r * c)).std(dim=1, correction=0, keepdim=True).clamp_min(floor)
        c = c / torch.exp(torch.log(c).mean())  # geometric mean one: the row factor keeps the overall scale
        score = _imbalance(m / (r * c))
        if score < best:
            best, best_c = score, c.clone()
    zero = m.abs().amax(dim=0) == 0
    out = best_c.reshape(-1)
    out[zero] = 1.0
    return out.clamp(2.0**-14, 65504.0).to(torch.float16)


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


__all__ = ["ITERATIONS", "apply_balance", "column_scale", "imbalance", "undo_balance"]
