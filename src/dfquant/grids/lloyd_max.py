"""Lloyd-Max quantizers: against a unit-variance Gaussian/Laplace source (closed form) or an empirical sample.

The minimum-MSE scalar quantizer with ``L`` levels satisfies two conditions (Lloyd 1957/1982, Max 1960):

* thresholds at midpoints: ``t_i = (y_i + y_{i+1}) / 2``;
* levels at conditional means: ``y_i = E[X | t_{i-1} < X <= t_i] = M_1(t_{i-1}, t_i) / M_0(t_{i-1}, t_i)``.

Alternating the two converges to the optimum for log-concave densities (Fleischer 1964), which covers the
Gaussian and the Laplace. The iteration starts from the companding approximation (Panter & Dite 1951): levels
at the quantiles of the density proportional to ``p^(1/3)`` (for these sources, the same family with 3x the
variance), which is already close, so few iterations are needed. The distortion at the optimum is
``D = E[X^2] - sum_i y_i^2 P_i``.

The empirical solver is the same two-step iteration on the values of each group (1-D k-means), vectorized over
groups: with the group sorted and prefix sums precomputed, one iteration costs ``O(L log n)`` per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from dfquant.errors import ConfigError
from dfquant.grids.distributions import LAPLACE_BETA, check_dist, partial_moments, pdf, ppf


@dataclass(frozen=True)
class LloydMaxTable:
    """The Lloyd-Max quantizer of a unit-variance source.

    Attributes:
        dist: ``"gaussian"`` or ``"laplace"``.
        bits: code bits; there are ``2**bits`` levels.
        levels: levels, increasing (float64 numpy array).
        thresholds: the ``2**bits - 1`` decision thresholds.
        mse: expected squared error for the unit-variance source.
        iterations: Lloyd iterations until the levels moved less than the tolerance.
    """

    dist: str
    bits: int
    levels: np.ndarray
    thresholds: np.ndarray
    mse: float
    iterations: int

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio ``10 log10(1 / D)`` in dB."""
        return 10 * math.log10(1.0 / self.mse)


def solve_lloyd_max(dist: str, num_levels: int, tol: float = 1e-12, max_iter: int = 200_000) -> LloydMaxTable:
    """Solve the Lloyd-Max conditions for ``num_levels`` levels of a unit-variance source.

    Args:
        dist: ``"gaussian"`` or ``"laplace"``.
        num_levels: number of levels ``L >= 1``.
        tol: stop when no level moves more than this.
        max_iter: iteration cap.

    Returns:
        The converged :class:`LloydMaxTable` (``bits = ceil(log2 L)``).
    """
    check_dist(dist)
    if num_levels < 1:
        raise ConfigError(f"Lloyd-Max needs at least one level, got {num_levels}")
    L = num_levels
    # Panter-Dite start: quantiles of the p^(1/3)-density = same family, standard deviation * sqrt(3).
    y = math.sqrt(3.0) * ppf(dist, (np.arange(L) + 0.5) / L)
    it = 0
    for it in range(1, max_iter + 1):
        y_new = _lloyd_step(dist, y)
        delta = float(np.max(np.abs(y_new - y)))
        y = y_new
        if delta < tol:
            break
        if delta < 1e-5 and L > 2:
            y, newton_iters = _newton(dist, y, tol)
            it += newton_iters
            break
    t = (y[:-1] + y[1:]) / 2
    lo = np.concatenate([[-np.inf], t])
    hi = np.concatenate([t, [np.inf]])
    m0, m1, m2 = partial_moments(dist, lo, hi)
    mse = float(np.sum(m2 - 2 * y * m1 + y * y * m0))
    bits = max(1, math.ceil(math.log2(L))) if L > 1 else 1
    return LloydMaxTable(dist, bits, y, t, mse, it)


def _cells(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = (y[:-1] + y[1:]) / 2
    return t, np.concatenate([[-np.inf], t]), np.concatenate([t, [np.inf]])


def _lloyd_step(dist: str, y: np.ndarray) -> np.ndarray:
    """One Lloyd iteration: midpoint thresholds, then conditional-mean levels (kept exactly symmetric)."""
    _, lo, hi = _cells(y)
    m0, m1, _ = partial_moments(dist, lo, hi)
    y_new = np.where(m0 > 0, m1 / np.where(m0 > 0, m0, 1.0), (lo.clip(-50, 50) + hi.clip(-50, 50)) / 2)
    return 0.5 * (y_new - y_new[::-1])


def _newton(dist: str, y: np.ndarray, tol: float, max_iter: int = 100) -> tuple[np.ndarray, int]:
    """Newton's method on ``D(y)`` with nearest-level thresholds; the Hessian is tridiagonal.

    ``dD/dy_i = 2 (y_i M0_i - M1_i)``;
    ``d2D/dy_i2 = 2 M0_i - p(t_i) (y_{i+1} - y_i)/2 - p(t_{i-1}) (y_i - y_{i-1})/2``;
    ``d2D/dy_i dy_{i+1} = -p(t_i) (y_{i+1} - y_i)/2``. A step that does not lower ``D`` falls back to Lloyd.
    """
    from scipy.linalg import solve_banded

    def dist_mse(v: np.ndarray) -> float:
        _, lo, hi = _cells(v)
        m0, m1, m2 = partial_moments(dist, lo, hi)
        return float(np.sum(m2 - 2 * v * m1 + v * v * m0))

    d_cur = dist_mse(y)
    for k in range(1, max_iter + 1):
        t, lo, hi = _cells(y)
        m0, m1, _ = partial_moments(dist, lo, hi)
        g = 2 * (y * m0 - m1)
        pt = pdf(dist, t)
        gap = np.diff(y) / 2
        diag = 2 * m0
        diag[:-1] -= pt * gap
        diag[1:] -= pt * gap
        off = -pt * gap
        ab = np.zeros((3, len(y)))
        ab[0, 1:] = off
        ab[1] = diag
        ab[2, :-1] = off
        step = solve_banded((1, 1), ab, -g)
        cand = y + step
        cand = 0.5 * (cand - cand[::-1])
        if np.all(np.diff(cand) > 0) and dist_mse(cand) <= d_cur + 1e-18:
            y_new = cand
        else:
            y_new = _lloyd_step(dist, y)
        delta = float(np.max(np.abs(y_new - y)))
        y = y_new
        d_cur = dist_mse(y)
        if delta < tol:
            return y, k
    return y, max_iter


@cache
def lloyd_max_table(dist: str, bits: int) -> LloydMaxTable:
    """Cached Lloyd-Max table with ``2**bits`` levels (bits in 1..8) for a unit-variance source."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"Lloyd-Max tables exist for 1..8 bits, got {bits}")
    tol = 1e-12
    return solve_lloyd_max(dist, 2**bits, tol=tol)


def laplace_scale_to_sigma(b: float) -> float:
    """Unit-variance scale of a Laplace with scale ``b`` (``sigma = sqrt(2) b``)."""
    return b / LAPLACE_BETA


def lloyd_empirical(
    x: torch.Tensor,
    init_levels: torch.Tensor,
    iters: int = 30,
    sorted_x: torch.Tensor | None = None,
    tol: float = 1e-7,
) -> torch.Tensor:
    """1-D k-means (Lloyd's algorithm) on each row of ``x``, started from ``init_levels``.

    Each iteration: thresholds at midpoints of the current levels, then each level moves to the mean of the
    values in its cell (a cell left empty keeps its level). The MSE never increases (Lloyd 1982).

    Args:
        x: float32 ``(m, n)`` values, one group per row.
        init_levels: ``(m, L)`` increasing starting levels (e.g. the fitted analytic Lloyd-Max levels).
        iters: maximum iterations.
        sorted_x: ``x`` sorted along dim 1, if already computed.
        tol: stop when no level moves more than ``tol`` times the group's spread.

    Returns:
        ``(m, L)`` float32 levels, increasing along dim 1.
    """
    xs = torch.sort(x.to(torch.float32), dim=1).values if sorted_x is None else sorted_x
    m, n = xs.shape
    cs = torch.zeros(m, n + 1, dtype=torch.float64, device=xs.device)
    cs[:, 1:] = torch.cumsum(xs.to(torch.float64), dim=1)
    y = init_levels.to(torch.float32).clone()
    spread = (xs[:, -1] - xs[:, 0]).clamp_min(1e-30)
    edges0 = torch.zeros(m, 1, dtype=torch.int64, device=xs.device)
    edgesn = torch.full((m, 1), n, dtype=torch.int64, device=xs.device)
    for _ in range(iters):
        t = (y[:, :-1] + y[:, 1:]) * 0.5
        pos = torch.searchsorted(xs, t.contiguous(), right=True)  # values <= t go to the lower cell
        edges = torch.cat([edges0, pos, edgesn], dim=1)
        cnt = (edges[:, 1:] - edges[:, :-1]).to(torch.float64)
        sums = cs.gather(1, edges[:, 1:]) - cs.gather(1, edges[:, :-1])
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1), y.to(torch.float64)).to(torch.float32)
        new = torch.sort(new, dim=1).values
        moved = ((new - y).abs().amax(dim=1) / spread).max()
        y = new
        if float(moved) < tol:
            break
    return y
