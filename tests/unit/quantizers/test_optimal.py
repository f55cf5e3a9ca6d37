"""The ``lloyd-optimal`` rule: exact optimality against brute force, never worse than any other rule per
group, the binned path for large groups, weights, edge cases and its error model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dfquant import ConfigError, InputError, get_quantizer
from dfquant.grids.distributions import sample
from dfquant.grids.lloyd_max import lloyd_max_table
from dfquant.quantizers import available, quantizer_class
from dfquant.quantizers.optimal import optimal_levels


def _brute_force_sse(x: list[float], levels: int, w: list[float] | None = None) -> float:
    """Smallest weighted squared error over all partitions of the sorted values into contiguous runs."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    xs = [x[i] for i in order]
    ws = [1.0 if w is None else w[i] for i in order]
    n = len(xs)
    best = math.inf
    for k in range(1, min(levels, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            sse = 0.0
            for lo, hi in itertools.pairwise(bounds):
                tw = sum(ws[lo:hi])
                mean = sum(ws[i] * xs[i] for i in range(lo, hi)) / tw if tw > 0 else 0.0
                sse += sum(ws[i] * (xs[i] - mean) ** 2 for i in range(lo, hi))
            best = min(best, sse)
    return best


def _sse(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted squared error of nearest-level quantization of each row of ``x`` on the levels ``y``."""
    d = (x[:, :, None].double() - y[:, None, :].double()) ** 2
    e = d.min(dim=2).values
    return (e if w is None else e * w.double()).sum(1)


def _group_sse(rule: str, bits: int, x: torch.Tensor, **opts: object) -> torch.Tensor:
    return ((get_quantizer(rule, bits, **opts).fake_quantize(x) - x).double() ** 2).sum(1)


def _dense_optimum(x: torch.Tensor, levels: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal weighted squared error per row by the plain ``O(L n^2)`` dynamic program (reference)."""
    xs, order = torch.sort(x.double(), dim=1)
    ws = torch.ones_like(xs) if w is None else w.double().gather(1, order)
    z = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    s0, s1, s2 = (torch.cat([z, t.cumsum(1)], 1) for t in (ws, ws * xs, ws * xs * xs))
    c0 = s0[:, None, :] - s0[:, :, None]
    c1 = s1[:, None, :] - s1[:, :, None]
    cost = ((s2[:, None, :] - s2[:, :, None]) - c1 * c1 / torch.where(c0 > 0, c0, torch.ones_like(c0))).clamp(0)
    idx = torch.arange(x.shape[1] + 1)
    cost = cost.masked_fill((idx[:, None] >= idx[None, :])[None], float("inf"))
    d = cost[:, 0, :]
    for _ in range(1, min(levels, x.shape[1])):
        d = (d[:, :, None] + cost).min(dim=1).values
    return d[:, -1]


def test_bisection_matches_the_dense_program() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.cat(
        [
            torch.randn(4, 300, generator=g),
            torch.randn(4, 300, generator=g) ** 3,
            torch.randint(-3, 4, (4, 300), generator=g).float(),  # many repeated values
        ]
    )
    w = torch.rand(12, 300, generator=g) * (torch.rand(12, 300, generator=g) > 0.3)  # some zero weights
    for levels in (2, 5, 16):
        for weights in (None, w):
            got = _sse(x, optimal_levels(x, levels, weights), weights)
            ref = _dense_optimum(x, levels, weights)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_exact_against_brute_force(levels: int) -> None:
    g = torch.Generator().manual_seed(levels)
    x = torch.cat([torch.randn(6, 9, generator=g), torch.rand(6, 9, generator=g) ** 3], dim=0)
    y = optimal_levels(x, levels)
    got = _sse(x, y)
    for r in range(x.shape[0]):
        assert float(got[r]) == pytest.approx(_brute_force_sse(x[r].tolist(), levels), rel=1e-5, abs=1e-9)


def test_weighted_against_brute_force_and_repetition() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 8, generator=g)
    w = torch.randint(0, 4, (5, 8), generator=g).float()
    w[0] = 0.0  # all-zero weights: treated as unweighted
    y = optimal_levels(x, 3, w)
    got = _sse(x, y, torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w)))
    for r in range(x.shape[0]):
        ref = _brute_force_sse(x[r].tolist(), 3, None if r == 0 else w[r].tolist())
        assert float(got[r]) == pytest.approx(ref, rel=1e-5, abs=1e-9)
    # integer weights are the same as repeating the values
    rep = torch.repeat_interleave(x[1], w[1].long())
    y_rep = optimal_levels(rep[None], 3)
    assert float(_sse(rep[None], y_rep)[0]) == pytest.approx(float(got[1]), rel=1e-5)
    with pytest.raises(ConfigError, match="do not match"):
        optimal_levels(x, 3, w[:, :4])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_never_worse_than_any_other_rule(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    n = 144
    rows = [
        sample("gaussian", 4 * n, g).reshape(4, n),
        sample("laplace", 4 * n, g).reshape(4, n),
        (torch.randn(4, n, generator=g) + torch.sign(torch.randn(4, n, generator=g)) * 3),  # bimodal
        torch.randn(4, n, generator=g) ** 3,  # heavy tails
    ]
    x = torch.cat(rows).float()
    mine = _group_sse("lloyd-optimal", bits, x)
    for rule in available():
        if rule == "lloyd-optimal" or bits not in quantizer_class(rule).supported_bits:
            continue
        if hasattr(quantizer_class(rule), "block_granularity"):
            continue  # block-scaled formats (mxfp4, nvfp4) store one scale per block of 16/32: more than one codebook
        other = _group_sse(rule, bits, x)
        assert bool((mine <= other * (1 + 1e-5) + 1e-9).all()), rule


def test_large_groups_binned_then_refined() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3, 600, generator=g), torch.randn(3, 600, generator=g) ** 3])
    exact = _group_sse("lloyd-optimal", 3, x)
    binned = _group_sse("lloyd-optimal", 3, x, max_atoms=128, bins=64)
    empirical = _group_sse("lloyd-empirical", 3, x)
    assert bool((exact <= binned * (1 + 1e-6)).all())
    assert bool((binned <= empirical * (1 + 1e-6)).all())
    assert float(binned.sum()) < 1.02 * float(exact.sum())


def test_expected_mse_is_the_lloyd_max_optimum_on_large_samples() -> None:
    g = torch.Generator().manual_seed(11)
    for dist in ("gaussian", "laplace"):
        x = sample(dist, 200_000, g).reshape(1, -1).float()
        for bits in (2, 3, 4):
            q = get_quantizer("lloyd-optimal", bits)
            assert q.expected_mse(dist) == pytest.approx(lloyd_max_table(dist, bits).mse, rel=1e-12)
            measured = float(((q.fake_quantize(x, "tensor") - x) ** 2).mean())
            assert measured == pytest.approx(q.expected_mse(dist, x.numel()), rel=0.02), (dist, bits)


def test_edge_cases() -> None:
    q = get_quantizer("lloyd-optimal", 3)
    # constant groups, fewer values than levels, repeated values: all exact
    x = torch.tensor([[0.5] * 6, [1.0, -2.0, 3.0, 1.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1e-3]])
    assert torch.equal(q.fake_quantize(x), x)
    tiny = torch.randn(5, 3)
    torch.testing.assert_close(q.fake_quantize(tiny), tiny)
    assert torch.equal(q.fake_quantize(torch.full((2, 1), 7.0)), torch.full((2, 1), 7.0))
    # levels are strictly increasing unit levels within [-1, 1 + repeats]
    qt = q.quantize(torch.randn(4, 50), "channel")
    lv = qt.levels if qt.levels.dim() == 2 else qt.levels[None]
    assert bool((lv[:, 1:] > lv[:, :-1]).all()) and float(lv.min()) >= -1.0
    # half precision in, float32 math, same dtype out; group granularity with a tail group
    h = torch.randn(6, 100).to(torch.float16)
    out = q.fake_quantize(h, "group:32")
    assert out.dtype == torch.float16 and out.shape == h.shape
    assert torch.equal(out, q.fake_quantize(h.float(), "group:32").to(torch.float16))


@pytest.mark.parametrize(
    "opts", [{"max_atoms": 1}, {"bins": True}, {"iters": -1}, {"max_atoms": 2.5}, {"colour": "red"}]
)
def test_bad_options(opts: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="lloyd-optimal"):
        get_quantizer("lloyd-optimal", 3, **opts)


# -- importance weights --------------------------------------------------------------------------------------


def test_importance_weights_through_quantize() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 4, 3, 3, generator=g)
    imp = (torch.rand(1, 4, 1, 1, generator=g) ** 4).expand_as(w)  # a few input channels matter
    q = get_quantizer("lloyd-optimal", 2, weighting="input-variance")
    assert q.wants_importance and not get_quantizer("lloyd-optimal", 2).wants_importance
    weighted = q.quantize(w, "channel", importance=imp).dequantize()
    plain = q.quantize(w, "channel").dequantize()
    werr = lambda y: float((imp * (y - w) ** 2).sum())  # noqa: E731
    assert werr(weighted) < werr(plain)
    assert float(((plain - w) ** 2).sum()) <= float(((weighted - w) ** 2).sum())
    # group layout with a tail group: the weights follow the values
    out = q.quantize(w.reshape(8, -1), "group:16", importance=imp.reshape(8, -1))
    assert out.dequantize().shape == (8, 36)
    with pytest.raises(InputError, match="shape"):
        q.quantize(w, "channel", importance=imp[:4])
    with pytest.raises(InputError, match="non-negative"):
        q.quantize(w, "channel", importance=-imp)
    with pytest.raises(ConfigError, match="takes no importance"):
        get_quantizer("minmax", 2).quantize(w, "channel", importance=imp)
    with pytest.raises(ConfigError, match="weighting"):
        get_quantizer("lloyd-optimal", 2, weighting="hessian")


def test_pipeline_weights_by_input_variance() -> None:
    """Layers whose input variance is known are fitted to the variance-weighted error (the head after the
    average pooling with the variances before it, which rank its channels alike); the stem, reading the image,
    is fitted as without weighting, and so is the head without bias correction (which needs the absolute
    ``E[x^2]``)."""
    from torch import nn

    from dfquant.config import LayerRule, QuantConfig
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.zoo.cifar_resnet import CifarResNet

    model = CifarResNet(8).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 2)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    _, rp = quantize_model(model, QuantConfig(LayerRule("lloyd-optimal", 2)))
    opts = {"weighting": "input-variance"}
    _, rw = quantize_model(model, QuantConfig(LayerRule("lloyd-optimal", 2, options=opts)))
    err_p = {r.name: r.rel_mse for r in rp.layers}
    err_w = {r.name: r.rel_mse for r in rw.layers}
    assert err_w["conv1"] == err_p["conv1"]  # the stem reads the image: no statistics
    changed = [n for n in err_p if err_w[n] != err_p[n]]
    assert len(changed) >= 4 and all(err_w[n] >= err_p[n] * (1 - 1e-6) for n in changed)
    assert "linear" in changed
    assert {r.options.get("weighting") for r in rw.layers} == {"input-variance"}
    cfg = QuantConfig(LayerRule("lloyd-optimal", 2, options=opts), bias_correction=False)
    _, rn = quantize_model(model, cfg)
    err_n = {r.name: r.rel_mse for r in rn.layers}
    assert err_n["linear"] == err_p["linear"] and err_n["layer1.0.conv2"] != err_p["layer1.0.conv2"]
