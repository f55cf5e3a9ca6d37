"""Rules whose codes come from their own decision thresholds: ``ternary`` and ``dorefa``.

Both pick each value's code with a rule of their own (not nearest-level rounding), then fit the group's scale
by least squares for those codes, ``alpha = <t, x> / ||t||^2`` with ``t`` the codes' unit levels:

* ``ternary`` (Li, Zhang, Liu, "Ternary Weight Networks", 2016; the low-bit rule of DF-MPC, Chen et al. 2023):
  the threshold ``Delta = 0.7 * E|x|`` per group, codes ``sign(x) * [|x| > Delta]`` on the levels
  ``{-1, 0, 1}`` (2 bits), and ``alpha`` the mean of ``|x|`` over the values above the threshold (the least
  squares scale of those codes).
* ``dorefa`` (Zhou et al., "DoReFa-Net", 2016): DoReFa's weight transform ``u = tanh(x) / max|tanh(x)|``
  followed by uniform rounding of ``u`` to ``2^b`` levels in ``[-1, 1]``; these codes sit on the mid-rise
  grid ``k + 1/2`` and are decoded linearly with the least-squares ``alpha``. DoReFa trains the network on the
  transformed weights; without training, the values must stay on the weight's own scale, so here ``x`` is
  first divided by its group's root mean square (which also makes the codes independent of a per-group
  scaling of ``x``, as for every other rule).

Scaling a group by ``s > 0`` scales ``alpha`` by ``s`` and leaves the codes unchanged, so per-channel
quantization commutes with BatchNorm folding (DF-MPC relies on it).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from dfquant.errors import ConfigError
from dfquant.grids.formats import Grid, make_grid
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.codes import QParams, constant_groups
from dfquant.quantizers.qtensor import group_batches
from dfquant.quantizers.registry import register

__all__ = ["DoReFa", "Ternary"]


class CodeRule(Quantizer):
    """A rule that assigns codes itself (:meth:`assign`) on a fixed grid, with a least-squares scale."""

    runs_on_device: ClassVar[bool] = True

    @property
    @abstractmethod
    def grid(self) -> Grid:
        """The unit levels the codes index."""

    @abstractmethod
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (int64 indices into the grid's levels) of ``m`` groups given as a float32 ``(m, g)`` matrix."""

    def fit(self, x: torch.Tensor) -> QParams:
        """``alpha = <t, x> / ||t||^2`` for the assigned codes' levels ``t``; offset 0."""
        t = self.grid.table.to(x.device)[self.assign(x)]
        den = (t * t).sum(1)
        alpha = torch.where(den > 0, (t * x).sum(1) / torch.where(den > 0, den, torch.ones_like(den)), den)
        p = QParams(scale=alpha.clamp_min(0.0), offset=torch.zeros_like(alpha), levels=self.grid.table)
        return constant_groups(x, p)

    def encode(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        levels: torch.Tensor,
        glen: int,
        table_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The codes :meth:`assign` gives each group of ``glen`` values (not nearest-level rounding, which would
        move the decision thresholds to the midpoints between scaled levels); the fitted parameters are not
        needed."""
        R, n = rows.shape
        codes = torch.empty(R, n, dtype=torch.uint8, device=rows.device)
        for batch, cols in group_batches(rows, glen if glen < n else None):
            codes[:, cols] = self.assign(batch.contiguous()).to(torch.uint8).reshape(R, cols.stop - cols.start)
        return codes


@register
class Ternary(CodeRule):
    """Ternary weights (TWN): ``Delta = ratio * E|x|``, codes ``sign(x) [|x| > Delta]``, ``alpha`` = mean of
    ``|x|`` above ``Delta``. 2 bits (3 levels).

    Options:
        ratio: the threshold ratio (default 0.7, the TWN approximation of the optimum for Gaussian or uniform
            weights).

    Example:
        >>> import torch
        >>> from dfquant import get_quantizer
        >>> w = torch.tensor([[0.1, -0.8, 1.0, 0.05]])
        >>> get_quantizer("ternary", 2).fake_quantize(w).tolist()
        [[0.0, -0.8999999761581421, 0.8999999761581421, 0.0]]
    """

    name = "ternary"
    description = "ternary {-a, 0, a}: threshold 0.7 E|w| per group, a = mean |w| above it (TWN)"
    supported_bits: ClassVar[tuple[int, ...]] = (2,)
    options_allowed: ClassVar[tuple[str, ...]] = ("ratio",)

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        ratio = self.options.get("ratio", 0.7)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio < 10.0:
            raise ConfigError(f"quantizer 'ternary': ratio must be a number in [0, 10), got {ratio!r}")
        self.ratio = float(ratio)

    @property
    def grid(self) -> Grid:
        return make_grid("int-sym", 2)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.ratio * x.abs().mean(dim=1, keepdim=True)
        return (1 + torch.sign(x) * (x.abs() > delta)).to(torch.int64)


@register
class DoReFa(CodeRule):
    """DoReFa-style codes: ``u = tanh(x / rms) / max|tanh(x / rms)|``, ``k = round((u + 1) / 2 * (2^b - 1))``
    on the mid-rise grid, least-squares scale. Bits 1..8.

    Example:
        >>> import torch
        >>> from dfquant import get_quantizer
        >>> w = torch.randn(8, 256)
        >>> err = float(((get_quantizer("dorefa", 3).fake_quantize(w) - w) ** 2).mean())
        >>> 0.0 < err < 0.05
        True
    """

    name = "dorefa"
    description = "DoReFa tanh-normalized uniform codes, least-squares scale per group"

    @property
    def grid(self) -> Grid:
        return make_grid("int-mr", self.bits)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
        t = torch.tanh(x / torch.where(rms > 0, rms, torch.ones_like(rms)))
        top = t.abs().amax(dim=1, keepdim=True)
        u = t / torch.where(top > 0, top, torch.ones_like(top))
        k = torch.round((u + 1.0) * 0.5 * (2**self.bits - 1))
        return k.clamp(0, 2**self.bits - 1).to(torch.int64)
