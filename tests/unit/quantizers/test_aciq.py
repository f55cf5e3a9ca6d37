"""The ``aciq`` rule: predicted vs measured error, per-group distribution choice, grids, edge cases."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from dfquant import ConfigError, InputError, get_quantizer
from dfquant.grids.distributions import DIST_CODES, LAPLACE_BETA, ppf, sample
from dfquant.grids.error_model import aciq_alpha

N = 1_000_000
DISTS = ("gaussian", "laplace")


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, torch.Tensor]]:
    """Per source, 10^6 i.i.d. draws and a stratified sample (one draw in each of 10^6 equal-probability cells)."""
    g = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    u = (np.arange(N) + rng.random(N)) / N
    return {d: {"iid": sample(d, N, g), "stratified": torch.from_numpy(ppf(d, u)).float()} for d in DISTS}


@pytest.mark.parametrize("dist", DISTS)
def test_expected_mse_within_2_percent_of_measured(sources: dict[str, dict[str, torch.Tensor]], dist: str) -> None:
    """Per tensor on 10^6 values, every width. I.i.d. samples: within 2 % up to 5 bits; from 6 bits the clip lies
    where a few hundred tail values carry a tenth of the error and the standard error of the mean reaches
    1-7 %, so the tolerance there is 3 standard errors (measured from the sample). The stratified sample holds
    2 % at every width."""
    for bits in range(1, 9):
        q = get_quantizer("aciq", bits)
        pred = q.expected_mse(dist)
        for kind, x in sources[dist].items():
            qt = q.quantize(x, "tensor")
            assert int(qt.info["dist"][0, 0]) == DIST_CODES[dist]
            err = (qt.dequantize().double() - x.double()) ** 2
            meas = float(err.mean())
            se = float(err.std()) / math.sqrt(N)
            tol = 0.02 * pred if kind == "stratified" or bits <= 5 else max(0.02 * pred, 3 * se)
            assert abs(meas - pred) <= tol, (dist, bits, kind, meas, pred, se)


def test_clip_follows_the_fitted_family_per_group() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.stack([sample("gaussian", 4096, g) * 2.0, sample("laplace", 4096, g) * 0.5])
    q = get_quantizer("aciq", 3)
    qt = q.quantize(x, "channel")
    assert qt.info["dist"][:, 0].tolist() == [0.0, 1.0]
    sigma = float(x[0].std(correction=0))
    assert float(qt.info["clip"][0, 0]) == pytest.approx(aciq_alpha("gaussian", 3) * sigma, rel=0.02)
    b = float((x[1] - x[1].median()).abs().mean())
    assert float(qt.info["clip"][1, 0]) == pytest.approx(aciq_alpha("laplace", 3) * b, rel=0.02)
    # 2^M bins of width 2 alpha / 2^M: scale = alpha / 2^(M-1).
    assert torch.allclose(qt.scale[:, 0], qt.info["clip"][:, 0] / 4, rtol=1e-6)


def test_int_sym_grid_has_its_own_clip_and_asymmetric_grids_are_refused() -> None:
    q = get_quantizer("aciq", 2, grid="int-sym")  # 3 bins over [-alpha, alpha]
    assert q.grid.name == "int2-sym"
    assert q.clip("gaussian") != get_quantizer("aciq", 2).clip("gaussian")
    assert q.expected_mse("gaussian") > get_quantizer("aciq", 2).expected_mse("gaussian")
    for grid in ("int", "uint"):
        with pytest.raises(ConfigError, match="symmetrically"):
            get_quantizer("aciq", 4, grid=grid)


def test_error_decreases_with_bits() -> None:
    for dist in DISTS:
        mses = [get_quantizer("aciq", b).expected_mse(dist) for b in range(1, 9)]
        assert all(b < a for a, b in itertools.pairwise(mses))
    x = torch.randn(64, 256)
    errs = [float(((get_quantizer("aciq", b).fake_quantize(x) - x) ** 2).mean()) for b in range(1, 9)]
    assert all(b < a for a, b in itertools.pairwise(errs)), errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    x = torch.randn(16, 512)
    xh = x.to(dtype)
    q = get_quantizer("aciq", 4)
    out = q.fake_quantize(xh, "group:128")
    assert out.dtype == dtype
    ref = q.fake_quantize(xh.float(), "group:128")
    assert torch.equal(out, ref.to(dtype))
    assert float(((out.float() - xh.float()) ** 2).mean()) < 0.02


def test_input_is_not_modified() -> None:
    x = torch.randn(8, 100) * 3
    before = x.clone()
    get_quantizer("aciq", 3).quantize(x, "group:32")
    assert torch.equal(x, before)


def test_constant_and_zero_groups_are_exact() -> None:
    x = torch.randn(4, 64)
    x[1] = 0.0
    x[2] = -2.5
    out = get_quantizer("aciq", 2).fake_quantize(x)
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], x[2])
    assert float(((out[0] - x[0]) ** 2).mean()) < 0.2


def test_nan_raises_input_error_naming_the_tensor() -> None:
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    with pytest.raises(InputError, match=re.escape("layer1.weight")):
        get_quantizer("aciq", 4).quantize(x, name="layer1.weight")


def test_unit_levels_in_laplace_units() -> None:
    q = get_quantizer("aciq", 4)
    lv = q.unit_levels("laplace")
    alpha = aciq_alpha("laplace", 4) * LAPLACE_BETA
    assert float(lv[-1]) == pytest.approx(alpha * 15 / 16, rel=1e-6)
