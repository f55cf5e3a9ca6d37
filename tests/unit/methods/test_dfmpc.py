"""DF-MPC: the closed-form compensation, the BatchNorm statistic rules, pair finding, the ternary and DoReFa
rules, the whole-model path and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant import get_quantizer
from dfquant.config import LayerRule
from dfquant.errors import ConfigError, InputError, ModelError
from dfquant.graph.modules import get_module
from dfquant.graph.pairs import find_compensation_pairs
from dfquant.methods.dfmpc import (
    compensate_layer,
    compensation_coefficients,
    compensation_loss,
    moment_statistics,
    projection_noise_statistics,
    projection_statistics,
)
from dfquant.pipeline.compensate import compensate_model
from dfquant.zoo.cifar_resnet import CifarResNet

# ------------------------------------------------------------------------------------------------------------
# A random conv -> BN -> ReLU -> conv chain on Gaussian inputs


def _chain(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, 8, 3, 3, generator=g) * 0.2
    w2 = torch.randn(8, 16, 3, 3, generator=g) * 0.1
    x = torch.randn(256, 8, 12, 12, generator=g)
    z = F.conv2d(x, w1, padding=1)
    return {
        "w1": w1,
        "w2": w2,
        "x": x,
        "mean": z.mean((0, 2, 3)),
        "var": z.var((0, 2, 3), correction=0),
        "gamma": torch.rand(16, generator=g) + 0.5,
        "beta": torch.randn(16, generator=g) * 0.5,
    }


def _run(ch: dict[str, torch.Tensor], w1, mean, std, gamma, beta) -> torch.Tensor:  # type: ignore[no-untyped-def]
    z = F.conv2d(ch["x"], w1, padding=1)
    a = F.relu(
        gamma[None, :, None, None] * (z - mean[None, :, None, None]) / std[None, :, None, None]
        + beta[None, :, None, None]
    )
    return F.conv2d(a, ch["w2"], padding=1)


@pytest.mark.parametrize("rule", ["projection", "moments"])
def test_closed_form_c_lowers_output_mse_of_the_chain(rule: str) -> None:
    ch = _chain()
    eps = 1e-5
    w_hat = get_quantizer("ternary", 2).fake_quantize(ch["w1"])
    comp = compensate_layer(
        ch["w1"],
        w_hat,
        ch["mean"],
        ch["var"],
        ch["gamma"],
        ch["beta"],
        eps,
        rule=rule,
        input_mean=torch.zeros(8),
        input_var=torch.ones(8),
    )
    std = (ch["var"] + eps).sqrt()
    ref = _run(ch, ch["w1"], ch["mean"], std, ch["gamma"], ch["beta"])
    plain = _run(ch, w_hat, comp.mean_hat, comp.std_hat, ch["gamma"], ch["beta"])
    compensated = _run(ch, w_hat, comp.mean_hat, comp.std_hat, comp.gamma, comp.beta)
    mse_1 = float(((plain - ref) ** 2).mean())
    mse_c = float(((compensated - ref) ** 2).mean())
    assert mse_c < 0.97 * mse_1, (rule, mse_1, mse_c)
    assert comp.loss_after <= comp.loss_before
    assert bool((comp.c >= 0).all())


def test_with_float_statistics_the_ternary_scale_is_already_optimal() -> None:
    # TWN's scale (mean |w| above the threshold) is the least-squares scale of its codes, and with unchanged
    # statistics y_hat = y: the closed form then gives c = 1 exactly.
    ch = _chain()
    w_hat = get_quantizer("ternary", 2).fake_quantize(ch["w1"])
    comp = compensate_layer(ch["w1"], w_hat, ch["mean"], ch["var"], ch["gamma"], ch["beta"], 1e-5, rule="float")
    torch.testing.assert_close(comp.c, torch.ones(16), atol=1e-5, rtol=0.0)


def test_moment_rule_matches_the_sampled_statistics_of_the_quantized_layer() -> None:
    ch = _chain(1)
    w_hat = get_quantizer("ternary", 2).fake_quantize(ch["w1"])
    # Inputs with known per-channel means and variances: the quantized layer's output mean is exact (up to
    # zero padding, which the interior avoids), its variance exact for independent inputs.
    m, s = torch.linspace(-1, 1, 8), torch.linspace(0.5, 1.5, 8)
    x = ch["x"] * s[None, :, None, None] + m[None, :, None, None]
    z, zq = F.conv2d(x, ch["w1"]), F.conv2d(x, w_hat)
    std = z.var((0, 2, 3), correction=0).sqrt()
    mu_hat, std_hat = moment_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std, m, s**2)
    torch.testing.assert_close(mu_hat, zq.mean((0, 2, 3)), atol=0.02, rtol=0.0)
    torch.testing.assert_close(std_hat, zq.var((0, 2, 3), correction=0).sqrt(), rtol=0.03, atol=0.0)


def test_projection_rule_is_exact_for_a_scaled_weight() -> None:
    w = torch.randn(6, 4, 3, 3)
    kappa = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.25, 3.0])
    mean, std = torch.randn(6), torch.rand(6) + 0.1
    mu_hat, std_hat = projection_statistics(w, w * kappa[:, None, None, None], mean, std)
    torch.testing.assert_close(mu_hat, kappa * mean)
    torch.testing.assert_close(std_hat, kappa.abs() * std)


@pytest.mark.parametrize(("lambda1", "lambda2"), [(0.5, 0.0), (0.0, 0.0), (2.0, 0.3)])
def test_closed_form_matches_a_numerical_least_squares_solve(lambda1: float, lambda2: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    x_hat = 0.8 * x + 0.3 * torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    y, y_hat = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    c = compensation_coefficients(x, y, x_hat, y_hat, lambda1, lambda2)
    for j in range(12):  # the same loss as one stacked least-squares problem per channel
        a = torch.cat([x_hat[j].reshape(-1), (lambda1**0.5 * y_hat[j]).reshape(1), torch.tensor([lambda2**0.5])])
        b = torch.cat([x[j].reshape(-1), (lambda1**0.5 * y[j]).reshape(1), torch.zeros(1, dtype=torch.float64)])
        c_ls = torch.linalg.lstsq(a[:, None], b[:, None]).solution.item()
        assert c[j].item() == pytest.approx(max(c_ls, 0.0), rel=1e-5, abs=1e-6)
    # and no other c does better
    loss = compensation_loss(c, x, y, x_hat, y_hat, lambda1, lambda2)
    for delta in (-0.01, 0.01):
        assert bool((compensation_loss(c + delta, x, y, x_hat, y_hat, lambda1, lambda2) >= loss - 1e-6).all())


def test_c_is_clamped_at_zero() -> None:
    x = torch.randn(4, 9)
    c = compensation_coefficients(x, torch.ones(4), -x, torch.ones(4) * -1, 0.5, 0.0)
    assert c.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert compensation_coefficients(x, torch.zeros(4), torch.zeros(4, 9), torch.zeros(4)).tolist() == [0.0] * 4


# ------------------------------------------------------------------------------------------------------------
# Pair finding


class _Bottleneck(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + x)


def _plain(n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 4 * 4, 2))


def test_pairs_of_resnet_basic_blocks() -> None:
    pairs = find_compensation_pairs(CifarResNet(20))
    assert [(p.low, p.bn, p.high) for p in pairs[:2]] == [
        ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"),
        ("layer1.1.conv1", "layer1.1.bn1", "layer1.1.conv2"),
    ]
    assert len(pairs) == 9
    assert all(p.low.endswith("conv1") and p.high.endswith("conv2") for p in pairs)  # stem and linear excluded


def test_pairs_of_a_bottleneck_block() -> None:
    model = nn.Sequential(_Bottleneck(), _Bottleneck())
    assert [(p.low, p.high) for p in find_compensation_pairs(model)] == [
        ("0.conv2", "0.conv3"),
        ("1.conv2", "1.conv3"),
    ]


def test_pairs_of_a_plain_chain_alternate_and_end_high() -> None:
    # five convs, then a flatten and a linear: the last conv has no layer to compensate it, so it stays high
    names = [(p.low, p.high) for p in find_compensation_pairs(_plain(5))]
    assert names == [("3", "6"), ("9", "12")]
    assert [(p.low, p.high) for p in find_compensation_pairs(_plain(4))] == [("0", "3"), ("6", "9")]


def test_no_pair_across_a_residual_addition_or_a_shared_activation() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.bn1(self.conv1(x)) + x)  # the sum sits between BN and ReLU
            b = F.relu(self.bn1(x))
            return self.conv2(a) + b

    assert find_compensation_pairs(Block()) == []


# ------------------------------------------------------------------------------------------------------------
# Quantizer rules


def test_ternary_threshold_and_scale_follow_twn() -> None:
    w = torch.randn(6, 200)
    qt = get_quantizer("ternary", 2).quantize(w)
    w_hat = qt.dequantize()
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    above = w.abs() > delta
    alpha = (w.abs() * above).sum(1) / above.sum(1)
    torch.testing.assert_close(w_hat, torch.sign(w) * above * alpha[:, None])
    assert qt.bits == 2 and qt.levels.tolist() == [-1.0, 0.0, 1.0]


def test_dorefa_codes_are_uniform_in_tanh_space_and_scale_free() -> None:
    q = get_quantizer("dorefa", 3)
    w = torch.randn(4, 300)
    qt = q.quantize(w)
    rms = w.pow(2).mean(1, keepdim=True).sqrt()
    t = torch.tanh(w / rms)
    u = t / t.abs().amax(1, keepdim=True)
    assert torch.equal(qt.codes.long(), torch.round((u + 1) * 3.5).long())
    s = torch.tensor([[0.1], [1.0], [5.0], [30.0]])
    torch.testing.assert_close(q.fake_quantize(w * s), q.fake_quantize(w) * s)


# ------------------------------------------------------------------------------------------------------------
# The whole-model path


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorms running statistics measured on Gaussian inputs (as training would)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 4, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize(("stats", "bias_correction"), [("projection", True), ("moments", False), ("float", True)])
def test_compensate_model_folds_c_exactly(stats: str, bias_correction: bool) -> None:
    model = _trained_like(_plain(4))
    q, report, dreport = compensate_model(model, stats=stats, bias_correction=bias_correction)
    assert [p.low for p in dreport.pairs] == ["0", "6"]
    for p in dreport.pairs:
        assert p.weight_dev < 1e-5 and p.bias_dev < 1e-5, p
        assert p.loss_after <= p.loss_before
    bits = {r.name: (r.quantizer, r.bits) for r in report.layers}
    assert bits == {
        "0": ("ternary", 2),
        "3": ("minmax", 6),
        "6": ("ternary", 2),
        "9": ("minmax", 6),
        "13": ("minmax", 6),
    }
    assert 2.0 < report.bits_per_weight < 6.5
    assert "c mean" in dreport.to_text() and dreport.to_dict()["pairs"][0]["low"] == "0"
    x = torch.randn(8, 3, 4, 4)
    assert q(x).shape == (8, 2)


@pytest.mark.parametrize(
    "low", [LayerRule("ternary", 2, rotate="hadamard:4"), LayerRule("mse", 3, rotate="hadamard:8")]
)
def test_compensation_folds_c_exactly_after_a_rotation(low: LayerRule) -> None:
    """The low layers fitted as ``Q(W R^T) R`` (the pipeline's rotation for each layer): the folded, rotated
    layer still decodes to ``c gamma / sigma_hat * W_hat``, and every layer is rotated."""
    model = _trained_like(_plain(4))
    high = LayerRule("minmax", 6, rotate="hadamard:8")
    q, report, dreport = compensate_model(model, low=low, high=high)
    for p in dreport.pairs:
        assert p.weight_dev < 1e-5 and p.bias_dev < 1e-5, p
    assert {r.name: r.rotate for r in report.layers} == {
        n: ("hadamard:8" if n not in ("0", "6") else low.rotate) for n in ("0", "3", "6", "9", "13")
    }
    assert all(get_module(q, n).rotation is not None for n in ("0", "3", "6", "9", "13"))
    assert f"rotate {low.rotate}" in dreport.to_text()
    # the rotation is not a no-op: the low layers' codes differ from an unrotated run
    plain, _, _ = compensate_model(model, low=LayerRule(low.quantizer, low.bits), high=LayerRule("minmax", 6))
    assert not torch.equal(get_module(q, "0").dequantize_weight(), get_module(plain, "0").dequantize_weight())


def test_bad_input_raises_named_errors() -> None:
    model = _trained_like(_plain(4))
    with pytest.raises(ConfigError, match="lambda1 must be a finite number >= 0, got -1"):
        compensate_model(model, lambda1=-1.0)
    with pytest.raises(ConfigError, match="rule must be one of moments, projection, projection-noise, float, got 'x'"):
        compensate_model(model, stats="x")
    with pytest.raises(ConfigError, match=r"granularity must be 'channel' or 'group:G'.*got 'tensor'"):
        compensate_model(model, low=LayerRule("ternary", 2, "tensor"))
    with pytest.raises(ConfigError, match="'ternary' supports bits in \\{2\\}, got 3"):
        compensate_model(model, low=LayerRule("ternary", 3))
    with pytest.raises(ConfigError, match=r"the high rule must not balance \(got balance='absorbed'\)"):
        compensate_model(model, high=LayerRule("minmax", 6, balance="absorbed"))
    with pytest.raises(ModelError, match="found no layer pair in Sequential"):
        compensate_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match=r"torch\.fx tracing of Untraceable failed"):
        compensate_model(Untraceable())
    with pytest.raises(InputError, match="conv9: float weight \\(4, 9\\) and quantized weight \\(3, 9\\)"):
        compensate_layer(
            torch.ones(4, 9),
            torch.ones(3, 9),
            torch.zeros(4),
            torch.ones(4),
            None,
            None,
            1e-5,
            rule="float",
            where="conv9",
        )
    with pytest.raises(ConfigError, match="'moments' rule needs the input channels' means"):
        compensate_layer(torch.ones(4, 9), torch.ones(4, 9), torch.zeros(4), torch.ones(4), None, None, 1e-5)
    with pytest.raises(InputError, match="running mean holds NaN"):
        compensate_layer(
            torch.ones(4, 9),
            torch.ones(4, 9),
            torch.full((4,), float("nan")),
            torch.ones(4),
            None,
            None,
            1e-5,
            rule="float",
        )


def test_projection_noise_rule_matches_the_sampled_statistics_of_the_quantized_layer() -> None:
    ch = _chain(2)
    w_hat = get_quantizer("ternary", 2).fake_quantize(ch["w1"])
    # independent inputs of equal variance: sigma^2 kappa^2 + sum E^2 v is the quantized layer's variance
    x = ch["x"] * 1.5 + 0.3
    z, zq = F.conv2d(x, ch["w1"]), F.conv2d(x, w_hat)
    std = z.var((0, 2, 3), correction=0).sqrt()
    v = torch.full((8,), 1.5**2)
    mu_hat, std_hat = projection_noise_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std, v)
    measured = zq.var((0, 2, 3), correction=0).sqrt()
    torch.testing.assert_close(std_hat, measured, rtol=0.03, atol=0.0)
    # the plain projection misses the noise: it is below the measured deviation on every channel
    _, std_proj = projection_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std)
    assert bool((std_proj < 0.97 * measured).all())
    torch.testing.assert_close(mu_hat, projection_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std)[0])
    # without input variances the rule is the projection
    torch.testing.assert_close(projection_noise_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std, None)[1], std_proj)
    with pytest.raises(InputError, match="conv3: input variances must be non-negative"):
        projection_noise_statistics(ch["w1"], w_hat, z.mean((0, 2, 3)), std, -v, where="conv3")


def test_coefficient_none_keeps_only_the_rederived_statistics() -> None:
    ch = _chain(3)
    w_hat = get_quantizer("ternary", 2).fake_quantize(ch["w1"])
    args = (ch["w1"], w_hat, ch["mean"], ch["var"], ch["gamma"], ch["beta"], 1e-5)
    loss = compensate_layer(*args, rule="projection", coefficient="loss")
    none = compensate_layer(*args, rule="projection", coefficient="none")
    assert torch.equal(none.c, torch.ones(16)) and torch.equal(none.gamma, ch["gamma"])
    torch.testing.assert_close(none.std_hat, loss.std_hat)
    assert none.loss_after == none.loss_before and loss.loss_after < loss.loss_before
    # the loss coefficients shrink: with the projection statistics c < 1 on every channel of a ternary layer
    assert bool((loss.c < 1).all())
    with pytest.raises(ConfigError, match="coefficient rule must be one of loss, none, got 'mse'"):
        compensate_layer(*args, rule="projection", coefficient="mse")
    model = _trained_like(_plain(4))
    _, _, dreport = compensate_model(model)
    assert dreport.coefficient == "none" and all(p.c_min == p.c_max == 1.0 for p in dreport.pairs)
    assert "coefficients 'none'" in dreport.to_text()
    with pytest.raises(ConfigError, match="coefficient rule must be one of loss, none, got 'x'"):
        compensate_model(model, coefficient="x")


def test_cli_low_options_and_coefficient_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from dfquant.cli.common import parse_options
    from dfquant.cli.main import main

    assert parse_options("weighting=input-variance,bins=64,x=0.5", "--low-options") == {
        "weighting": "input-variance",
        "bins": 64,
        "x": 0.5,
    }
    with pytest.raises(ConfigError, match="--low-options: expected KEY=VALUE items separated by commas, got 'bins'"):
        parse_options("bins", "--low-options")
    base = ["quantize", "cifar-resnet20", "--method", "dfmpc"]
    assert main([*base, "--coefficient", "none", "--lambda1", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dfquant: error: --lambda1/--lambda2 weight the DF-MPC loss: they apply to --coefficient loss, not none"
    )


def test_cli_refuses_options_dfmpc_does_not_take(capsys: pytest.CaptureFixture[str]) -> None:
    from dfquant.cli.main import main

    assert main(["quantize", "cifar-resnet20", "--method", "dfmpc", "--bits", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dfquant: error: --method dfmpc takes --low-bits/--high-bits and per-pair rules, not --bits"]
