"""The ``lloyd-max`` and ``lloyd-empirical`` rules: error model, distribution choice, fallback, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfquant import ConfigError, InputError, get_quantizer
from dfquant.grids.distributions import DIST_CODES, cell_mse, ks_critical, sample
from dfquant.grids.lloyd_max import lloyd_max_table
from dfquant.quantizers.lloyd import default_fallback_ks, group_sq_error

N = 1_000_000
ROWS = 16


@pytest.fixture(scope="module")
def sources() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {d: sample(d, N, g).reshape(ROWS, -1) for d in ("gaussian", "laplace")}


def _mse(q_name: str, bits: int, x: torch.Tensor, gran: str = "channel", **opts: object) -> float:
    q = get_quantizer(q_name, bits, **opts)
    return float(((q.fake_quantize(x, gran) - x) ** 2).mean())


def _group_sse(q_name: str, bits: int, x: torch.Tensor, **opts: object) -> torch.Tensor:
    return ((get_quantizer(q_name, bits, **opts).fake_quantize(x) - x) ** 2).sum(dim=1)


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_expected_mse_within_2_percent_of_measured(sources: dict[str, torch.Tensor], dist: str) -> None:
    x = sources[dist]
    for bits in range(1, 9):
        table = lloyd_max_table(dist, bits)
        meas = {}
        for rule in ("lloyd-max", "lloyd-empirical"):
            q = get_quantizer(rule, bits)
            assert q.expected_mse(dist) == pytest.approx(table.mse, rel=1e-12)
            pred = q.expected_mse(dist, N)  # per tensor: one group of 10^6 values
            meas[rule] = _mse(rule, bits, x, "tensor")
            assert meas[rule] == pytest.approx(pred, rel=0.02), (rule, dist, bits, meas[rule], pred)
        assert meas["lloyd-empirical"] <= meas["lloyd-max"]


@pytest.mark.parametrize(("forced", "source"), [("gaussian", "laplace"), ("laplace", "gaussian")])
def test_forced_family_error_model(sources: dict[str, torch.Tensor], forced: str, source: str) -> None:
    # A forced family's table at the scale its fit converges to on the other source (Laplace scale on a
    # Gaussian: sqrt(2) E|X| = 2/sqrt(pi)); the prediction is worse than the source's own Lloyd-Max table.
    for bits in (2, 4):
        q = get_quantizer("lloyd-max", bits, dist=forced, fallback_ks="off")
        pred = q.expected_mse(source)
        s = 2 / math.sqrt(math.pi) if forced == "laplace" else 1.0
        assert pred == pytest.approx(cell_mse(source, lloyd_max_table(forced, bits).levels * s), rel=1e-12)
        assert pred > lloyd_max_table(source, bits).mse
        assert _mse("lloyd-max", bits, sources[source], dist=forced, fallback_ks="off") == pytest.approx(pred, rel=0.02)


def test_empirical_finite_group_correction() -> None:
    # The one-degree-of-freedom correction lowers the prediction on small groups and vanishes as n grows;
    # measured k-means error on groups of 4096 sits between the population optimum and a few % below the
    # corrected prediction.
    q = get_quantizer("lloyd-empirical", 4)
    d_star = lloyd_max_table("gaussian", 4).mse
    preds = [q.expected_mse("gaussian", n) for n in (64, 4096, 10**6)]
    assert preds[0] < preds[1] < preds[2] < d_star
    assert preds[2] == pytest.approx(d_star, rel=1e-4)
    assert get_quantizer("lloyd-max", 4).expected_mse("gaussian", 64) == d_star  # analytic: no sample fitting
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(8))
    meas = _mse("lloyd-empirical", 4, x)
    assert 0.95 * preds[1] < meas < preds[1] < d_star


def test_unit_levels_are_the_tables() -> None:
    for dist in ("gaussian", "laplace"):
        lv = get_quantizer("lloyd-max", 3).unit_levels(dist)
        np.testing.assert_allclose(lv.numpy(), lloyd_max_table(dist, 3).levels, rtol=1e-6)
    assert get_quantizer("lloyd-empirical", 3).unit_levels("gaussian") is None


def test_ks_picks_the_source_family() -> None:
    g = torch.Generator().manual_seed(0)
    for dist in ("gaussian", "laplace"):
        x = 0.02 * sample(dist, 32 * 2048, g).reshape(32, 2048) + 0.001
        t = get_quantizer("lloyd-max", 3).quantize(x, "channel")
        assert bool((t.info["dist"] == DIST_CODES[dist]).all()), dist
        assert t.levels.dim() == 1  # one analytic table for the whole tensor: shared levels
        np.testing.assert_allclose(t.levels.numpy(), lloyd_max_table(dist, 3).levels, rtol=1e-6)
        own, other = ("ks_gaussian", "ks_laplace") if dist == "gaussian" else ("ks_laplace", "ks_gaussian")
        assert bool((t.info[own] < t.info[other]).all())
        # the location is the offset, the unit-variance sigma the scale
        assert float(t.scale.mean()) == pytest.approx(0.02, rel=0.03)
        assert float(t.offset.mean()) == pytest.approx(0.001, abs=0.001)


def test_fallback_for_groups_that_fit_neither() -> None:
    g = torch.Generator().manual_seed(1)
    n = 4096
    normal = torch.randn(4, n, generator=g)
    uniform = torch.rand(2, n, generator=g) * 2 - 1
    bimodal = torch.randn(2, n, generator=g) * 0.3 + torch.where(torch.rand(2, n, generator=g) < 0.5, -2.0, 2.0)
    x = torch.cat([normal, uniform, bimodal])
    for bits in (2, 3, 4):
        t = get_quantizer("lloyd-max", bits).quantize(x, "channel")
        code = t.info["dist"][:, 0]
        assert code[:4].tolist() == [DIST_CODES["gaussian"]] * 4
        assert code[4:].tolist() == [DIST_CODES["empirical"]] * 4
        # one shared Gaussian table plus one table per fallback group, each group naming its table
        assert t.levels.shape == (5, 2**bits)
        assert t.table_index is not None and t.table_index.shape == (8, 1)
        best_ks = torch.minimum(t.info["ks_gaussian"], t.info["ks_laplace"])[:, 0]
        assert bool((best_ks[4:] > default_fallback_ks(n, bits)).all())
        # the fallback helps: lower error on exactly those groups, same error elsewhere
        fb = _group_sse("lloyd-max", bits, x)
        off = _group_sse("lloyd-max", bits, x, fallback_ks="off")
        assert bool((fb[4:] < off[4:]).all()), (bits, (fb / off).tolist())
        assert bool((fb[6:] < 0.5 * off[6:]).all()), (bits, (fb / off).tolist())  # bimodal: at least halved
        torch.testing.assert_close(fb[:4], off[:4], rtol=1e-6, atol=0)
    # the option: off, a fixed threshold
    assert 2 not in get_quantizer("lloyd-max", 3, fallback_ks="off").quantize(x).info["dist"]
    assert 2 not in get_quantizer("lloyd-max", 3, fallback_ks=1.0).quantize(x).info["dist"]
    assert bool((get_quantizer("lloyd-max", 3, fallback_ks=1e-6).quantize(x).info["dist"] == 2).all())


def test_default_threshold() -> None:
    # significance term for small groups, practical floor 1/(4L) for large ones
    assert default_fallback_ks(144, 3) == pytest.approx(ks_critical(144, 0.05))
    assert default_fallback_ks(1_000_000, 3) == pytest.approx(1 / 32)
    assert default_fallback_ks(1_000_000, 2) > default_fallback_ks(1_000_000, 4)
    # well-fitting groups (estimated parameters) almost never fall back
    g = torch.Generator().manual_seed(2)
    for dist in ("gaussian", "laplace"):
        x = sample(dist, 2000 * 256, g).reshape(2000, 256)
        frac = float((get_quantizer("lloyd-max", 4).quantize(x).info["dist"] == 2).float().mean())
        assert frac <= 0.005, (dist, frac)


def test_empirical_never_worse_than_analytic_per_group() -> None:
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.randn(6, 300, generator=g),
        sample("laplace", 6 * 300, g).reshape(6, 300) * 3 + 1,
        torch.distributions.StudentT(2.5).sample((6, 300)),
        torch.rand(6, 300, generator=g),
        torch.randn(6, 300, generator=g) + torch.where(torch.rand(6, 300, generator=g) < 0.3, 4.0, 0.0),
    ]
    x = torch.cat(rows)
    for bits in range(1, 7):
        for gran in ("channel", "group:16", "group:64"):
            qa = get_quantizer("lloyd-max", bits)
            qe = get_quantizer("lloyd-empirical", bits)
            ea = ((qa.fake_quantize(x, gran) - x) ** 2).reshape(-1)
            ee = ((qe.fake_quantize(x, gran) - x) ** 2).reshape(-1)
            G = 300 if gran == "channel" else int(gran.split(":")[1])
            pad = -x.shape[1] % G
            per_a = torch.nn.functional.pad(ea.reshape(x.shape[0], -1), (0, pad)).reshape(-1, G).sum(1)
            per_e = torch.nn.functional.pad(ee.reshape(x.shape[0], -1), (0, pad)).reshape(-1, G).sum(1)
            assert bool((per_e <= per_a * (1 + 1e-5) + 1e-12).all()), (bits, gran)
            assert float(per_e.sum()) < float(per_a.sum())


@pytest.mark.parametrize("rule", ["lloyd-max", "lloyd-empirical"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(rule: str, dtype: torch.dtype) -> None:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    before = x.clone()
    q = get_quantizer(rule, 3)
    out = q.fake_quantize(x, "group:64")
    assert out.dtype == dtype
    assert torch.equal(x, before)  # not modified
    ref = q.fake_quantize(x.float(), "group:64")
    assert torch.equal(out, ref.to(dtype))
    assert float(((out.float() - x.float()) ** 2).mean()) < 0.05 * float((x.float() ** 2).mean())


@pytest.mark.parametrize("rule", ["lloyd-max", "lloyd-empirical"])
@pytest.mark.parametrize("gran", ["channel", "group:8", "tensor"])
def test_constant_and_zero_groups_are_exact(rule: str, gran: str) -> None:
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    x[0] = 0.0
    x[1] = 3.25
    x[2] = -1e-3
    x[3, :8] = 7.0  # one constant group inside a varying row
    before = x.clone()
    for bits in (1, 2, 4, 8):
        out = get_quantizer(rule, bits).fake_quantize(x, gran)
        assert torch.equal(x, before)
        if gran == "tensor":
            assert out.shape == x.shape
            continue
        assert torch.equal(out[:3], x[:3]), (bits, gran)
        if gran == "group:8":
            assert torch.equal(out[3, :8], x[3, :8])


@pytest.mark.parametrize("rule", ["lloyd-max", "lloyd-empirical"])
def test_all_zero_tensor(rule: str) -> None:
    x = torch.zeros(4, 16)
    assert torch.equal(get_quantizer(rule, 4).fake_quantize(x, "tensor"), x)


@pytest.mark.parametrize("rule", ["lloyd-max", "lloyd-empirical"])
def test_nan_raises_naming_the_tensor(rule: str) -> None:
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(InputError, match=r"layer3\.conv1\.weight"):
        get_quantizer(rule, 3).quantize(x, name="layer3.conv1.weight")


@pytest.mark.parametrize("rule", ["lloyd-max", "lloyd-empirical"])
def test_ragged_last_group_is_fitted_on_its_own_elements(rule: str) -> None:
    x = torch.randn(5, 67, generator=torch.Generator().manual_seed(6))
    q = get_quantizer(rule, 2)
    t = q.quantize(x, "group:16")
    assert t.scale.shape == (5, 5)
    out = t.dequantize()
    assert out.shape == x.shape
    # the tail of 3 values per row is quantized exactly as if it were its own tensor
    tail = q.fake_quantize(x[:, 64:].contiguous(), "channel")
    assert torch.equal(out[:, 64:], tail)
    head = q.fake_quantize(x[:, :64].contiguous(), "group:16")
    assert torch.equal(out[:, :64], head)


def test_group_sq_error_matches_direct_computation() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 300, generator=g) * 3
    x[3] = 1.5  # constant row
    levels = torch.sort(torch.randn(7, 8, generator=g) * 2, dim=1).values
    mids = (levels[:, :-1] + levels[:, 1:]) / 2
    direct = ((levels.double().gather(1, torch.searchsorted(mids, x)) - x.double()) ** 2).sum(1)
    got = group_sq_error(torch.sort(x, dim=1).values, levels)
    torch.testing.assert_close(got, direct, rtol=1e-9, atol=1e-9)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="dist"):
        get_quantizer("lloyd-max", 3, dist="cauchy")
    with pytest.raises(ConfigError, match="fallback_ks"):
        get_quantizer("lloyd-max", 3, fallback_ks=1.5)
    with pytest.raises(ConfigError, match="iters"):
        get_quantizer("lloyd-empirical", 3, iters=-1)
    with pytest.raises(ConfigError):
        get_quantizer("lloyd-max", 9)
    assert get_quantizer("lloyd-max", 3, fallback_ks="off").fallback_threshold(100) == math.inf
