"""Quantized terms: the storage form of a :class:`~dfquant.quantizers.qtensor.QTensor` inside a layer.

A :class:`QuantTerm` holds the codes packed to ``bits`` each (:func:`~dfquant.quantizers.packing.pack`), the
``(rows, groups)`` scale and offset, the levels (one table ``(L,)`` or ``T`` stacked tables with a packed per-group
table index) and its metadata; :func:`term_layout` gives the ``(rows, cols, groups)`` of a shape at a
granularity. The dtypes a layer and a term's scales may have are named here (the names files use).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.quantizers.codes import decode_codes
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.packing import pack, packed_nbytes, unpack
from dfquant.quantizers.qtensor import SCALE_DTYPES, QTensor, from_rows

#: Floating dtypes a layer may have, by name (the names used in files).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


#: Dtypes a term's scales may be stored in: the rule-selectable :data:`SCALE_DTYPES` plus the 8-bit block scales
#: of MXFP4 (E8M0) and NVFP4 (E4M3), which only their rules produce (:mod:`dfquant.quantizers.blockscaled`).
STORED_SCALE_DTYPES: dict[str, torch.dtype] = {
    **SCALE_DTYPES,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e8m0fnu": torch.float8_e8m0fnu,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The file name of a floating dtype (``torch.float32 -> "float32"``)."""
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise InputError(f"dtype {dtype} is not supported; allowed: {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------------------------------------
# Terms


def term_layout(shape: Sequence[int], granularity: str | Granularity) -> tuple[int, int, int]:
    """``(rows, cols, groups_per_row)`` of a tensor of ``shape`` at ``granularity`` (see ``QTensor``).

    Raises:
        ConfigError: an axis out of range for ``shape``.
    """
    gran = Granularity.parse(granularity)
    numel = math.prod(shape)
    if gran.kind == "tensor" or len(shape) == 0:
        rows = 1
    else:
        axis = gran.axis if gran.axis >= 0 else len(shape) + gran.axis
        if not 0 <= axis < len(shape):
            raise ConfigError(f"granularity '{gran}' has axis {gran.axis}, out of range for shape {tuple(shape)}")
        rows = shape[axis]
    cols = numel // rows if rows else 0
    G = gran.group_size if gran.kind == "group" else None
    groups = -(-cols // G) if G is not None and cols > G else 1
    return rows, cols, groups


def index_bits(tables: int) -> int:
    """Bits per table index for ``tables`` level tables: ``max(1, ceil(log2(tables)))`` (as ``QTensor`` counts
    them). Indices of up to 8 bits are stored packed; wider ones as int32."""
    return max(1, math.ceil(math.log2(tables))) if tables > 1 else 0


class QuantTerm(nn.Module):
    """One quantized tensor in storage form.

    Buffers: ``packed`` (codes), ``scale``, ``offset``, ``levels``, ``table_index`` and ``channels`` (the last
    three may be absent).

    Args:
        bits: bits per code (1..8).
        shape: the term's tensor shape (oriented; ``(len(channels), ...)`` for a channel-subset term).
        granularity: granularity text (``"channel"``, ``"group:64"``, ...).
        quantizer: the registered quantizer name that made it.
        grid: the grid's name (informational; the levels are stored).
        packed: uint8 ``(ceil(numel * bits / 8),)`` packed codes in row layout.
        scale: ``(rows, groups)``, float32, float16 or bfloat16 (the storage dtype, see
            :data:`~dfquant.quantizers.qtensor.SCALE_DTYPES`).
        offset: ``(rows, groups)`` in the scale's dtype, or None (all zero).
        levels: float32 ``(L,)`` shared by every group, or a stack of ``T`` tables ``(T, L)``.
        table_index: for stacked levels, each group's table: a uint8 stream of ``rows * groups`` indices
            packed at :func:`index_bits` each, or int32 ``(rows, groups)`` when that exceeds 8 bits; None for
            shared levels.
        channels: int64 ``(k,)`` output-channel indices this term covers, or None (all).
        options: the quantizer options used (recorded in files).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    levels: torch.Tensor
    table_index: torch.Tensor | None
    channels: torch.Tensor | None

    def __init__(
        self,
        *,
        bits: int,
        shape: Sequence[int],
        granularity: str,
        quantizer: str,
        grid: str,
        packed: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        levels: torch.Tensor,
        table_index: torch.Tensor | None = None,
        channels: torch.Tensor | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.bits = int(bits)
        self.shape = tuple(int(s) for s in shape)
        self.granularity = Granularity.parse(granularity)  # parsed once; files hold its text form
        self.quantizer = quantizer
        self.grid = grid
        self.options = dict(options or {})
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("levels", levels)
        self.register_buffer("table_index", table_index)
        self.register_buffer("channels", channels)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype scales and offsets are stored in."""
        return self.scale.dtype

    @property
    def num_tables(self) -> int:
        """Number of level tables (1 for shared levels)."""
        return 1 if self.levels.dim() == 1 else int(self.levels.shape[0])

    @classmethod
    def from_qtensor(
        cls,
        qt: QTensor,
        *,
        options: Mapping[str, Any] | None = None,
        channels: torch.Tensor | None = None,
    ) -> QuantTerm:
        """Pack a :class:`QTensor` (codes packed at ``qt.bits``; scales and offsets in their dtype when it is
        a scale storage dtype and both share it, else float32; levels as float32).

        Args:
            qt: the quantized tensor, in oriented layout.
            options: the quantizer options that produced it (recorded in files).
            channels: output-channel indices when ``qt`` covers only those rows of the weight.

        Raises:
            InputError: levels of an unknown form, or channels that do not match the term's rows.
        """
        ch = None
        if channels is not None:
            ch = channels.detach().to(torch.int64).reshape(-1).clone()
            if ch.numel() != qt.shape[0]:
                raise InputError(f"a term of shape {qt.shape} cannot cover {ch.numel()} channels")
        levels = qt.levels.detach().to(torch.float32).contiguous().clone()
        sdt = qt.scale.dtype
        if sdt not in STORED_SCALE_DTYPES.values() or (qt.offset is not None and qt.offset.dtype != sdt):
            sdt = torch.float32  # exact: every storage dtype converts to float32 without loss
        index = None
        if levels.dim() == 2:
            rows, groups = qt.scale.shape
            tables = levels.shape[0]
            idx = qt.table_index
            if idx is None:
                if tables != rows * groups:
                    raise InputError(f"{tables} level tables for {rows * groups} groups need a table index")
                idx = torch.arange(tables).reshape(rows, groups)
            index = _store_index(idx.reshape(rows, groups), tables)
        elif levels.dim() != 1:
            raise InputError(f"levels must be (L,) or (T, L), got shape {tuple(levels.shape)}")
        return cls(
            bits=qt.bits,
            shape=qt.shape,
            granularity=str(qt.granularity),
            quantizer=qt.quantizer,
            grid=qt.grid,
            packed=pack(qt.codes, qt.bits),
            scale=qt.scale.detach().to(sdt).contiguous().clone(),
            offset=None if qt.offset is None else qt.offset.detach().to(sdt).contiguous().clone(),
            levels=levels,
            table_index=index,
            channels=ch,
            options=options,
        )

    def table_indices(self) -> torch.Tensor | None:
        """Each group's table, int64 ``(rows, groups)``, or None for shared levels."""
        if self.table_index is None:
            return None
        rows, groups = self.scale.shape
        if self.table_index.dtype == torch.uint8:
            flat = unpack(self.table_index.cpu(), index_bits(self.num_tables), rows * groups)
            return flat.to(torch.int64).reshape(rows, groups).to(self.scale.device)
        return self.table_index.to(torch.int64).reshape(rows, groups)

    def to_qtensor(self, dtype: torch.dtype = torch.float32) -> QTensor:
        """Unpack into a :class:`QTensor` (codes ``(rows, cols)`` uint8) whose ``dequantize`` gives
        ``dtype``."""
        rows, cols, _ = term_layout(self.shape, self.granularity)
        codes = unpack(self.packed, self.bits, self.numel).view(rows, cols).to(self.scale.device)
        return QTensor(
            codes=codes,
            scale=self.scale,
            offset=self.offset,
            levels=self.levels,
            bits=self.bits,
            shape=self.shape,
            granularity=self.granularity,
            dtype=dtype,
            quantizer=self.quantizer,
            grid=self.grid,
            table_index=self.table_indices(),
        )

    def dequantize(self) -> torch.Tensor:
        """The term's values, float32, in its own shape (``levels[table][code] * scale + offset``).

        Decoded straight from the packed codes (:func:`decode_codes`), bit for bit the values of
        ``to_qtensor().dequantize(torch.float32)``.
        """
        return self._decode(from_zero=False)

    def _decode(self, *, from_zero: bool) -> torch.Tensor:
        """:meth:`dequantize`, or ``0 + dequantize()`` (``from_zero``: the first step of a sum started from a
        zero tensor, which turns ``-0.0`` into ``+0.0``), applied to the decode table instead of the values."""
        gran = self.granularity
        rows, cols, _ = term_layout(self.shape, gran)
        codes = unpack(self.packed, self.bits, self.numel).view(rows, cols).to(self.scale.device)
        vals = decode_codes(
            codes,
            self.scale,
            self.offset,
            self.levels,
            self.table_indices(),
            gran.group_size or cols,
            from_zero=from_zero,
        )
        return from_rows(vals, self.shape, gran)

    def dequantize_rows(self, rows: torch.Tensor, *, from_zero: bool = False) -> torch.Tensor | None:
        """``dequantize()[rows]`` without decoding the other rows: float32 ``(k, *shape[1:])`` for int64
        indices ``rows`` ``(k,)`` along axis 0 (in range; any order, repeats allowed).

        Exact (same values bit for bit) because every element decodes on its own,
        ``levels[table[r, g]][code] * scale[r, g] + offset[r, g]``, with the parameters of its group: for
        ``channel`` / ``group:G`` granularity along axis 0 a row of the tensor is a row of groups, so the
        selected rows' codes, scales, offsets and table indices are decoded as a smaller term; for ``tensor``
        granularity every row uses the single group's parameters. When ``cols * bits`` is a multiple of 8 each
        row's codes are whole bytes of the stream and only the selected rows are unpacked, else all codes are
        unpacked (not decoded). ``from_zero``: as in :meth:`_decode`.

        Returns:
            The rows' values, or None for a granularity whose rows do not run along axis 0 (``channel:1``,
            ``group:G:1``, ...), which only a full :meth:`dequantize` decodes.
        """
        gran = self.granularity
        if not self.shape or (gran.kind != "tensor" and gran.axis != 0):
            return None
        n0 = self.shape[0]
        cols = self.numel // n0
        rows = rows.to(device=self.packed.device, dtype=torch.int64).reshape(-1)
        k = rows.numel()
        if cols * self.bits % 8 == 0:
            row_bytes = self.packed.view(n0, cols * self.bits // 8).index_select(0, rows)
            codes = unpack(row_bytes, self.bits, k * cols).view(k, cols)
        else:
            codes = unpack(self.packed, self.bits, self.numel).view(n0, cols).index_select(0, rows)
        codes = codes.to(self.scale.device)
        idx = self.table_indices()
        if gran.kind == "tensor":  # one group: every row of the tensor uses its parameters
            scale, offset = self.scale.expand(k, 1), None if self.offset is None else self.offset.expand(k, 1)
            table = None if idx is None else idx.expand(k, 1)
            group_len = cols
        else:
            at = rows.to(self.scale.device)
            scale = self.scale.index_select(0, at)
            offset = None if self.offset is None else self.offset.index_select(0, at)
            table = None if idx is None else idx.index_select(0, at)
            group_len = gran.group_size or cols
        vals = decode_codes(codes, scale, offset, self.levels, table, group_len, from_zero=from_zero)
        return vals.reshape(k, *self.shape[1:])

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32, oriented) plus this term (scattered into its channels for a subset term)."""
        values = self.dequantize()
        if self.channels is None:
            return weight + values
        return weight.index_add(0, self.channels.to(weight.device), values)

    def storage_bits(self) -> int:
        """Bits of this term as :meth:`QTensor.storage_bits` counts them: codes at ``bits``, scales and
        offsets at the bits of their storage dtype (32 or 16), stacked level tables at 32 bits per level plus
        ``index_bits`` per group (shared levels of a fixed format are not counted); channel indices of a
        subset term at 32 bits each."""
        sbits = torch.finfo(self.scale.dtype).bits
        bits = self.numel * self.bits + sbits * self.scale.numel()
        if self.offset is not None:
            bits += sbits * self.offset.numel()
        if self.levels.dim() > 1:
            bits += 32 * self.levels.numel() + index_bits(self.num_tables) * self.scale.numel()
        if self.channels is not None:
            bits += 32 * self.channels.numel()
        return bits

    def nbytes(self) -> int:
        """Bytes of the stored buffers (what a file holds for this term)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def meta(self) -> dict[str, Any]:
        """JSON-ready metadata: everything needed to rebuild empty buffers of the right shapes."""
        return {
            "quantizer": self.quantizer,
            "bits": self.bits,
            "grid": self.grid,
            "granularity": str(self.granularity),
            "shape": list(self.shape),
            "offset": self.offset is not None,
            "scale_dtype": next(k for k, v in STORED_SCALE_DTYPES.items() if v == self.scale.dtype),
            "num_levels": int(self.levels.shape[-1]),
            "num_tables": None if self.levels.dim() == 1 else self.num_tables,
            "channels": None if self.channels is None else int(self.channels.numel()),
            "options": dict(self.options),
        }

    @staticmethod
    def buffer_specs(meta: Mapping[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The ``{buffer name: (dtype, shape)}`` a term with metadata ``meta`` holds (absent buffers omitted).

        Metadata without ``scale_dtype`` (files of format version 1) mean float32 scales and offsets.

        Raises:
            ConfigError: metadata that do not describe a valid term.
        """
        bits = meta["bits"]
        if not is_int(bits) or not 1 <= bits <= 8:
            raise ConfigError(f"bits must be an integer in 1..8, got {bits!r}")
        shape = tuple(meta["shape"])
        if not shape or not all(is_pos_int(s) for s in shape):
            raise ConfigError(f"shape must be a list of positive integers, got {meta['shape']!r}")
        rows, _, groups = term_layout(shape, meta["granularity"])
        L = meta["num_levels"]
        if not is_int(L) or not 1 <= L <= 2**bits:
            raise ConfigError(f"num_levels must be an integer in 1..{2**bits} for {bits} bits, got {L!r}")
        sd_name = meta.get("scale_dtype", "float32")
        sdt = STORED_SCALE_DTYPES.get(sd_name) if isinstance(sd_name, str) else None
        if sdt is None:
            raise ConfigError(f"scale_dtype must be one of {', '.join(STORED_SCALE_DTYPES)}, got {sd_name!r}")
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "packed": (torch.uint8, (packed_nbytes(math.prod(shape), bits),)),
            "scale": (sdt, (rows, groups)),
        }
        if meta["offset"] is True:
            specs["offset"] = (sdt, (rows, groups))
        elif meta["offset"] is not False:
            raise ConfigError(f"offset must be true or false, got {meta['offset']!r}")
        T = meta["num_tables"]
        if T is None:
            specs["levels"] = (torch.float32, (L,))
        elif is_int(T) and 2 <= T <= rows * groups:
            specs["levels"] = (torch.float32, (T, L))
            nb = index_bits(T)
            specs["table_index"] = (
                (torch.uint8, (packed_nbytes(rows * groups, nb),)) if nb <= 8 else (torch.int32, (rows, groups))
            )
        else:
            raise ConfigError(f"num_tables must be null or an integer in 2..{rows * groups}, got {T!r}")
        ch = meta["channels"]
        if ch is not None:
            if not is_int(ch) or ch != shape[0]:
                raise ConfigError(f"channels must equal the term's first dimension {shape[0]}, got {ch!r}")
            specs["channels"] = (torch.int64, (ch,))
        return specs

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> QuantTerm:
        """An empty term (zero buffers of the right dtypes and shapes) to load a state dict into.

        Raises:
            ConfigError: metadata that do not describe a valid term.
        """
        specs = cls.buffer_specs(meta)
        bufs = {k: torch.zeros(shape, dtype=dt) for k, (dt, shape) in specs.items()}
        return cls(
            bits=meta["bits"],
            shape=meta["shape"],
            granularity=meta["granularity"],
            quantizer=meta["quantizer"],
            grid=meta["grid"],
            packed=bufs["packed"],
            scale=bufs["scale"],
            offset=bufs.get("offset"),
            levels=bufs["levels"],
            table_index=bufs.get("table_index"),
            channels=bufs.get("channels"),
            options=meta.get("options") or {},
        )

    def validate(self, full_shape: Sequence[int] | None = None) -> None:
        """Check the stored values: finite scales and levels, scales >= 0, codes within the levels, table
        indices within the tables, channel indices in range and distinct (for a term read from a file).

        Raises:
            InputError: naming what is wrong.
        """
        for key in ("scale", "offset", "levels"):
            t = getattr(self, key)
            if t is not None and not bool(torch.isfinite(t.to(torch.float32)).all()):
                raise InputError(f"term {key} holds NaN or infinite values")
        if bool((self.scale.to(torch.float32) < 0).any()):
            raise InputError("term scale holds negative values")
        n_levels = int(self.levels.shape[-1])
        if n_levels < (1 << self.bits):
            top = int(unpack(self.packed.cpu(), self.bits, self.numel).max())
            if top >= n_levels:
                raise InputError(f"term codes reach {top} but only {n_levels} levels are stored")
        idx = self.table_indices()
        if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_tables):
            raise InputError(f"term table indices fall outside 0..{self.num_tables - 1}")
        if self.channels is not None and full_shape is not None:
            ch = self.channels
            if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= full_shape[0]):
                raise InputError(f"term channel indices fall outside 0..{full_shape[0] - 1}")
            if ch.unique().numel() != ch.numel():
                raise InputError("term channel indices repeat")

    def extra_repr(self) -> str:
        sub = f", channels={self.channels.numel()}" if self.channels is not None else ""
        tables = f", tables={self.num_tables}" if self.levels.dim() > 1 else ""
        return f"{self.quantizer}, bits={self.bits}, shape={self.shape}, granularity={self.granularity}{tables}{sub}"


def _store_index(index: torch.Tensor, tables: int) -> torch.Tensor:
    """Table indices ``(rows, groups)`` in storage form: packed at :func:`index_bits` when that is <= 8, else
    int32."""
    nb = index_bits(tables)
    if nb <= 8:
        return pack(index.to(torch.int64).reshape(-1), nb)
    return index.to(torch.int32).contiguous().clone()


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_pos_int(v: object) -> bool:
    return is_int(v) and v > 0  # type: ignore[operator]
