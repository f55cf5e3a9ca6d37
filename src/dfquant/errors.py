"""Errors raised by dfquant.

Every error derives from :class:`DfquantError`, so callers (and the command line) can catch one type. Messages
name what the user gave (the layer or tensor, the value) and what is allowed.
"""

from __future__ import annotations


class DfquantError(Exception):
    """Base class of every error dfquant raises on purpose."""


class ConfigError(DfquantError, ValueError):
    """A setting is outside what is allowed (bits, granularity, quantizer name, rule)."""


class InputError(DfquantError, ValueError):
    """A tensor cannot be quantized as given (NaN/Inf values, empty, wrong rank)."""


class FileFormatError(DfquantError):
    """A file is not a valid dfquant file, or does not match what it claims to hold."""


class ModelError(DfquantError):
    """A model cannot be loaded, built or walked as asked."""


def check_finite(x: object, name: str) -> None:
    """Raise :class:`InputError` naming ``name`` when tensor ``x`` holds NaN or Inf values.

    Args:
        x: a ``torch.Tensor``.
        name: what to call the tensor in the message (layer or parameter name).

    Raises:
        InputError: when any element is NaN or infinite.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise InputError(f"'{name}' must be a torch.Tensor, got {type(x).__name__}")
    if not x.numel():
        return
    if x.is_floating_point():
        # one reduction pass instead of a boolean temporary: min and max propagate NaN, and are infinite when
        # any element is
        lo, hi = torch.aminmax(x.detach())
        ok = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    else:
        ok = bool(torch.isfinite(x).all())
    if not ok:
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise InputError(
            f"tensor '{name}' has {n_nan} NaN and {n_inf} infinite values out of {x.numel()}; "
            "only finite values can be quantized"
        )
