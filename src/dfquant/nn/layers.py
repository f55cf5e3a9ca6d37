"""Quantized layers: packed codes plus scales/levels, dequantized on the fly.

A quantized layer holds a *list* of terms and computes with their sum, ``W_hat = sum_k dequantize(term_k)``
(plain post-training quantization is one term; residual expansion adds more). A :class:`QuantTerm` is the
storage form of a :class:`~dfquant.quantizers.qtensor.QTensor`: the codes packed to ``bits`` each
(:func:`~dfquant.quantizers.packing.pack`), the ``(rows, groups)`` scale and offset (float32, or
float16/bfloat16 when the
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
on top of the packed codes. With ``cache_weight=False`` (what :func:`dfquant.io.load.load_quantized` gives by
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

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError
from dfquant.nn.base import QuantModule, register_quant_module, weight_of
from dfquant.nn.terms import is_int, is_pos_int


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
        if pad is not None and not is_int(pad):
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
            if not isinstance(v, list) or len(v) != cls.dims or not all(is_pos_int(i) for i in v):
                raise ConfigError(f"{cls.layer_type}: {key} must be {cls.dims} positive integers, got {v!r}")
            tuples[key] = v
        pad = args["padding"]
        ok_pad = pad in ("same", "valid") or (
            isinstance(pad, list) and len(pad) == cls.dims and all(is_int(p) and p >= 0 for p in pad)
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


def _pos_int(args: Mapping[str, Any], key: str) -> int:
    v = args[key]
    if not is_pos_int(v):
        raise ConfigError(f"'{key}' must be a positive integer, got {v!r}")
    return int(v)


def _check_args(args: Mapping[str, Any], keys: tuple[str, ...], kind: str) -> None:
    if set(args) != set(keys):
        raise ConfigError(f"{kind} layer arguments must be exactly {', '.join(keys)}; got {', '.join(sorted(args))}")
