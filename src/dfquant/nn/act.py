"""Activation quantization: :class:`ActQuant` fake-quantizes a layer's input on a fixed grid with a
per-tensor scale fitted without data, the input side of REx and W/A settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.nn.terms import is_int
from dfquant.quantizers.blockscaled import BLOCK_FORMATS, fake_quantize_blocks, round_to_levels

# ------------------------------------------------------------------------------------------------------------
# Input quantization (quantization-aware training)


class ActQuant(nn.Module):
    """Fake quantization of a layer's input, applied before the layer computes (quantization-aware training
    records it: :func:`dfquant.qat.fake.convert`; the layer metadata's ``input_quant`` entry).

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

        if block is not None and (fmt not in BLOCK_FORMATS or BLOCK_FORMATS[fmt][0] != block):
            allowed = ", ".join(f"{k} (block {v[0]})" for k, v in BLOCK_FORMATS.items())
            raise ConfigError(f"input format '{fmt}' with block {block!r} is not known; block formats: {allowed}")
        self.fmt = str(fmt)
        self.block = block
        self.axis = int(axis)
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(1).clone())
        self.register_buffer("levels", levels.detach().to(torch.float32).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:

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
        if not is_int(L) or not 2 <= L <= 256:
            raise ConfigError(f"input_quant num_levels must be an integer in 2..256, got {L!r}")
        if not is_int(axis) or (block is not None and not is_int(block)) or not isinstance(meta["format"], str):
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
