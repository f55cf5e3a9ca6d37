"""Outlier residual: the bulk of a weight at ``b`` bits plus a sparse binary-valued residual on its largest
weights.

Pure tensor math. Reference: the outlier mode of E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "REx: Data-Free
Residual Quantization Error Expansion", NeurIPS 2023 (a sparse expansion order holding only the largest
weights, for transformer weights whose ranges are set by a few outliers).

Let ``O`` be the ``n = round(F numel)`` positions of largest ``|W|`` (``F`` the outlier fraction) and ``t`` the
largest ``|W|`` outside ``O``. The bulk is ``B = Q(clamp(W, -t, t))`` (``base="clip"``: the outliers no
longer set the ranges of their rows) or ``B = Q(W)`` (``base="plain"``). The residual ``R = W - B`` is kept
on ``O`` only, binary-valued::

    S_i = sign(R_i) s_{g(i)}   (i in O),     W ~ B + S,

with one magnitude per sign (``scale="sign"``: ``s_+ = mean(R_i | R_i > 0)``, ``s_- = mean(-R_i | R_i < 0)``,
the least-squares values) or one per output channel (``scale="row"``: ``s_r = mean_{i in O, row r} |R_i|``).

Storage (counted by :func:`outlier_bits`): each outlier's flat index as int32 (32 bits), its sign (1 bit,
packed) and the float32 magnitudes (2, or one per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, InputError, check_finite
from ..quantizers.base import Granularity, QTensor, Quantizer

__all__ = ["OUTLIER_BASES", "OUTLIER_SCALES", "OutlierResidual", "outlier_bits", "split_outliers"]

OUTLIER_BASES = ("clip", "plain")
OUTLIER_SCALES = ("sign", "row")


@dataclass(frozen=True)
class OutlierResidual:
    """A sparse binary-valued residual.

    Attributes:
        index: int64 ``(n,)`` flat positions (row-major over the oriented weight), sorted.
        negative: bool ``(n,)`` whether each value is negative.
        scale: float32 magnitudes: ``(2,)`` = ``(s_+, s_-)`` for ``"sign"``, ``(rows,)`` for ``"row"``.
        kind: ``"sign"`` or ``"row"``.
        shape: the weight's oriented shape.
    """

    index: torch.Tensor
    negative: torch.Tensor
    scale: torch.Tensor
    kind: str
    shape: tuple[int, ...]

    def values(self) -> torch.Tensor:
        """The ``n`` residual values ``sign_i s_{g(i)}`` (float32)."""
        if self.kind == "sign":
            mag = torch.where(self.negative, self.scale[1], self.scale[0])
        else:
            cols = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
            mag = self.scale[self.index // cols]
        return torch.where(self.negative, -mag, mag)

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (float32, the weight's shape) plus the residual."""
        flat = w.reshape(-1).index_add(0, self.index.to(w.device), self.values().to(w.device))
        return flat.reshape(w.shape)


def outlier_bits(n: int, kind: str, rows: int) -> int:
    """Storage bits of ``n`` outliers: 32-bit index + 1 sign bit each, plus 32 bits per magnitude."""
    return 33 * n + 32 * (2 if kind == "sign" else rows)


def split_outliers(
    weight: torch.Tensor,
    quantizer: Quantizer,
    fraction: float,
    *,
    granularity: str | Granularity = "channel",
    base: str = "clip",
    scale: str = "sign",
    name: str = "weight",
    scale_dtype: str | torch.dtype = torch.float32,
) -> tuple[QTensor, OutlierResidual]:
    """The bulk ``B`` (a :class:`QTensor`) and the outlier residual ``S`` of ``weight`` (module docstring).

    Args:
        weight: float tensor in ``(out, in, *kernel)`` layout (not modified).
        quantizer: the bulk's rule.
        fraction: ``F`` in ``(0, 0.5]``.
        granularity: the bulk's granularity.
        base: ``"clip"`` or ``"plain"``.
        scale: ``"sign"`` or ``"row"``.
        name: for messages.
        scale_dtype: the bulk's scale storage dtype.

    Raises:
        ConfigError: a fraction, base or scale kind out of range.
        InputError: an empty, non-floating or non-finite weight.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 0.5:
        raise ConfigError(f"'{name}': outlier fraction must be a number in (0, 0.5], got {fraction!r}")
    if base not in OUTLIER_BASES:
        raise ConfigError(f"'{name}': outlier base must be one of {', '.join(OUTLIER_BASES)}, got {base!r}")
    if scale not in OUTLIER_SCALES:
        raise ConfigError(f"'{name}': outlier scale must be one of {', '.join(OUTLIER_SCALES)}, got {scale!r}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        raise InputError(f"'{name}': weight must be a non-empty floating-point tensor")
    check_finite(weight, name)
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    flat = w.reshape(-1)
    n = max(1, min(flat.numel() - 1, round(fraction * flat.numel()))) if flat.numel() > 1 else 0
    mag = flat.abs()
    idx = torch.sort(torch.topk(mag, n, sorted=False).indices).values if n else torch.zeros(0, dtype=torch.int64)
    if base == "clip" and n:
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[idx] = False
        t = float(mag[keep].max())
        target = w.clamp(-t, t)
    else:
        target = w
    bulk = quantizer.quantize(target, granularity, name=name, scale_dtype=scale_dtype)
    res = (w - bulk.dequantize(torch.float32)).reshape(-1)[idx]
    negative = res < 0
    if scale == "sign":
        pos, neg = res[~negative], -res[negative]
        s = torch.stack(
            [pos.mean() if pos.numel() else torch.tensor(0.0), neg.mean() if neg.numel() else torch.tensor(0.0)]
        )
    else:
        rows = w.shape[0] if w.dim() else 1
        cols = flat.numel() // rows
        r = idx // cols
        tot = torch.zeros(rows).index_add(0, r, res.abs())
        cnt = torch.zeros(rows).index_add(0, r, torch.ones_like(res))
        s = torch.where(cnt > 0, tot / cnt.clamp_min(1), torch.zeros_like(tot))
    return bulk, OutlierResidual(idx, negative, s.to(torch.float32), scale, tuple(w.shape))
