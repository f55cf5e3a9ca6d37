"""Outlier residual: the bulk of a weight at ``b`` bits plus a sparse binary-valued residual on its largest
weights.

Pure tensor math. Reference: the outlier mode of E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "REx: Data-Free
Residual Quantization Error Expansion", NeurIPS 2023 (a sparse expansion order holding only the largest
weights, for transformer weights whose ranges are set by a few outliers).

The outliers ``O`` (``select``):

* ``"global"`` (default): the ``n = round(F numel)`` largest ``|W|`` of the tensor; every row is clipped at
  ``t``, the largest ``|W|`` outside ``O``;
* ``"row"``: in every output channel (row of the oriented weight) its ``k = max(1, round(F cols))`` largest
  ``|W|``; the row's bulk is clipped at ``t_r``, the largest ``|W|`` of the row outside ``O``.

The bulk is ``B = Q(clamp(W, -t, t))`` (``base="clip"``: the outliers no longer set the ranges of their rows)
or ``B = Q(W)`` (``base="plain"``). The residual ``R = W - B`` is kept on ``O`` only, binary-valued::

    S_i = sign(R_i) s_{g(i)}   (i in O),     W ~ B + S,

with the least-squares magnitudes (means of ``|R_i|``) per group ``g``: per row and sign (``scale="row-sign"``,
the default), per sign (``"sign"``) or per row (``"row"``).

Which selection: the tensor's largest weights concentrate where the ranges need them (MiniLM, minmax W3 per
channel, 0.2 %, STS-B Spearman, float 82.03: no outliers 9.32, ``global`` 77.73, ``row`` 35.71), but a row that
holds many of them of very different sizes gets one magnitude per sign for all, and in a language model those
largest weights must stay nearly exact: SmolLM2-135M, minmax W4 per channel, 0.2 %, 4 WikiText-2 windows (float
21.19): no outliers 150.7, ``row`` 79.1 (about one outlier per row and sign, so its magnitude is its own),
``global`` 5.1e5 (3 binary orders on the same positions still 5.5e4; the same positions stored exactly, 75.7).

Storage (counted by :func:`outlier_bits`): each outlier's flat index as int32 (32 bits), its sign (1 bit,
packed) and the float32 magnitudes (2, one per row, or two per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfquant.errors import ConfigError, InputError, check_finite
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor

__all__ = [
    "OUTLIER_BASES",
    "OUTLIER_SCALES",
    "OUTLIER_SELECTS",
    "OutlierResidual",
    "outlier_bits",
    "scale_count",
    "split_outliers",
]

OUTLIER_BASES = ("clip", "plain")
OUTLIER_SCALES = ("row-sign", "sign", "row")
OUTLIER_SELECTS = ("global", "row")


@dataclass(frozen=True)
class OutlierResidual:
    """A sparse binary-valued residual.

    Attributes:
        index: int64 ``(n,)`` flat positions (row-major over the oriented weight), sorted.
        negative: bool ``(n,)`` whether each value is negative.
        scale: float32 magnitudes: ``(2,)`` = ``(s_+, s_-)`` for ``"sign"``, ``(rows,)`` for ``"row"``,
            ``(2 rows,)`` = ``(s_+, s_-)`` of row 0, of row 1, ... for ``"row-sign"``.
        kind: ``"row-sign"``, ``"sign"`` or ``"row"``.
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
            row = self.index // cols
            mag = self.scale[row] if self.kind == "row" else self.scale[2 * row + self.negative.to(torch.int64)]
        return torch.where(self.negative, -mag, mag)

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (float32, the weight's shape) plus the residual."""
        flat = w.reshape(-1).index_add(0, self.index.to(w.device), self.values().to(w.device))
        return flat.reshape(w.shape)


def scale_count(kind: str, rows: int) -> int:
    """Number of magnitudes a residual of ``kind`` stores for a weight of ``rows`` output channels."""
    return {"sign": 2, "row": rows, "row-sign": 2 * rows}[kind]


def outlier_bits(n: int, kind: str, rows: int) -> int:
    """Storage bits of ``n`` outliers: 32-bit index + 1 sign bit each, plus 32 bits per magnitude."""
    return 33 * n + 32 * scale_count(kind, rows)


def split_outliers(
    weight: torch.Tensor,
    quantizer: Quantizer,
    fraction: float,
    *,
    granularity: str | Granularity = "channel",
    base: str = "clip",
    scale: str = "row-sign",
    select: str = "global",
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
        scale: ``"row-sign"``, ``"sign"`` or ``"row"``.
        select: ``"global"`` (the tensor's largest; default) or ``"row"`` (each row's largest).
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
    if select not in OUTLIER_SELECTS:
        raise ConfigError(f"'{name}': outlier selection must be one of {', '.join(OUTLIER_SELECTS)}, got {select!r}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        raise InputError(f"'{name}': weight must be a non-empty floating-point tensor")
    check_finite(weight, name)
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    flat = w.reshape(-1)
    rows = w.shape[0] if w.dim() else 1
    cols = flat.numel() // rows
    mag = flat.abs()
    if select == "row" and cols > 1:
        k = max(1, min(cols - 1, round(fraction * cols)))
        m2 = mag.reshape(rows, cols)
        top = torch.topk(m2, k, dim=1, sorted=False).indices
        idx = torch.sort((top + torch.arange(rows)[:, None] * cols).reshape(-1)).values
        keep = torch.ones_like(m2, dtype=torch.bool).scatter_(1, top, False)
        t_row = torch.where(keep, m2, torch.zeros_like(m2)).amax(dim=1)
        t = t_row.reshape(rows, *([1] * (w.dim() - 1))) if w.dim() > 1 else t_row
    elif flat.numel() > 1:
        n = max(1, min(flat.numel() - 1, round(fraction * flat.numel())))
        idx = torch.sort(torch.topk(mag, n, sorted=False).indices).values
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[idx] = False
        t = mag[keep].max()
    else:
        idx = torch.zeros(0, dtype=torch.int64)
        t = None
    target = torch.maximum(torch.minimum(w, t), -t) if base == "clip" and t is not None and idx.numel() else w
    bulk = quantizer.quantize(target, granularity, name=name, scale_dtype=scale_dtype)
    res = (w - bulk.dequantize(torch.float32)).reshape(-1)[idx]
    negative = res < 0
    if scale == "sign":
        pos, neg = res[~negative], -res[negative]
        s = torch.stack(
            [pos.mean() if pos.numel() else torch.tensor(0.0), neg.mean() if neg.numel() else torch.tensor(0.0)]
        )
    else:
        # per row ("row") or per row and sign ("row-sign"): bucket = row, or 2 row + [negative]
        r = idx // cols
        bucket = r if scale == "row" else 2 * r + negative.to(torch.int64)
        size = scale_count(scale, rows)
        tot = torch.zeros(size).index_add(0, bucket, res.abs())
        cnt = torch.zeros(size).index_add(0, bucket, torch.ones_like(res))
        s = torch.where(cnt > 0, tot / cnt.clamp_min(1), torch.zeros_like(tot))
    return bulk, OutlierResidual(idx, negative, s.to(torch.float32), scale, tuple(w.shape))
