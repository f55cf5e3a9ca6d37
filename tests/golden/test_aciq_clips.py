"""ACIQ clips (Banner et al. 2019), the optimal uniform quantizer of a unit Gaussian (Max 1960), the FP4 E2M1
levels, the optimal clip ratios of the error model, and where the granular + clipping approximation holds.

Banner et al. print 1.71, 2.15, 2.55 (Gaussian, ``alpha / sigma``) and 2.83, 3.89, 5.03 (Laplace, ``alpha / b``) at
2, 3, 4 bits. Minimizing their formula gives 1.7106, 2.1516, 2.5591 and 2.8307, 3.8972, 5.0286: the printed
values are within 0.01 of these (some truncated, some rounded), which is the tolerance used for them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dfquant import get_quantizer
from dfquant.grids.distributions import LAPLACE_BETA
from dfquant.grids.error_model import aciq_alpha, approx_mse, exact_mse, optimal_clip
from dfquant.grids.formats import make_grid

pytestmark = pytest.mark.portable  # published values: checked under every CPU capability (make test-portable)

PAPER_CLIPS = {"gaussian": {2: 1.71, 3: 2.15, 4: 2.55}, "laplace": {2: 2.83, 3: 3.89, 4: 5.03}}
SOLVED_CLIPS = {"gaussian": {2: 1.7106, 3: 2.1516, 4: 2.5591}, "laplace": {2: 2.8307, 3: 3.8972, 4: 5.0286}}
# Max (1960), Table II: optimum uniform quantizer of a unit Gaussian, 4, 8, 16 levels: MSE and step size.
MAX_UNIFORM = {2: (0.1188, 0.9957), 3: (0.03744, 0.5860), 4: (0.01154, 0.3352)}

# The grids whose optimal clip is checked against scipy's integrator (``test_optimal_clip_ratios``).
OPTIMUM_GRIDS = [
    *(f"int{b}-mr" for b in range(2, 9)),
    "fp8_e4m3",
    "fp8_e5m2",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
    "nf4",
]
# The FP4 E2M1 grid's optimal clip for a unit Gaussian (C*/sigma), from scipy's integrator below.
FP4_GAUSSIAN_CLIP = 2.9225


def _density(dist: str):  # type: ignore[no-untyped-def]
    """The unit-variance density: N(0, 1), or Laplace with b = 1/sqrt(2)."""
    if dist == "gaussian":
        return lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    b = 1 / math.sqrt(2)
    return lambda x: math.exp(-abs(x) / b) / (2 * b)


def _quad_mse(levels: np.ndarray, clip: float, dist: str) -> float:
    """``E[(X - Q(X))^2]`` for nearest-level rounding onto ``levels`` scaled so the largest magnitude is
    ``clip``: one ``scipy.integrate.quad`` per cell between midpoints (the tails to infinity)."""
    from scipy.integrate import quad

    p = _density(dist)
    lv = np.sort(levels) * clip / np.max(np.abs(levels))
    edges = [-math.inf, *((lv[1:] + lv[:-1]) / 2), math.inf]
    total = 0.0
    for i, y in enumerate(lv):
        lo, hi = edges[i], edges[i + 1]
        # split at the level and at 0 (the Laplace kink) so each piece is smooth for the integrator
        cuts = sorted({lo, hi, float(y), *([0.0] if lo < 0.0 < hi else [])})
        for a, b in itertools.pairwise(cuts):
            total += quad(lambda x, y=y: (x - y) ** 2 * p(x), a, b, epsabs=1e-15, epsrel=1e-12, limit=200)[0]
    return total


def _model_levels(name: str) -> np.ndarray:
    y = np.asarray(make_grid(name).levels, dtype=np.float64)
    return y - (y[0] + y[-1]) / 2 if make_grid(name).family == "uint" else y


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_aciq_clips_match_the_paper(dist: str) -> None:
    for bits, printed in PAPER_CLIPS[dist].items():
        c = aciq_alpha(dist, bits)
        assert c == pytest.approx(printed, abs=0.01), (dist, bits, c)
        assert c == pytest.approx(SOLVED_CLIPS[dist][bits], abs=1e-4)
        # The quantizer uses it: alpha in units of the unit-variance sigma is c * sigma or c * b.
        unit = 1.0 if dist == "gaussian" else LAPLACE_BETA
        assert get_quantizer("aciq", bits).clip(dist) == pytest.approx(c * unit, rel=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_levels_are_2_to_the_m_bins_over_the_clip(bits: int) -> None:
    q = get_quantizer("aciq", bits)
    for dist in ("gaussian", "laplace"):
        alpha = q.clip(dist)
        lv = q.unit_levels(dist).double().numpy()
        assert len(lv) == 2**bits
        step = 2 * alpha / 2**bits
        assert np.allclose(np.diff(lv), step, rtol=1e-6)
        assert lv[-1] == pytest.approx(alpha - step / 2, rel=1e-6)
        assert q.expected_mse(dist) == pytest.approx(exact_mse(q.grid, dist, float(lv[-1])), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_best_uniform_quantizer_of_a_unit_gaussian(bits: int) -> None:
    mse, step = MAX_UNIFORM[bits]
    opt = optimal_clip(make_grid("int-mr", bits), "gaussian")
    assert float(f"{opt.mse:.4g}") == mse
    assert opt.scale == pytest.approx(step, abs=1e-4)  # the step size of int-mr at scale s is s
    # The mse rule's population optimum and the statq analytic rule are the same optimum.
    assert get_quantizer("mse", bits).expected_mse("gaussian") == pytest.approx(opt.mse, rel=1e-7)
    assert get_quantizer("statq", bits).expected_mse("gaussian") == pytest.approx(opt.mse, rel=1e-12)


def test_fp4_e2m1_levels() -> None:
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert list(make_grid("fp4_e2m1").levels) == [-v for v in reversed(pos[1:])] + pos
    q = get_quantizer("statq", 4, format="fp4_e2m1")
    lv = q.unit_levels("gaussian").double().numpy()
    c = FP4_GAUSSIAN_CLIP
    assert np.allclose(lv, np.array(make_grid("fp4_e2m1").levels) * c / 6, rtol=1e-4)


@pytest.mark.parametrize("name", OPTIMUM_GRIDS)
@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_optimal_clip_ratios(dist: str, name: str) -> None:
    """The solver's optimum against scipy's integrator: the MSE it reports is the integral at its clip, no
    clip nearby does better (1 % either side; a grid of 16 levels or fewer: no clip from 0.3 to 12 sigma
    does better either), and the clip is the integral's minimizer (bounded Brent search on the integral
    within 1 % of it; wide minifloats repeat their curve every octave, so only this local check applies)."""
    from scipy.optimize import minimize_scalar

    opt = optimal_clip(name, dist)
    levels = _model_levels(name)
    at = _quad_mse(levels, opt.clip, dist)
    assert opt.mse == pytest.approx(at, rel=1e-7), (opt.mse, at)
    for c in (opt.clip * 0.99, opt.clip * 1.01):
        assert _quad_mse(levels, c, dist) > at * (1 - 1e-9)
    if len(levels) <= 16:
        assert min(_quad_mse(levels, float(c), dist) for c in np.geomspace(0.3, 12.0, 40)) >= at * (1 - 1e-9)
    res = minimize_scalar(
        lambda c: _quad_mse(levels, float(c), dist),
        bounds=(opt.clip * 0.99, opt.clip * 1.01),
        method="bounded",
        options={"xatol": 1e-7},
    )
    assert opt.clip == pytest.approx(res.x, rel=2e-4), (opt.clip, res.x)


def test_fp4_gaussian_clip() -> None:
    assert optimal_clip("fp4_e2m1", "gaussian").clip == pytest.approx(FP4_GAUSSIAN_CLIP, rel=1e-4)


def test_optimal_clip_beats_aciq_clip() -> None:
    # ACIQ's clip minimizes an approximation: its exact MSE exceeds the exact optimum's, by 7.5 %, 4.0 %, 1.7 %
    # (Gaussian) and 1.4 %, 1.1 %, 0.6 % (Laplace) at 2, 3, 4 bits.
    excess = {"gaussian": {2: 1.0752, 3: 1.0399, 4: 1.0167}, "laplace": {2: 1.0139, 3: 1.0111, 4: 1.0058}}
    for dist, table in excess.items():
        for bits, ratio in table.items():
            aciq = get_quantizer("aciq", bits).expected_mse(dist)
            best = optimal_clip(make_grid("int-mr", bits), dist).mse
            assert aciq / best == pytest.approx(ratio, abs=1e-4), (bits, dist, aciq / best)


def test_approximate_model_where_it_holds() -> None:
    """Approximate / exact MSE at the exact optimum.

    Holds within 3 %: integer grids from 6 bits, every minifloat but FP4 E2M1 (within 1.5 %), FP4 E2M1 and
    NF4 (within 4 %). Does not hold at low integer widths: Banner's model measures clipping from the range edge
    (half a step beyond the top level) and so underestimates it, by 21 % (Gaussian) / 26 % (Laplace) at 2 bits,
    8 % / 9 % at 4 bits and 4.5 % / 5 % at 5 bits. Its optimum still lies close to the exact one from 6 bits.
    """
    within = {
        **{f"int{b}-mr": 0.03 for b in (6, 7, 8)},
        "fp8_e4m3": 0.015,
        "fp8_e5m2": 0.015,
        "fp6_e3m2": 0.015,
        "fp6_e2m3": 0.015,
        "fp4_e2m1": 0.04,
        "nf4": 0.025,
    }
    for dist in ("gaussian", "laplace"):
        for name, tol in within.items():
            opt = optimal_clip(name, dist)
            ratio = approx_mse(name, dist, opt.clip) / opt.mse
            assert abs(ratio - 1) < tol, (name, dist, ratio)
            approx_opt = optimal_clip(name, dist, "approx")
            assert exact_mse(name, dist, approx_opt.clip) < opt.mse * 1.01  # its optimum is near-optimal
        for bits, low in {2: 0.80, 4: 0.93}.items():
            opt = optimal_clip(f"int{bits}-mr", dist)
            assert approx_mse(opt.grid, dist, opt.clip) / opt.mse < low


def test_sqnr_of_the_best_4_bit_uniform_quantizer() -> None:
    opt = optimal_clip("int4-mr", "gaussian")
    assert opt.sqnr_db == pytest.approx(10 * math.log10(1 / 0.011543), abs=1e-3)
    assert opt.sqnr_db == pytest.approx(19.38, abs=0.01)
