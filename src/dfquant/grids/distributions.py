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

import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache
from typing import Literal

import numpy as np
import torch
from scipy import special

from dfquant.errors import ConfigError

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


#: torch's reduction grain (``at::internal::GRAIN_SIZE``): torch splits a lone reduced row at least this long across
#: threads, so the float32 sums of such rows depend on how rows are blocked (see :func:`fit_groups`).
_GRAIN = 32768
#: Values per block of rows in :func:`fit_groups`: the block's temporaries stay in the L2 cache.
_BLOCK = 1 << 16
#: Values per worker thread (at least) in :func:`split_threads`.
_MIN_SPLIT = 1 << 18
_UNIT_ROUNDOFF = 2.0**-53


@contextmanager
def serial_torch() -> Iterator[None]:
    """Inside the block torch runs every op on one intra-op thread; the caller's setting is restored after.

    The blocked loops of :func:`fit_groups` and :func:`dfquant.quantizers.lloyd.encode_rows_fast` run ops on a
    few ten thousand values, which a second thread hardly speeds up while each parallel region costs a
    synchronisation: on a loaded machine (another process on the other core) that wait takes milliseconds, and
    the loops ran 4x slower with two threads than with one. They split their rows over threads themselves
    (:func:`run_split`). ``torch.set_num_threads`` is process-wide: other threads running torch meanwhile see
    one thread too.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def run_split(m: int, work: Callable[[int, int], None], threads: int) -> None:
    """Call ``work(start, stop)`` on ``threads`` contiguous parts of ``range(m)`` at once, each on its own Python
    thread (torch and NumPy release the GIL inside their kernels); ``work(0, m)`` when ``threads < 2``."""
    if threads < 2 or m < 2:
        work(0, m)
        return
    cuts = [m * k // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, a, b) for a, b in itertools.pairwise(cuts) if b > a]:
            f.result()


def split_threads(numel: int) -> int:
    """Worker threads for blocked work on ``numel`` values: torch's thread count (at most 2 per
    ``_MIN_SPLIT`` values), read before :func:`serial_torch` sets it to 1."""
    return max(1, min(torch.get_num_threads(), numel // _MIN_SPLIT))


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along dim 1 (values only): the values of ``torch.sort(x, dim=1).values``.

    CPU float32 matrices go through NumPy's vectorized sort (x86-simd-sort, AVX-512 where the CPU has it: about
    10x ``torch.sort`` on rows of 64 values), on torch's thread count (NumPy releases the GIL while sorting). Rows
    holding a ``-0.0`` are sorted by torch (the two zeros compare equal; NumPy's sort may order them otherwise or
    even write one for the other), so the result is torch's bit for bit.
    """
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad or x.numel() < 2:
        return torch.sort(x, dim=1).values
    xc = x.detach().contiguous()
    src = xc.numpy()
    out = src.copy()

    def part(a: int, b: int) -> None:
        out[a:b].sort(axis=1)

    run_split(out.shape[0], part, split_threads(out.size))
    res = torch.from_numpy(out)
    # -0.0 == +0.0: NumPy's vectorized sort may write either zero for the other, and torch's order of the two is
    # its own; rows holding a -0.0 are sorted by torch
    neg_zero = torch.from_numpy((np.signbit(src) & (src == 0)).any(axis=1)).nonzero().squeeze(1)
    if neg_zero.numel():
        res[neg_zero] = torch.sort(xc[neg_zero], dim=1).values
    return res


def _exact_std(x: torch.Tensor, sd: torch.Tensor, mu: torch.Tensor, buf: torch.Tensor) -> None:
    """Population standard deviation of each row of ``x`` in float64, written to ``sd``; ``mu`` receives the float64
    means. Squares of float32 values are exact in float64, so ``M2 = sum x^2 - (sum x)^2 / n`` only carries the
    float64 rounding of the sums, relatively ``O(n u kappa^2)`` (see :func:`_uncertain_std`, which turns ``sd`` into
    ``x.std(dim=1, correction=0)``)."""
    n = x.shape[1]
    d = buf[: x.shape[0]]
    d.copy_(x)
    torch.sum(d, dim=1, out=mu)
    torch.linalg.vecdot(d, d, out=sd)
    mu.div_(n)
    sd.sub_(mu * mu * n).clamp_min_(0).div_(n).sqrt_()


def _uncertain_std(sd: torch.Tensor, mu: torch.Tensor, n: int) -> torch.Tensor:
    """Rows whose float64 standard deviation ``sd`` (:func:`_exact_std`) might round to another float32 than torch's.

    torch accumulates the float32 rows in float64 (Welford's update) and rounds ``sqrt(M2 / n)`` to float32 once.
    Both float64 variances are within ``delta = 16 n u (var + mean^2) + 4 u var`` of the exact one (``u = 2^-53``;
    float64 sums of ``n`` terms err by at most ``n u`` times the sum of their magnitudes, ``n (var + mean^2)``
    here, and Welford's update by ``O(n u kappa)`` relative, Chan, Golub and LeVeque 1983). So torch's value lies
    in ``[sqrt(var - delta), sqrt(var + delta)]``, and rounds to ``float32(sd)`` unless that interval reaches a
    rounding boundary (the midpoint between ``float32(sd)`` and a neighbour): about one row in ``1 / (n * 1e-5)``
    on well-conditioned data, every row whose spread is tiny against its mean. Returns their indices.
    """
    s32 = sd.to(torch.float32)
    s = s32.to(torch.float64)
    up = torch.nextafter(s32, torch.full_like(s32, math.inf)).to(torch.float64)
    down = torch.nextafter(s32, torch.full_like(s32, -math.inf)).to(torch.float64)
    var = sd * sd
    delta = (16 * n * _UNIT_ROUNDOFF) * (var + mu * mu) + (4 * _UNIT_ROUNDOFF) * var
    low = (var - delta).clamp_min(0).sqrt()
    high = (var + delta).sqrt()
    near = (low <= (s + down) * 0.5) | (high >= (s + up) * 0.5)
    return near.nonzero().squeeze(1)


def _cdf_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical CDF steps ``i / n`` and ``(i - 1) / n``, ``i = 1..n`` (float32, ``(1, n)``)."""
    i = torch.arange(1, n + 1, dtype=torch.float32)
    return (i / n)[None, :], ((i - 1) / n)[None, :]


def _ks_gaussian(xs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KS statistic of the Gaussian fit of sorted rows (plain formula; zero-spread rows are the caller's)."""
    hi, lo = _cdf_grid(xs.shape[1])
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    Fg = torch.special.ndtr((xs - mean[:, None]) / safe_std[:, None])
    return torch.maximum((hi - Fg).amax(dim=1), (Fg - lo).amax(dim=1))


def fit_groups(
    x: torch.Tensor, sorted_x: torch.Tensor | None = None, block: int | None = None, ks: str = "both"
) -> GroupFit:
    """Fit Gaussian (mean, std) and Laplace (median, mean absolute deviation) to each row of ``x``.

    The Kolmogorov-Smirnov statistic of each fit is
    ``D = max_i max(i/n - F(x_(i)), F(x_(i)) - (i-1)/n)`` over the sorted sample ``x_(1) <= ... <= x_(n)``
    (Kolmogorov 1933; Smirnov 1948), with ``F`` the fitted CDF. A lower ``D`` is the better fit.

    Every output is bit-identical to the plain float32 formulas (:func:`fit_groups_reference`). Rows shorter than
    32768 values are done in one pass over blocks of about 65536 values that stay in cache, split over torch's
    threads (:func:`run_split`, :func:`serial_torch`):

    * each block is sorted there (NumPy) unless ``sorted_x`` is given; the median is read off it (rows whose
      median is a zero next to a ``-0.0`` take its sign from ``torch.sort``, :func:`_signed_zero_medians`);
    * the CDFs are evaluated once per sorted value, ``F_G = Phi((x_(i) - mean) / std)`` and the Laplace
      ``F_L = e / 2`` below the median, ``1 - e / 2`` above it, with ``e = exp(-|x_(i) - median| / b)``. The
      sorted values below the median are the first ``floor(n / 2)`` (the median is their midpoint or the middle
      value), so the side is a column split, not a per-value test;
    * the standard deviation comes from float64 sums of ``x`` and ``x^2`` (:func:`_exact_std`) instead of torch's
      scalar Welford loop, rounded to float32; the few rows where that rounding is uncertain are recomputed by
      torch (:func:`_uncertain_std`) together with their Gaussian statistic;
    * mean and mean absolute deviation are torch's float32 row means of the unsorted values, as before.

    Args:
        x: float32 tensor ``(m, n)``, finite.
        sorted_x: ``x`` sorted along dim 1, if already computed (:func:`sort_rows`).
        block: rows of ``n >= 32768`` values only: torch splits a lone row this long across threads, so their
            float32 sums (and Welford standard deviation) depend on whether a block holds one row or more. They
            are fitted by the plain formulas in blocks of ``max(1, block // n)`` rows (the whole matrix at once
            when None), as earlier versions did; so are tensors on other devices than the CPU.
        ks: ``"both"`` (default), or ``"gaussian"`` / ``"laplace"`` when the caller needs only that family's KS
            statistic (a rule with a forced family): the blocked pass then skips the other one's CDF and leaves
            its statistic NaN (the plain-formula path computes both anyway).

    Returns:
        A :class:`GroupFit`. Groups with zero spread get ``std = 0`` and KS statistics of 0.
    """
    if ks not in ("both", "gaussian", "laplace"):
        raise ConfigError(f"fit_groups: ks must be 'both', 'gaussian' or 'laplace', got {ks!r}")
    x = x.detach().to(torch.float32)
    m, n = x.shape
    if n >= _GRAIN or m == 0 or x.device.type != "cpu":
        rows = m if block is None else max(1, block // n)
        xs = sort_rows(x) if sorted_x is None else sorted_x
        if rows >= m:
            return fit_groups_reference(x, xs)
        parts = [fit_groups_reference(x[i : i + rows], xs[i : i + rows]) for i in range(0, m, rows)]
        return GroupFit(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(GroupFit)))
    threads = split_threads(x.numel())
    with serial_torch():
        return _fit_short(x.contiguous(), sorted_x, threads, ks)


def _fit_short(x: torch.Tensor, sorted_x: torch.Tensor | None, threads: int, ks: str = "both") -> GroupFit:
    """:func:`fit_groups` of rows shorter than ``_GRAIN`` values (blocked, on ``threads`` threads)."""
    m, n = x.shape
    out = {k: torch.empty(m) for k in ("mean", "std", "median", "mad", "ks_g", "ks_l")}
    sd, mu = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
    rows = max(1, min(m, _BLOCK // n))

    def work(a: int, b: int) -> None:
        _fit_rows(x, sorted_x, a, b, rows, out, sd, mu, ks)

    run_split(m, work, threads)
    mean, std, median, mad, ks_g, ks_l = (out[k] for k in ("mean", "std", "median", "mad", "ks_g", "ks_l"))
    if sorted_x is None:
        _signed_zero_medians(x, median)
    idx = _uncertain_std(sd, mu, n)
    if idx.numel():
        exact = x[idx].std(dim=1, correction=0)
        changed = idx[exact != std[idx]]
        std[idx] = exact
        if changed.numel() and ks != "laplace":
            xs_c = sort_rows(x[changed]) if sorted_x is None else sorted_x[changed]
            ks_g[changed] = _ks_gaussian(xs_c, mean[changed], std[changed])
    lap_sigma = mad * math.sqrt(2.0)
    flat = std == 0
    ks_g = torch.where(flat, torch.zeros_like(ks_g), ks_g)
    ks_l = torch.where(flat | (mad == 0), torch.where(flat, torch.zeros_like(ks_l), torch.ones_like(ks_l)), ks_l)
    return GroupFit(mean, std, median, lap_sigma, ks_g, ks_l)


def _signed_zero_medians(x: torch.Tensor, median: torch.Tensor) -> None:
    """Give zero medians the sign ``torch.sort`` gives them.

    ``-0.0`` and ``+0.0`` compare equal, so NumPy's sort may order them otherwise than torch's (or write one for the
    other), and a median taken between zeros may come out as the other zero (the same value, another bit pattern,
    which would show in stored offsets). Rows with a zero median and a ``-0.0`` are sorted again by torch. Elsewhere
    the sign of a sorted zero does not matter: ``Phi`` and ``exp`` of ``+-0`` are equal.
    """
    idx = (median == 0).nonzero().squeeze(1)
    if not idx.numel():
        return
    sub = x[idx]
    idx = idx[(torch.signbit(sub) & (sub == 0)).any(dim=1)]
    if idx.numel():
        xs = torch.sort(x[idx], dim=1).values
        n = x.shape[1]
        median[idx] = xs[:, (n - 1) // 2] if n % 2 == 1 else 0.5 * (xs[:, n // 2 - 1] + xs[:, n // 2])


def _ks_gaussian_block(
    xs: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    hi: torch.Tensor,
    lo: torch.Tensor,
    F: torch.Tensor,
    d: torch.Tensor,
    safe: torch.Tensor,
    t: torch.Tensor,
    one: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Gaussian KS statistics of the sorted block ``xs`` into ``out``: ``F = Phi((x - mean) / std)``, in the
    buffers ``F``, ``d`` (block-sized), ``safe``, ``t`` (per row) of :func:`_fit_rows`."""
    torch.where(std > 0, std, one, out=safe)
    torch.sub(xs, mean[:, None], out=F)
    F.div_(safe[:, None])
    torch.special.ndtr(F, out=F)
    torch.amax(torch.sub(hi, F, out=d), dim=1, out=out)
    torch.amax(torch.sub(F, lo, out=d), dim=1, out=t)
    torch.maximum(out, t, out=out)


def _fit_rows(
    x: torch.Tensor,
    sorted_x: torch.Tensor | None,
    start: int,
    stop: int,
    rows: int,
    out: dict[str, torch.Tensor],
    sd: torch.Tensor,
    mu: torch.Tensor,
    ks: str = "both",
) -> None:
    """The blocked pass of :func:`fit_groups` over rows ``start:stop``, ``rows`` rows per block (``ks``: which KS
    statistics; a skipped one is NaN)."""
    n = x.shape[1]
    hi, lo = _cdf_grid(n)
    unit = torch.ones(1, 1)
    k0 = n // 2  # x_(i) <= median for i < k0, x_(i) >= median from k0 on
    F, d = torch.empty(rows, n), torch.empty(rows, n)
    dbuf = torch.empty(rows, n, dtype=torch.float64)
    safe, t, ones = torch.empty(rows), torch.empty(rows), torch.ones(rows)
    if sorted_x is None:
        x_np = x.numpy()
        sort_np = np.empty((rows, n), dtype=np.float32)
        sort_t = torch.from_numpy(sort_np)
    mean, std, median, mad, ks_g, ks_l = (out[k] for k in ("mean", "std", "median", "mad", "ks_g", "ks_l"))
    for s in range(start, stop, rows):
        e = min(s + rows, stop)
        c = e - s
        xc = x[s:e]
        if sorted_x is None:
            np.copyto(sort_np[:c], x_np[s:e])
            sort_np[:c].sort(axis=1)
            xsc = sort_t[:c]
        else:
            xsc = sorted_x[s:e]
        med = median[s:e]
        if n % 2:
            med.copy_(xsc[:, k0])
        else:
            torch.add(xsc[:, k0 - 1], xsc[:, k0], out=med).mul_(0.5)
        torch.mean(xc, dim=1, out=mean[s:e])
        _exact_std(xc, sd[s:e], mu[s:e], dbuf)
        std[s:e].copy_(sd[s:e])
        Fc, dc, sc, tc, one = F[:c], d[:c], safe[:c], t[:c], ones[:c]
        torch.sub(xc, med[:, None], out=Fc)
        torch.mean(Fc.abs_(), dim=1, out=mad[s:e])
        if ks == "laplace":
            ks_g[s:e] = math.nan
        else:
            _ks_gaussian_block(xsc, mean[s:e], std[s:e], hi, lo, Fc, dc, sc, tc, one, ks_g[s:e])
        if ks == "gaussian":
            ks_l[s:e] = math.nan
            continue
        # Laplace: -|x - median| / b is (x - median) / b below the median and (median - x) / b above it (exact),
        # e = exp(.), F = e/2 below, 1 - e/2 above: one rounding either way, as e/2 is exact (for a subnormal e,
        # where it is not, 1 - e/2 rounds to 1 anyway)
        torch.where(mad[s:e] > 0, mad[s:e], one, out=sc)
        torch.sub(xsc[:, :k0], med[:, None], out=Fc[:, :k0])
        torch.sub(med[:, None], xsc[:, k0:], out=Fc[:, k0:])
        Fc.div_(sc[:, None]).exp_()
        Fc[:, :k0].mul_(0.5)
        torch.add(unit, Fc[:, k0:], alpha=-0.5, out=Fc[:, k0:])
        torch.amax(torch.sub(hi, Fc, out=dc), dim=1, out=ks_l[s:e])
        torch.amax(torch.sub(Fc, lo, out=dc), dim=1, out=tc)
        torch.maximum(ks_l[s:e], tc, out=ks_l[s:e])


def fit_groups_reference(x: torch.Tensor, sorted_x: torch.Tensor | None = None) -> GroupFit:
    """The plain formulas of :func:`fit_groups` on the whole matrix at once (slow; the definition it is tested
    against)."""
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
