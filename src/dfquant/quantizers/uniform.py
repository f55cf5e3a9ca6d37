"""Uniform quantizers whose clip comes from the sample: ``minmax`` and ``mse``.

Both encode on a uniform grid (default ``int-mr``: ``2^b`` mid-rise levels ``k + 1/2``, no zero level, the
uniform quantizer of Max 1960); ``grid='int'`` / ``'int-sym'`` select grids with a zero level, ``'uint'`` the
asymmetric min/max variant with a zero point.

* ``minmax`` (Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient inference"): the
  extreme levels sit on the group's absolute maximum (or its min and max for ``uint``): no value is clipped.
* ``mse``: the clip ``c * max|x|`` with ``c`` chosen per group by minimizing the measured squared error, first on
  a coarse grid of ratios, then on a fine grid around the best coarse ratio. With ``weighting="input-variance"``
  the error minimized is ``sum_i a_i (x_i - x_hat_i)^2``, ``a_i`` the variance of the input channel that weight
  ``i`` multiplies (supplied by :func:`dfquant.quantize_model` from the BatchNorm statistics; see
  :class:`dfquant.quantizers.optimal.LloydOptimal` for the derivation). A non-uniform ``grid`` (any of
  :data:`SHAPED_GRIDS`: ``"lloyd-gaussian"``, ``"lloyd-laplace"``, ``"nf4"``, ``"iq4_nl"``, ``"apot"``, a
  minifloat) searches the clip of that fixed shape instead of an integer grid. ``grid="lloyd-gaussian"`` is the
  analytic Lloyd-Max table of N(0, 1) (Max 1960) with a symmetric per-group scale fitted to the group's own
  values: on Hadamard-rotated weights (``rotate=hadamard``), whose groups are close to Gaussian, it is the
  Gaussian-optimal shape with no stored offset. MiniLM's linear layers, 4 bits in groups of 64 with float16
  scales (4.25 bits per weight), rotated: relative MSE 6.8e-3 against 8.6e-3 on the integer grid
  (``benchmarks/rotation_table.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from dfquant.errors import ConfigError
from dfquant.grids.distributions import absmax_expected_mse, cell_mse, optimal_scale
from dfquant.grids.formats import CODEBOOK_FAMILIES, FIXED_WIDTH_FAMILIES, INT_FAMILIES, MINIFLOATS, Grid, make_grid
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.codes import QParams, constant_groups
from dfquant.quantizers.registry import register


class UniformRule(Quantizer):
    """Shared base of uniform rules: a grid family from :data:`dfquant.grids.formats.INT_FAMILIES`."""

    runs_on_device: ClassVar[bool] = True

    options_allowed: ClassVar[tuple[str, ...]] = ("grid",)
    default_family: ClassVar[str] = "int-mr"

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        family = self.options.get("grid", self.default_family)
        if family not in INT_FAMILIES:
            raise ConfigError(f"quantizer '{self.name}': grid must be one of {', '.join(INT_FAMILIES)}, got '{family}'")
        self._grid = make_grid(family, bits)

    @property
    def grid(self) -> Grid:
        return self._grid

    @property
    def asymmetric(self) -> bool:
        return self._grid.family == "uint"

    @property
    def sym_top(self) -> float:
        """Largest magnitude reachable on both sides (the level put at the clip)."""
        lv = self._grid.levels
        return min(abs(lv[0]), abs(lv[-1]))

    def params_for_clip(self, x: torch.Tensor, clip: torch.Tensor) -> QParams:
        """Symmetric scale putting level ``sym_top`` at ``clip`` (per group), offset 0."""
        scale = clip / self.sym_top
        return QParams(scale=scale, offset=torch.zeros_like(scale), levels=self._grid.table)

    def clip_mse_unit(self, dist: str, clip: float) -> float:
        """Expected MSE of a unit-variance source with the top level at ``clip`` (closed form, clipping included)."""
        return cell_mse(dist, np.asarray(self._grid.levels) * (clip / self.sym_top))


@register
class MinMax(UniformRule):
    """Round-to-nearest uniform quantization on the group's range (the naive baseline)."""

    name = "minmax"
    description = "uniform, extreme levels on the absolute max (or min/max with grid=uint)"

    def fit(self, x: torch.Tensor) -> QParams:
        if self.asymmetric:
            lo, hi = x.amin(dim=1), x.amax(dim=1)
            scale = (hi - lo) / (self._grid.num_levels - 1)
            p = QParams(scale=scale, offset=lo, levels=self._grid.table)
        else:
            p = self.params_for_clip(x, x.abs().amax(dim=1))
        return constant_groups(x, p)

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """Expected MSE with the clip at the maximum of ``n = group_size`` samples (default 1024).

        Given the maximum ``m`` of ``|X|``, the other ``n - 1`` samples are distributed as ``X`` conditioned on
        ``|X| <= m`` and the maximal one reconstructs exactly, so
        ``E[D] = E_m[(n-1)/n * int_{-m}^{m} (x - Q_m(x))^2 p(x) dx / P(|X| <= m)]``, averaged over quantiles of
        the maximum's distribution ``(2F(m) - 1)^n``. (For ``uint`` the same formula with the symmetric clip is
        used as an approximation.)
        """
        return absmax_expected_mse(dist, np.asarray(self._grid.levels) / self.sym_top, group_size or 1024)


#: Non-uniform grids whose clip ``mse`` can search: the codebooks (NF4, IQ4_NL, the Gaussian and Laplace
#: Lloyd-Max tables, APoT) and the minifloats; each is used as a fixed shape that the per-group scale stretches.
SHAPED_GRIDS: tuple[str, ...] = (*CODEBOOK_FAMILIES, *MINIFLOATS)
_SYMMETRIC_INT = tuple(f for f in INT_FAMILIES if f != "uint")


@register
class MSEClip(UniformRule):
    """Uniform quantization with the clip minimizing the measured squared error of each group."""

    name = "mse"
    description = "uniform or a fixed shape (grid=lloyd-gaussian, nf4, ...), clip searched per group for the least MSE"
    options_allowed: ClassVar[tuple[str, ...]] = ("grid", "coarse", "fine", "weighting")
    supports_importance = True

    def __init__(self, bits: int, **options: Any) -> None:
        grid = options.get("grid")
        if grid in SHAPED_GRIDS:
            Quantizer.__init__(self, bits, **options)
            if grid in FIXED_WIDTH_FAMILIES and make_grid(grid).bits != bits:
                raise ConfigError(
                    f"quantizer 'mse': grid '{grid}' is {make_grid(grid).bits} bits wide, got bits={bits}"
                )
            self._grid = make_grid(grid) if grid in FIXED_WIDTH_FAMILIES else make_grid(grid, bits)
        elif grid is not None and grid not in _SYMMETRIC_INT:
            allowed = ", ".join((*_SYMMETRIC_INT, *SHAPED_GRIDS))
            raise ConfigError(f"quantizer 'mse' searches a symmetric clip; grid must be one of {allowed}, got '{grid}'")
        else:
            super().__init__(bits, **options)

    def fit(self, x: torch.Tensor) -> QParams:
        return self._fit(x, None)

    def fit_weighted(self, x: torch.Tensor, importance: torch.Tensor) -> QParams:
        """Clip per group minimizing ``sum_i importance_i (x_i - x_hat_i)^2``."""
        return self._fit(x, importance)

    def _fit(self, x: torch.Tensor, importance: torch.Tensor | None) -> QParams:
        amax = x.abs().amax(dim=1)
        coarse = int(self.options.get("coarse", 24))
        fine = int(self.options.get("fine", 16))
        ratios = torch.linspace(1.0 / coarse, 1.0, coarse, device=x.device)
        best_r, best_err = self._search(x, amax, ratios[None, :].expand(x.shape[0], -1), importance)
        step = 1.0 / coarse
        fine_r = best_r[:, None] + torch.linspace(-step, step, fine, device=x.device)[None, :]
        fine_r = fine_r.clamp(min=1e-3, max=1.0)
        r2, e2 = self._search(x, amax, fine_r, importance)
        r = torch.where(e2 < best_err, r2, best_r)
        return constant_groups(x, self.params_for_clip(x, amax * r))

    def _search(
        self, x: torch.Tensor, amax: torch.Tensor, ratios: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the ratio (column of ``ratios``) with the smallest (weighted) squared error, and that error."""
        best_err = torch.full((x.shape[0],), float("inf"), device=x.device)
        best_r = torch.ones(x.shape[0], device=x.device)
        top = self.sym_top
        grid = self._grid
        table, mids = grid.table.to(x.device), grid.midpoints.to(x.device)
        for j in range(ratios.shape[1]):
            r = ratios[:, j]
            scale = (amax * r / top).clamp_min(1e-30)
            z = x / scale[:, None]
            # a value on a midpoint is as far from either level, so the search skips the encoder's tie rule
            zq = grid.round(z) if grid.kind == "int" or not mids.numel() else table[torch.bucketize(z, mids)]
            xq = zq * scale[:, None]
            sq = (xq - x) ** 2
            err = (sq if importance is None else sq * importance).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
        return best_r, best_err

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """The minimum over the clip of the closed-form MSE (the population optimum the search estimates)."""
        return optimal_scale(dist, tuple(self._grid.levels))[1]

    def optimal_clip(self, dist: str) -> float:
        """The clip (in units of sigma, where the level ``sym_top`` sits) minimizing the closed-form MSE."""
        return optimal_scale(dist, tuple(self._grid.levels))[0] * self.sym_top

    def unit_levels(self, dist: str, group_size: int | None = None) -> torch.Tensor:
        c = self.optimal_clip(dist)
        return self._grid.table * (c / self.sym_top)
