"""``lloyd-optimal``: the globally optimal ``2^b``-level scalar quantizer of each group's own values.

For a group of ``n`` values and ``L = 2^b`` levels, the codebook minimizing the squared error
``sum_i min_k (x_i - y_k)^2`` is the optimum of 1-D k-means. Lloyd's iteration (``lloyd-empirical``) only
reaches a fixed point near its starting levels; in one dimension the global optimum is found exactly by
dynamic programming, because an optimal partition consists of contiguous runs of the sorted values (Fisher
1958, "On grouping for maximum homogeneity"; Bellman 1973; Wang and Song 2011, "Ckmeans.1d.dp: optimal
k-means clustering in one dimension by dynamic programming", The R Journal 3(2)). With sorted values
``x_(1) <= ... <= x_(n)`` and prefix sums ``S0, S1, S2`` of the (optionally weighted) counts, values and
squares, the cost of a run ``(j, i]`` about its mean is

    C(j, i) = (S2_i - S2_j) - (S1_i - S1_j)^2 / (S0_i - S0_j),

and ``D_k(i) = min_{j < i} D_{k-1}(j) + C(j, i)`` with ``D_1(i) = C(0, i)``; ``D_L(n)`` is the optimum and the
arg-mins give the runs, whose means are the levels. Levels are then encoded by the nearest-level rule, which
reproduces the optimal runs (an optimal partition is also a nearest-neighbour partition).

Cost: the run cost satisfies the quadrangle inequality, so the leftmost minimizing ``j`` is non-decreasing in
``i`` (and, across levels, ``j_{k-1}(i) <= j_k(i)``), and each level is solved by bisection over ``i`` in
``O(a log a)`` run costs per group for ``a`` atoms (the divide-and-conquer optimization, Galil and Park 1992;
Wang and Song 2011 use it for the same program; Gronlund et al. 2017, "Fast exact k-means, k-medians and
Bregman divergence clustering in 1D", find it faster in practice than the ``O(a)`` SMAWK variant). Blocks of
groups are solved at once with a handful of tensor operations per bisection round, on the input's device:
windows of similar lengths as one padded tensor, others as one ragged list. Groups of up to ``max_atoms`` values
(default 4096, and at most ``2^16 / L``: 4096 up to 4 bits, 256 at 8 bits) are solved exactly, one atom per
value. Larger groups are first cut into ``bins`` atoms (default 1024, same bound), half at equal counts and
half at equal widths of the range, so that sparse tails keep atoms of their own; each atom keeps the count,
sum and sum of squares of its values, so every cost above stays exact. The optimum is then the best
partition whose boundaries fall between atoms; Lloyd iterations on all values
(:func:`dfquant.grids.lloyd_max.lloyd_empirical`) refine it, and a group keeps the ``lloyd-empirical`` solution if
that is better.

Since every per-group rule with ``L`` levels and nearest-level encoding (uniform, Lloyd-Max, NF4, APoT,
k-means) yields some ``L``-level codebook of the group, the exact optimum's squared error is never above any
of theirs. Levels are stored per group in units of the half range around the mid range
(``offset = (max + min) / 2``, ``scale = (max - min) / 2``), so the unit levels lie in ``[-1, 1]``.

Example:
    >>> import torch
    >>> from dfquant import get_quantizer
    >>> w = torch.randn(8, 200)
    >>> e = lambda r: float(((get_quantizer(r, 3).fake_quantize(w) - w) ** 2).sum())
    >>> e("lloyd-optimal") <= e("lloyd-empirical")
    True
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfquant.errors import ConfigError
from dfquant.grids.lloyd_max import lloyd_empirical
from dfquant.quantizers.base import WEIGHTINGS, Quantizer
from dfquant.quantizers.codes import QParams, constant_groups
from dfquant.quantizers.lloyd import LloydEmpirical, group_sq_error, prefix_sums
from dfquant.quantizers.registry import register

__all__ = ["WEIGHTINGS", "LloydOptimal", "optimal_levels"]

#: Atoms (groups times atoms per group) solved in one block.
BLOCK_ELEMS = 1 << 19
#: Largest ``L * a`` (levels times atoms) solved per group: 16 levels over 4096 atoms, 256 over 256.
WORK_PER_GROUP = 1 << 16


def _atoms(xs: torch.Tensor, w: torch.Tensor, max_atoms: int) -> tuple[torch.Tensor, ...]:
    """Atoms of sorted values ``xs`` with weights ``w``: the sorted-value index where each atom starts
    (``(m, a + 1)``, ending with ``n``) and the prefix sums ``(S0, S1, S2)`` at those indices (float64).

    Up to ``max_atoms`` values, one atom per value. Beyond, ``a = max_atoms`` atoms cut both at equal counts
    (half of the cuts) and at equal widths of the range (the other half, so that sparse tails get atoms of
    their own); a cut falling where another already is leaves an empty atom, which costs nothing.
    """
    m, n = xs.shape
    dev = xs.device
    z = torch.zeros(m, 1, dtype=torch.float64, device=dev)
    x64, w64 = xs.to(torch.float64), w.to(torch.float64)
    s0 = torch.cat([z, w64.cumsum(1)], 1)
    s1 = torch.cat([z, (w64 * x64).cumsum(1)], 1)
    s2 = torch.cat([z, (w64 * x64 * x64).cumsum(1)], 1)
    if n <= max_atoms:
        return torch.arange(n + 1, device=dev).expand(m, -1), s0, s1, s2
    half = max_atoms // 2
    by_count = torch.div(torch.arange(half + 1, device=dev) * n, half, rounding_mode="floor").expand(m, -1)
    lo, hi = xs[:, :1], xs[:, -1:]
    frac = torch.arange(1, max_atoms - half, dtype=torch.float32, device=dev) / (max_atoms - half)
    by_width = torch.searchsorted(xs.contiguous(), (lo + (hi - lo) * frac).contiguous())
    cuts = torch.sort(torch.cat([by_count, by_width], dim=1), dim=1).values
    return cuts, s0.gather(1, cuts), s1.gather(1, cuts), s2.gather(1, cuts)


def _first_run(s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``D_1(i) = C(0, i)``: the squared error of the atoms ``(0, i]`` about their mean, ``(m, a + 1)``."""
    c0 = s0 - s0[:, :1]
    c1 = s1 - s1[:, :1]
    return ((s2 - s2[:, :1]) - c1 * c1 / c0.clamp_min(1e-300)).clamp_min(0.0)


def _schedule(a: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Positions ``1..a`` with their nearest already-visited neighbours: a list of ``(positions, left, right)``
    per round, with ``0`` and ``a + 1`` as sentinels. The end ``a`` comes first (it has no right bound), then
    ``1..a-1`` in breadth-first order of bisection, so that every later window is bounded on both sides."""
    out = [tuple(torch.tensor([v], device=device) for v in (a, 0, a + 1))]
    segments = [(0, a)]  # open intervals (left, right) whose inner positions are not visited yet
    while segments:
        mids, lefts, rights, nxt = [], [], [], []
        for lo, hi in segments:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            mids.append(mid)
            lefts.append(lo)
            rights.append(hi)
            nxt += [(lo, mid), (mid, hi)]
        if mids:
            out.append(tuple(torch.tensor(v, device=device) for v in (mids, lefts, rights)))
        segments = nxt
    return out  # type: ignore[return-value]


def _solve_block(s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, levels: int) -> torch.Tensor:
    """Optimal runs of ``a`` atoms into ``k = min(levels, a)`` clusters: ``(m, k + 1)`` atom boundaries.

    ``D_k(i) = min_j D_{k-1}(j) + C(j, i)`` for every end ``i``. The run cost satisfies the quadrangle
    inequality (Wang and Song 2011), so the leftmost minimizing ``j`` is non-decreasing in ``i``: each level
    is solved by bisection over ``i`` (the ``j`` of a middle end bounds those of the ends on either side),
    ``O(a log a)`` evaluations per group and level instead of ``O(a^2)`` (the divide-and-conquer
    optimization of such recurrences, Galil and Park 1992). The last level needs only ``i = a``.

    Since ``S2_i`` does not depend on ``j``, a candidate is scored as
    ``E(j) - (S1_i - S1_j)^2 / (S0_i - S0_j)`` with ``E(j) = D_{k-1}(j) - S2_j``, read from one table of
    ``(E, S1, S0)`` rows by flat index, and ``S2_i`` is added to the minimum.
    """
    m, a1 = s0.shape
    a = a1 - 1
    k = min(levels, a)
    if k == a:  # one atom per cluster
        return torch.arange(a1, device=s0.device).expand(m, -1).clone()
    dev = s0.device
    base = torch.arange(m, device=dev)[:, None] * a1
    d = _first_run(s0, s1, s2)  # one cluster: D_1(i) = C(0, i)
    schedule = _schedule(a, dev)
    final = [(torch.tensor([a], device=dev), torch.tensor([0], device=dev), torch.tensor([a + 1], device=dev))]
    s0f, s1f, s2f = s0.reshape(-1), s1.reshape(-1), s2.reshape(-1)
    prev = torch.zeros(m, a1, dtype=torch.int64, device=dev)  # one cluster starts at atom 0
    back = []
    for level in range(1, k):
        ef = (d - s2).reshape(-1)
        opt = torch.zeros(m, a + 2, dtype=torch.int64, device=dev)
        opt[:, a + 1] = a
        new_d = torch.full_like(d, float("inf"))
        for mids, left, right in schedule if level < k - 1 else final:
            p = mids.numel()
            lo = torch.maximum(opt[:, left], prev[:, mids])
            hi = torch.minimum(opt[:, right], (mids - 1).expand(m, -1))
            lo = torch.minimum(lo, hi)
            length = hi - lo + 1
            width, total = int(length.max()), int(length.sum())
            ends = base + mids  # flat index of each end
            if width * m * p <= 2 * total:  # windows of similar lengths: padded to one width (dense ops)
                j = torch.minimum(lo[:, :, None] + torch.arange(width, device=dev), hi[:, :, None])
                jf = (j + base[:, :, None]).reshape(-1)
                c1 = s1f[ends][:, :, None] - s1f.index_select(0, jf).reshape(m, p, width)
                c0 = s0f[ends][:, :, None] - s0f.index_select(0, jf).reshape(m, p, width)
                c0 = c0.clamp_min(1e-300)  # 0 only where c1 is 0 too (an empty or weightless run)
                val = ef.index_select(0, jf).reshape(m, p, width) - c1 * c1 / c0
                best, arg = val.min(dim=2)  # the first minimum: the leftmost j
                opt[:, mids] = j.gather(2, arg[:, :, None])[:, :, 0]
            else:  # ragged windows, one after another
                flat = length.reshape(-1)
                seg = torch.repeat_interleave(torch.arange(m * p, device=dev), flat, output_size=total)
                start = torch.cumsum(flat, 0) - flat
                j = ((lo + base).reshape(-1) - start).index_select(0, seg) + torch.arange(total, device=dev)
                c1 = s1f[ends].reshape(-1).index_select(0, seg) - s1f.index_select(0, j)
                c0 = (s0f[ends].reshape(-1).index_select(0, seg) - s0f.index_select(0, j)).clamp_min(1e-300)
                val = ef.index_select(0, j) - c1 * c1 / c0
                best = torch.full((m * p,), float("inf"), dtype=val.dtype, device=dev).scatter_reduce(
                    0, seg, val, "amin", include_self=True
                )
                leftmost = torch.where(val == best.index_select(0, seg), j, m * a1)
                arg = torch.full((m * p,), m * a1, dtype=torch.int64, device=dev).scatter_reduce(
                    0, seg, leftmost, "amin", include_self=True
                )
                opt[:, mids] = torch.minimum(arg.reshape(m, p) - base, hi)  # all-inf windows: their last j
                best = best.reshape(m, p)
            cost = best + s2f[ends]
            new_d[:, mids] = torch.maximum(cost, torch.zeros_like(cost))
        d = new_d
        prev = opt[:, :a1]
        back.append(prev)
    bounds = torch.empty(m, k + 1, dtype=torch.int64, device=dev)
    bounds[:, 0] = 0
    bounds[:, k] = a
    i = torch.full((m, 1), a, dtype=torch.int64, device=dev)
    for step in range(k - 1, 0, -1):
        i = back[step - 1].gather(1, i)
        bounds[:, step] = i[:, 0]
    return bounds


def optimal_levels(
    x: torch.Tensor,
    levels: int,
    weights: torch.Tensor | None = None,
    *,
    max_atoms: int = 4096,
    sorted_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Levels of the minimum squared-error ``levels``-level scalar quantizer of each row of ``x``.

    Minimizes ``sum_i w_i (x_i - y_{k(i)})^2`` over the levels ``y`` and the assignment (weighted 1-D k-means)
    by dynamic programming over the sorted values (see the module docstring). Exact when a row has at most
    ``max_atoms`` values; otherwise exact over partitions whose boundaries fall between ``max_atoms`` atoms
    cut at equal counts and equal widths (callers refine that solution with Lloyd iterations).

    Args:
        x: ``(m, n)`` float values, one group per row.
        levels: number of levels ``L >= 1``.
        weights: ``(m, n)`` non-negative weights of the values (None: all 1); a row whose weights are all 0 is
            treated as unweighted.
        max_atoms: atoms per row for the exact program (``O(L a log a)`` work per row, ``a <= max_atoms``).
        sorted_x: ``x`` sorted along dim 1, if already computed (only when ``weights`` is None).

    Returns:
        ``(m, L)`` float32 levels, non-decreasing along dim 1. A row with fewer than ``L`` distinct runs
        repeats its largest level.

    Raises:
        ConfigError: ``levels < 1``, ``max_atoms < 2`` or weights of another shape.
    """
    if levels < 1 or max_atoms < 2:
        raise ConfigError(f"optimal_levels needs levels >= 1 and max_atoms >= 2, got {levels}, {max_atoms}")
    x = x.to(torch.float32)
    m, n = x.shape
    if weights is None:
        xs = torch.sort(x, dim=1).values if sorted_x is None else sorted_x.to(torch.float32)
        ws = torch.ones_like(xs)
    else:
        if weights.shape != x.shape:
            raise ConfigError(f"weights of shape {tuple(weights.shape)} do not match values {tuple(x.shape)}")
        xs, order = torch.sort(x, dim=1)
        w = weights.to(torch.float32).clamp_min(0.0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        ws = w.gather(1, order)
    a = min(n, max_atoms)
    rows = max(1, BLOCK_ELEMS // (a + 1))
    out = torch.empty(m, levels, dtype=torch.float32, device=x.device)
    for r0 in range(0, m, rows):
        out[r0 : r0 + rows] = _solve_rows(xs[r0 : r0 + rows], ws[r0 : r0 + rows], levels, max_atoms)
    return out


def _solve_rows(xs: torch.Tensor, ws: torch.Tensor, levels: int, max_atoms: int) -> torch.Tensor:
    """Optimal levels ``(m, L)`` of a block of sorted rows ``xs`` with weights ``ws``."""
    n = xs.shape[1]
    cuts, s0, s1, s2 = _atoms(xs, ws, max_atoms)
    bounds = _solve_block(s0, s1, s2, levels)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    cnt = s0.gather(1, hi) - s0.gather(1, lo)
    tot = s1.gather(1, hi) - s1.gather(1, lo)
    # a run of zero weight (empty atoms, or zero weights) takes the mid range of the values around it
    first = cuts.gather(1, lo).clamp_max(n - 1)
    last = (cuts.gather(1, hi) - 1).clamp(min=0)
    mid = (xs.gather(1, first) + xs.gather(1, last)).to(torch.float64) / 2
    y = torch.where(cnt > 0, tot / torch.where(cnt > 0, cnt, torch.ones_like(cnt)), mid).to(torch.float32)
    k = y.shape[1]
    if k < levels:
        y = torch.cat([y, y[:, -1:].expand(-1, levels - k)], dim=1)
    return torch.sort(y, dim=1).values


def _strictly_increasing(unit: torch.Tensor, step: float = 1e-3) -> torch.Tensor:
    """Make sorted levels strictly increasing: a level repeating the one below it moves ``step`` above it.

    Repeats arise when a group has fewer distinct values than levels (every value then sits exactly on a
    level, and the moved levels sit above the largest value, where no value is nearest to them) or from runs
    of zero weight; a codebook must be strictly increasing to be shared as a grid.
    """
    out = unit.clone()
    for k in range(1, out.shape[1]):
        out[:, k] = torch.maximum(out[:, k], out[:, k - 1] + step)
    return out.contiguous()


@register
class LloydOptimal(Quantizer):
    """The minimum squared-error ``2^b``-level codebook of each group (exact 1-D k-means, per group).

    See the module docstring for the dynamic program and its sources. The squared error of each group solved
    exactly is never above that of any other rule with ``2^b`` levels; for larger groups it is never above
    that of ``lloyd-empirical`` (checked per group).

    With ``weighting="input-variance"`` the rule asks :func:`dfquant.quantize_model` for importance
    weights (:attr:`wants_importance`) and minimizes ``sum_i a_i (w_i - w_hat_i)^2`` instead. For a layer
    ``y = W x`` whose input channels are uncorrelated with variances ``s_c^2``, the output error left after
    bias correction (which removes the mean part ``dW E[x]``) is ``E||dW (x - E[x])||^2 =
    sum_{o, c, taps} s_c^2 dW[o, c, taps]^2``: the weight error of an input channel counts in proportion to
    that channel's variance (a diagonal approximation of the layer's input second moment, as in Optimal Brain
    Surgeon, Hassibi and Stork 1993, and in GPTQ, Frantar et al. 2023, here taken from the BatchNorm
    statistics instead of data). The pipeline uses ``s_c^2 + E[x_c]^2`` when bias correction is off, and
    equal weights where a layer's input statistics are unknown.

    Options:
        max_atoms: largest group solved exactly (default 4096, at least 2; at most ``2^16 / L``).
        bins: larger groups are solved over this many atoms (default 1024, at least 2; same bound) and, when
            unweighted, refined with Lloyd iterations.
        iters: Lloyd refinement iterations for larger groups (default 30).
        weighting: ``"none"`` (default) or ``"input-variance"`` (see above).

    ``QParams.info`` holds nothing; levels are per group ``(m, L)`` in units of the half range.
    """

    name = "lloyd-optimal"
    description = "globally optimal per-group codebook (exact 1-D k-means by dynamic programming)"
    runs_on_device: ClassVar[bool] = True
    options_allowed: ClassVar[tuple[str, ...]] = ("max_atoms", "bins", "iters", "weighting")
    supports_importance = True
    max_atoms: int
    bins: int

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        for key, default in (("max_atoms", 4096), ("bins", 1024)):
            value = self.options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"quantizer '{self.name}': {key} must be an integer >= 2, got {value!r}")
            setattr(self, key, value)
        iters = self.options.get("iters", 30)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ConfigError(f"quantizer '{self.name}': iters must be an integer >= 0, got {iters!r}")
        self.iters = iters

    def fit(self, x: torch.Tensor) -> QParams:
        """Fit ``m`` groups ``(m, n)``: the optimal levels, around the mid range in half-range units."""
        return self._fit(x, None)

    def fit_weighted(self, x: torch.Tensor, importance: torch.Tensor) -> QParams:
        """Fit ``m`` groups ``(m, n)`` minimizing the squared error weighted by ``importance``."""
        return self._fit(x, importance)

    def _fit(self, x: torch.Tensor, importance: torch.Tensor | None) -> QParams:
        xs = torch.sort(x, dim=1).values
        levels = 2**self.bits
        cap = max(2, WORK_PER_GROUP // levels)  # keeps L * a <= WORK_PER_GROUP
        exact = x.shape[1] <= min(self.max_atoms, cap)
        atoms = max(2, x.shape[1] if exact else min(self.bins, cap))
        if importance is not None:
            y = optimal_levels(x, levels, importance, max_atoms=atoms)
        else:
            y = optimal_levels(x, levels, max_atoms=atoms, sorted_x=xs)
        if not exact and importance is None:
            sums = prefix_sums(xs)
            y = lloyd_empirical(x, y, iters=self.iters, sorted_x=xs)
            ref = LloydEmpirical(self.bits, iters=self.iters).fit(x.cpu())  # its fit runs on the host
            tables, index = ref.tables()
            start = (tables[index] * ref.scale[:, None] + ref.offset[:, None]).to(x.device)
            better = group_sq_error(xs, start, sums) < group_sq_error(xs, y, sums)
            y = torch.where(better[:, None], start, y)
        lo, hi = xs[:, 0], xs[:, -1]
        offset = (hi + lo) / 2
        scale = (hi - lo) / 2
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        unit = torch.sort(((y - offset[:, None]) / safe).clamp(-1.0, 1.0), dim=1).values
        unit = torch.where((scale > 0)[:, None], unit, torch.linspace(-1.0, 1.0, unit.shape[1], device=x.device))
        return constant_groups(x, QParams(scale=scale, offset=offset, levels=_strictly_increasing(unit)))

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """The Lloyd-Max distortion ``D*`` less the part fitted to a finite sample (as ``lloyd-empirical``).

        For the Gaussian and Laplace sources (log-concave densities) the Lloyd-Max fixed point is the unique
        locally optimal quantizer (Fleischer 1964; Trushkin 1982), hence the global optimum the exact program
        converges to as the group grows; the finite-sample term is
        :meth:`dfquant.quantizers.lloyd.LloydEmpirical.expected_mse`'s.
        """
        return LloydEmpirical(self.bits).expected_mse(dist, group_size)
