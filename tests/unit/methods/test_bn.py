"""BatchNorm folding and DFQ bias correction: exactness of the fold, the clipped-normal moments against
closed forms and Monte Carlo, and the expected output shift against a brute-force convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.methods.bn import (
    correct_bias,
    expected_input_mean,
    expected_output_shift,
    fold_batchnorm,
    relu_gaussian_mean,
    relu_gaussian_moments,
)


def _random_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n))
    bn.running_var.copy_(torch.rand(n) * 2 + 0.1)
    if bn.affine:
        bn.weight.data.copy_(torch.randn(n))
        bn.bias.data.copy_(torch.randn(n))
    bn.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_conv2d_is_exact(bias: bool, affine: bool) -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=bias)
    bn = nn.BatchNorm2d(8, affine=affine, eps=1e-3)
    _random_bn(bn)
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        w, b = fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        out = F.conv2d(x, w, b, padding=1, groups=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fold_linear_bn1d_and_inputs_untouched() -> None:
    lin = nn.Linear(10, 7)
    bn = nn.BatchNorm1d(7)
    _random_bn(bn)
    before = lin.weight.detach().clone()
    x = torch.randn(32, 10)
    with torch.no_grad():
        w, b = fold_batchnorm(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        torch.testing.assert_close(F.linear(x, w, b), bn(lin(x)), atol=1e-5, rtol=1e-5)
    assert torch.equal(lin.weight, before)


def test_fold_keeps_dtype_and_rejects_bad_stats() -> None:
    w = torch.randn(4, 3, dtype=torch.float16)
    fw, fb = fold_batchnorm(w, None, torch.zeros(4), torch.ones(4), None, None, 1e-5)
    assert fw.dtype == fb.dtype == torch.float16
    with pytest.raises(InputError, match="running_var"):
        fold_batchnorm(w, None, torch.zeros(4), torch.ones(3), None, None, 1e-5)
    with pytest.raises(InputError, match="NaN"):
        fold_batchnorm(w, None, torch.tensor([0.0, float("nan"), 0, 0]), torch.ones(4), None, None, 1e-5)


def test_relu_gaussian_moments_closed_form_and_monte_carlo() -> None:
    mean = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5, 0.7])
    std = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.2, 0.0])
    m, v = relu_gaussian_moments(mean, std)
    # scipy: mean and variance of max(0, Z) via the truncated-normal moments times P(Z > 0)
    for i in range(5):
        mu, s = float(mean[i]), float(std[i])
        a = (0 - mu) / s
        p = 1 - stats.norm.cdf(a)
        tm, tv = stats.truncnorm.stats(a, float("inf"), loc=mu, scale=s, moments="mv")
        e1 = p * tm
        e2 = p * (tv + tm**2)
        assert float(m[i]) == pytest.approx(e1, rel=1e-5, abs=1e-6)
        assert float(v[i]) == pytest.approx(e2 - e1**2, rel=1e-4, abs=1e-6)
    assert float(m[5]) == pytest.approx(0.7) and float(v[5]) == 0.0
    z = torch.randn(400_000, 1) * std[:5] + mean[:5]
    torch.testing.assert_close(z.clamp_min(0).mean(0), m[:5], atol=5e-3, rtol=0)
    assert torch.equal(relu_gaussian_mean(mean, std), m)


def test_expected_input_mean() -> None:
    beta, gamma = torch.tensor([0.5, -1.0]), torch.tensor([2.0, -0.5])
    assert torch.equal(expected_input_mean(beta, gamma, "none"), beta)
    relu = expected_input_mean(beta, gamma, "relu")
    torch.testing.assert_close(relu, relu_gaussian_mean(beta, gamma.abs()))
    with pytest.raises(ConfigError, match="relu"):
        expected_input_mean(beta, gamma, "gelu")


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_expected_output_shift_matches_convolution_of_constant_input(groups: int) -> None:
    dw = torch.randn(8, 8 // groups, 3, 3)
    mean = torch.randn(8)
    x = mean.reshape(1, 8, 1, 1).expand(1, 8, 5, 5)
    ref = F.conv2d(x, dw, groups=groups)[0, :, 1, 1]  # an interior output: no padding involved
    torch.testing.assert_close(expected_output_shift(dw, mean, groups), ref, atol=1e-5, rtol=1e-5)


def test_expected_output_shift_linear_and_shape_errors() -> None:
    dw, mean = torch.randn(5, 7), torch.randn(7)
    torch.testing.assert_close(expected_output_shift(dw, mean), dw @ mean)
    with pytest.raises(InputError, match="input means"):
        expected_output_shift(dw, torch.randn(6))
    with pytest.raises(InputError, match="differ"):
        correct_bias(dw, dw[:4], None, mean)


def test_correct_bias_removes_the_mean_shift() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3) * 0.2
    wq = w + torch.randn_like(w) * 0.05 + 0.01
    b = torch.randn(6)
    mean, std = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    x = (torch.randn(2000, 4, 6, 6) * std.reshape(1, 4, 1, 1) + mean.reshape(1, 4, 1, 1)).clamp_min(0)
    ex = relu_gaussian_mean(mean, std)
    new_b, shift = correct_bias(w, wq, b, ex)
    torch.testing.assert_close(new_b, b - shift)
    ref = F.conv2d(x, w, b).mean((0, 2, 3))
    before = F.conv2d(x, wq, b).mean((0, 2, 3)) - ref
    after = F.conv2d(x, wq, new_b).mean((0, 2, 3)) - ref
    assert float(after.abs().max()) < 0.05 * float(before.abs().max())
