"""Data-free moment propagation for bias correction: the per-channel mean and variance rules against Monte
Carlo, the moment program found in traced graphs (residual sums, option-A shortcuts, pooling), and the bias
correction it enables in :func:`dfquant.quantize_model`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.graph.trace import analyze_graph
from dfquant.methods.bn import MomentOp, Moments, propagate_moments
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo.cifar_resnet import CifarResNet
from shared_models import trained_like

# -- the rules -----------------------------------------------------------------------------------------------


def test_batchnorm_add_relu_pad_mean_against_monte_carlo() -> None:
    g = torch.Generator().manual_seed(1)
    beta_a, gamma_a = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([1.0, 0.5, -2.0])
    beta_b, gamma_b = torch.tensor([-0.3, 0.8, 1.0]), torch.tensor([0.7, 1.5, 0.2])
    program = [
        MomentOp("a", "batchnorm", source="bn_a"),
        MomentOp("ra", "relu", ("a",)),
        MomentOp("b", "batchnorm", source="bn_b"),
        MomentOp("s", "add", ("b", "ra")),
        MomentOp("p", "pad", ("s",), pad=(1, 2)),
        MomentOp("r", "relu", ("p",)),
        MomentOp("m", "mean", ("r",)),
        MomentOp("i", "identity", ("m",)),
    ]
    got = propagate_moments(program, {"bn_a": (beta_a, gamma_a), "bn_b": (beta_b, gamma_b)})
    n = 400_000
    a = beta_a + gamma_a * torch.randn(n, 3, generator=g)
    b = beta_b + gamma_b * torch.randn(n, 3, generator=g)
    s = b + F.relu(a)  # independent branches: the mean and variance of the sum are exact
    torch.testing.assert_close(got["s"].mean, s.mean(0), atol=0.01, rtol=0)
    assert got["s"].var is not None
    torch.testing.assert_close(got["s"].var, s.var(0), atol=0.02, rtol=0.01)
    # zero channels: 1 before, 2 after
    assert got["p"].mean.shape == (6,) and float(got["p"].mean[[0, 4, 5]].abs().sum()) == 0.0
    # ReLU of the sum, modelled as normal: exact for a normal sum, close here
    z = beta_b + torch.sqrt(gamma_b**2 + got["ra"].var) * torch.randn(n, 3, generator=g) + got["ra"].mean
    torch.testing.assert_close(got["r"].mean[1:4], F.relu(z).mean(0), atol=0.01, rtol=0)
    # spatial averaging keeps the mean and forgets the variance, but for its relative values
    assert torch.equal(got["m"].mean, got["r"].mean) and got["m"].var is None and got["i"].var is None
    assert torch.equal(got["i"].relative_variance, got["r"].var)
    assert got["r"].rel_var is None and torch.equal(got["r"].relative_variance, got["r"].var)


def test_unknown_inputs_are_left_out_and_bad_ops_raise() -> None:
    program = [
        MomentOp("m", "mean", ("x",)),  # x never defined
        MomentOp("a", "batchnorm", source="missing"),
        MomentOp("b", "batchnorm", source="bn"),
        MomentOp("pooled", "mean", ("b",)),
        MomentOp("r", "relu", ("pooled",)),  # needs a variance that averaging made unknown
        MomentOp("bad", "add", ("b", "pooled2")),
    ]
    got = propagate_moments(program, {"bn": (torch.zeros(2), torch.ones(2))})
    assert set(got) == {"b", "pooled"}
    assert isinstance(got["b"], Moments) and torch.equal(got["b"].var, torch.ones(2))
    with pytest.raises(ConfigError, match="moment propagation models"):
        propagate_moments(
            [MomentOp("b", "batchnorm", source="bn"), MomentOp("x", "sigmoid", ("b",))],
            {"bn": (torch.zeros(2), torch.ones(2))},
        )


# -- the program in traced graphs ----------------------------------------------------------------------------


def test_cifar_resnet_program_reaches_every_layer_but_the_stem() -> None:
    net = CifarResNet(8)  # one block per stage: two option-A shortcuts, pooling, flatten, linear
    info = analyze_graph(net)
    assert info.method == "fx"
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(info.input_moments) == sorted(n for n in layers if n != "conv1")
    assert info.input_moments["layer2.0.conv1"][1:] == ("layer1.0.bn2 + relu", "relu")
    assert info.input_moments["layer3.0.conv1"][1:] == ("layer2.0.bn2 + layer1.0.relu2", "relu")
    assert info.input_moments["linear"][1:] == ("layer3.0.bn2 + layer2.0.relu2", "relu, mean")
    # the input_bn chains of the direct BN -> ReLU -> conv pattern are unchanged
    assert info.input_bn["layer1.0.conv2"] == ("layer1.0.bn1", "relu")
    stats = {n: (m.bias.detach(), m.weight.detach()) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    moments = propagate_moments(info.moment_program, stats)
    for layer, (node, _, _) in info.input_moments.items():
        fan_in = net.get_submodule(layer).weight.shape[1]
        assert moments[node].mean.shape == (fan_in,)


class _Heads(nn.Module):
    """BN1d -> Linear; BN2d -> ReLU -> mean over H, W -> Linear; a view() that is not followed."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1d = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6, 3)
        self.bn2d = nn.BatchNorm2d(4)
        self.fc2 = nn.Linear(4, 3)
        self.fc3 = nn.Linear(4 * 5 * 5, 3)
        self.fc4 = nn.Linear(5, 3)  # acts on the last (spatial) dim of a 4-D map: never corrected

    def forward(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2d(x))
        a = self.fc1(self.bn1d(v)) + self.fc2(y.mean((2, 3)))
        return a + self.fc3(y.view(y.shape[0], -1)) + self.fc4(y).sum((1, 2))


def test_pooling_and_rank_checks() -> None:
    info = analyze_graph(_Heads())
    assert set(info.input_moments) == {"fc1", "fc2"}
    assert info.input_moments["fc2"][1:] == ("bn2d", "relu, mean")
    assert info.input_moments["fc1"][1:] == ("bn1d", "none")


# -- bias correction through residual sums -------------------------------------------------------------------


class _Residual(nn.Module):
    """``conv(ReLU(bn_b(v) + ReLU(bn_a(u))))`` with independent inputs ``u``, ``v``."""

    def __init__(self, c: int = 8, o: int = 12) -> None:
        super().__init__()
        self.bn_a = nn.BatchNorm2d(c)
        self.bn_b = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, o, 3)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn_b(v) + F.relu(self.bn_a(u))))


def test_bias_correction_through_a_residual_sum() -> None:
    torch.manual_seed(5)
    model = trained_like(_Residual(), seed=5, bias_std=0.5)
    model.bn_a.bias.data += 0.5  # positive means: a large E[x] and a large shift
    # inputs drawn from the BatchNorms' own statistics, so that their outputs are N(beta, gamma^2)
    shape = (2000, 8, 8, 8)

    def draw(bn: nn.BatchNorm2d) -> torch.Tensor:
        return torch.randn(shape) * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)

    u, v = draw(model.bn_a), draw(model.bn_b)
    shifts = {}
    for on in (False, True):
        q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 2, "tensor"), bias_correction=on))
        with torch.no_grad():
            shifts[on] = (q(u, v) - model(u, v)).mean((0, 2, 3))
        if on:
            (rec,) = report.bias_corrected
            assert (rec.layer, rec.bn, rec.activation) == ("conv", "bn_b + relu", "relu")
            assert rec.shift_l2 == pytest.approx(float(shifts[False].norm()), rel=0.1)
    assert float(shifts[False].abs().max()) > 0.05
    assert float(shifts[True].abs().max()) < 0.2 * float(shifts[False].abs().max())


def test_resnet_bias_correction_covers_residual_inputs() -> None:
    model = trained_like(CifarResNet(8), seed=2, bias_std=0.5)
    _, report = quantize_model(model, QuantConfig(LayerRule("minmax", 3)))
    corrected = {b.layer: (b.bn, b.activation) for b in report.bias_corrected}
    assert set(corrected) == {n for n, _ in model.named_modules() if n.endswith(("conv1", "conv2"))} - {"conv1"} | {
        "linear"
    }
    assert corrected["layer1.0.conv2"] == ("layer1.0.bn1", "relu")
    assert corrected["linear"] == ("layer3.0.bn2 + layer2.0.relu2", "relu, mean")
