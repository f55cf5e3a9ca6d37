"""Storage and forward of the REx extras a quantized layer may carry: an outlier residual and an input
expansion (see :mod:`dfquant.methods.outliers` and :mod:`dfquant.methods.rex_act`).

A :class:`~dfquant.nn.base.QuantModule` holds them as ``outliers`` (a :class:`SparseTerm` child, or None) and
``input_spec`` (an :class:`~dfquant.methods.rex_act.InputSpec`, or None). In a file's manifest a layer records
them under the optional keys ``"outliers"`` (:meth:`SparseTerm.meta`) and ``"act"``
(:meth:`InputSpec.to_dict`); files without these keys load as before. The sparse term's tensors are
``NAME.outliers.index`` (I32 ``[n]``, flat positions in the oriented weight), ``NAME.outliers.signs`` (U8,
``n`` sign bits packed, 1 = negative) and ``NAME.outliers.scale`` (F32 ``[2]`` per sign, or ``[rows]`` per
output channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.methods.outliers import OUTLIER_SCALES, OutlierResidual, outlier_bits, scale_count
from dfquant.methods.rex_act import InputSpec, expand_input, paired_forward
from dfquant.quantizers.packing import pack, packed_nbytes, unpack

__all__ = ["SparseTerm", "input_expanded_forward", "layer_op", "order_weights"]


class SparseTerm(nn.Module):
    """A sparse binary-valued residual in storage form (buffers ``index``, ``signs``, ``scale``).

    Args:
        shape: the layer's oriented weight shape.
        kind: ``"row-sign"`` (two magnitudes per output channel), ``"sign"`` (one per sign) or ``"row"`` (one per
            output channel).
        index: int32 ``(n,)`` flat positions. signs: uint8 packed sign bits. scale: float32 magnitudes.
    """

    index: torch.Tensor
    signs: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self, *, shape: Sequence[int], kind: str, index: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.kind = kind
        self.register_buffer("index", index)
        self.register_buffer("signs", signs)
        self.register_buffer("scale", scale)

    @property
    def count(self) -> int:
        return int(self.index.numel())

    @classmethod
    def from_residual(cls, res: OutlierResidual) -> SparseTerm:
        """Pack an :class:`OutlierResidual`."""
        return cls(
            shape=res.shape,
            kind=res.kind,
            index=res.index.to(torch.int32).contiguous().clone(),
            signs=pack(res.negative.to(torch.uint8), 1),
            scale=res.scale.to(torch.float32).contiguous().clone(),
        )

    def to_residual(self) -> OutlierResidual:
        neg = unpack(self.signs.cpu(), 1, self.count).to(torch.bool).to(self.index.device)
        return OutlierResidual(self.index.to(torch.int64), neg, self.scale, self.kind, self.shape)

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32, oriented) plus the residual."""
        return self.to_residual().add_to(weight)

    def storage_bits(self) -> int:
        """32-bit index and 1 sign bit per outlier, 32 bits per magnitude."""
        return outlier_bits(self.count, self.kind, self.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count}

    @staticmethod
    def buffer_specs(meta: Mapping[str, Any], shape: Sequence[int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{buffer: (dtype, shape)}`` of a sparse term described by ``meta`` in a layer of ``shape``.

        Raises:
            ConfigError: metadata that do not describe a sparse term.
        """
        if not isinstance(meta, Mapping) or set(meta) != {"kind", "count"}:
            raise ConfigError(f"outlier metadata must be an object with keys kind, count; got {meta!r}")
        kind, n = meta["kind"], meta["count"]
        if kind not in OUTLIER_SCALES:
            raise ConfigError(f"outlier kind must be one of {', '.join(OUTLIER_SCALES)}, got {kind!r}")
        numel = math.prod(shape)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= numel:
            raise ConfigError(f"outlier count must be an integer in 0..{numel}, got {n!r}")
        return {
            "index": (torch.int32, (n,)),
            "signs": (torch.uint8, (packed_nbytes(n, 1),)),
            "scale": (torch.float32, (scale_count(kind, int(shape[0])),)),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], shape: Sequence[int]) -> SparseTerm:
        """An empty sparse term to load a state dict into."""
        specs = cls.buffer_specs(meta, shape)
        bufs = {k: torch.zeros(s, dtype=dt) for k, (dt, s) in specs.items()}
        return cls(shape=shape, kind=meta["kind"], index=bufs["index"], signs=bufs["signs"], scale=bufs["scale"])

    def validate(self) -> None:
        """Indices in range and distinct, finite non-negative magnitudes (a term read from a file).

        Raises:
            InputError: naming what is wrong.
        """
        numel = math.prod(self.shape)
        idx = self.index
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise InputError(f"outlier indices fall outside 0..{numel - 1}")
        if idx.unique().numel() != idx.numel():
            raise InputError("outlier indices repeat")
        if not bool(torch.isfinite(self.scale).all()) or bool((self.scale < 0).any()):
            raise InputError("outlier magnitudes must be finite and >= 0")

    def extra_repr(self) -> str:
        return f"kind={self.kind}, count={self.count}"


def order_weights(module: Any) -> list[torch.Tensor]:
    """The dense weight orders ``W_1..W_K`` of a quantized layer (subset terms scattered; the outlier residual,
    if any, added to the first order), float32, oriented."""
    terms = module.quant_terms
    device = terms[0].scale.device
    zero = torch.zeros(module.weight_shape, dtype=torch.float32, device=device)
    out = [t.add_to(zero) for t in terms]
    if getattr(module, "outliers", None) is not None:
        out[0] = module.outliers.add_to(out[0])
    return out


def layer_op(module: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The bias-free ``op(x, oriented weight)`` of a quantized linear or convolution layer.

    Raises:
        InputError: a layer type whose input cannot be expanded (an embedding takes token ids).
    """
    kind = getattr(module, "layer_type", "")
    if kind in ("linear", "hf-conv1d"):
        return lambda x, w: F.linear(x, w)
    if kind in ("conv1d", "conv2d"):
        conv = F.conv1d if kind == "conv1d" else F.conv2d

        def op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            pad = module.padding
            if module.padding_mode != "zeros":
                x, pad = F.pad(x, module._reversed_padding, mode=module.padding_mode), 0
            return conv(x, w, None, module.stride, pad, module.dilation, module.groups)

        return op
    raise InputError(f"the input of a {kind or type(module).__name__} layer cannot be quantized")


def input_expanded_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A layer's output with its input expanded: ``sum_{k1 + k2 <= K + 1} op(X_k1, W_k2) + bias`` in the
    layer's dtype (:func:`dfquant.methods.rex_act.paired_forward`)."""
    op = layer_op(module)
    spec: InputSpec = module.input_spec
    weights = getattr(module, "_order_cache", None)
    if weights is None:
        weights = [w.to(module.dtype) for w in order_weights(module)]
        if module.cache_weight:
            module._order_cache = weights
    xs = [xk.to(module.dtype) for xk in expand_input(x, spec, min(spec.order, len(weights)))]
    y = paired_forward(xs, weights, op)
    if module.bias is not None:
        shape = [1] * y.dim()
        shape[1 if getattr(module, "layer_type", "") in ("conv1d", "conv2d") else -1] = -1
        y = y + module.bias.reshape(shape)
    return y
