"""The ``mse`` rule with importance weights (``weighting="input-variance"``) and on non-uniform grids (NF4, the
Gaussian Lloyd-Max table)."""

from __future__ import annotations

import pytest
import torch

from dfquant.errors import ConfigError
from dfquant.grids.formats import make_grid
from dfquant.quantizers import get_quantizer


def _weighted_error(q, x: torch.Tensor, a: torch.Tensor, weighted: bool) -> torch.Tensor:
    p = q.fit_weighted(x, a) if weighted else q.fit(x)
    scale = p.scale[:, None]
    xq = q.grid.round(x / scale) * scale
    return (a * (xq - x) ** 2).sum(dim=1)


def test_weighted_clip_lowers_the_weighted_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 288)
    a = torch.rand(64, 288) ** 4 * 10  # a few inputs dominate, as after a BatchNorm with uneven gammas
    q = get_quantizer("mse", 3, weighting="input-variance")
    assert q.wants_importance
    plain = _weighted_error(q, x, a, weighted=False)
    weighted = _weighted_error(q, x, a, weighted=True)
    # the weighted search can only do better on the loss it minimizes (same candidate ratios include the plain
    # optimum's neighbourhood); on this input it gains clearly on average
    assert bool((weighted <= plain * (1 + 1e-6)).float().mean() > 0.9)
    assert float(weighted.sum()) < 0.97 * float(plain.sum())


def test_uniform_importance_equals_plain_fit() -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 100)
    q = get_quantizer("mse", 4, weighting="input-variance")
    assert torch.equal(q.fit_weighted(x, torch.full_like(x, 3.0)).scale, q.fit(x).scale)


def test_nf4_grid_search_beats_nf4_absmax() -> None:
    torch.manual_seed(2)
    x = torch.randn(32, 512)
    q = get_quantizer("mse", 4, grid="nf4")
    assert q.grid == make_grid("nf4")
    err_mse = float(((q.fake_quantize(x) - x) ** 2).mean())
    err_nf4 = float(((get_quantizer("nf4", 4).fake_quantize(x) - x) ** 2).mean())
    assert err_mse < err_nf4


def test_lloyd_gaussian_shape_reaches_max_distortion() -> None:
    """On the Gaussian Lloyd-Max table the population optimum of the clip is the table itself, with Max's (1960)
    distortion 0.009497 at 4 bits and 0.03454 at 3 bits; the per-row search on 16384 N(0, 1) values lands on it."""
    torch.manual_seed(3)
    x = torch.randn(8, 16384)
    for bits, max_d in ((3, 0.03454), (4, 0.009497)):
        q = get_quantizer("mse", bits, grid="lloyd-gaussian")
        assert q.grid == make_grid("lloyd-gaussian", bits)
        assert q.expected_mse("gaussian") == pytest.approx(max_d, rel=2e-3)
        measured = float(((q.fake_quantize(x) - x) ** 2).mean())
        assert measured == pytest.approx(max_d, rel=0.03)


def test_lloyd_gaussian_shape_beats_the_integer_grid_at_equal_bits() -> None:
    """Groups of 64 Gaussian values, float16 scales, no offset (both 4.25 bits per weight): the Lloyd-Max shape
    with a searched scale has about 20 % less squared error than the integer grid with a searched clip."""
    torch.manual_seed(4)
    w = torch.randn(256, 1024)
    err = {}
    for grid in ("int-mr", "lloyd-gaussian"):
        qt = get_quantizer("mse", 4, grid=grid).quantize(w, "group:64", scale_dtype="float16")
        assert qt.offset is None and qt.bits_per_weight() == pytest.approx(4.25, abs=1e-3)
        err[grid] = float(((qt.dequantize() - w) ** 2).mean())
    assert err["lloyd-gaussian"] < 0.85 * err["int-mr"]
    assert 0.0065 < err["lloyd-gaussian"] < 0.0075


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="grid 'nf4' is 4 bits"):
        get_quantizer("mse", 3, grid="nf4")
    with pytest.raises(ConfigError, match="grid 'fp4_e2m1' is 4 bits"):
        get_quantizer("mse", 3, grid="fp4_e2m1")
    with pytest.raises(ConfigError, match=r"symmetric clip; grid must be one of .*lloyd-gaussian.*got 'uint'"):
        get_quantizer("mse", 4, grid="uint")
    with pytest.raises(ConfigError, match="got 'lloyd'"):
        get_quantizer("mse", 4, grid="lloyd")
    with pytest.raises(ConfigError, match="weighting must be one of none, input-variance"):
        get_quantizer("mse", 4, weighting="hessian")
