"""The error model: exact cell integrals, the granular + clipping approximation, and the optimal clip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from dfquant import ConfigError
from dfquant.grids.distributions import cell_mse, pdf, ppf, sample
from dfquant.grids.error_model import (
    aciq_alpha,
    approx_mse,
    approx_terms,
    banner_mse,
    clipping_mse,
    exact_mse,
    model_levels,
    optimal_clip,
    tail_mse,
)
from dfquant.grids.formats import make_grid

FORMATS = [f"int{b}-mr" for b in range(2, 9)] + [
    "int4",
    "int4-sym",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
    "nf4",
]
DISTS = ("gaussian", "laplace")
N = 1_000_000


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, torch.Tensor]]:
    """Per source, 10^6 i.i.d. draws and a stratified sample (one draw in each of 10^6 equal-probability cells)."""
    g = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    u = (np.arange(N) + rng.random(N)) / N
    return {d: {"iid": sample(d, N, g), "stratified": torch.from_numpy(ppf(d, u)).float()} for d in DISTS}


def assert_mc_close(err: torch.Tensor, predicted: float, kind: str, se: float) -> None:
    """The mean of the squared errors ``err`` within 2 % of ``predicted``.

    For i.i.d. samples the tolerance widens to 3 standard errors of the mean (``se``, from the model) where that
    exceeds 2 %: at the optimal clip of fine grids the clipping term comes from the few samples beyond it
    (Gaussian INT8: about 90 of 10^6 values carry a tenth of the error), so the mean of 10^6 squared errors has a
    standard error of 1-7 %. Stratified samples have one value per quantile cell and hold 2 %.
    """
    mean = float(err.double().mean())
    tol = 0.02 * predicted if kind == "stratified" else max(0.02 * predicted, 3 * se)
    assert abs(mean - predicted) <= tol, (kind, mean, predicted, se)


def error_se(levels: np.ndarray, dist: str, n: int = N) -> float:
    """Standard error of the mean of ``n`` squared errors: ``sqrt((E[e^4] - E[e^2]^2) / n)``, by quadrature."""
    x = np.linspace(-40, 40, 400_001)
    mids = (levels[:-1] + levels[1:]) / 2
    e2 = (x - levels[np.searchsorted(mids, x)]) ** 2
    p = pdf(dist, x)
    m2, m4 = np.trapezoid(e2 * p, x), np.trapezoid(e2 * e2 * p, x)
    return math.sqrt(max(m4 - m2 * m2, 0.0) / n)


@pytest.mark.parametrize("dist", DISTS)
def test_batched_exact_mse_equals_cell_mse(dist: str) -> None:
    clips = np.array([0.3, 1.0, 2.5, 7.0, 33.0])
    for name in ("int3-mr", "int4-sym", "fp8_e4m3", "fp4_e2m1", "nf4", "uint4"):
        batch = exact_mse(name, dist, clips)
        y = model_levels(name)
        for c, v in zip(clips, batch, strict=True):
            ref = cell_mse(dist, y * c / np.abs(y).max())
            assert v == pytest.approx(ref, rel=1e-12, abs=1e-300)
            assert exact_mse(name, dist, float(c)) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("dist", DISTS)
def test_tails_match_quadrature(dist: str) -> None:
    for a in (-1.3, 0.0, 0.7, 2.0, 4.5):
        ref, _ = integrate.quad(lambda x, a=a: (x - a) ** 2 * float(pdf(dist, x)), a, np.inf, epsabs=1e-14)
        assert float(tail_mse(dist, a)) == pytest.approx(ref, rel=1e-8, abs=1e-14)
        if a >= 0:  # Banner's two-sided closed forms
            assert float(clipping_mse(dist, a)) == pytest.approx(2 * ref, rel=1e-8, abs=1e-14)


def test_banner_closed_forms_in_paper_units() -> None:
    # Laplace with scale b: 2 b^2 exp(-alpha / b); unit variance means b = 1/sqrt(2).
    b = 1 / math.sqrt(2)
    assert float(clipping_mse("laplace", 1.5)) == pytest.approx(2 * b * b * math.exp(-1.5 / b), rel=1e-14)
    a = 1.5
    gauss = (a * a + 1) * (1 - math.erf(a / math.sqrt(2))) - math.sqrt(2 / math.pi) * a * math.exp(-a * a / 2)
    assert float(clipping_mse("gaussian", a)) == pytest.approx(gauss, rel=1e-12)
    assert float(banner_mse("gaussian", a, 3)) == pytest.approx(gauss + a * a / (3 * 64), rel=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_approx_of_int_mr_is_banner_at_the_range_edge(bits: int) -> None:
    # Top level C, 2^M bins: the range edge is alpha = C + Delta / 2 = C * 2^(M-1) / (2^(M-1) - 1/2).
    for dist in DISTS:
        for c in (0.8, 2.0, 5.0):
            alpha = c * 2 ** (bits - 1) / (2 ** (bits - 1) - 0.5)
            assert approx_mse(f"int{bits}-mr", dist, c) == pytest.approx(
                float(banner_mse(dist, alpha, bits)), rel=1e-12
            )


def test_minifloat_granular_term_is_the_binade_sum() -> None:
    # FP4 E2M1 at unit scale (C = 6): subnormal+first binade [0, 2) step 0.5, [2, 4) step 1, [4, 6] step 2.
    from dfquant.grids.distributions import cdf

    s = 0.5  # C = 3 sigma
    for dist in DISTS:

        def p(a: float, b: float, dist: str = dist) -> float:
            return 2 * float(cdf(dist, b * s) - cdf(dist, a * s))

        ref = p(0, 2) * (0.5 * s) ** 2 / 12 + p(2, 4) * (1 * s) ** 2 / 12 + p(4, 6) * (2 * s) ** 2 / 12
        gran, clip = approx_terms("fp4_e2m1", dist, 3.0)
        assert gran == pytest.approx(ref, rel=1e-12)
        assert clip == pytest.approx(2 * float(tail_mse(dist, 3.0)), rel=1e-12)


@pytest.mark.parametrize("kind", ["iid", "stratified"])
@pytest.mark.parametrize("name", ["int2-mr", "int8-mr", "int4-sym", "fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "nf4"])
def test_exact_model_matches_monte_carlo(sources: dict[str, dict[str, torch.Tensor]], name: str, kind: str) -> None:
    g = make_grid(name)
    for dist in DISTS:
        opt = optimal_clip(g, dist)
        x = sources[dist][kind]
        s = opt.clip / g.max_abs
        se = error_se(np.asarray(g.levels) * s, dist) if kind == "iid" else 0.0
        assert_mc_close((g.round(x / s) * s - x) ** 2, opt.mse, kind, se)


@pytest.mark.parametrize("name", [*FORMATS, "apot4", "lloyd-gaussian3", "int1-mr"])
def test_optimal_clip_is_a_global_minimum(name: str) -> None:
    for dist in DISTS:
        for model in ("exact", "approx"):
            opt = optimal_clip(name, dist, model)
            assert model_mse(name, dist, opt.clip, model) == pytest.approx(opt.mse, rel=1e-12)
            assert model_mse(name, dist, opt.clip * 0.999, model) >= opt.mse * (1 - 1e-9)
            assert model_mse(name, dist, opt.clip * 1.001, model) >= opt.mse * (1 - 1e-9)
            grid = np.geomspace(0.05, 60, 3000)
            assert np.min(model_mse(name, dist, grid, model)) >= opt.mse * (1 - 1e-5)


def model_mse(name: str, dist: str, c: float | np.ndarray, model: str) -> np.ndarray | float:
    return exact_mse(name, dist, c) if model == "exact" else approx_mse(name, dist, c)


def test_wide_minifloats_repeat_every_octave_and_the_smallest_tie_is_returned() -> None:
    for dist in DISTS:
        opt = optimal_clip("fp8_e4m3", dist)
        assert exact_mse("fp8_e4m3", dist, 2 * opt.clip) == pytest.approx(opt.mse, rel=1e-5)
        assert exact_mse("fp8_e4m3", dist, opt.clip / 2) > opt.mse * 1.0002  # clipping starts to matter
    assert optimal_clip("fp8_e4m3", "gaussian").clip == pytest.approx(9.129, abs=0.002)


def test_uint_is_modelled_centred_like_int_mr() -> None:
    for dist in DISTS:
        assert optimal_clip("uint4", dist).mse == pytest.approx(optimal_clip("int4-mr", dist).mse, rel=1e-12)
        assert optimal_clip("uint4", dist).scale == pytest.approx(optimal_clip("int4-mr", dist).scale, rel=1e-9)


@pytest.mark.parametrize("family", ["int", "int-mr", "int-sym"])
def test_optimal_error_never_grows_with_bits(family: str) -> None:
    for dist in DISTS:
        start = 2 if family == "int-sym" else 1
        mses = [optimal_clip(make_grid(family, b), dist).mse for b in range(start, 9)]
        assert all(b < a for a, b in itertools.pairwise(mses)), mses


def test_aciq_constant_is_scale_free() -> None:
    # The optimum of Banner's formula in units of b does not depend on b: minimize at b = 3 directly.
    from scipy.optimize import minimize_scalar

    b, M = 3.0, 3
    res = minimize_scalar(
        lambda a: 2 * b * b * math.exp(-a / b) + a * a / (3 * 4**M),
        bounds=(0.1, 100),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert res.x / b == pytest.approx(aciq_alpha("laplace", M), rel=1e-7)


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="clip must be"):
        exact_mse("int4-mr", "gaussian", 0.0)
    with pytest.raises(ConfigError, match="unknown error model"):
        optimal_clip("int4-mr", "gaussian", "fancy")
    with pytest.raises(ConfigError, match="unknown distribution"):
        optimal_clip("int4-mr", "cauchy")
    with pytest.raises(ConfigError, match="bits >= 1"):
        aciq_alpha("gaussian", 0)
