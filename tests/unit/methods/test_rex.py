"""REx residual expansion: terms, group sparsity, budget split, cost, one kernel, error bound, wiring."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.methods.rex import (
    BoundLayer,
    BoundResidual,
    concat_forward,
    error_bound,
    expand,
    expansion_cost,
    kept_channels,
    layer_sparsities,
    max_output_change,
    operator_norm_inf,
    reconstruct,
    relative_error,
    termwise_forward,
    total_cost,
)
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers.registry import get_quantizer

RULES = [
    ("minmax", 3, {}),
    ("lloyd-max", 3, {}),
    ("statq", 4, {"format": "fp4_e2m1"}),
    ("nf4", 4, {}),
]


def _weight(out: int = 24, inp: int = 40) -> torch.Tensor:
    return torch.randn(out, inp) * torch.linspace(0.2, 2.0, out)[:, None]


# -- expansion --


@pytest.mark.parametrize(("rule", "bits", "opts"), RULES, ids=[r[0] for r in RULES])
def test_any_quantizer_expands(rule: str, bits: int, opts: dict) -> None:
    """Every order is the rule applied to the current residual, with its own scales; the error falls."""
    q = get_quantizer(rule, bits, **opts)
    w = _weight()
    terms = expand(w, q, 4, granularity="channel")
    assert [t.order for t in terms] == [1, 2, 3, 4]
    assert all(t.qtensor.quantizer == rule and t.channels is None for t in terms)
    first = q.quantize(w, "channel")
    assert torch.equal(terms[0].qtensor.dequantize(), first.dequantize())
    res = w - terms[0].qtensor.dequantize()
    assert torch.equal(terms[1].qtensor.dequantize(), q.quantize(res, "channel").dequantize())
    # each order has its own, smaller scales
    s1, s2 = terms[0].qtensor.scale.float(), terms[1].qtensor.scale.float()
    assert bool((s2 < s1).all())
    errs = [relative_error(w, terms[:k]) for k in range(1, 5)]
    assert all(b < a for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < errs[0] / 4


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_minmax_falls_faster_than_2_pow_b_minus_1(bits: int) -> None:
    """On the default mid-rise grid the step shrinks (2^b - 1)-fold per order: the error falls >= 2^(b-1)."""
    w = _weight(32, 72)
    q = get_quantizer("minmax", bits)
    terms = expand(w, q, 4)
    errs = [relative_error(w, terms[:k]) for k in range(1, 5)]
    for a, b in itertools.pairwise(errs):
        assert a / b >= 2 ** (bits - 1)
    # and the max error respects the half-step of the last order
    last = terms[-1].qtensor.scale.float().reshape(-1)
    assert bool(((reconstruct(terms, w.shape) - w).abs().amax(dim=1) <= last / 2 + 1e-6).all())


def test_order_one_is_plain_and_bad_input() -> None:
    w = _weight()
    q = get_quantizer("minmax", 4)
    (t,) = expand(w, q, 1)
    assert torch.equal(t.qtensor.codes, q.quantize(w).codes)
    with pytest.raises(ConfigError, match="order"):
        expand(w, q, 0)
    with pytest.raises(ConfigError, match="sparsity"):
        expand(w, q, 2, sparsity=1.5)
    with pytest.raises(ConfigError, match="axis 0"):
        expand(w, q, 2, granularity="channel:1", sparsity=0.5)


# -- group sparsity --


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_sparse_keeps_exactly_the_budgeted_channels(sparsity: float) -> None:
    w = _weight(24, 40)
    q = get_quantizer("minmax", 3)
    terms = expand(w, q, 3, sparsity=sparsity)
    n = kept_channels(24, 1 - sparsity)
    assert n == round((1 - sparsity) * 24)
    assert terms[0].channels is None
    for k, t in enumerate(terms[1:], start=2):
        assert t.channels is not None and t.channels.numel() == n and t.qtensor.shape == (n, 40)
        # the kept channels are those with the largest current residual
        res = w - reconstruct(terms[: k - 1], w.shape)
        top = set(torch.topk(res.norm(dim=1), n).indices.tolist())
        assert set(t.channels.tolist()) == top
    # untouched channels keep the order-1 error exactly
    rest = sorted(set(range(24)) - set(terms[1].channels.tolist()) - set(terms[2].channels.tolist()))
    w1 = reconstruct(terms[:1], w.shape)
    assert torch.equal(reconstruct(terms, w.shape)[rest], w1[rest])


def test_later_orders_may_pick_channels_skipped_earlier() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    q = get_quantizer("minmax", 2)
    terms = expand(w, q, 4, sparsity=0.5)
    picked = [set(t.channels.tolist()) for t in terms[1:]]
    assert picked[1] - picked[0] or picked[2] - picked[1]


def test_zero_kept_channels_adds_no_term() -> None:
    w = _weight(4, 8)
    terms = expand(w, get_quantizer("minmax", 4), 3, sparsity=0.9)  # round(0.1 * 4) = 0
    assert len(terms) == 1


def test_layer_split_linear_in_depth() -> None:
    s = layer_sparsities(5, 0.5, "linear")
    kept = [1 - x for x in s]
    assert sum(kept) / 5 == pytest.approx(0.5)
    steps = [b - a for a, b in itertools.pairwise(kept)]
    assert all(d > 0 for d in steps) and max(steps) - min(steps) < 1e-9  # linear, more toward the head
    assert layer_sparsities(4, 0.3, "uniform") == pytest.approx([0.3] * 4)
    sizes = [100.0, 10.0, 10.0]
    s = layer_sparsities(3, 0.2, "linear", sizes=sizes)
    kept = [1 - x for x in s]
    assert sum(k * z for k, z in zip(kept, sizes, strict=True)) == pytest.approx(0.8 * sum(sizes))
    assert max(kept) <= 1.0 and kept[-1] == pytest.approx(1.0)  # capped, excess handed to the others
    assert layer_sparsities(3, 0.5, lambda i, n: 1.0) == pytest.approx([0.5] * 3)
    with pytest.raises(ConfigError, match="split rule"):
        layer_sparsities(3, 0.5, "quadratic")


# -- cost --


def test_bops_accounting() -> None:
    c = expansion_cost("l", 1000, [(4, 64), (4, 32)], 64, bits=4, bits_per_weight=6.1)
    assert c.weight_bits_per_mac == 6.0
    assert c.bops == 1000 * 6 * 32 and c.plain_bops == 1000 * 4 * 32 and c.float_bops == 1000 * 1024
    c2 = expansion_cost("m", 3000, [(2, 8), (2, 8)], 8, bits=2, bits_per_weight=4.0, act_bits=8)
    assert c2.bops == 3000 * 4 * 8
    t = total_cost([c, c2])
    assert t["bops"] == c.bops + c2.bops
    assert t["bops_vs_plain"] == pytest.approx((c.bops + c2.bops) / (c.plain_bops + c2.plain_bops))
    assert t["weight_bits_per_mac"] == pytest.approx((6 * 1000 + 4 * 3000) / 4000)


# -- one kernel --


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_concatenated_kernel_equals_termwise_sum(kind: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(12, 6, 3, 3) if kind == "conv2d" else torch.randn(12, 20)
    x = torch.randn(2, 6, 9, 9) if kind == "conv2d" else torch.randn(3, 5, 20)
    conv = {"stride": 2, "padding": 1} if kind == "conv2d" else {}
    terms = expand(w, get_quantizer("minmax", 2), 3, sparsity=0.5)
    pairs = [(t.qtensor.dequantize(torch.float32), t.channels) for t in terms]
    one = concat_forward(x, pairs, **conv)
    ref = termwise_forward(x, pairs, **conv)
    summed = reconstruct(terms, w.shape)
    direct = F.conv2d(x, summed, **conv) if kind == "conv2d" else F.linear(x, summed)
    assert torch.allclose(one, ref, atol=1e-5) and torch.allclose(one, direct, atol=1e-5)


# -- error bound --


def _qw(w: torch.Tensor, bits: int, order: int) -> torch.Tensor:
    return reconstruct(expand(w, get_quantizer("minmax", bits), order), w.shape)


def test_operator_norm_inf() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    assert operator_norm_inf(w) == 3.0
    x = torch.tensor([1.0, -1.0])
    assert float((w @ x).abs().max()) == 3.0  # attained


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bound_holds_on_small_network(order: int) -> None:
    torch.manual_seed(2)
    w1, w2, w3, w4 = (
        torch.randn(32, 16) / 4,
        torch.randn(32, 32) / 6,
        torch.randn(32, 32) / 6,
        torch.randn(5, 32) / 6,
    )
    b1, b2, b4 = torch.randn(32) * 0.1, torch.randn(32) * 0.1, torch.randn(5) * 0.1
    q1, q2, q3, q4 = (_qw(w, 3, order) for w in (w1, w2, w3, w4))
    db = torch.randn(32) * 1e-3  # a changed bias (bias correction) is covered too

    def net(x: torch.Tensor, a: list[torch.Tensor], bias2: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, a[0], b1))
        r = F.relu(F.linear(F.relu(F.linear(h, a[1], bias2)), a[2]) + h)  # residual block
        return F.linear(r, a[3], b4)

    chain = [
        BoundLayer(w1, q1, b1, b1),
        BoundResidual((BoundLayer(w2, q2, b2, b2 + db), BoundLayer(w3, q3))),
        BoundLayer(w4, q4, b4, b4),
    ]
    x = torch.rand(512, 16) * 4 - 2
    worst, norm = max_output_change(
        lambda z: net(z, [w1, w2, w3, w4], b2), lambda z: net(z, [q1, q2, q3, q4], b2 + db), x
    )
    U = error_bound(chain, norm)
    assert 0 < worst <= U
    same = [BoundLayer(w1, w1, b1, b1), BoundLayer(w4[:, :32], w4[:, :32])]
    assert error_bound(same, 3.0) == 0.0


def test_bound_not_above_paper_product_form() -> None:
    """Bias-free chain: U <= (prod(||W|| + ||E||) - prod ||W||) ||X|| (the paper's form)."""
    torch.manual_seed(4)
    ws = [torch.randn(20, 20) / 5 for _ in range(4)]
    qs = [_qw(w, 2, 2) for w in ws]
    U = error_bound([BoundLayer(w, q) for w, q in zip(ws, qs, strict=True)], 1.5)
    a = [operator_norm_inf(w) for w in ws]
    e = [operator_norm_inf(q - w) for w, q in zip(ws, qs, strict=True)]
    paper = (math.prod(x + y for x, y in zip(a, e, strict=True)) - math.prod(a)) * 1.5
    assert 0 < U <= paper * (1 + 1e-9)


# -- wiring --


def _build(_: dict | None = None) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()


def _model() -> nn.Module:
    net = _build()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net


def test_config_fields() -> None:
    r = LayerRule("minmax", 4, expand=2, sparsity=0.5)
    assert LayerRule.from_dict(r.to_dict()) == r and hash(r) != hash(LayerRule("minmax", 4))
    cfg = QuantConfig(r, rules=(PatternRule("fc", expand=3),), sparsity_split="uniform")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg and cfg.rule_for("fc").expand == 3
    for bad in ({"expand": 0}, {"expand": True}, {"sparsity": 1.0}, {"sparsity": -0.1}):
        with pytest.raises(ConfigError):
            LayerRule(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sparsity_split"):
        QuantConfig(sparsity_split="cubic")


def test_quantize_model_adds_terms_and_reports() -> None:
    net = _model()
    plain, rep1 = quantize_model(net, QuantConfig(LayerRule("minmax", 2)))
    dense, rep2 = quantize_model(net, QuantConfig(LayerRule("minmax", 2, expand=2)))
    sparse, rep3 = quantize_model(net, QuantConfig(LayerRule("minmax", 2, expand=2, sparsity=0.5)))
    assert all(len(m.terms) == 2 for m in (dense[0], dense[3], dense[6]))
    assert [r.order for r in rep2.layers] == [2, 2, 2] and rep2.layers[0].weight_bits_per_mac == 4.0
    assert all(a.rel_mse > b.rel_mse for a, b in zip(rep1.layers, rep2.layers, strict=True))
    assert rep1.bits_per_weight < rep3.bits_per_weight < rep2.bits_per_weight  # all terms counted
    # the 50 % budget is met over the expanded weights, more kept toward the head
    kept = [1 - r.sparsity for r in rep3.layers]
    params = [r.params for r in rep3.layers]
    assert kept[0] < kept[-1]
    assert sum(k * p for k, p in zip(kept, params, strict=True)) / sum(params) == pytest.approx(0.5, abs=0.05)
    assert "K=2" in rep3.to_text() and "sparse" in rep3.to_text()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        err = [float((m(x) - net(x)).abs().max()) for m in (plain, sparse, dense)]
    assert err[0] > err[1] > err[2]


def test_save_load_sparse_expansion_identical(tmp_path) -> None:
    net = _model()
    q, rep = quantize_model(net, QuantConfig(LayerRule("lloyd-max", 3, expand=2, sparsity=0.5)))
    assert any(t.channels is not None for t in q[3].quant_terms)
    path = save_quantized(q, tmp_path / "m.safetensors", source={"test": 1}, report=rep)
    m, manifest = load_quantized(path, build=_build)
    assert [t["channels"] for t in manifest["layers"]["3"]["terms"]] == [
        None,
        q[3].quant_terms[1].channels.numel(),
    ]
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(m(x), q(x))
