"""The quantizer contract, written once: layout (tensor / channel / group), encode, decode, QTensor.

A quantizer is a named, stateless rule. Its only job is :meth:`Quantizer.fit`: given ``m`` groups of equal length
as a float32 ``(m, g)`` matrix, return per-group ``scale``, ``offset`` and the unit-scale levels (one grid shared
by all groups, or one codebook per group). Everything else lives here:

* layout: the tensor is viewed as rows (one row for per-tensor, one per channel along ``axis`` otherwise), each
  row split into groups of ``group_size`` (the last group of a row may be shorter: it is fitted on its true
  elements, as a second batch of equal-length groups);
* encoding: ``z = (x - offset) / scale``, nearest level (saturating, ties to even); a group whose scale is 0
  (constant or all-zero) decodes exactly to its offset;
* decoding: ``x_hat = levels[code] * scale + offset``.

The caller's tensor is never modified; all statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, check_finite
from ..grids import Grid

GranularityKind = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class Granularity:
    """Where scales are shared: the whole tensor, each channel along ``axis``, or groups of ``group_size``
    consecutive elements within each channel's row.

    Parse from text with :meth:`parse`: ``"tensor"``, ``"channel"`` (axis 0), ``"channel:1"``, ``"group:64"``
    (groups of 64 along each output channel's flattened row), ``"group:64:1"`` (rows along axis 1).
    """

    kind: GranularityKind = "channel"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "channel", "group"):
            raise ConfigError(f"granularity must be 'tensor', 'channel' or 'group:G', got '{self.kind}'")
        if self.kind == "group" and (self.group_size is None or self.group_size < 1):
            raise ConfigError(f"group granularity needs a group size >= 1, got {self.group_size}")
        if self.kind != "group" and self.group_size is not None:
            raise ConfigError(f"granularity '{self.kind}' takes no group size")

    @classmethod
    def parse(cls, spec: str | Granularity) -> Granularity:
        """Parse ``tensor``, ``channel[:AXIS]`` or ``group:G[:AXIS]``."""
        if isinstance(spec, Granularity):
            return spec
        parts = str(spec).strip().lower().split(":")
        try:
            if parts[0] in ("tensor", "per-tensor") and len(parts) == 1:
                return cls("tensor")
            if parts[0] in ("channel", "per-channel") and len(parts) <= 2:
                return cls("channel", int(parts[1]) if len(parts) == 2 else 0)
            if parts[0] == "group" and len(parts) in (2, 3):
                return cls("group", int(parts[2]) if len(parts) == 3 else 0, int(parts[1]))
        except ValueError:
            pass
        raise ConfigError(f"granularity '{spec}' not understood; allowed: tensor, channel[:AXIS], group:G[:AXIS]")

    def __str__(self) -> str:
        if self.kind == "tensor":
            return "tensor"
        suffix = f":{self.axis}" if self.axis else ""
        return f"channel{suffix}" if self.kind == "channel" else f"group:{self.group_size}{suffix}"


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
            return self.levels[None, :], torch.zeros(m, dtype=torch.int64)
        if self.table_index is None:
            if self.levels.shape[0] != m:
                raise InputError(f"{self.levels.shape[0]} level tables for {m} groups need a table_index")
            return self.levels, torch.arange(m)
        return self.levels, self.table_index.to(torch.int64)


@dataclass
class QTensor:
    """A quantized tensor: integer codes plus per-group scale/offset and levels.

    Codes are stored unpacked (uint8, one per element) in row layout ``(rows, n)``; :mod:`dfquant.packing` packs
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
        """``||x_hat - x||^2 / ||x||^2`` (MSE over the mean square of ``reference``)."""
        ref = reference.to(torch.float32)
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


# ----------------------------------------------------------------------------------------------------------------
# Quantizer


#: Values of the ``weighting`` option of rules that take importance weights.
WEIGHTINGS = ("none", "input-variance")


class Quantizer(ABC):
    """A named rule that fits per-group scale/offset/levels for a tensor.

    Subclasses set :attr:`name`, may restrict :attr:`supported_bits`, and implement :meth:`fit`. Optionally they
    implement :meth:`expected_mse` (the error model: expected MSE for a unit-variance Gaussian or Laplace source)
    and :meth:`unit_levels` (the levels used for a unit-variance source, where they are fixed).

    Args:
        bits: code bits.
        **options: rule-specific options (validated by the subclass; unknown ones raise ConfigError).
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 9))
    options_allowed: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: Whether the rule can minimize an importance-weighted squared error (:meth:`fit_weighted`).
    supports_importance: ClassVar[bool] = False

    def __init__(self, bits: int, **options: Any) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.supported_bits:
            allowed = ", ".join(str(b) for b in self.supported_bits)
            raise ConfigError(f"quantizer '{self.name}' supports bits in {{{allowed}}}, got {bits!r}")
        unknown = sorted(set(options) - set(self.options_allowed))
        if unknown:
            allowed_opts = ", ".join(self.options_allowed) or "none"
            raise ConfigError(f"quantizer '{self.name}' got unknown option(s) {unknown}; allowed: {allowed_opts}")
        self.bits = bits
        self.options = dict(options)
        #: ``"input-variance"``: the rule minimizes the importance-weighted error the pipeline supplies (only
        #: for rules that set :attr:`supports_importance`, which then accept the ``weighting`` option).
        self.weighting = "none"
        if self.supports_importance:
            weighting = self.options.get("weighting", "none")
            if weighting not in WEIGHTINGS:
                raise ConfigError(
                    f"quantizer '{self.name}': weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}"
                )
            self.weighting = str(weighting)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{type(self).__name__}(bits={self.bits}{opts})"

    # -- to implement -------------------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, x: torch.Tensor) -> QParams:
        """Fit ``m`` groups given as a finite float32 ``(m, g)`` matrix; return their :class:`QParams`."""

    def fit_weighted(self, x: torch.Tensor, importance: torch.Tensor) -> QParams:
        """Fit ``m`` groups minimizing ``sum_i importance_i (x_i - x_hat_i)^2`` (``importance``: non-negative,
        the shape of ``x``). Implemented by rules that set :attr:`supports_importance`."""
        raise ConfigError(f"quantizer '{self.name}' takes no importance weights")

    @property
    def wants_importance(self) -> bool:
        """Whether this configured rule asks the pipeline for importance weights of the weight's elements
        (:func:`dfquant.api.quantize_model` supplies them where the layer's input statistics are known): rules
        that support them, configured with ``weighting="input-variance"``."""
        return self.supports_importance and self.weighting != "none"

    @property
    def grid(self) -> Grid | None:
        """The fixed grid this rule encodes on, or None when levels are fitted per group."""
        return None

    @property
    def grid_name(self) -> str:
        g = self.grid
        return g.name if g is not None else f"{self.name}{self.bits}"

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """Expected squared error for a unit-variance ``dist`` source, in groups of ``group_size`` samples where
        the rule's clip depends on the sample (None: the population limit). Raise NotImplementedError when the
        rule has no error model."""
        raise NotImplementedError(f"quantizer '{self.name}' has no error model")

    def unit_levels(self, dist: str, group_size: int | None = None) -> torch.Tensor | None:
        """The levels (at scale, i.e. in units of the source's standard deviation) this rule uses for a
        unit-variance ``dist`` source, or None when they depend on the sample."""
        return None

    # -- written once -------------------------------------------------------------------------------------------
    def quantize(
        self,
        x: torch.Tensor,
        granularity: str | Granularity = "channel",
        name: str = "tensor",
        *,
        scale_dtype: str | torch.dtype = torch.float32,
        importance: torch.Tensor | None = None,
    ) -> QTensor:
        """Quantize ``x`` at ``granularity``.

        Args:
            x: float tensor (float32, float16 or bfloat16), not modified.
            granularity: see :class:`Granularity`.
            name: the tensor's name, used in error messages.
            scale_dtype: the dtype per-group scales and offsets are stored in (see :data:`SCALE_DTYPES`). The
                fitted scales and offsets are rounded to it *before* encoding, so the codes are chosen for the
                values that are stored and ``dequantize`` gives exactly what a saved file decodes to; the
                returned ``QTensor`` holds them in that dtype (and counts their bits accordingly).
            importance: optional non-negative weights of ``x``'s elements (same shape): the rule then
                minimizes the weighted squared error (:meth:`fit_weighted`; only rules that set
                :attr:`supports_importance`).

        Returns:
            A :class:`QTensor`.

        Raises:
            InputError: empty, non-floating or non-finite input.
            ConfigError: a granularity that does not fit the tensor, an unknown ``scale_dtype``, or a scale or
                offset too large for it.
        """
        gran = Granularity.parse(granularity)
        sdtype = parse_scale_dtype(scale_dtype)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"tensor '{name}' must be a floating-point torch.Tensor, got {_describe(x)}")
        if x.numel() == 0:
            raise InputError(f"tensor '{name}' is empty (shape {tuple(x.shape)}); nothing to quantize")
        if gran.kind != "tensor" and x.dim() == 0:
            gran = Granularity("tensor")
        xf = x.detach().to(device="cpu", dtype=torch.float32)
        check_finite(xf, name)
        rows = to_rows(xf, gran)
        R, n = rows.shape
        G = gran.group_size if gran.kind == "group" else None
        glen = G if G is not None and n > G else n
        ngr = -(-n // glen)
        scale = torch.empty(R, ngr)
        offset = torch.empty(R, ngr)
        parts: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        info: dict[str, torch.Tensor] = {}
        split = G if G is not None and n > G else None
        batches = group_batches(rows, split)
        weights = self._importance_batches(importance, x, gran, name, split) or [None] * len(batches)
        for (batch, cols), w in zip(batches, weights, strict=True):
            p = self.fit(batch.contiguous()) if w is None else self.fit_weighted(batch.contiguous(), w)
            g0, g1 = cols.start // glen, -(-cols.stop // glen)
            scale[:, g0:g1] = p.scale.reshape(R, g1 - g0)
            offset[:, g0:g1] = p.offset.reshape(R, g1 - g0)
            tab, idx = p.tables()
            parts.append((tab.to(torch.float32), idx.reshape(R, g1 - g0), g0, g1))
            for k, v in p.info.items():
                info.setdefault(k, torch.empty(R, ngr))[:, g0:g1] = v.reshape(R, g1 - g0).to(torch.float32)
        scale, offset = round_params(scale, offset, sdtype, name)
        levels, table_index = merge_tables(parts, R, ngr)
        codes = self.encode(rows, scale.to(torch.float32), offset.to(torch.float32), levels, glen, table_index)
        off = offset if bool((offset != 0).any()) else None
        return QTensor(
            codes=codes,
            scale=scale,
            offset=off,
            levels=levels,
            bits=self.bits,
            shape=tuple(x.shape),
            granularity=gran,
            dtype=x.dtype,
            quantizer=self.name,
            grid=self.grid_name,
            info=info,
            table_index=table_index,
        )

    def encode(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        levels: torch.Tensor,
        glen: int,
        table_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Codes of ``(R, n)`` rows for the fitted float32 ``(R, ngr)`` scales/offsets: those of
        :func:`encode_rows`, by lookup table (:func:`dfquant.quantizers.encoding.encode_rows_fast`). A rule may
        override it with its own exact encoder."""
        from .encoding import encode_rows_fast  # encoding builds on encode_rows below

        return encode_rows_fast(rows, scale, offset, levels, glen, table_index)

    def _importance_batches(
        self,
        importance: torch.Tensor | None,
        x: torch.Tensor,
        gran: Granularity,
        name: str,
        split: int | None,
    ) -> list[torch.Tensor | None] | None:
        """The importance weights laid out in the batches of :func:`group_batches`, after checks."""
        if importance is None:
            return None
        if not self.supports_importance:
            raise ConfigError(f"quantizer '{self.name}' takes no importance weights")
        if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != tuple(x.shape):
            raise InputError(
                f"importance weights of tensor '{name}' must be a tensor of shape {tuple(x.shape)}, got "
                f"{_describe(importance)}"
            )
        imp = importance.detach().to(device="cpu", dtype=torch.float32)
        check_finite(imp, f"{name} importance")
        if bool((imp < 0).any()):
            raise InputError(f"importance weights of tensor '{name}' must be non-negative")
        return [b.contiguous() for b, _ in group_batches(to_rows(imp, gran), split)]

    def fake_quantize(
        self, x: torch.Tensor, granularity: str | Granularity = "channel", name: str = "tensor"
    ) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype."""
        return self.quantize(x, granularity, name).dequantize()

    def with_options(self, **options: Any) -> Quantizer:
        """A copy of this rule with some options changed."""
        return type(self)(self.bits, **{**self.options, **options})


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
    index = torch.empty(R, ngr, dtype=torch.int64)
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


def _describe(x: object) -> str:
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
