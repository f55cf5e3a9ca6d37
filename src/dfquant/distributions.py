"""Gaussian and Laplace sources: closed-form partial moments, per-group fits and Kolmogorov-Smirnov statistics.

Unit-variance standard forms are used throughout: the Gaussian ``N(0, 1)`` and the Laplace with scale
``beta = 1/sqrt(2)`` (variance ``2 beta^2 = 1``). A fitted group maps to them by location and scale:
Gaussian ``(mean, std)``; Laplace ``(median, b)`` with ``b`` the mean absolute deviation about the median (the
maximum-likelihood scale), i.e. unit-variance scale ``sigma = sqrt(2) * b``.

Partial moments ``M_k(a, b) = int_a^b x^k p(x) dx`` (k = 0, 1, 2) are what Lloyd-Max iterations and the error
model need: a cell's probability, its conditional mean ``M_1 / M_0`` and its squared error
``M_2 - 2 c M_1 + c^2 M_0`` about a level ``c`` are all closed forms.

* Gaussian: ``M_0 = Phi(b) - Phi(a)``, ``M_1 = phi(a) - phi(b)``, ``M_2 = M_0 + a phi(a) - b phi(b)``.
* Laplace (scale ``beta``), antiderivatives for ``x >= 0``: ``F_0 = 1 - e/2``, ``F_1 = -e (x + beta) / 2``,
  ``F_2 = 2 beta^2 - e (x^2 + 2 beta x + 2 beta^2) / 2`` with ``e = exp(-x / beta)``; mirrored for ``x < 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch
from scipy import special

from .errors import ConfigError

DistName = Literal["gaussian", "laplace"]
DISTRIBUTIONS: tuple[DistName, ...] = ("gaussian", "laplace")
LAPLACE_BETA = 1.0 / math.sqrt(2.0)

#: Integer codes for per-group distribution choices (stored in reports).
DIST_CODES = {"gaussian": 0, "laplace": 1, "empirical": 2}


def check_dist(name: str) -> DistName:
    """Validate a distribution name."""
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"unknown distribution '{name}'; allowed: {', '.join(DISTRIBUTIONS)}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Unit-variance densities in float64 numpy (used for tables and the error model)


def pdf(dist: str, x: np.ndarray | float) -> np.ndarray:
    """Density of the unit-variance source."""
    x = np.asarray(x, dtype=np.float64)
    if check_dist(dist) == "gaussian":
        return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return np.exp(-np.abs(x) / LAPLACE_BETA) / (2 * LAPLACE_BETA)


def cdf(dist: str, x: np.ndarray | float) -> np.ndarray:
    """Cumulative distribution of the unit-variance source."""
    x = np.asarray(x, dtype=np.float64)
    if check_dist(dist) == "gaussian":
        return special.ndtr(x)
    e = np.exp(-np.abs(x) / LAPLACE_BETA)
    return np.where(x >= 0, 1 - 0.5 * e, 0.5 * e)


def ppf(dist: str, q: np.ndarray | float) -> np.ndarray:
    """Quantile function of the unit-variance source."""
    q = np.asarray(q, dtype=np.float64)
    if check_dist(dist) == "gaussian":
        return special.ndtri(q)
    with np.errstate(divide="ignore"):
        return np.where(q < 0.5, LAPLACE_BETA * np.log(2 * q), -LAPLACE_BETA * np.log(2 * (1 - q)))


def _antiderivatives(dist: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A_k(x)`` with ``A_k' = x^k p(x)`` and ``A_k(-inf) = 0`` for k = 0, 1, 2 (handles +-inf)."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    xf = np.where(fin, x, 0.0)
    if check_dist(dist) == "gaussian":
        ph = np.where(fin, np.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi), 0.0)
        a0 = special.ndtr(x)
        a1 = -ph
        a2 = a0 - xf * ph
        return a0, a1, a2
    b = LAPLACE_BETA
    e = np.where(fin, np.exp(-np.abs(xf) / b), 0.0)
    pos = x >= 0
    a0 = np.where(pos, 1 - 0.5 * e, 0.5 * e)
    a1 = np.where(pos, -0.5 * e * (xf + b), 0.5 * e * (xf - b))
    a2 = np.where(
        pos,
        2 * b * b - 0.5 * e * (xf * xf + 2 * b * xf + 2 * b * b),
        0.5 * e * (xf * xf - 2 * b * xf + 2 * b * b),
    )
    return a0, a1, a2


def partial_moments(dist: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(M_0, M_1, M_2)`` over ``[a, b]`` for the unit-variance source (vectorized; ``a``/``b`` may be +-inf)."""
    A = _antiderivatives(dist, np.asarray(a, dtype=np.float64))
    B = _antiderivatives(dist, np.asarray(b, dtype=np.float64))
    return B[0] - A[0], B[1] - A[1], B[2] - A[2]


def cell_mse(
    dist: str,
    levels: np.ndarray,
    thresholds: np.ndarray | None = None,
    lo: float = -np.inf,
    hi: float = np.inf,
) -> float:
    """Exact expected squared error of mapping the unit-variance source to ``levels``.

    ``D = sum_i int_{t_{i-1}}^{t_i} (x - y_i)^2 p(x) dx`` with ``t`` the given thresholds (default: midpoints,
    i.e. nearest-level mapping). Saturation (clipping) is included: the outer cells extend to the integration
    bounds ``[lo, hi]`` (default the whole line). With finite bounds the result is the un-normalized integral over
    ``[lo, hi]`` (divide by the probability of ``[lo, hi]`` for the conditional MSE).
    """
    y = np.asarray(levels, dtype=np.float64)
    t = (y[:-1] + y[1:]) / 2 if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    a = np.clip(np.concatenate([[-np.inf], t]), lo, hi)
    b = np.clip(np.concatenate([t, [np.inf]]), lo, hi)
    m0, m1, m2 = partial_moments(dist, a, b)
    return float(np.sum(m2 - 2 * y * m1 + y * y * m0))


def max_abs_quantiles(dist: str, n: int, points: int = 256) -> np.ndarray:
    """Quadrature nodes for the maximum of ``|X|`` over ``n`` samples: its quantiles at ``(k + 1/2) / points``.

    ``P(max |X| <= m) = (2 F(m) - 1)^n``, so the ``u``-quantile is ``m = F^{-1}(1 - (1 - u^(1/n)) / 2)``,
    evaluated as ``-F^{-1}((1 - u^(1/n)) / 2)`` with ``1 - u^(1/n) = -expm1(log(u) / n)`` for precision.
    Averaging a function over these nodes approximates its expectation over the sample maximum.
    """
    u = (np.arange(points) + 0.5) / points
    tail = -np.expm1(np.log(u) / max(n, 1))
    return -ppf(dist, tail / 2)


def absmax_expected_mse(dist: str, levels: np.ndarray | tuple[float, ...], n: int) -> float:
    """Expected MSE of a grid scaled so that its largest magnitude sits on the group's absolute maximum.

    With ``m = max |X|`` over ``n`` samples, the other ``n - 1`` samples are distributed as ``X`` given
    ``|X| <= m`` and the maximal one decodes exactly (the grid reaches ``+-1`` on both sides), so
    ``E[D] = E_m[(n - 1) / n * int_{-m}^{m} (x - Q_m(x))^2 p(x) dx / P(|X| <= m)]``, averaged over the quantiles
    of the maximum's distribution ``(2 F(m) - 1)^n`` (:func:`max_abs_quantiles`).

    Args:
        dist: unit-variance source, ``"gaussian"`` or ``"laplace"``.
        levels: grid levels with ``max |level| = 1`` at both ends.
        n: samples per group.
    """
    lv = np.asarray(levels, dtype=np.float64)
    total = 0.0
    nodes = max_abs_quantiles(dist, n)
    for m in nodes:
        mass = float(cdf(dist, m) - cdf(dist, -m))
        total += (n - 1) / n * cell_mse(dist, lv * m, lo=-m, hi=m) / max(mass, 1e-300)
    return total / len(nodes)


@cache
def optimal_scale(dist: str, levels: tuple[float, ...]) -> tuple[float, float]:
    """Scale ``c`` minimizing the closed-form ``cell_mse(dist, c * levels)`` and that MSE.

    The MSE is not unimodal in ``c`` for coarse grids (e.g. 3 levels ``{-1, 0, 1}`` tend to MSE 1 as ``c`` grows),
    so a log-spaced scan brackets the global minimum before Brent's method refines it.
    """
    from scipy.optimize import minimize_scalar

    lv = np.asarray(levels, dtype=np.float64)
    top = float(np.abs(lv).max()) or 1.0
    cs = np.geomspace(0.1, 64.0, 400) / top
    errs = [cell_mse(dist, lv * c) for c in cs]
    i = int(np.argmin(errs))
    lo, hi = cs[max(i - 1, 0)], cs[min(i + 1, len(cs) - 1)]
    res = minimize_scalar(lambda c: cell_mse(dist, lv * c), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    if float(res.fun) <= errs[i]:
        return float(res.x), float(res.fun)
    return float(cs[i]), float(errs[i])


# ----------------------------------------------------------------------------------------------------------------
# Per-group fits in torch (float32)


@dataclass(frozen=True)
class GroupFit:
    """Location/scale fits and KS statistics of ``m`` groups (each field has shape ``(m,)``).

    ``sigma_*`` are unit-variance scales: Gaussian std, and ``sqrt(2) * b`` for Laplace.
    """

    mean: torch.Tensor
    std: torch.Tensor
    median: torch.Tensor
    laplace_sigma: torch.Tensor
    ks_gaussian: torch.Tensor
    ks_laplace: torch.Tensor

    def best(self) -> torch.Tensor:
        """Per group: 0 when the Gaussian fits better (smaller KS statistic), 1 for Laplace."""
        return (self.ks_laplace < self.ks_gaussian).to(torch.int64)

    def location_scale(self, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and unit-variance scale of the chosen distribution per group (0 Gaussian, 1 Laplace)."""
        lap = choice == 1
        return torch.where(lap, self.median, self.mean), torch.where(lap, self.laplace_sigma, self.std)


def fit_groups(x: torch.Tensor, sorted_x: torch.Tensor | None = None) -> GroupFit:
    """Fit Gaussian (mean, std) and Laplace (median, mean absolute deviation) to each row of ``x``.

    The Kolmogorov-Smirnov statistic of each fit is
    ``D = max_i max(i/n - F(x_(i)), F(x_(i)) - (i-1)/n)`` over the sorted sample ``x_(1) <= ... <= x_(n)``
    (Kolmogorov 1933; Smirnov 1948), with ``F`` the fitted CDF. A lower ``D`` is the better fit.

    Args:
        x: float32 tensor ``(m, n)``, finite.
        sorted_x: ``x`` sorted along dim 1, if already computed.

    Returns:
        A :class:`GroupFit`. Groups with zero spread get ``std = 0`` and KS statistics of 0.
    """
    x = x.to(torch.float32)
    n = x.shape[1]
    xs = torch.sort(x, dim=1).values if sorted_x is None else sorted_x
    mean = x.mean(dim=1)
    std = x.std(dim=1, correction=0)
    median = xs[:, (n - 1) // 2] if n % 2 == 1 else 0.5 * (xs[:, n // 2 - 1] + xs[:, n // 2])
    mad = (x - median[:, None]).abs().mean(dim=1)
    lap_sigma = mad * math.sqrt(2.0)
    i = torch.arange(1, n + 1, dtype=torch.float32)
    hi = (i / n)[None, :]
    lo = ((i - 1) / n)[None, :]
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    zg = (xs - mean[:, None]) / safe_std[:, None]
    Fg = torch.special.ndtr(zg)
    ks_g = torch.maximum((hi - Fg).amax(dim=1), (Fg - lo).amax(dim=1))
    safe_b = torch.where(mad > 0, mad, torch.ones_like(mad))
    zl = (xs - median[:, None]) / safe_b[:, None]
    el = torch.exp(-zl.abs())
    Fl = torch.where(zl >= 0, 1 - 0.5 * el, 0.5 * el)
    ks_l = torch.maximum((hi - Fl).amax(dim=1), (Fl - lo).amax(dim=1))
    flat = std == 0
    ks_g = torch.where(flat, torch.zeros_like(ks_g), ks_g)
    ks_l = torch.where(flat | (mad == 0), torch.where(flat, torch.zeros_like(ks_l), torch.ones_like(ks_l)), ks_l)
    return GroupFit(mean, std, median, lap_sigma, ks_g, ks_l)


def ks_critical(n: int, alpha: float = 0.001) -> float:
    """Asymptotic critical value of the one-sample KS statistic, ``sqrt(-ln(alpha/2)/2) / sqrt(n)``.

    (Smirnov's limiting distribution; with parameters estimated from the sample the true level is lower,
    i.e. the test is conservative, which is the right side to err on for a fallback.)
    """
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(max(n, 1))


def sample(dist: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` float32 samples of the unit-variance source."""
    if check_dist(dist) == "gaussian":
        return torch.randn(n, generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
    return (-LAPLACE_BETA * torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)
