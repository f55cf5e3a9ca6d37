"""Codes, written once: per-group parameters (:class:`QParams`), encoding to the nearest level and decoding.

* encoding: ``z = (x - offset) / scale``, nearest level (saturating, ties to even); a group whose scale is 0
  (constant or all-zero) decodes exactly to its offset (:func:`constant_groups`);
* decoding: ``x_hat = levels[table][code] * scale + offset`` in float32 (:func:`decode_codes`);
* scales and offsets rounded to their storage dtype (:func:`round_params`), level tables merged
  (:func:`merge_tables`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import cast

import torch
import torch.nn.functional as F

from dfquant.errors import ConfigError, InputError
from dfquant.grids.formats import Grid


@dataclass
class QParams:
    """Fitted parameters of ``m`` equal-length groups.

    Attributes:
        scale: ``(m,)`` float32, >= 0 (0 marks a constant group).
        offset: ``(m,)`` float32.
        levels: unit-scale levels, increasing along the last dim: ``(L,)`` shared by every group, or a stack of
            ``T`` tables ``(T, L)`` with ``table_index`` naming each group's table (``T = m`` and no index: one
            table per group).
        table_index: ``(m,)`` integer index into the tables, or None.
        info: optional per-group float tensors ``(m,)`` for reports (e.g. ``dist``, ``ks_gaussian``).
    """

    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)
    table_index: torch.Tensor | None = None

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tables (T, L), index (m,))`` whatever the form the levels were given in."""
        m = self.scale.shape[0]
        if self.levels.dim() == 1:
            return self.levels[None, :], torch.zeros(m, dtype=torch.int64, device=self.scale.device)
        if self.table_index is None:
            if self.levels.shape[0] != m:
                raise InputError(f"{self.levels.shape[0]} level tables for {m} groups need a table_index")
            return self.levels, torch.arange(m, device=self.scale.device)
        return self.levels, self.table_index.to(torch.int64)


def round_params(
    scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and offsets rounded to their storage ``dtype`` (round to nearest even), returned in that dtype.

    float16 keeps 11 significant bits over about 6e-5..65504 (smaller scales lose precision and may round to
    0, which decodes the group to its offset); bfloat16 keeps 8 bits over the float32 range.

    Raises:
        ConfigError: a finite value that overflows ``dtype``.
    """
    out = []
    for what, t in (("scale", scale), ("offset", offset)):
        r = t.to(dtype)
        if dtype != torch.float32 and not bool(torch.isfinite(r).all()):
            big = float(t.abs().max())
            raise ConfigError(
                f"tensor '{name}': a group {what} of {big:.6g} overflows {str(dtype).removeprefix('torch.')} "
                f"(largest {torch.finfo(dtype).max:.6g}); store scales as bfloat16 or float32"
            )
        out.append(r)
    return out[0], out[1]


def merge_tables(
    parts: list[tuple[torch.Tensor, torch.Tensor, int, int]], R: int, ngr: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine per-batch level tables into one deduplicated stack and an ``(R, ngr)`` index.

    Returns shared ``(L,)`` levels and None when every group uses the same table.
    """
    tables = torch.cat([t for t, _, _, _ in parts])
    index = torch.empty(R, ngr, dtype=torch.int64, device=tables.device)
    base = 0
    for t, idx, g0, g1 in parts:
        index[:, g0:g1] = idx + base
        base += t.shape[0]
    uniq, inverse = torch.unique(tables, dim=0, return_inverse=True)
    used, index = torch.unique(inverse[index], return_inverse=True)  # drop tables no group uses
    uniq = uniq[used]
    if uniq.shape[0] == 1:
        return uniq[0].contiguous(), None
    return uniq.contiguous(), index


def gather_levels(levels: torch.Tensor, table_index: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """Unit levels of ``(R, ngr, G)`` codes: ``levels[code]`` or ``levels[table_index[r, g], code]`` (float32)."""
    lv = levels.to(torch.float32)
    if lv.dim() == 1:
        return lv[codes]
    if table_index is None:
        raise InputError("stacked level tables need a table index")
    return lv[table_index.to(torch.int64)[..., None], codes]


#: Largest decode table (``rows * groups * L`` entries) indexed with int32 rather than int64 offsets.
_INT32_INDEX_LIMIT = 2**31 - 1
#: :func:`decode_codes` builds the per-group decode table when it has at most this many entries per code
#: (``L <= ratio * group_len``; measured on one CPU core: the table is faster for ``group_len >= 3L``, the
#: direct gather for ``group_len <= 2L``).
_TABLE_RATIO = 0.5


def decode_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    levels: torch.Tensor,
    table_index: torch.Tensor | None,
    group_len: int,
    *,
    from_zero: bool = False,
) -> torch.Tensor:
    """Decode ``(R, n)`` uint8 codes in groups of ``group_len``: float32 ``(R, n)`` values
    ``x[r, j] = levels[t[r, g]][code[r, j]] * scale[r, g] + offset[r, g]`` with ``g = j // group_len``.

    Float32 math, the product rounded, then the sum (what :meth:`QTensor.dequantize` returns; packed layers
    decode with it too), computed in one of two orders chosen by size, both evaluating exactly that expression
    for every element:

    * ``2 L <= group_len`` (codes outnumber levels, the usual case: 16 levels, groups of 64): the decode table
      ``D[r, g, c] = levels[t[r, g]][c] * scale[r, g] + offset[r, g]`` of ``R * groups * L`` entries, then one
      gather ``x[r, j] = D[r, g, code[r, j]]`` through int32 offsets ``(r * groups + g) * L + code``;
    * else: gather ``levels[t[r, g]][code]`` (offsets ``t * L + code``), then scale and shift in place.

    Args:
        codes: uint8 ``(R, n)``. scale, offset: ``(R, groups)`` in any float dtype (read as float32); offset
            None means zero. levels: float32 ``(L,)`` or stacked ``(T, L)``. table_index: ``(R, groups)``
            integer table of each group (stacked levels only).
        group_len: elements per group (the last group of a row may be shorter: ``groups * group_len >= n``).
        from_zero: return ``0.0 + x`` (what a sum started from a zero tensor holds after this term: ``-0.0``
            becomes ``+0.0``), added to the table rather than to the values.

    Raises:
        InputError: stacked levels without a table index.
    """
    R, n = codes.shape
    ngr = scale.shape[1]
    L = int(levels.shape[-1])
    lv = levels.to(torch.float32)
    s = scale.to(torch.float32)[..., None]
    off = None if offset is None else offset.to(torch.float32)[..., None]
    if lv.dim() > 1 and table_index is None:
        raise InputError("stacked level tables need a table index")
    pad = ngr * group_len - n
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(R, ngr, group_len)
    # Offsets are built as codes.to(int) followed by an in-place add of the per-group base: a mixed-dtype
    # broadcast add (uint8 + int32) takes a slow non-vectorized path, several times the cost of the two steps.
    if L / group_len <= _TABLE_RATIO:
        if lv.dim() == 1:
            table = lv
        else:
            tix = cast(torch.Tensor, table_index).to(device=lv.device, dtype=torch.int64).reshape(-1)
            table = lv.index_select(0, tix).view(R, ngr, L)
        dec = table * s  # (R, ngr, L)
        if off is not None:
            dec = dec + off
        if from_zero:
            dec = dec + 0.0
        itype = torch.int32 if dec.numel() <= _INT32_INDEX_LIMIT else torch.int64
        base = torch.arange(R * ngr, dtype=itype, device=codes.device).view(R, ngr, 1) * L
        idx = codes.to(itype).add_(base)
        vals = dec.reshape(-1).index_select(0, idx.view(-1))
    else:
        itype = torch.int32 if lv.numel() <= _INT32_INDEX_LIMIT else torch.int64
        idx = codes.to(itype)
        if lv.dim() > 1:
            idx.add_((cast(torch.Tensor, table_index).to(itype) * L)[..., None])
        vals = lv.reshape(-1).index_select(0, idx.view(-1)).view(R, ngr, group_len)
        vals.mul_(s)
        if off is not None:
            vals.add_(off)
        if from_zero:
            vals.add_(0.0)
    vals = vals.view(R, ngr * group_len)
    return vals[:, :n] if pad else vals


def encode_rows(
    rows: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    levels: torch.Tensor,
    glen: int,
    table_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of ``(R, n)`` rows given per-group ``(R, ngr)`` scale/offset and shared or stacked levels."""
    R, n = rows.shape
    ngr = scale.shape[1]
    pad = ngr * glen - n
    xp = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
    xp = xp.reshape(R, ngr, glen)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    z = (xp - offset[..., None]) * inv[..., None]
    if levels.dim() == 1:
        codes = _encode_nearest(z, levels)
    else:
        if table_index is None:
            raise InputError("stacked level tables need a table index")
        tab_mids = (levels[:, :-1] + levels[:, 1:]) * 0.5
        mids = tab_mids[table_index.to(torch.int64)]  # (R, ngr, L-1)
        codes = torch.searchsorted(mids.reshape(R * ngr, -1).contiguous(), z.reshape(R * ngr, glen).contiguous())
        codes = codes.reshape(R, ngr, glen).to(torch.uint8)
    return codes.reshape(R, ngr * glen)[:, :n].contiguous()


_GRID_CACHE: dict[tuple[float, ...], Grid] = {}


def _encode_nearest(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level codes on a shared level list, through a cached :class:`Grid` (saturating, ties to even)."""
    key = tuple(float(v) for v in levels.tolist())
    grid = _GRID_CACHE.get(key)
    if grid is None:
        bits = max(1, math.ceil(math.log2(max(len(key), 2))))
        grid = Grid("levels", "codebook", "codebook", bits, key)
        if len(_GRID_CACHE) > 256:
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = grid
    return grid.encode(z)


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def constant_groups(x: torch.Tensor, params: QParams) -> QParams:
    """Make groups with zero spread exact: scale 0 and offset = the constant value.

    Their codes then point at the level nearest 0 (or any level: ``level * 0 + offset = offset``).
    """
    lo = x.amin(dim=1)
    hi = x.amax(dim=1)
    flat = hi == lo
    if not bool(flat.any()):
        return params
    return replace(
        params,
        scale=torch.where(flat, torch.zeros_like(params.scale), params.scale),
        offset=torch.where(flat, lo, params.offset),
    )
