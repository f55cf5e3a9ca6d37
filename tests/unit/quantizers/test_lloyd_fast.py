"""The fast ``lloyd-max`` path against the plain implementation it replaced, bit for bit.

Fast path: :func:`dfquant.grids.distributions.fit_groups` (blocked, NumPy sort per block, float64 standard deviation,
column split of the Laplace CDF) and :func:`dfquant.quantizers.lloyd.encode_rows_fast` (lookup-table encoder).
Reference: :func:`dfquant.grids.distributions.fit_groups_reference` (the plain float32 formulas on the whole matrix),
``torch.sort`` and :func:`dfquant.quantizers.codes.encode_rows` (binary search), i.e. the code path of earlier
versions, kept here as ``_Old``. Every output must be identical: codes, scales, offsets, level tables, table
indices, chosen families and KS statistics.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch

from dfquant.errors import ConfigError
from dfquant.grids.distributions import (
    _exact_std,
    _uncertain_std,
    fit_groups,
    fit_groups_reference,
    serial_torch,
    sort_rows,
)
from dfquant.grids.lloyd_max import lloyd_max_table
from dfquant.quantizers import get_quantizer
from dfquant.quantizers.codes import QParams, constant_groups, encode_rows
from dfquant.quantizers.encoding import build_bin_table, encode_rows_fast, encode_thresholds
from dfquant.quantizers.lloyd import LloydEmpirical, LloydMax, _Fit, constant_rows
from dfquant.quantizers.qtensor import QTensor


class _Old:
    """The pre-fast-path pieces of ``lloyd-max``: full ``torch.sort``, plain fit, ``constant_groups`` on ``x``,
    binary-search encoder."""

    dist: str

    def _fit_analytic(self, x: torch.Tensor, presort: bool = False) -> _Fit:
        xs = torch.sort(x, dim=1).values
        fit = fit_groups_reference(x, xs)
        if self.dist == "auto":
            choice = fit.best()
        else:
            choice = torch.full((x.shape[0],), 0 if self.dist == "gaussian" else 1, dtype=torch.int64)
        loc, sigma = fit.location_scale(choice)
        scale = torch.where(sigma > 0, sigma, fit.std)
        ks = torch.where(choice == 1, fit.ks_laplace, fit.ks_gaussian)
        return _Fit(fit, choice, loc, scale, ks, x.amax(dim=1) == x.amin(dim=1), x, xs)

    def _params(
        self, x: torch.Tensor, f: _Fit, levels: torch.Tensor, code: torch.Tensor, index: torch.Tensor | None = None
    ) -> QParams:
        info = {"dist": code.to(torch.float32), "ks_gaussian": f.fit.ks_gaussian, "ks_laplace": f.fit.ks_laplace}
        return constant_groups(x, QParams(scale=f.scale, offset=f.loc, levels=levels, info=info, table_index=index))

    def encode(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        levels: torch.Tensor,
        glen: int,
        table_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return encode_rows(rows, scale, offset, levels, glen, table_index)


class _OldMax(_Old, LloydMax):
    pass


class _OldEmpirical(_Old, LloydEmpirical):
    pass


def _data(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(*shape, generator=g) * 0.02
    if kind == "laplace":
        u = torch.rand(*shape, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.03
    if kind == "t3":  # heavy tails: many groups fall back to the empirical solver
        z = torch.randn(*shape, generator=g)
        return z / (torch.randn(*shape, 3, generator=g).pow(2).sum(-1) / 3).sqrt()
    if kind == "sparse":  # 60 % zeros of both signs: zero medians, constant-zero groups, zero cells
        x = torch.randn(*shape, generator=g) * 0.02
        zero = torch.rand(*shape, generator=g) < 0.6
        signed = torch.where(torch.rand(*shape, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        return torch.where(zero, signed, x)
    # mixed: per-row scale and offset, ties, constant rows, rows mostly zero, zero runs
    x = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 2 + torch.randn(
        shape[0], 1, generator=g
    )
    x[::7] = torch.round(x[::7] * 2) / 2
    x[3::11] = 0.25
    x[5::13, :5] = 0.0
    x[6::17] = torch.where(torch.rand(x[6::17].shape, generator=g) < 0.6, torch.zeros(()), x[6::17])
    return x


def _assert_same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if a.is_floating_point():  # raw bits: -0.0 and +0.0 differ
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.contiguous().view(bits), b.contiguous().view(bits)
        assert torch.equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} differ"
    else:
        assert a == b, what


def _assert_same_qtensor(new: QTensor, old: QTensor) -> None:
    for name in ("codes", "scale", "offset", "levels", "table_index", "info", "bits", "shape"):
        _assert_same(getattr(new, name), getattr(old, name), name)


SHAPE = (96, 640)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "t3", "mixed", "sparse"])
@pytest.mark.parametrize(
    ("bits", "gran", "opts", "sdtype"),
    [
        (4, "group:64", {}, "float16"),
        (2, "group:64", {}, "float32"),
        (8, "group:64", {}, "float32"),
        (3, "group:27", {}, "float32"),  # odd groups
        (4, "group:100", {}, "bfloat16"),  # a tail group per row
        (4, "channel", {}, "float32"),
        (3, "channel", {"fallback_ks": 0.02}, "float16"),  # many fallback tables
        (4, "group:128", {"dist": "gaussian"}, "float16"),  # one shared table: ties go to even
        (4, "tensor", {}, "float32"),
    ],
)
def test_lloyd_max_matches_the_plain_implementation(
    kind: str, bits: int, gran: str, opts: dict[str, Any], sdtype: str
) -> None:
    x = _data(kind, SHAPE, seed=bits * 31 + len(gran))
    new = LloydMax(bits, **opts).quantize(x, gran, scale_dtype=sdtype)
    old = _OldMax(bits, **opts).quantize(x, gran, scale_dtype=sdtype)
    if "dist" in opts:
        # a forced family computes and reports only its own KS statistic; everything else is unchanged
        other = "ks_laplace" if opts["dist"] == "gaussian" else "ks_gaussian"
        assert other not in new.info and other in old.info
        del old.info[other]
    _assert_same_qtensor(new, old)


@pytest.mark.parametrize("kind", ["gaussian", "t3", "mixed", "sparse"])
def test_lloyd_empirical_matches_the_plain_implementation(kind: str) -> None:
    x = _data(kind, (32, 512), seed=7)
    _assert_same_qtensor(LloydEmpirical(3).quantize(x, "channel"), _OldEmpirical(3).quantize(x, "channel"))


@pytest.mark.parametrize("threads", [1, 2])
def test_benchmark_tensor_matches_on_one_and_two_threads(threads: int) -> None:
    """The benchmark setting (4 bits, groups of 64 and per channel) on a 1024 x 1024 slice of the benchmark
    tensor; also checks the caller's thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
        for gran in ("group:64", "channel"):
            new = LloydMax(4).quantize(w, gran, scale_dtype="float16")
            assert torch.get_num_threads() == threads
            _assert_same_qtensor(new, _OldMax(4).quantize(w, gran, scale_dtype="float16"))
    finally:
        torch.set_num_threads(before)


def test_seeded_tensor_against_independent_references() -> None:
    """Gaussian, Laplace, constant, half-zero and tied rows, groups of 64 with float16 scales, checked against
    references that share no code with the quantizer: scipy's Kolmogorov-Smirnov statistics of each group
    (Gaussian with the group's mean and population std; Laplace with its median and mean absolute deviation,
    the maximum-likelihood fit), a float64 decoder, a brute-force nearest-level search and a float64 MSE."""
    from scipy import stats

    g = torch.Generator().manual_seed(1234)
    w = torch.randn(48, 320, generator=g) * 0.05
    w[7] = 0.125
    w[9, ::2] = 0.0
    w[11] = torch.round(w[11] * 40) / 40
    u = torch.rand(16, 320, generator=g) - 0.5
    w[20:36] = -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.03
    qt = LloydMax(4).quantize(w, "group:64", scale_dtype="float16")
    x = w.double().numpy().reshape(48, 5, 64)
    ks_g = qt.info["ks_gaussian"].double().numpy()
    ks_l = qt.info["ks_laplace"].double().numpy()
    dist = qt.info["dist"].long().numpy()
    for r in range(48):
        for k in range(5):
            grp = x[r, k]
            if grp.std() == 0:
                assert ks_g[r, k] == 0 and ks_l[r, k] == 0
                continue
            ref_g = stats.kstest(grp, "norm", args=(grp.mean(), grp.std())).statistic
            med = np.median(grp)
            ref_l = stats.kstest(grp, "laplace", args=(med, np.abs(grp - med).mean())).statistic
            assert ks_g[r, k] == pytest.approx(ref_g, abs=2e-6), (r, k)
            assert ks_l[r, k] == pytest.approx(ref_l, abs=2e-6), (r, k)
            if dist[r, k] < 2 and abs(ref_g - ref_l) > 1e-5:  # 2: the empirical fallback
                assert dist[r, k] == int(ref_l < ref_g), (r, k)
    assert {int(d) for d in np.unique(dist)} == {0, 1, 2}  # every family is exercised
    # a float64 decoder: levels[table][code] * scale + offset
    levels = qt.levels.double()
    table = qt.table_index.long()
    scale = qt.scale.double()
    offset = qt.offset.double()
    codes = qt.codes.long().reshape(48, 5, 64)
    every = levels[table][..., None, :] * scale[..., None, None] + offset[..., None, None]  # (48, 5, 1, 16)
    dec = torch.gather(every.expand(48, 5, 64, 16), 3, codes[..., None])[..., 0]
    got = qt.dequantize(torch.float32).double().reshape(48, 5, 64)
    assert torch.allclose(got, dec, rtol=1e-6, atol=1e-6 * float(dec.abs().max()))  # float32 rounding
    # each code is the nearest level of its group (ties within float32 rounding aside)
    dist_all = (torch.from_numpy(x)[..., None] - every).abs()  # (48, 5, 64, 16)
    chosen = torch.gather(dist_all, 3, codes[..., None])[..., 0]
    assert bool((chosen <= dist_all.min(dim=3).values + 1e-6 * scale[..., None]).all())
    # the error it reports is the float64 relative MSE of what it decodes
    ref_mse = float(((got.reshape(48, 320) - w.double()) ** 2).sum() / (w.double() ** 2).sum())
    assert qt.rel_mse(w) == pytest.approx(ref_mse, rel=1e-5)
    assert ref_mse < 0.0125  # 4-bit Lloyd-Max on unit Gaussian: 0.0095 (Max 1960); tails and ties cost a little


# ----------------------------------------------------------------------------------------------------------------
# fit_groups


def _fit_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    cases = [
        torch.randn(4096, 64, generator=g),
        torch.randn(300, 27, generator=g) * 1e-3 + 0.5,
        torch.randn(7, 4096, generator=g),
        torch.randn(40, 1, generator=g),
        torch.randn(40, 2, generator=g),
        torch.randn(40, 3, generator=g),
        torch.randn(64, 333, generator=g) * 1e30,
        torch.randn(64, 64, generator=g) * 1e-38,  # subnormal spreads
        torch.randn(64, 100, generator=g) * 0.01 + 5.0,  # kappa^2 = 2.5e5: every std recomputed by torch
        torch.round(torch.randn(200, 64, generator=g) * 3) / 4,  # ties everywhere, medians on ties
        _data("mixed", (150, 96), 3),
        _data("laplace", (500, 128), 4),
    ]
    signed_zeros = torch.zeros(8, 64)
    signed_zeros[:, ::3] = -0.0
    signed_zeros[4:, 5] = 1.0
    return [*cases, signed_zeros, _data("sparse", (1000, 64), 5), _data("sparse", (1000, 27), 6)]


@pytest.mark.parametrize("case", range(15))
def test_fit_groups_is_bitwise_the_plain_formulas(case: int) -> None:
    x = _fit_cases()[case]
    ref = fit_groups_reference(x)
    for got in (fit_groups(x), fit_groups(x, torch.sort(x, dim=1).values), fit_groups(x, sort_rows(x))):
        for f in fields(ref):
            _assert_same(getattr(got, f.name), getattr(ref, f.name), f.name)


def test_fit_groups_long_rows_keep_the_blocking() -> None:
    """Rows of 32768 values or more: the plain formulas on blocks of ``block // n`` rows (or all rows)."""
    x = torch.randn(3, 40000)
    got = fit_groups(x, block=1 << 19)
    parts = [fit_groups_reference(x[i : i + 13]) for i in range(0, 3, 13)]
    for f in fields(got):
        _assert_same(getattr(got, f.name), torch.cat([getattr(p, f.name) for p in parts]), f.name)
    _assert_same(fit_groups(x).ks_gaussian, fit_groups_reference(x).ks_gaussian, "ks_gaussian")


def test_std_rounding_is_certain_outside_the_flagged_rows() -> None:
    """The float64 standard deviation rounds to torch's float32 value on every row it does not flag, over rows
    of 1..5000 values, offsets up to 300 standard deviations and magnitudes 1e-30..1e30; it flags no row of
    centred data with 5 or more values, and every row whose spread is tiny against its mean."""
    g = torch.Generator().manual_seed(11)
    share = {}
    for n in (1, 2, 5, 27, 64, 128, 1000, 5000):
        m = max(8, 200_000 // n)
        for loc, mag in ((0.0, 1.0), (3.0, 1.0), (300.0, 1.0), (0.0, 1e-30), (1.0, 1e30)):
            x = ((torch.randn(m, n, generator=g) + loc) * mag).contiguous()
            sd, mu = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
            _exact_std(x, sd, mu, torch.empty(m, n, dtype=torch.float64))
            idx = _uncertain_std(sd, mu, n)
            ok = torch.ones(m, dtype=torch.bool)
            ok[idx] = False
            assert torch.equal(sd.to(torch.float32)[ok], x.std(dim=1, correction=0)[ok]), (n, loc, mag)
            share[n, loc, mag] = idx.numel() / m
    assert all(share[n, loc, mag] == 0 for n in (5, 27, 64, 128, 1000, 5000) for loc, mag in ((0.0, 1.0), (0.0, 1e-30)))
    assert share[1, 0.0, 1.0] == 1.0  # std 0, mean not 0: torch is asked (it gives 0)
    assert share[1000, 300.0, 1.0] == share[5000, 300.0, 1.0] == 1.0
    assert share[64, 3.0, 1.0] < 1e-3 and share[64, 300.0, 1.0] < 0.2


def test_constant_rows_from_the_standard_deviation() -> None:
    """``constant_rows`` (what the quantizer tests) is ``max == min``, also where ``std`` rounds to 0 on a row
    spread over subnormals, which the fit itself treats as zero spread."""
    x = _data("mixed", (200, 64), 9)
    x[17] = -0.0
    x[18, ::2] = 0.0
    x[18, 1::2] = -0.0
    x[19, 0] = 1e-45  # one subnormal step away from a constant row: std = 1.7e-46 rounds to 0
    x[19, 1:] = 0.0
    fit = fit_groups(x)
    flat = constant_rows(x, fit.std)
    assert torch.equal(flat, x.amax(dim=1) == x.amin(dim=1))
    assert int(flat.sum()) == 19 and int((fit.std == 0).sum()) == 20
    assert not bool(flat[19]) and float(fit.std[19]) == 0.0 and float(fit.ks_gaussian[19]) == 0.0


def test_sort_rows_gives_torch_sort_bits() -> None:
    x = torch.randn(1000, 300)
    x[:, ::7] = 0.5
    x[::3, 1::5] = -0.0
    x[::2, 2::5] = 0.0
    with serial_torch():
        assert torch.get_num_threads() == 1
        _assert_same(sort_rows(x), torch.sort(x, dim=1).values, "sorted")
    _assert_same(sort_rows(x), torch.sort(x, dim=1).values, "sorted")
    _assert_same(sort_rows(x.T[:, :64]), torch.sort(x.T[:, :64], dim=1).values, "sorted columns")


# ----------------------------------------------------------------------------------------------------------------
# Encoder


def _encode_both(
    rows: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    levels: torch.Tensor,
    glen: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    fast = encode_rows_fast(rows, scale, offset, levels, glen, index)
    slow = encode_rows(rows, scale, offset, levels, glen, index)
    _assert_same(fast, slow, "codes")
    return fast


def _around(v: torch.Tensor) -> torch.Tensor:
    """``v`` with its float32 neighbours."""
    up = torch.nextafter(v, torch.full_like(v, math.inf))
    down = torch.nextafter(v, torch.full_like(v, -math.inf))
    return torch.cat([down, v, up])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_encoder_on_midpoints_and_their_neighbours(bits: int) -> None:
    """Values exactly on the decision thresholds (unit scale, zero offset): the stacked tables send them to the
    lower level, one shared table to the level at even distance from zero, as ``encode_rows`` does."""
    tables = torch.stack(
        [torch.tensor(lloyd_max_table(d, bits).levels, dtype=torch.float32) for d in ("gaussian", "laplace")]
    )
    mids = (tables[:, :-1] + tables[:, 1:]) * 0.5
    vals = torch.cat([_around(mids.flatten()), torch.tensor([0.0, -0.0, 50.0, -50.0, 3e38, -3e38])])
    n = vals.numel()
    rows = vals.repeat(4, 1)
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    index = torch.tensor([[0], [1], [1], [0]])
    codes = _encode_both(rows, ones, zeros, tables, n, index).long()
    L = 2**bits
    M = 2 * (L - 1)  # values below, on and above the midpoints of both tables
    k = torch.arange(L - 1)
    for r, t in ((0, 0), (1, 1)):
        assert torch.equal(codes[r, t * (L - 1) + k], k)  # just below midpoint k: level k
        assert torch.equal(codes[r, M + t * (L - 1) + k], k)  # on it: the lower level
        assert torch.equal(codes[r, 2 * M + t * (L - 1) + k], k + 1)  # just above: level k + 1
    assert codes[0, -4:].tolist() == [L - 1, 0, L - 1, 0]
    for t in range(2):
        shared = _encode_both(rows, ones, zeros, tables[t], n).long()
        # no zero level (even L): a tie goes up from midpoint k when k + 1 is even
        assert torch.equal(shared[0, M + t * (L - 1) + k], k + (k % 2))


def test_encoder_shared_table_with_a_zero_level_breaks_ties_to_even() -> None:
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    mids = (levels[:-1] + levels[1:]) * 0.5
    rows = _around(mids)[None, :]
    codes = _encode_both(rows, torch.ones(1, 1), torch.zeros(1, 1), levels, rows.shape[1])
    # on the midpoints: -0.75 -> 0 (index 0 is 2 from zero), -0.25 -> 2, 0.25 -> 2, 0.75 -> 4, 1.5 -> 4
    assert codes[0, 5:10].tolist() == [0, 2, 2, 4, 4]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_encoder_random_groups_tails_and_constant_groups(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    R, n, glen = 37, 1000, 64  # 15 full groups and a tail of 40 per row
    rows = torch.randn(R, n, generator=g) * 3
    ngr = -(-n // glen)
    scale = torch.rand(R, ngr, generator=g) + 0.05
    scale[3, 2] = 0.0  # constant group
    scale[4, 5] = 1e-30  # z overflows to +-inf after the bin scaling
    offset = torch.randn(R, ngr, generator=g)
    tables = torch.stack(
        [torch.tensor(lloyd_max_table(d, bits).levels, dtype=torch.float32) for d in ("gaussian", "laplace")]
    )
    index = torch.randint(0, 2, (R, ngr), generator=g)
    _encode_both(rows, scale, offset, tables, glen, index)
    _encode_both(rows, scale, offset, tables[1], glen)
    _encode_both(rows, scale.to(torch.float16).float(), offset.to(torch.float16).float(), tables[0], glen)


def test_encoder_tables_without_lookup_rows_are_encoded_exactly() -> None:
    """Thresholds closer than 2^-13 (no bin scale separates them), a subnormal scale (``1 / scale`` is inf) and
    per-group tables: the encoder hands those groups, or the whole tensor, to ``encode_rows``."""
    g = torch.Generator().manual_seed(3)
    base = torch.tensor(lloyd_max_table("gaussian", 3).levels, dtype=torch.float32)
    close = base.clone()
    close[4], close[5] = close[3] + 1e-5, close[3] + 2e-5  # midpoints 1e-5 apart
    own = torch.sort(torch.randn(50, 8, generator=g), dim=1).values
    tables = torch.cat([base[None], close[None], own])
    R, glen = 20, 32
    rows = torch.randn(R, 5 * glen, generator=g)
    scale = torch.rand(R, 5, generator=g) + 0.1
    offset = torch.randn(R, 5, generator=g) * 0.1
    index = torch.randint(0, tables.shape[0], (R, 5), generator=g)
    index[0, 0] = 1
    rows[0, :glen] = (close[4] + close[5]) * 0.5 * scale[0, 0] + offset[0, 0]
    _encode_both(rows, scale, offset, tables, glen, index)
    lut = build_bin_table(encode_thresholds(tables), torch.bincount(index.flatten(), minlength=tables.shape[0]))
    assert lut is not None and int(lut.row[1]) == -1 and int(lut.row[0]) >= 0
    tiny = scale.clone()
    tiny[1, 1] = 1e-45
    _encode_both(rows, tiny, offset, tables, glen, index)


def test_bin_table_counts_the_thresholds_below_each_bin() -> None:
    """For the 4-bit Gaussian and Laplace tables: ``s = 2^p`` with ``2 / s`` below the smallest threshold gap,
    ``H`` just above the largest scaled threshold, at most one threshold per bin."""
    tables = torch.stack(
        [torch.tensor(lloyd_max_table(d, 4).levels, dtype=torch.float32) for d in ("gaussian", "laplace")]
    )
    thr = encode_thresholds(tables)
    lut = build_bin_table(thr, torch.tensor([5, 3]))
    assert lut is not None
    gap = float((thr[:, 1:] - thr[:, :-1]).min())
    assert 2 / lut.scale <= gap < 4 / lut.scale
    assert lut.half == math.ceil(float(thr.abs().max()) * lut.scale) + 1
    width = 2 * lut.half + 1
    assert lut.base.numel() == 2 * width and lut.row.tolist() == [0, 1]
    finite = torch.isfinite(lut.thr).reshape(2, width)
    assert finite.sum(dim=1).tolist() == [15, 15]  # each threshold alone in its bin
    assert lut.base.reshape(2, width)[:, -1].tolist() == [15, 15]


# -- refine: least-squares scale/offset alternation ---------------------------------------------------------------


def _rel(w: torch.Tensor, qt: object) -> float:
    d = qt.dequantize(torch.float32)  # type: ignore[attr-defined]
    return float(((d - w) ** 2).sum() / (w**2).sum())


def test_refine_lowers_the_error_monotonically_and_zero_changes_nothing() -> None:
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(3))
    plain = get_quantizer("lloyd-max", 4).quantize(w, "group:64")
    zero = get_quantizer("lloyd-max", 4, refine=0).quantize(w, "group:64")
    assert torch.equal(plain.codes, zero.codes) and torch.equal(plain.scale, zero.scale)
    errs = [_rel(w, get_quantizer("lloyd-max", 4, refine=r, dist="gaussian").quantize(w, "group:64")) for r in range(5)]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(errs))
    # N(0, 1) groups of 64 at 4 bits: the analytic Gaussian levels give ~9.0e-3, two refinements ~7.5e-3
    assert 8.6e-3 < errs[0] < 9.4e-3 and errs[2] < 0.86 * errs[0]


def test_refine_keeps_constant_groups_exact_and_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 64, generator=g) * 0.3 + 0.1
    w[2] = 0.25  # a constant group stays exact
    q1 = get_quantizer("lloyd-max", 3, refine=1, dist="gaussian", fallback_ks="off")
    qt = q1.quantize(w, "channel")
    assert torch.equal(qt.dequantize(torch.float32)[2], w[2])
    # one refinement from the analytic fit: codes of the analytic parameters, then twice the step to the
    # least-squares fit for those codes
    q0 = get_quantizer("lloyd-max", 3, dist="gaussian", fallback_ks="off").quantize(w, "channel")
    y = q0.levels[q0.codes.long()]
    for r in (0, 1, 3, 4, 5):
        A = torch.stack([y[r], torch.ones(64)], dim=1).double()
        sol = torch.linalg.lstsq(A, w[r].double()[:, None]).solution.squeeze(1)
        s0, o0 = q0.scale[r, 0].double(), q0.offset[r, 0].double()
        torch.testing.assert_close(qt.scale[r, 0].double(), s0 + 2 * (sol[0] - s0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(qt.offset[r, 0].double(), o0 + 2 * (sol[1] - o0), rtol=1e-5, atol=1e-6)


def test_refine_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="refine must be an integer >= 0, got -1"):
        get_quantizer("lloyd-max", 4, refine=-1)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_fit_groups_with_one_family_skips_only_the_other_statistic(family: str) -> None:
    x = _data("mixed", (64, 256), seed=11)
    both = fit_groups(x)
    one = fit_groups(x, ks=family)
    keep, skip = ("ks_gaussian", "ks_laplace") if family == "gaussian" else ("ks_laplace", "ks_gaussian")
    for name in ("mean", "std", "median", "laplace_sigma", keep):
        _assert_same(getattr(one, name), getattr(both, name), name)
    # constant rows still get 0; every other row's skipped statistic is NaN
    flat = both.std == 0
    assert bool(torch.isnan(getattr(one, skip)[~flat]).all()) and bool((getattr(one, skip)[flat] == 0).all())
    with pytest.raises(ValueError, match="ks must be"):
        fit_groups(x, ks="student")
