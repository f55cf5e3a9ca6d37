"""Lloyd-Max tables against the classical values (Max 1960) and the optimality conditions.

The Laplace levels are checked against the two Lloyd-Max conditions, each evaluated by numerical quadrature
(independent of the closed-form partial moments the solver uses): every level is the conditional mean of its
cell, every threshold the midpoint of its neighbours.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate

from dfquant.grids.distributions import LAPLACE_BETA, pdf
from dfquant.grids.lloyd_max import lloyd_max_table

pytestmark = pytest.mark.portable  # published values: checked under every CPU capability (make test-portable)

# Distortion of the unit-variance source at 1, 2, 3, 4 bits, to the printed precision.
GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009501}
LAPLACE_MSE = {1: 0.5, 2: 0.1762, 3: 0.0545, 4: 0.0154}
# Positive levels of the unit Gaussian quantizer (Max 1960, Table I).
GAUSSIAN_LEVELS = {2: (0.4528, 1.510), 3: (0.2451, 0.7560, 1.344, 2.152)}


def _digits(v: float) -> int:
    """Decimal places of a printed value (0.03455 -> 5, 1.510 -> 3)."""
    s = repr(v)
    return len(s.split(".")[1]) if "." in s else 0


def _sig_round(v: float, ref: float) -> float:
    """``v`` rounded to the significant figures printed in ``ref``."""
    sig = len(repr(ref).split(".")[1].lstrip("0")) if ref < 1 else len(repr(ref).replace(".", "").lstrip("0"))
    return float(f"{v:.{sig}g}")


@pytest.mark.parametrize(("dist", "table"), [("gaussian", GAUSSIAN_MSE), ("laplace", LAPLACE_MSE)])
def test_mse_matches_classical_tables(dist: str, table: dict[int, float]) -> None:
    for bits, ref in table.items():
        mse = lloyd_max_table(dist, bits).mse
        assert _sig_round(mse, ref) == pytest.approx(ref, abs=1e-12), (dist, bits, mse)


def test_one_bit_closed_forms() -> None:
    # Gaussian: levels +-sqrt(2/pi), D = 1 - 2/pi; Laplace: levels +-E|X| = +-beta, D = 1 - beta^2 = 1/2.
    g = lloyd_max_table("gaussian", 1)
    assert g.levels[1] == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12)
    assert g.mse == pytest.approx(1 - 2 / math.pi, abs=1e-12)
    lap = lloyd_max_table("laplace", 1)
    assert lap.levels[1] == pytest.approx(LAPLACE_BETA, abs=1e-12)
    assert lap.mse == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("bits", sorted(GAUSSIAN_LEVELS))
def test_gaussian_levels_match_max_1960(bits: int) -> None:
    levels = lloyd_max_table("gaussian", bits).levels
    ref = GAUSSIAN_LEVELS[bits]
    positive = levels[len(levels) // 2 :]
    for got, want in zip(positive, ref, strict=True):
        assert round(float(got), _digits(want)) == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-12)  # symmetric


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_satisfy_lloyd_max_conditions_by_quadrature(dist: str, bits: int) -> None:
    t = lloyd_max_table(dist, bits)
    y, thr = t.levels, t.thresholds
    np.testing.assert_allclose(thr, (y[:-1] + y[1:]) / 2, atol=1e-12)  # thresholds are midpoints
    edges = [-np.inf, *thr.tolist(), np.inf]
    mse = 0.0
    probs = np.zeros(len(y))
    for k in range(len(y)):
        a, b = edges[k], edges[k + 1]
        p0 = integrate.quad(lambda v: float(pdf(dist, v)), a, b, epsabs=1e-13, epsrel=1e-12)[0]
        p1 = integrate.quad(lambda v: v * float(pdf(dist, v)), a, b, epsabs=1e-13, epsrel=1e-12)[0]
        assert p1 / p0 == pytest.approx(y[k], abs=1e-8), (dist, bits, k)  # level = conditional mean
        probs[k] = p0
        mse += integrate.quad(lambda v, c=y[k]: (v - c) ** 2 * float(pdf(dist, v)), a, b, epsabs=1e-13, epsrel=1e-12)[0]
    assert mse == pytest.approx(t.mse, rel=1e-8)
    # At the optimum the distortion equals E[X^2] - sum y_k^2 P_k (the levels are centroids).
    assert 1.0 - float(np.sum(y * y * probs)) == pytest.approx(t.mse, rel=1e-7)


def test_laplace_two_bit_levels_from_the_conditions() -> None:
    # 4-level Laplace quantizer (beta = 1/sqrt 2): with threshold t, the outer level is the conditional mean of
    # the exponential tail, t + beta, and the inner one that of [0, t]; t is their midpoint. Solve by bisection.
    b = LAPLACE_BETA

    def inner(t: float) -> float:
        return b - t * math.exp(-t / b) / (1 - math.exp(-t / b))

    lo, hi = 0.1, 5.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (inner(mid) + mid + b) / 2 - mid > 0:
            lo = mid
        else:
            hi = mid
    y = lloyd_max_table("laplace", 2).levels
    assert y[2] == pytest.approx(inner(lo), abs=1e-9)
    assert y[3] == pytest.approx(lo + b, abs=1e-9)
    assert (round(y[2], 4), round(y[3], 4)) == (0.4198, 1.8340)


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_mse_decreases_with_bits(dist: str) -> None:
    mses = [lloyd_max_table(dist, b).mse for b in range(1, 9)]
    assert all(b < a for a, b in itertools.pairwise(mses))
    # High-resolution limit (Panter & Dite 1951): D * 4^b -> (int p^(1/3))^3 / 12, i.e. sqrt(3) pi / 2 for the
    # Gaussian and 9/2 for the unit-variance Laplace; at 8 bits within 2 %.
    limit = math.sqrt(3) * math.pi / 2 if dist == "gaussian" else 4.5
    assert mses[-1] * 4**8 == pytest.approx(limit, rel=0.02)
