"""Number grids: exact level sets of the OCP minifloats, integer families, codebooks, encoding rules."""

from __future__ import annotations

import pytest
import torch

from dfquant.errors import ConfigError
from dfquant.grids.formats import NF4_LEVELS, make_grid


def test_fp4_e2m1_levels() -> None:
    g = make_grid("fp4_e2m1")
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert list(g.levels) == [-v for v in reversed(pos[1:])] + pos
    assert g.bits == 4 and g.num_levels == 15


@pytest.mark.parametrize(
    ("name", "max_value", "num_levels", "min_subnormal"),
    [
        ("fp8_e4m3", 448.0, 253, 2.0**-9),
        ("fp8_e5m2", 57344.0, 247, 2.0**-16),
        ("fp6_e3m2", 28.0, 63, 2.0**-4),
        ("fp6_e2m3", 7.5, 63, 2.0**-3),
    ],
)
def test_minifloat_ranges(name: str, max_value: float, num_levels: int, min_subnormal: float) -> None:
    g = make_grid(name)
    assert g.max_abs == max_value
    assert g.num_levels == num_levels
    positive = [v for v in g.levels if v > 0]
    assert positive[0] == min_subnormal
    assert g.symmetric


@pytest.mark.parametrize(("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_minifloat_encoding_matches_torch_cast(name: str, dtype: torch.dtype) -> None:
    """Our saturating nearest-even rounding equals torch's float8 cast of the clamped value."""
    g = make_grid(name)
    x = torch.randn(20000) * torch.logspace(-4, 3, 20000)
    x = x.clamp(-g.max_abs, g.max_abs)
    ours = g.round(x)
    ref = x.to(dtype).to(torch.float32)
    assert torch.equal(ours, ref)


def test_float8_levels_are_the_torch_values() -> None:
    all_bytes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    finite = sorted({float(v) for v in all_bytes if torch.isfinite(v)})
    assert list(make_grid("fp8_e4m3").levels) == finite


def test_integer_families() -> None:
    assert make_grid("int", 3).levels == (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    assert make_grid("int-sym", 3).levels == (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    assert make_grid("int-mr", 2).levels == (-1.5, -0.5, 0.5, 1.5)
    assert make_grid("uint", 2).levels == (0.0, 1.0, 2.0, 3.0)
    assert make_grid("int4-mr").name == "int4-mr"
    assert make_grid("uint8").num_levels == 256


def test_codebooks() -> None:
    assert make_grid("nf4").levels == NF4_LEVELS
    g = make_grid("lloyd-gaussian2")
    assert g.levels[-1] == pytest.approx(1.5104, abs=1e-4)
    apot = make_grid("apot", 4)
    assert apot.num_levels == 15 and apot.max_abs == 1.0 and apot.zero_index == 7


def test_saturation_and_ties_to_even() -> None:
    g = make_grid("int", 4)
    z = torch.tensor([-100.0, -8.5, 0.5, 1.5, 2.5, -0.5, 7.4, 100.0])
    assert g.round(z).tolist() == [-8.0, -8.0, 0.0, 2.0, 2.0, -0.0, 7.0, 7.0]
    assert torch.equal(g.round(z), torch.round(z).clamp(-8, 7))


@pytest.mark.parametrize(
    ("family", "bits"),
    [("int", 0), ("int", 9), ("int-sym", 1), ("fp4_e2m1", 8), ("nf4", 3), ("apot", 1), ("bogus", 4)],
)
def test_bad_grids_raise(family: str, bits: int) -> None:
    with pytest.raises(ConfigError):
        make_grid(family, bits)
