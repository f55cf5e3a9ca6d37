"""The column scale of a balanced layer (:mod:`dfquant.methods.balance`): a float16 vector ``c``, one value per
fan-in column, with which the layer decodes ``(sum of terms) diag(c)`` (or scales its input, ``x diag(c)``).

A child module of :class:`~dfquant.nn.base.QuantModule` (state-dict key ``balance.scale``), so that moves follow
the layer's device and casts never change the stored float16 values.
"""

from __future__ import annotations

import torch
from torch import nn

from dfquant.errors import InputError
from dfquant.methods.balance import undo_balance


class ColumnScale(nn.Module):
    """``c`` of a balanced layer: buffer ``scale``, float16 ``(fan_in,)``."""

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float16).reshape(-1).clone())

    @classmethod
    def empty(cls, fan_in: int) -> ColumnScale:
        """A placeholder of ones (a file's values replace it)."""
        return cls(torch.ones(fan_in, dtype=torch.float16))

    def undo(self, w: torch.Tensor) -> torch.Tensor:
        """``W diag(c)`` along the flattened fan-in of ``w`` (float32)."""
        return undo_balance(w, self.scale)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x diag(c)`` along the last dimension, in ``x``'s dtype."""
        return x * self.scale.to(device=x.device, dtype=x.dtype)

    def storage_bits(self) -> int:
        return 16 * self.scale.numel()

    def nbytes(self) -> int:
        return 2 * self.scale.numel()

    def validate(self, fan_in: int) -> None:
        """Refuse a scale of the wrong size or dtype, or with values that are not finite and positive.

        Raises:
            InputError: naming what is wrong.
        """
        s = self.scale
        if s.dtype != torch.float16 or tuple(s.shape) != (fan_in,):
            raise InputError(f"balance scale must be float16 of shape [{fan_in}], got {s.dtype} {list(s.shape)}")
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise InputError("balance scale must be finite and positive")
