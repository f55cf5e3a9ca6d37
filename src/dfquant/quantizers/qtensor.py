"""The quantized tensor (:class:`QTensor`: codes, per-group scale and offset, levels) and the row layout every
rule shares: :func:`to_rows` / :func:`from_rows` view a tensor as ``(rows, n)`` at a granularity, and
:func:`group_batches` cuts rows into batches of equal-length groups. Scales may be stored in the dtypes of
:data:`SCALE_DTYPES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dfquant.errors import ConfigError
from dfquant.quantizers.codes import decode_codes
from dfquant.quantizers.granularity import Granularity


@dataclass
class QTensor:
    """A quantized tensor: integer codes plus per-group scale/offset and levels.

    Codes are stored unpacked (uint8, one per element) in row layout ``(rows, n)``;
    :mod:`dfquant.quantizers.packing` packs
    them to ``bits`` per code for files. ``levels`` is ``(L,)`` (one table for every group) or ``(T, L)`` (a few
    tables, e.g. the Gaussian and Laplace Lloyd-Max levels plus one per fallback group) with ``table_index``
    ``(rows, groups_per_row)`` naming each group's table; ``scale`` and ``offset`` are ``(rows, groups_per_row)``
    (``offset`` is None when all offsets are zero).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    levels: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    granularity: Granularity
    dtype: torch.dtype
    quantizer: str
    grid: str
    info: dict[str, torch.Tensor] = field(default_factory=dict)
    table_index: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_len(self) -> int:
        """Length of a full group (a whole row for tensor/channel granularity)."""
        return self.granularity.group_size or self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct ``levels[code] * scale + offset`` in the original shape (float32 math, cast to ``dtype``,
        by default the original dtype)."""
        vals = decode_codes(self.codes, self.scale, self.offset, self.levels, self.table_index, self.group_len)
        out = from_rows(vals, self.shape, self.granularity)
        return out.to(dtype or self.dtype)

    def storage_bits(self) -> dict[str, int]:
        """Bits needed to store each part: codes at ``bits`` each, float32 scales/offsets, levels when they are
        not a fixed format (codebooks fitted per group, or per tensor)."""
        parts = {
            "codes": self.numel * self.bits,
            "scale": self.scale.numel() * _dtype_bits(self.scale.dtype),
        }
        if self.offset is not None:
            parts["offset"] = self.offset.numel() * _dtype_bits(self.offset.dtype)
        if self.levels.dim() > 1:
            parts["levels"] = self.levels.numel() * _dtype_bits(self.levels.dtype)
            if self.table_index is not None and self.levels.shape[0] > 1:
                parts["table_index"] = self.table_index.numel() * max(1, math.ceil(math.log2(self.levels.shape[0])))
        return parts

    def bits_per_weight(self) -> float:
        """Total storage bits divided by the number of elements (codes + scales + offsets + codebooks)."""
        return sum(self.storage_bits().values()) / max(self.numel, 1)

    def rel_mse(self, reference: torch.Tensor) -> float:
        """``||x_hat - x||^2 / ||x||^2`` (MSE over the mean square of ``reference``), computed where the codes
        are (a rule that fits on the host compares against a copy of a device reference)."""
        ref = reference.to(device=self.codes.device, dtype=torch.float32)
        den = float((ref * ref).sum())
        num = float(((self.dequantize(torch.float32) - ref) ** 2).sum())
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


# ----------------------------------------------------------------------------------------------------------------
# Layout


def to_rows(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """View ``x`` as ``(rows, n)``: one row for per-tensor, else one row per index along ``gran.axis``."""
    if gran.kind == "tensor" or x.dim() == 0:
        return x.reshape(1, -1)
    axis = gran.axis if gran.axis >= 0 else x.dim() + gran.axis
    if not 0 <= axis < x.dim():
        raise ConfigError(f"granularity axis {gran.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).contiguous()


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], gran: Granularity) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    if gran.kind == "tensor" or len(shape) == 0:
        return rows.reshape(shape)
    axis = gran.axis if gran.axis >= 0 else len(shape) + gran.axis
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return rows.reshape(moved).movedim(0, axis)


def group_batches(rows: torch.Tensor, group_size: int | None) -> list[tuple[torch.Tensor, slice]]:
    """Split ``(R, n)`` rows into batches of equal-length groups.

    Returns a list of ``(batch, cols)``: full groups ``(R * n // G, G)`` covering columns ``[0, n//G * G)``, and,
    when ``G`` does not divide ``n``, the tail groups ``(R, n % G)``. With ``group_size=None`` one group per row.
    """
    R, n = rows.shape
    if group_size is None or group_size >= n:
        return [(rows, slice(0, n))]
    nf = n // group_size
    out = []
    if nf:
        out.append((rows[:, : nf * group_size].reshape(R * nf, group_size), slice(0, nf * group_size)))
    if n % group_size:
        out.append((rows[:, nf * group_size :], slice(nf * group_size, n)))
    return out


#: Dtypes per-group scales and offsets may be stored in, by name.
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_scale_dtype(spec: str | torch.dtype) -> torch.dtype:
    """The scale storage dtype named by ``spec`` (a name of :data:`SCALE_DTYPES` or one of its dtypes).

    Raises:
        ConfigError: any other value.
    """
    if isinstance(spec, torch.dtype) and spec in SCALE_DTYPES.values():
        return spec
    if isinstance(spec, str) and spec in SCALE_DTYPES:
        return SCALE_DTYPES[spec]
    raise ConfigError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {spec!r}")
