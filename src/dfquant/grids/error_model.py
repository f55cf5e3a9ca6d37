"""Error model of a grid scaled to a clip: expected MSE for a unit-variance Gaussian or Laplace source.

A grid (any :class:`~dfquant.grids.formats.Grid`) is used at the scale ``s = C / max|level|`` that puts its
largest-magnitude level on the *clip* ``C``; every value beyond the extreme levels saturates to them. Clips are in
units of the source's standard deviation (unit-variance sources, :mod:`dfquant.grids.distributions`). ``uint`` grids
are modelled centred on their mid-range, as an offset puts them when fitted (so ``uint b`` behaves as
``int b-mr``).

Two models of the expected squared error ``D(C) = E[(X - Q_C(X))^2]``:

* **exact**: the sum of closed-form cell integrals ``sum_i int_{t_{i-1}}^{t_i} (x - y_i)^2 p(x) dx`` with midpoint
  thresholds and the outer cells running to infinity (clipping included); see
  :func:`dfquant.grids.distributions.cell_mse`.
* **approximate**, granular term plus clipping term, as in the literature:

  - uniform (integer) grids, Banner, Nahshan & Soudry, "Post training 4-bit quantization of convolutional
    networks for rapid-deployment" (NeurIPS 2019, ACIQ): ``2^M`` bins of width ``Delta = 2 alpha / 2^M`` over
    ``[-alpha, alpha]`` give ``D ~ 2 int_alpha^inf (x - alpha)^2 p(x) dx + alpha^2 / (3 * 4^M)``, i.e. the
    clipping tail beyond the range edge ``alpha`` (top level plus half a step) plus ``Delta^2 / 12`` for the
    granular noise (the paper's simplification: the whole mass is taken as granular). Closed forms
    (:func:`clipping_mse`): Laplace with scale ``b``: ``2 b^2 exp(-alpha / b)``; Gaussian:
    ``(alpha^2 + sigma^2) [1 - erf(alpha / (sqrt(2) sigma))] - sqrt(2/pi) alpha sigma exp(-alpha^2 / (2 sigma^2))``.
  - minifloats and codebooks, the granular term summed over exponent ranges as in Kuzmin et al., "FP8
    quantization: the power of the exponent" (NeurIPS 2022): each binade ``[2^e, 2^(e+1))`` with step
    ``Delta_e`` contributes ``P(binade) Delta_e^2 / 12`` (subnormals ``[0, 2^e_min)`` with their own step, the top
    binade up to the clip), plus the exact clipping tail ``2 int_C^inf (x - C)^2 p(x) dx`` beyond the largest
    level. It is computed gap by gap between consecutive levels (``sum_i P(y_i < |X| < y_(i+1)) (y_(i+1) -
    y_i)^2 / 12``), which is exactly the binade sum for minifloats and the Panter-Dite style cell sum for
    codebooks.

:func:`optimal_clip` minimizes either model over ``C`` (cached per grid and source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from scipy import special
from scipy.optimize import minimize_scalar

from dfquant.errors import ConfigError
from dfquant.grids.distributions import LAPLACE_BETA, cell_mse, check_dist, partial_moments
from dfquant.grids.formats import Grid, make_grid

ModelName = Literal["exact", "approx"]
MODELS: tuple[ModelName, ...] = ("exact", "approx")

#: Search interval of the clip, in units of sigma (covers every grid of 1..8 bits for both sources, and several
#: octaves of the log-periodic error curve of wide-range minifloats).
CLIP_SEARCH = (0.02, 64.0)
#: Minima of the exact model within this relative MSE of the best are ties (wide minifloats repeat their error
#: curve every octave of ``C``); the smallest such clip is returned.
TIE_RTOL = 1e-5


def as_grid(grid: Grid | str) -> Grid:
    """A :class:`Grid` from a grid or its name (``"int4-mr"``, ``"fp4_e2m1"``, ``"nf4"``, ...)."""
    return grid if isinstance(grid, Grid) else make_grid(grid)


def model_levels(grid: Grid | str) -> np.ndarray:
    """Unit-scale levels as the model sees them: the grid's levels, centred on the mid-range for ``uint``."""
    g = as_grid(grid)
    y = np.asarray(g.levels, dtype=np.float64)
    if g.family == "uint":
        y = y - (y[0] + y[-1]) / 2
    return y


def _scaled(grid: Grid | str, clip: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Levels scaled so the largest magnitude sits at each clip: ``(n, L)``, and the clips ``(n,)``."""
    y = model_levels(grid)
    c = np.atleast_1d(np.asarray(clip, dtype=np.float64))
    if np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise ConfigError(f"clip must be finite and > 0, got {clip!r}")
    return y[None, :] * (c / np.max(np.abs(y)))[:, None], c


def _shape_like(v: np.ndarray, clip: np.ndarray | float) -> np.ndarray | float:
    return float(v[0]) if np.ndim(clip) == 0 else v.reshape(np.shape(clip))


# ----------------------------------------------------------------------------------------------------------------
# Exact model


def exact_mse(grid: Grid | str, dist: str, clip: np.ndarray | float) -> np.ndarray | float:
    """Exact expected MSE of ``grid`` with its largest-magnitude level at ``clip`` (unit-variance ``dist``).

    ``D(C) = sum_i [M_2 - 2 y_i M_1 + y_i^2 M_0]_(t_(i-1))^(t_i)`` with ``y_i`` the scaled levels, ``t_i`` the
    midpoints (``t_0 = -inf``, ``t_L = inf``) and ``M_k`` the closed-form partial moments of the source; a scalar
    clip goes through :func:`dfquant.grids.distributions.cell_mse`, an array of clips is evaluated in one batch.

    Args:
        grid: the grid (or its name).
        dist: ``"gaussian"`` or ``"laplace"``.
        clip: ``C / sigma``, a float or an array.

    Returns:
        The MSE, a float or an array shaped like ``clip``.
    """
    check_dist(dist)
    y, _ = _scaled(grid, clip)
    if np.ndim(clip) == 0:
        return cell_mse(dist, y[0])
    t = (y[:, :-1] + y[:, 1:]) / 2
    inf = np.full((y.shape[0], 1), np.inf)
    m0, m1, m2 = partial_moments(dist, np.concatenate([-inf, t], 1), np.concatenate([t, inf], 1))
    return _shape_like(np.sum(m2 - 2 * y * m1 + y * y * m0, axis=1), clip)


# ----------------------------------------------------------------------------------------------------------------
# Approximate model


def tail_mse(dist: str, a: np.ndarray | float) -> np.ndarray:
    """One-sided clipping error ``T(a) = int_a^inf (x - a)^2 p(x) dx`` of the unit-variance source, any real ``a``.

    Gaussian: ``T(a) = (1 + a^2) Q(a) - a phi(a)`` with ``Q = 1 - Phi``. Laplace (``beta = 1/sqrt(2)``):
    ``T(a) = beta^2 exp(-a / beta)`` for ``a >= 0`` and ``1 + a^2 - beta^2 exp(a / beta)`` for ``a < 0``.
    The lower tail ``int_-inf^a (x - a)^2 p(x) dx`` is ``T(-a)`` by symmetry.
    """
    a = np.asarray(a, dtype=np.float64)
    if check_dist(dist) == "gaussian":
        return (1 + a * a) * special.ndtr(-a) - a * np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    b = LAPLACE_BETA
    e = np.exp(-np.abs(a) / b)
    return np.where(a >= 0, b * b * e, 1 + a * a - b * b * e)


def clipping_mse(dist: str, alpha: np.ndarray | float) -> np.ndarray:
    """Two-sided clipping error ``2 int_alpha^inf (x - alpha)^2 p(x) dx`` for a unit-variance source, ``alpha >= 0``.

    Banner et al. 2019 (ACIQ), closed forms: Gaussian
    ``(alpha^2 + sigma^2) [1 - erf(alpha / (sqrt(2) sigma))] - sqrt(2/pi) alpha sigma exp(-alpha^2 / (2 sigma^2))``;
    Laplace ``2 b^2 exp(-alpha / b)`` (here ``sigma = 1``, ``b = 1/sqrt(2)``).
    """
    a = np.asarray(alpha, dtype=np.float64)
    if check_dist(dist) == "gaussian":
        return (a * a + 1) * special.erfc(a / math.sqrt(2)) - math.sqrt(2 / math.pi) * a * np.exp(-0.5 * a * a)
    return 2 * LAPLACE_BETA**2 * np.exp(-a / LAPLACE_BETA)


def banner_mse(dist: str, alpha: np.ndarray | float, bits: int) -> np.ndarray:
    """Banner et al. 2019 (ACIQ), eq. for ``2^M`` uniform bins over ``[-alpha, alpha]``:
    ``D ~ clipping_mse(alpha) + alpha^2 / (3 * 4^M)``, unit-variance source, ``alpha`` in units of sigma."""
    a = np.asarray(alpha, dtype=np.float64)
    return clipping_mse(dist, a) + a * a / (3.0 * 4.0**bits)


def approx_terms(
    grid: Grid | str, dist: str, clip: np.ndarray | float
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Granular and clipping terms of the approximate model (see the module docstring).

    Integer grids (step ``Delta``, range edges one half-step beyond the extreme levels, ``a_lo < 0 < a_hi``):
    ``granular = Delta^2 / 12``, ``clipping = T(a_hi) + T(-a_lo)`` (Banner et al. 2019; equal to
    :func:`banner_mse` for ``int-mr`` grids). Other grids: ``granular = sum_i P(y_i < X < y_(i+1)) (y_(i+1) -
    y_i)^2 / 12`` over consecutive levels, ``clipping = T(y_max) + T(-y_min)`` (the exact error beyond the
    extreme levels), which for minifloats is the per-binade sum of Kuzmin et al. 2022.

    Args:
        grid: the grid (or its name).
        dist: ``"gaussian"`` or ``"laplace"``.
        clip: ``C / sigma``, a float or an array.

    Returns:
        ``(granular, clipping)``, floats or arrays shaped like ``clip``.
    """
    check_dist(dist)
    g = as_grid(grid)
    y, _ = _scaled(g, clip)
    if g.kind == "int" and y.shape[1] > 1:
        step = y[:, 1] - y[:, 0]
        gran = step * step / 12
        clipping = tail_mse(dist, y[:, -1] + step / 2) + tail_mse(dist, -(y[:, 0] - step / 2))
    else:
        m0, _, _ = partial_moments(dist, y[:, :-1], y[:, 1:])
        d = np.diff(y, axis=1)
        gran = np.sum(m0 * d * d, axis=1) / 12
        clipping = tail_mse(dist, y[:, -1]) + tail_mse(dist, -y[:, 0])
    return _shape_like(gran, clip), _shape_like(clipping, clip)


def approx_mse(grid: Grid | str, dist: str, clip: np.ndarray | float) -> np.ndarray | float:
    """Approximate expected MSE: granular term plus clipping term (:func:`approx_terms`)."""
    gran, clipping = approx_terms(grid, dist, clip)
    return gran + clipping


def model_mse(grid: Grid | str, dist: str, clip: np.ndarray | float, model: str = "exact") -> np.ndarray | float:
    """The MSE of ``model`` (``"exact"`` or ``"approx"``) at ``clip``."""
    if model == "exact":
        return exact_mse(grid, dist, clip)
    if model == "approx":
        return approx_mse(grid, dist, clip)
    raise ConfigError(f"unknown error model '{model}'; allowed: {', '.join(MODELS)}")


# ----------------------------------------------------------------------------------------------------------------
# Optimal clip


@dataclass(frozen=True)
class ClipOptimum:
    """The clip minimizing an error model.

    Attributes:
        grid: grid name.
        dist: source.
        model: ``"exact"`` or ``"approx"``.
        clip: ``C* / sigma``, where the largest-magnitude level sits.
        mse: the model's MSE at ``C*``.
        max_abs: the grid's largest level magnitude at unit scale (as modelled), so ``scale = clip / max_abs``.
    """

    grid: str
    dist: str
    model: str
    clip: float
    mse: float
    max_abs: float

    @property
    def scale(self) -> float:
        """Grid scale for a unit-variance source: ``C* / max|level|``."""
        return self.clip / self.max_abs

    @property
    def sqnr_db(self) -> float:
        """``10 log10(1 / D)``."""
        return 10 * math.log10(1 / self.mse) if self.mse > 0 else math.inf


def optimal_clip(grid: Grid | str, dist: str, model: str = "exact") -> ClipOptimum:
    """The clip ``C*`` (in sigma) minimizing ``model`` for ``grid`` and a unit-variance ``dist`` source (cached).

    The model is sampled on 1500 log-spaced clips over :data:`CLIP_SEARCH`; every local minimum of the samples is
    refined by bounded Brent search between its neighbours. Wide minifloats (FP8, FP6 E3M2) have an error curve
    that repeats every octave of ``C`` once clipping and underflow are negligible, so several minima are equal
    to rounding: the smallest clip whose MSE is within :data:`TIE_RTOL` of the best is returned.

    Args:
        grid: the grid (or its name).
        dist: ``"gaussian"`` or ``"laplace"``.
        model: ``"exact"`` (cell integrals) or ``"approx"`` (granular + clipping).

    Returns:
        A :class:`ClipOptimum`.
    """
    g = as_grid(grid)
    check_dist(dist)
    if model not in MODELS:
        raise ConfigError(f"unknown error model '{model}'; allowed: {', '.join(MODELS)}")
    return _optimal_clip(g.name, g.family, g.kind, g.bits, g.levels, dist, model)


@cache
def _optimal_clip(
    name: str, family: str, kind: str, bits: int, levels: tuple[float, ...], dist: str, model: str
) -> ClipOptimum:
    g = Grid(name, family, kind, bits, levels)  # type: ignore[arg-type]
    max_abs = float(np.max(np.abs(model_levels(g))))
    if len(levels) < 2:  # a single level: the clip does not matter; report the level at 1 sigma
        return ClipOptimum(name, dist, model, 1.0, float(model_mse(g, dist, 1.0, model)), max_abs)
    cs = np.geomspace(*CLIP_SEARCH, 1500)
    f = np.asarray(model_mse(g, dist, cs, model))
    idx = [i for i in range(len(cs)) if f[i] <= f[max(i - 1, 0)] and f[i] <= f[min(i + 1, len(cs) - 1)]]
    found: list[tuple[float, float]] = []
    for i in idx:
        lo, hi = cs[max(i - 1, 0)], cs[min(i + 1, len(cs) - 1)]
        res = minimize_scalar(
            lambda c: float(model_mse(g, dist, float(c), model)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-10 * hi},
        )
        c, v = (float(res.x), float(res.fun)) if res.fun <= f[i] else (float(cs[i]), float(f[i]))
        found.append((c, v))
    best = min(v for _, v in found)
    c_star, v_star = min((c, v) for c, v in found if v <= best * (1 + TIE_RTOL))
    return ClipOptimum(name, dist, model, c_star, v_star, max_abs)


def sqnr_db(mse: float) -> float:
    """Signal-to-quantization-noise ratio of a unit-variance source, ``10 log10(1 / D)`` in dB."""
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


# ----------------------------------------------------------------------------------------------------------------
# ACIQ constants


@cache
def aciq_alpha(dist: str, bits: int) -> float:
    """ACIQ's optimal clip ``c_M`` (Banner et al. 2019) in the paper's units: ``alpha / sigma`` (Gaussian) or
    ``alpha / b`` (Laplace), for ``2^M`` bins over ``[-alpha, alpha]``.

    Minimizes :func:`banner_mse` (scale-free: the optimum is proportional to the source's scale). Printed in the
    paper: Gaussian 1.71, 2.15, 2.55; Laplace 2.83, 3.89, 5.03 at M = 2, 3, 4 (this solver gives 1.7106, 2.1516,
    2.5591 and 2.8307, 3.8972, 5.0286, within 0.01).

    Args:
        dist: ``"gaussian"`` or ``"laplace"``.
        bits: ``M >= 1``.
    """
    check_dist(dist)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ConfigError(f"ACIQ needs bits >= 1, got {bits!r}")
    unit = 1.0 if dist == "gaussian" else LAPLACE_BETA  # sigma or b of the unit-variance source
    res = minimize_scalar(
        lambda a: float(banner_mse(dist, a, bits)), bounds=(0.05, 40.0), method="bounded", options={"xatol": 1e-11}
    )
    return float(res.x) / unit
