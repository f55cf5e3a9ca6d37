"""Property tests (Hypothesis): encoding is monotone, levels are fixed points, nested grids never lose accuracy
with more bits, packing round-trips, and no quantizer modifies its input."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dfquant.grids.formats import FAMILIES, FIXED_WIDTH_FAMILIES, make_grid
from dfquant.quantizers import available, get_quantizer
from dfquant.quantizers.packing import pack, packed_nbytes, unpack

FIXED = list(FIXED_WIDTH_FAMILIES)
SIZED = [f for f in FAMILIES if f not in FIXED and f not in ("int-sym",)]
grid_strategy = st.one_of(
    st.sampled_from(FIXED).map(lambda f: make_grid(f)),
    st.tuples(st.sampled_from(SIZED), st.integers(2, 8)).map(lambda fb: make_grid(*fb)),
    st.integers(2, 8).map(lambda b: make_grid("int-sym", b)),
)
floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(grid_strategy, st.lists(floats, min_size=2, max_size=200))
def test_encoding_is_monotone(grid, values) -> None:
    z = torch.tensor(sorted(values), dtype=torch.float32)
    codes = grid.encode(z).long()
    assert bool((codes[1:] >= codes[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(grid_strategy)
def test_levels_are_fixed_points(grid) -> None:
    t = grid.table
    assert torch.equal(grid.round(t), t)
    assert torch.equal(grid.encode(t).long(), torch.arange(grid.num_levels))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["int", "uint"]), st.integers(1, 7), st.lists(floats, min_size=1, max_size=100))
def test_error_never_grows_with_bits_for_nested_grids(family, bits, values) -> None:
    z = torch.tensor(values, dtype=torch.float32) / 100
    small, large = make_grid(family, bits), make_grid(family, bits + 1)
    assert set(small.levels) <= set(large.levels)
    err_small = (small.round(z) - z).abs()
    err_large = (large.round(z) - z).abs()
    assert bool((err_large <= err_small).all())


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, n, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(sorted(available())),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.tuples(st.integers(1, 9), st.integers(1, 70)),
    st.sampled_from(["tensor", "channel", "group:16"]),
)
def test_quantizers_never_modify_their_input(name, dtype, shape, gran) -> None:
    cls = type(get_quantizer(name, 4)) if 4 in _bits(name) else None
    bits = 4 if cls is not None else _bits(name)[0]
    q = get_quantizer(name, bits)
    if name in ("mxfp4", "nvfp4"):  # the block formats fix their blocks: 'channel' means blocks along each row
        gran = "channel"
    x = torch.randn(shape).to(dtype)
    before = x.clone()
    out = q.fake_quantize(x, gran)
    assert torch.equal(x, before)
    assert out.dtype == dtype and out.shape == x.shape


def _bits(name: str) -> tuple[int, ...]:
    from dfquant.quantizers import quantizer_class

    return quantizer_class(name).supported_bits


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["int", "int-sym", "int-mr", "uint"]), st.integers(2, 8), st.lists(floats, min_size=1, max_size=100)
)
@example("int-mr", 2, [-3.698898456053902e-21])  # a tiny negative value must keep its sign on a mid-rise grid
@example("int-mr", 5, [1e-30, -1e-30, 0.0, -0.0])
def test_integer_fast_path_equals_nearest_level_search(family, bits, values) -> None:
    """The round-based encoder of integer grids gives exactly the codes of the midpoint search, ties included."""
    from dfquant.grids.formats import Grid

    g = make_grid(family, bits)
    generic = Grid("check", "codebook", "codebook", g.bits, g.levels)  # same levels, generic search path
    z = torch.tensor(values, dtype=torch.float32) / 50
    ties = g.midpoints[torch.randint(0, g.midpoints.numel(), (50,))]
    z = torch.cat([z, ties])
    assert torch.equal(g.encode(z), generic.encode(z))
