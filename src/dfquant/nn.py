"""Quantized layers: packed codes plus scales/levels, dequantized on the fly.

A quantized layer holds a *list* of terms and computes with their sum, ``W_hat = sum_k dequantize(term_k)``
(plain post-training quantization is one term; residual expansion adds more). A :class:`QuantTerm` is the
storage form of a :class:`~dfquant.quantizers.base.QTensor`: the codes packed to ``bits`` each
(:func:`dfquant.packing.pack`), the ``(rows, groups)`` scale and offset (float32, or float16/bfloat16 when the
rule asked for it: ``LayerRule.scale_dtype``), the levels (shared ``(L,)``, or
``T`` stacked tables ``(T, L)`` with a packed per-group table index), and metadata (bits, shape,
granularity, quantizer, grid). A term may cover only some output channels (``channels``: their indices along
axis 0), for group-sparse expansions.

Weights are always handled in ``(out, in, *kernel)`` layout ("oriented"): for the Hugging Face ``Conv1D``,
whose parameter is stored transposed as ``(in, out)``, the terms hold the transpose, so granularities and
channel indices mean the same thing for every layer type. An ``nn.Embedding`` table ``(num_embeddings,
embedding_dim)`` is oriented as stored: channel axis 0 is the token (one row of scales per token) and groups
run along the embedding dimension, the same layout as a ``Linear`` output head tied to it.

Memory: a layer built by quantization keeps its dequantized weight after the first forward
(``cache_weight=True``, the constructors' default, for fast evaluation right after quantizing), which makes later
forwards as fast as the float layer but costs the float weight's memory again (32 bits per weight for float32)
on top of the packed codes. With ``cache_weight=False`` (what :func:`dfquant.io.load_quantized` gives by
default) each forward unpacks and decodes the terms (slower at small batches, only the transient weight in
memory; an embedding decodes only the rows it looks up). The
cache is dropped whenever the terms change (loading a state dict, :meth:`QuantModule.add_term`, moving the
module with ``.to()``), or by :meth:`QuantModule.clear_cache`.

Example:
    >>> import torch
    >>> from dfquant import get_quantizer
    >>> lin = torch.nn.Linear(16, 4)
    >>> qt = get_quantizer("minmax", 4).quantize(lin.weight.detach(), "channel")
    >>> q = QuantLinear.from_float(lin, [QuantTerm.from_qtensor(qt)])
    >>> q(torch.randn(2, 16)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError
from .packing import pack, packed_nbytes, unpack
from .quantizers.base import SCALE_DTYPES, Granularity, QTensor, decode_codes, from_rows

__all__ = [
    "DTYPES",
    "QUANT_MODULES",
    "STORED_SCALE_DTYPES",
    "ActQuant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantHFConv1D",
    "QuantLinear",
    "QuantModule",
    "QuantTerm",
    "index_bits",
    "is_hf_conv1d",
    "layer_kind",
    "oriented_weight",
    "register_quant_module",
    "term_layout",
    "weight_of",
]

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
# Float layer types


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2 style linear layer with an ``(in, out)``
    weight).

    Detected by class name and attributes, so ``transformers`` need not be imported: a class named ``Conv1D``
    with an ``nf`` attribute and a 2-D ``weight`` parameter of shape ``(in, nf)``.
    """
    if type(module).__name__ != "Conv1D" or isinstance(module, QuantModule):
        return False
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(nf, int) and w.shape[1] == nf


def layer_kind(module: nn.Module) -> str | None:
    """The quantizable kind of a float layer: ``linear``, ``conv1d``, ``conv2d``, ``hf-conv1d``,
    ``embedding``, or None.

    An ``nn.Embedding`` with ``max_norm`` (which renormalizes looked-up rows of its weight in place) is not
    quantizable.
    """
    if isinstance(module, QuantModule):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else None
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if is_hf_conv1d(module):
        return "hf-conv1d"
    return None


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's ``weight`` tensor as stored.

    Raises:
        InputError: the module has no weight tensor.
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise InputError(f"module {type(module).__name__} has no weight tensor")
    return w


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in ``(out, in, *kernel)`` layout (a transposed view for the HF ``Conv1D``)."""
    w = weight_of(module)
    return w.t() if is_hf_conv1d(module) else w


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
            :data:`~dfquant.quantizers.base.SCALE_DTYPES`).
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
        self.granularity = str(Granularity.parse(granularity))
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
            granularity=Granularity.parse(self.granularity),
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
        gran = Granularity.parse(self.granularity)
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
        gran = Granularity.parse(self.granularity)
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
            "granularity": self.granularity,
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
        if not _is_int(bits) or not 1 <= bits <= 8:
            raise ConfigError(f"bits must be an integer in 1..8, got {bits!r}")
        shape = tuple(meta["shape"])
        if not shape or not all(_is_pos_int(s) for s in shape):
            raise ConfigError(f"shape must be a list of positive integers, got {meta['shape']!r}")
        rows, _, groups = term_layout(shape, meta["granularity"])
        L = meta["num_levels"]
        if not _is_int(L) or not 1 <= L <= 2**bits:
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
        elif _is_int(T) and 2 <= T <= rows * groups:
            specs["levels"] = (torch.float32, (T, L))
            nb = index_bits(T)
            specs["table_index"] = (
                (torch.uint8, (packed_nbytes(rows * groups, nb),)) if nb <= 8 else (torch.int32, (rows, groups))
            )
        else:
            raise ConfigError(f"num_tables must be null or an integer in 2..{rows * groups}, got {T!r}")
        ch = meta["channels"]
        if ch is not None:
            if not _is_int(ch) or ch != shape[0]:
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


# ------------------------------------------------------------------------------------------------------------
# Input quantization (quantization-aware training)


class ActQuant(nn.Module):
    """Fake quantization of a layer's input, applied before the layer computes (quantization-aware training
    records it: :func:`dfquant.qat.convert`; the layer metadata's ``input_quant`` entry).

    Two kinds:

    * static (``block`` None): one per-tensor ``scale`` and the grid's unit ``levels``;
      ``x_hat = nearest_level(x / scale) * scale``;
    * block-scaled (``fmt`` ``mxfp4`` / ``nvfp4``, ``block`` 32 / 16): scales computed from each block of the
      input along ``axis`` at run time (:func:`dfquant.quantizers.blockscaled.fake_quantize_blocks`); for NVFP4
      ``scale`` holds the calibrated FP32 tensor scale ``g``.

    Buffers: ``scale`` float32 ``(1,)`` and ``levels`` float32 ``(L,)``, increasing.

    Args:
        fmt: the grid name (static) or ``mxfp4`` / ``nvfp4``.
        scale: ``(1,)`` scale (static) or NVFP4 tensor scale (1 for MXFP4).
        levels: the unit levels.
        block: block size of a block-scaled format, else None.
        axis: the input dimension blocks run along (1 for convolutions, -1 for linear layers).
    """

    scale: torch.Tensor
    levels: torch.Tensor

    def __init__(
        self, *, fmt: str, scale: torch.Tensor, levels: torch.Tensor, block: int | None = None, axis: int = -1
    ) -> None:
        super().__init__()
        from .quantizers.blockscaled import BLOCK_FORMATS

        if block is not None and (fmt not in BLOCK_FORMATS or BLOCK_FORMATS[fmt][0] != block):
            allowed = ", ".join(f"{k} (block {v[0]})" for k, v in BLOCK_FORMATS.items())
            raise ConfigError(f"input format '{fmt}' with block {block!r} is not known; block formats: {allowed}")
        self.fmt = str(fmt)
        self.block = block
        self.axis = int(axis)
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(1).clone())
        self.register_buffer("levels", levels.detach().to(torch.float32).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .quantizers.blockscaled import fake_quantize_blocks, round_to_levels

        if self.block is not None:
            return fake_quantize_blocks(x, self.fmt, self.axis, tensor_scale=self.scale)
        s = self.scale.to(x.dtype)
        return round_to_levels(x / s, self.levels) * s

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (the layer metadata's ``input_quant`` entry)."""
        return {"format": self.fmt, "block": self.block, "axis": self.axis, "num_levels": int(self.levels.numel())}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ActQuant:
        """An empty input quantizer (zero buffers) to load a state dict into.

        Raises:
            ConfigError: metadata that do not describe one.
        """
        if not isinstance(meta, Mapping) or set(meta) != {"format", "block", "axis", "num_levels"}:
            raise ConfigError(f"input_quant metadata keys must be axis, block, format, num_levels; got {meta!r}")
        L, block, axis = meta["num_levels"], meta["block"], meta["axis"]
        if not _is_int(L) or not 2 <= L <= 256:
            raise ConfigError(f"input_quant num_levels must be an integer in 2..256, got {L!r}")
        if not _is_int(axis) or (block is not None and not _is_int(block)) or not isinstance(meta["format"], str):
            raise ConfigError(f"input_quant format, block, axis must be a name, an integer or null, an integer: {meta}")
        return cls(fmt=meta["format"], scale=torch.ones(1), levels=torch.zeros(L), block=block, axis=axis)

    def validate(self) -> None:
        """Check loaded values: finite positive scale, finite increasing levels.

        Raises:
            InputError: naming what is wrong.
        """
        if not bool(torch.isfinite(self.scale).all()) or not bool((self.scale > 0).all()):
            raise InputError(f"input_quant scale must be finite and > 0, got {self.scale.tolist()}")
        lv = self.levels
        if not bool(torch.isfinite(lv).all()) or not bool((lv[1:] > lv[:-1]).all()):
            raise InputError("input_quant levels must be finite and increasing")

    def extra_repr(self) -> str:
        blk = f", block={self.block}, axis={self.axis}" if self.block is not None else ""
        return f"{self.fmt}{blk}, scale={float(self.scale):.6g}"


# ------------------------------------------------------------------------------------------------------------
# Quantized layers

M = TypeVar("M", bound="type[QuantModule]")

#: Layer type name (as written in files) -> quantized module class. Files name types only from this table.
QUANT_MODULES: dict[str, type[QuantModule]] = {}


def register_quant_module(cls: M) -> M:
    """Class decorator: make a :class:`QuantModule` subclass loadable under its ``layer_type``."""
    if not cls.layer_type or cls.layer_type in QUANT_MODULES:
        raise ConfigError(f"quantized layer type '{cls.layer_type}' is empty or already registered")
    QUANT_MODULES[cls.layer_type] = cls
    return cls


class QuantModule(nn.Module):
    """Base of the quantized layers: a list of :class:`QuantTerm` plus a float bias.

    Subclasses set :attr:`layer_type`, implement :meth:`module_args`, :meth:`_from_args`, :meth:`_forward` and
    :meth:`matches_float`.

    Args:
        terms: the terms, in oriented layout; their sum is the weight.
        bias: ``(out,)`` float bias or None.
        weight_shape: the oriented weight shape ``(out, in, *kernel)``.
        dtype: the dtype the dequantized weight is computed in (the original weight's).
        cache_weight: keep the dequantized weight after the first use (see the module docstring).
    """

    layer_type: ClassVar[str] = ""
    #: Whether the layer type can have a bias (an embedding cannot).
    has_bias: ClassVar[bool] = True
    bias: nn.Parameter | None
    outliers: Any  # a dfquant.nn_rex.SparseTerm or None
    input_quant: ActQuant | None

    def __init__(
        self,
        terms: Sequence[QuantTerm],
        bias: torch.Tensor | None,
        *,
        weight_shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        cache_weight: bool = True,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.dtype = dtype
        self.cache_weight = cache_weight
        self.terms = nn.ModuleList()
        self._cached: torch.Tensor | None = None
        # REx extras (see dfquant.nn_rex): a sparse outlier residual and an input expansion, absent by default
        self.register_module("outliers", None)
        self.input_spec: Any = None
        self.register_module("input_quant", None)  # an ActQuant set by quantization-aware training (dfquant.qat)
        for t in terms:
            self.add_term(t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- terms and the weight -------------------------------------------------------------------------------
    def add_term(self, term: QuantTerm) -> None:
        """Append a term (e.g. a residual expansion order); drops the cached weight.

        Raises:
            InputError: a term whose shape does not fit the weight.
        """
        expect = self.weight_shape if term.channels is None else (term.shape[0], *self.weight_shape[1:])
        if term.shape != tuple(expect):
            raise InputError(
                f"a term of shape {term.shape} does not fit a {self.layer_type} weight of shape {self.weight_shape}"
            )
        self.terms.append(term)
        self.clear_cache()

    @property
    def quant_terms(self) -> list[QuantTerm]:
        """The terms, typed."""
        return [t for t in self.terms if isinstance(t, QuantTerm)]

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (it is rebuilt from the terms on the next use)."""
        self._cached = None
        self.__dict__.pop("_order_cache", None)

    def dequantize_weight(self) -> torch.Tensor:
        """``sum_k term_k`` in oriented layout, summed in float32 in term order starting from zero, then cast
        to :attr:`dtype`.

        A first term covering every channel is decoded straight into the sum as ``0.0 + term`` (no zero
        tensor, no extra pass; same values bit for bit).
        """
        terms = self.quant_terms
        device = terms[0].scale.device if terms else torch.device("cpu")
        if terms and terms[0].channels is None:
            w = terms[0]._decode(from_zero=True).contiguous()
            terms = terms[1:]
        else:
            w = torch.zeros(self.weight_shape, dtype=torch.float32, device=device)
        for t in terms:
            w = t.add_to(w)
        if self.outliers is not None:
            w = self.outliers.add_to(w)
        return w.to(self.dtype)

    def dequantize_weight_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``dequantize_weight()[rows]`` decoding only those rows (axis 0: output channels, or tokens of an
        embedding): int64 indices ``(k,)`` in range, in any order; the result is ``(k, *weight_shape[1:])`` in
        :attr:`dtype`, the same values bit for bit.

        Every element of the weight is ``0 + term_1 + ... + term_K (+ outlier)``, each term element decoded
        from its own group's parameters (:meth:`QuantTerm.dequantize_rows`); a channel-subset term adds its
        values to the rows it covers (``index_add``, as the full sum does) and the outlier residual adds the
        outliers that fall in the rows.

        Returns:
            The rows, or None when a term's granularity does not run along axis 0 (only the full weight can be
            decoded then).
        """
        terms = self.quant_terms
        n0 = self.weight_shape[0]
        device = terms[0].scale.device if terms else rows.device
        rows = rows.to(device=device, dtype=torch.int64).reshape(-1)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        if uniq.numel() < rows.numel():  # decode each row once
            once = self.dequantize_weight_rows(uniq)
            return None if once is None else once.index_select(0, inverse)
        k = rows.numel()
        w: torch.Tensor | None = None
        for t in terms:
            if t.channels is None:
                vals = t.dequantize_rows(rows, from_zero=w is None)
                if vals is None:
                    return None
                w = vals if w is None else w + vals
                continue
            if w is None:
                w = torch.zeros((k, *self.weight_shape[1:]), dtype=torch.float32, device=device)
            channels = t.channels.to(device)
            pos = torch.full((n0,), -1, dtype=torch.int64, device=device)
            pos[channels] = torch.arange(channels.numel(), device=device)
            at = pos[rows]  # each requested row's position in the term, -1 where the term does not cover it
            hit = (at >= 0).nonzero().reshape(-1)
            vals = t.dequantize_rows(at[hit])
            if vals is None:
                return None
            w = w.index_add(0, hit, vals)
        if w is None:
            w = torch.zeros((k, *self.weight_shape[1:]), dtype=torch.float32, device=device)
        if self.outliers is not None:
            res = self.outliers.to_residual()
            cols = math.prod(self.weight_shape[1:])
            slot = torch.full((n0,), -1, dtype=torch.int64, device=device)
            slot[rows] = torch.arange(k, device=device)
            src = res.index.to(device)
            at = slot[src // cols]  # the requested row each outlier falls in, -1 for the others
            sel = (at >= 0).nonzero().reshape(-1)
            flat = w.reshape(-1).index_add(0, at[sel] * cols + src[sel] % cols, res.values().to(device)[sel])
            w = flat.view(w.shape)
        return w.to(self.dtype)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized weight, from the cache when enabled (oriented layout)."""
        if self._cached is not None:
            return self._cached
        w = self.dequantize_weight()
        if self.cache_weight:
            self._cached = w
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the float layer's own layout (read-only view for code that reads
        ``layer.weight``)."""
        return self.quantized_weight()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantModule:
        """Moves and casts (``.to()``, ``.half()``, ...) apply to the bias and set the dtype the weight is
        rebuilt in; the terms keep their stored dtypes (scales and offsets in their storage dtype, levels in
        float32), only their device follows, so a cast never changes the decoded values."""
        self.clear_cache()
        probe = fn(torch.zeros((), dtype=self.dtype))
        out = super()._apply(fn, recurse=False)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.dtype = probe.dtype
        if recurse:
            if isinstance(probe, torch.Tensor):
                device = probe.device
                for child in self.children():
                    child._apply(lambda t: t.to(device), recurse=True)
            else:
                for child in self.children():
                    child._apply(fn, recurse=True)
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cached"] = None  # a deep copy or pickle never carries the cache
        state.pop("_order_cache", None)
        return state

    # -- accounting -----------------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        """Bits of all terms as :meth:`QTensor.storage_bits` counts them."""
        extra = self.outliers.storage_bits() if self.outliers is not None else 0
        return sum(t.storage_bits() for t in self.quant_terms) + extra

    def bits_per_weight(self) -> float:
        """Storage bits of all terms over the number of weights."""
        return self.storage_bits() / max(math.prod(self.weight_shape), 1)

    def nbytes(self) -> int:
        """Bytes the terms occupy in a file (packed codes, scales, offsets, levels, indices)."""
        extra = self.outliers.nbytes() if self.outliers is not None else 0
        return sum(t.nbytes() for t in self.quant_terms) + extra

    # -- description ----------------------------------------------------------------------------------------
    def module_args(self) -> dict[str, Any]:
        """JSON-ready constructor arguments of the float layer (sizes, stride, padding, ...)."""
        raise NotImplementedError

    def layer_meta(self) -> dict[str, Any]:
        """JSON-ready description of this layer for a file's manifest."""
        meta = {
            "type": self.layer_type,
            "module": self.module_args(),
            "weight_shape": list(self.weight_shape),
            "dtype": dtype_name(self.dtype),
            "bias": self.bias is not None,
            "terms": [t.meta() for t in self.quant_terms],
        }
        if self.outliers is not None:  # optional keys (dfquant.nn_rex); absent in plain layers
            meta["outliers"] = self.outliers.meta()
        if self.input_spec is not None:
            meta["act"] = self.input_spec.to_dict()
        if self.input_quant is not None:
            meta["input_quant"] = self.input_quant.meta()
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, cache_weight: bool = True) -> QuantModule:
        """An empty quantized layer (zero buffers) described by ``layer_meta()`` output, dispatched on its
        ``type`` through :data:`QUANT_MODULES`.

        Raises:
            ConfigError: an unknown type or inconsistent metadata.
        """
        kind = meta["type"]
        sub = QUANT_MODULES.get(kind) if isinstance(kind, str) else None
        if sub is None:
            raise ConfigError(f"unknown quantized layer type {kind!r}; known: {', '.join(QUANT_MODULES)}")
        dtype = DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if dtype is None:
            raise ConfigError(f"unknown dtype {meta['dtype']!r}; allowed: {', '.join(DTYPES)}")
        mod = sub._from_args(dict(meta["module"]), dtype, cache_weight)
        if list(mod.weight_shape) != list(meta["weight_shape"]):
            raise ConfigError(
                f"weight_shape {meta['weight_shape']} does not match the layer arguments (expected "
                f"{list(mod.weight_shape)})"
            )
        for tm in meta["terms"]:
            mod.add_term(QuantTerm.from_meta(tm))
        if meta.get("outliers") is not None or meta.get("act") is not None:
            from .methods.rex_act import InputSpec
            from .nn_rex import SparseTerm

            if meta.get("outliers") is not None:
                mod.outliers = SparseTerm.from_meta(meta["outliers"], mod.weight_shape)
            if meta.get("act") is not None:
                mod.input_spec = InputSpec.from_dict(meta["act"])
        if meta.get("input_quant") is not None:
            mod.input_quant = ActQuant.from_meta(meta["input_quant"])
        if meta["bias"] and not sub.has_bias:
            raise ConfigError(f"a {kind} layer has no bias, but the metadata say it has one")
        if meta["bias"]:
            mod.bias = nn.Parameter(torch.zeros(mod.weight_shape[0], dtype=dtype), requires_grad=False)
        return mod

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        raise NotImplementedError

    @classmethod
    def from_float(cls, layer: nn.Module, terms: Sequence[QuantTerm], *, cache_weight: bool = True) -> QuantModule:
        """The quantized counterpart of float ``layer`` (dispatched on its kind), holding ``terms`` and a copy
        of its bias.

        Raises:
            ConfigError: a layer type that has no quantized counterpart.
        """
        kind = layer_kind(layer)
        sub = QUANT_MODULES.get(kind) if kind is not None else None
        if sub is None:
            raise ConfigError(f"layers of type {type(layer).__name__} have no quantized counterpart")
        w = oriented_weight(layer)
        mod = sub._from_args(sub.args_of(layer), w.dtype, cache_weight)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        for t in terms:
            mod.add_term(t)
        return mod

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        """The :meth:`module_args` of a float layer of this kind."""
        raise NotImplementedError

    def matches_float(self, layer: nn.Module) -> bool:
        """Whether float ``layer`` is the layer this one replaces (same kind and arguments)."""
        return layer_kind(layer) == self.layer_type and type(self).args_of(layer) == self.module_args()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.input_spec is not None:
            from .nn_rex import input_expanded_forward

            return input_expanded_forward(self, x)
        return self._forward(x, self.quantized_weight())

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        desc = ", ".join(f"{k}={v}" for k, v in self.module_args().items())
        return f"{desc}, bias={self.bias is not None}, terms={len(self.terms)}, cache_weight={self.cache_weight}"


@register_quant_module
class QuantLinear(QuantModule):
    """Quantized ``nn.Linear``: ``y = x W_hat^T + b``."""

    layer_type = "linear"

    def __init__(self, in_features: int, out_features: int, **kwargs: Any) -> None:
        super().__init__([], None, weight_shape=(out_features, in_features), **kwargs)
        self.in_features = in_features
        self.out_features = out_features

    def module_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        lin = cast(nn.Linear, layer)
        return {"in_features": int(lin.in_features), "out_features": int(lin.out_features)}

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        _check_args(args, ("in_features", "out_features"), cls.layer_type)
        return cls(
            _pos_int(args, "in_features"),
            _pos_int(args, "out_features"),
            dtype=dtype,
            cache_weight=cache_weight,
        )

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)


@register_quant_module
class QuantHFConv1D(QuantModule):
    """Quantized Hugging Face ``Conv1D`` (``y = x W + b`` with ``W`` stored ``(in, out)``).

    The terms hold the oriented ``(out, in)`` weight, so the forward is ``F.linear``; :attr:`weight` returns
    the ``(in, out)`` layout that code written for ``Conv1D`` expects.
    """

    layer_type = "hf-conv1d"

    def __init__(self, nx: int, nf: int, **kwargs: Any) -> None:
        super().__init__([], None, weight_shape=(nf, nx), **kwargs)
        self.nx = nx
        self.nf = nf

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized_weight().t()

    def module_args(self) -> dict[str, Any]:
        return {"nx": self.nx, "nf": self.nf}

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        w = weight_of(layer)
        return {"nx": int(w.shape[0]), "nf": int(w.shape[1])}

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        _check_args(args, ("nx", "nf"), cls.layer_type)
        return cls(_pos_int(args, "nx"), _pos_int(args, "nf"), dtype=dtype, cache_weight=cache_weight)

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)


@register_quant_module
class QuantEmbedding(QuantModule):
    """Quantized ``nn.Embedding``: ``y = W_hat[ids]`` (``F.embedding`` on the dequantized table).

    The table ``(num_embeddings, embedding_dim)`` is quantized as stored: ``channel`` gives one scale per
    token row, ``group:G`` groups of ``G`` along the embedding dimension of each row. With the default
    ``cache_weight=True`` the whole table is dequantized once and kept (``num_embeddings * embedding_dim``
    floats); with ``cache_weight=False`` every forward decodes only the rows of the distinct ids it looks up
    (:meth:`QuantModule.dequantize_weight_rows`; a term with rows not along the tokens, e.g. ``channel:1``,
    makes it decode the whole table). ``padding_idx`` is kept
    (it only matters for gradients, which quantized layers do not take); ``max_norm`` layers are not quantized
    (see :func:`layer_kind`). :attr:`weight` is the dequantized table, so an output head tied to it reads the
    same values.
    """

    layer_type = "embedding"
    has_bias = False

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs: Any) -> None:
        super().__init__([], None, weight_shape=(num_embeddings, embedding_dim), **kwargs)
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ConfigError(f"embedding: padding_idx must be in 0..{num_embeddings - 1} or None, got {padding_idx!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx

    def module_args(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        emb = cast(nn.Embedding, layer)
        pad = emb.padding_idx
        return {
            "num_embeddings": int(emb.num_embeddings),
            "embedding_dim": int(emb.embedding_dim),
            "padding_idx": None if pad is None else int(pad),
        }

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        _check_args(args, ("num_embeddings", "embedding_dim", "padding_idx"), cls.layer_type)
        pad = args["padding_idx"]
        if pad is not None and not _is_int(pad):
            raise ConfigError(f"embedding: padding_idx must be an integer or null, got {pad!r}")
        return cls(
            _pos_int(args, "num_embeddings"),
            _pos_int(args, "embedding_dim"),
            pad,
            dtype=dtype,
            cache_weight=cache_weight,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W_hat[x]``. Without a weight cache (``cache_weight=False``) only the looked-up rows are decoded:
        ``u, inv = unique(x)``, ``y = dequantize_weight_rows(u)[inv]`` (the same values as indexing the full
        table; ``padding_idx`` does not change forward values). Ids out of range, non-integer input, an input
        quantizer, or a term whose granularity does not run along the tokens take the full-table path."""
        cached = self.cache_weight or self._cached is not None
        plain_ids = x.numel() > 0 and x.dtype in (torch.int32, torch.int64)
        if cached or not plain_ids or self.input_quant is not None or self.input_spec is not None:
            return super().forward(x)
        uniq, inverse = torch.unique(x, return_inverse=True)  # sorted
        if int(uniq[0]) < 0 or int(uniq[-1]) >= self.num_embeddings:
            return super().forward(x)  # F.embedding raises its own error
        rows = self.dequantize_weight_rows(uniq)
        if rows is None:
            return super().forward(x)
        return F.embedding(inverse, rows)

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, w, self.padding_idx)


_CONV_KEYS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


class _QuantConvNd(QuantModule):
    """Shared body of the quantized convolutions (grouped and depthwise included)."""

    dims: ClassVar[int] = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int] | str,
        dilation: Sequence[int],
        groups: int,
        padding_mode: str = "zeros",
        **kwargs: Any,
    ) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"{self.layer_type}: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        ks = tuple(int(k) for k in kernel_size)
        super().__init__([], None, weight_shape=(out_channels, in_channels // groups, *ks), **kwargs)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ks
        self.stride = tuple(int(s) for s in stride)
        self.padding: tuple[int, ...] | str = padding if isinstance(padding, str) else tuple(int(p) for p in padding)
        self.dilation = tuple(int(d) for d in dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self._reversed_padding = _reversed_padding(self.padding, self.kernel_size, self.dilation)

    def module_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        conv = cast(nn.Conv2d, layer)  # Conv1d has the same attributes
        pad = conv.padding
        return {
            "in_channels": int(conv.in_channels),
            "out_channels": int(conv.out_channels),
            "kernel_size": [int(k) for k in conv.kernel_size],
            "stride": [int(s) for s in conv.stride],
            "padding": pad if isinstance(pad, str) else [int(p) for p in pad],
            "dilation": [int(d) for d in conv.dilation],
            "groups": int(conv.groups),
            "padding_mode": str(conv.padding_mode),
        }

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        _check_args(args, _CONV_KEYS, cls.layer_type)
        tuples = {}
        for key in ("kernel_size", "stride", "dilation"):
            v = args[key]
            if not isinstance(v, list) or len(v) != cls.dims or not all(_is_pos_int(i) for i in v):
                raise ConfigError(f"{cls.layer_type}: {key} must be {cls.dims} positive integers, got {v!r}")
            tuples[key] = v
        pad = args["padding"]
        ok_pad = pad in ("same", "valid") or (
            isinstance(pad, list) and len(pad) == cls.dims and all(_is_int(p) and p >= 0 for p in pad)
        )
        if not ok_pad:
            raise ConfigError(f"{cls.layer_type}: padding must be 'same', 'valid' or {cls.dims} integers, got {pad!r}")
        if args["padding_mode"] not in ("zeros", "reflect", "replicate", "circular"):
            raise ConfigError(f"{cls.layer_type}: unknown padding_mode {args['padding_mode']!r}")
        return cls(
            _pos_int(args, "in_channels"),
            _pos_int(args, "out_channels"),
            tuples["kernel_size"],
            tuples["stride"],
            pad,
            tuples["dilation"],
            _pos_int(args, "groups"),
            args["padding_mode"],
            dtype=dtype,
            cache_weight=cache_weight,
        )

    def _conv(self, x: torch.Tensor, w: torch.Tensor, padding: Any) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return self._conv(x, w, 0)
        return self._conv(x, w, self.padding)


@register_quant_module
class QuantConv1d(_QuantConvNd):
    """Quantized ``nn.Conv1d`` (grouped and depthwise included)."""

    layer_type = "conv1d"
    dims = 1

    def _conv(self, x: torch.Tensor, w: torch.Tensor, padding: Any) -> torch.Tensor:
        return F.conv1d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)


@register_quant_module
class QuantConv2d(_QuantConvNd):
    """Quantized ``nn.Conv2d`` (grouped and depthwise included)."""

    layer_type = "conv2d"
    dims = 2

    def _conv(self, x: torch.Tensor, w: torch.Tensor, padding: Any) -> torch.Tensor:
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)


def _reversed_padding(padding: tuple[int, ...] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last dimension first, left/right) for a non-zero padding mode, as ``nn.Conv``
    does."""
    n = len(kernel)
    if padding == "valid":
        return [0] * (2 * n)
    if padding == "same":
        out = [0] * (2 * n)
        for i, (d, k) in enumerate(zip(dilation, kernel, strict=True)):
            total = d * (k - 1)
            j = n - 1 - i
            out[2 * j] = total // 2
            out[2 * j + 1] = total - total // 2
        return out
    if isinstance(padding, str):
        raise ConfigError(f"padding must be 'same', 'valid' or integers, got '{padding}'")
    return [int(p) for p in reversed(padding) for _ in range(2)]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_int(v: object) -> bool:
    return _is_int(v) and v > 0  # type: ignore[operator]


def _pos_int(args: Mapping[str, Any], key: str) -> int:
    v = args[key]
    if not _is_pos_int(v):
        raise ConfigError(f"'{key}' must be a positive integer, got {v!r}")
    return int(v)


def _check_args(args: Mapping[str, Any], keys: tuple[str, ...], kind: str) -> None:
    if set(args) != set(keys):
        raise ConfigError(f"{kind} layer arguments must be exactly {', '.join(keys)}; got {', '.join(sorted(args))}")
