"""``aciq``: uniform quantization with the analytic clip of Banner, Nahshan & Soudry (NeurIPS 2019).

ACIQ ("Analytical Clipping for Integer Quantization") models a tensor as Gaussian or Laplace and clips it at the
``alpha`` minimizing the approximate error ``2 int_alpha^inf (x - alpha)^2 p(x) dx + alpha^2 / (3 * 4^M)`` of
``2^M`` uniform bins over ``[-alpha, alpha]`` (:func:`dfquant.grids.error_model.banner_mse`). The optimum is
proportional to the source's scale, ``alpha = c_M * sigma`` (Gaussian) or ``c_M * b`` (Laplace), with
``c_M`` from :func:`dfquant.grids.error_model.aciq_alpha` (Gaussian 1.71, 2.15, 2.55; Laplace 2.83, 3.90, 5.03 at
2, 3, 4 bits).

Per group: both families are fitted (:func:`dfquant.grids.distributions.fit_groups`) and the one with the smaller
Kolmogorov-Smirnov statistic gives ``alpha``. The grid is ``int-mr`` (``2^M`` mid-rise levels ``k + 1/2``, no
zero level), so the bins are exactly ACIQ's: ``scale = alpha / 2^(M-1)`` and the top level sits half a bin
inside ``alpha``. ``grid='int-sym'`` (``2^M - 1`` bins with a zero level) is accepted, with its own ``c`` from the
same formula for that number of bins; asymmetric grids are refused (the clip is symmetric about zero).

The grid is centred on zero (no offset), so the fitted spread is taken about zero: ``sigma = sqrt(std^2 +
mean^2)`` for a Gaussian fit and ``b = sqrt(b_MAD^2 + median^2 / 2)`` for a Laplace fit (both reduce to the
paper's ``sigma`` and ``b`` for centred groups).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from dfquant.errors import ConfigError
from dfquant.grids.distributions import LAPLACE_BETA, cell_mse, check_dist
from dfquant.grids.error_model import aciq_alpha, clipping_mse
from dfquant.quantizers.codes import QParams, constant_groups
from dfquant.quantizers.lloyd import fit_groups_chunked
from dfquant.quantizers.registry import register
from dfquant.quantizers.uniform import UniformRule

_ACIQ_GRIDS = ("int-mr", "int-sym")


@cache
def aciq_clip(dist: str, num_bins: int) -> float:
    """ACIQ's clip for ``num_bins`` uniform bins over ``[-alpha, alpha]``, in units of sigma (unit variance).

    Minimizes ``clipping_mse(alpha) + Delta^2 / 12`` with ``Delta = 2 alpha / num_bins`` (Banner et al. 2019);
    for ``num_bins = 2^M`` this is :func:`dfquant.grids.error_model.aciq_alpha` times ``sigma`` (or ``b``).
    """
    check_dist(dist)
    bits = math.log2(num_bins)
    if bits == int(bits):
        return aciq_alpha(dist, int(bits)) * (1.0 if dist == "gaussian" else LAPLACE_BETA)
    res = minimize_scalar(
        lambda a: float(clipping_mse(dist, a)) + (2 * a / num_bins) ** 2 / 12,
        bounds=(0.05, 40.0),
        method="bounded",
        options={"xatol": 1e-11},
    )
    return float(res.x)


@register
class ACIQ(UniformRule):
    """Uniform quantization with ACIQ's analytic clip for the better-fitting Gaussian or Laplace, per group.

    ``QParams.info`` holds per group ``dist`` (0 Gaussian, 1 Laplace: :data:`dfquant.grids.distributions.DIST_CODES`),
    ``ks_gaussian``, ``ks_laplace`` and ``clip`` (``alpha``, in the group's units).

    Example:
        >>> import torch
        >>> from dfquant import get_quantizer
        >>> q = get_quantizer("aciq", 4)
        >>> w = torch.randn(4, 4096)
        >>> float(((q.fake_quantize(w) - w) ** 2).mean()) < 0.013
        True
    """

    name = "aciq"
    runs_on_device: ClassVar[bool] = False  # its Gaussian / Laplace fits run on the CPU (numpy)
    description = "uniform (int-mr), ACIQ analytic clip of the Gaussian or Laplace fit (Banner et al. 2019)"

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        if self.grid.family not in _ACIQ_GRIDS:
            raise ConfigError(
                f"quantizer 'aciq' clips symmetrically about zero; grid must be one of {', '.join(_ACIQ_GRIDS)}, "
                f"got '{self.grid.family}'"
            )
        self._edge = self.sym_top + 0.5  # range edge alpha in grid units: top level plus half a step

    def clip(self, dist: str) -> float:
        """ACIQ's ``alpha`` for a unit-variance ``dist`` source, in units of sigma."""
        return aciq_clip(check_dist(dist), self.grid.num_levels)

    def fit(self, x: torch.Tensor) -> QParams:
        xs = torch.sort(x, dim=1).values
        fit = fit_groups_chunked(x, xs)
        choice = fit.best()
        loc, sigma = fit.location_scale(choice)
        sigma = torch.sqrt(sigma * sigma + loc * loc)  # unit-variance spread about zero
        ratio = torch.tensor([self.clip("gaussian"), self.clip("laplace")], dtype=torch.float32)[choice]
        alpha = ratio * sigma
        scale = alpha / self._edge
        info = {
            "dist": choice.to(torch.float32),
            "ks_gaussian": fit.ks_gaussian,
            "ks_laplace": fit.ks_laplace,
            "clip": alpha,
        }
        p = QParams(scale=scale, offset=torch.zeros_like(scale), levels=self.grid.table, info=info)
        return constant_groups(x, p)

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """Exact MSE of ACIQ's clip for the unit-variance source (cell integrals, clipping included).

        The fitted family and scale are taken at their population values (large groups), so the prediction does
        not depend on ``group_size``.
        """
        return cell_mse(dist, np.asarray(self.grid.levels) * (self.clip(dist) / self._edge))

    def unit_levels(self, dist: str, group_size: int | None = None) -> torch.Tensor:
        """``levels * alpha / (top + 1/2)`` for a unit-variance ``dist`` source (``int-mr``: ``alpha / 2^(M-1)``)."""
        return torch.tensor(np.asarray(self.grid.levels) * (self.clip(dist) / self._edge), dtype=torch.float32)
