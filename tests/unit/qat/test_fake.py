"""Quantization-aware training: the analytic weight scale, the estimators, the input rule, conversion and files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dfquant.errors import ConfigError, ModelError
from dfquant.grids.error_model import exact_mse, optimal_clip
from dfquant.grids.formats import make_grid
from dfquant.io.load import load_quantized
from dfquant.io.manifest import read_manifest
from dfquant.io.save import save_quantized
from dfquant.nn.act import ActQuant
from dfquant.nn.base import QuantModule
from dfquant.qat.fake import ActFakeQuant, QATConfig, QATLayer, WeightFakeQuant, convert, prepare_qat
from dfquant.qat.train import train_qat
from dfquant.quantizers.blockscaled import round_to_levels


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("fmt", ["int4-mr", "int4", "fp4_e2m1"])
def test_analytic_weight_scale_is_the_error_model_optimum(fmt: str) -> None:
    grid = make_grid(fmt)
    w = torch.randn(1, 400_000, generator=torch.Generator().manual_seed(0))
    wq = WeightFakeQuant((1, 400_000), "statq", fmt, "channel", "gaussian", w)
    _, s, _ = wq.scales(w)
    opt = optimal_clip(grid, "gaussian")
    assert float(s) == pytest.approx(opt.scale, rel=4e-3)
    # the measured error at that scale is the model's minimum, and moving the scale either way costs more
    err = float(((wq(w) - w) ** 2).mean())
    assert err == pytest.approx(float(exact_mse(grid, "gaussian", opt.clip)), rel=0.02)
    for f in (0.85, 1.15):
        z = w / (float(s) * f)
        worse = float(((grid.round(z) * float(s) * f - w) ** 2).mean())
        assert worse > err * 1.01


def test_ste_passes_gradient_only_inside_the_clip_range() -> None:
    w = torch.linspace(-3, 3, 601).reshape(1, -1).requires_grad_(True)
    wq = WeightFakeQuant((1, 601), "statq", "int2-mr", "channel", "gaussian", w.detach())
    out = wq(w)
    out.sum().backward()
    _, s, _ = wq.scales(w)
    inside = w.detach().abs() <= 1.5 * float(s)
    assert w.grad is not None
    assert torch.equal(w.grad, inside.float()) and 0 < int(inside.sum()) < 601


def test_input_rule_warm_starts_from_minmax_and_converges_to_least_squares() -> None:
    aq = ActFakeQuant("statq", "int4-mr", -1, momentum=0.5)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    grid = make_grid("int4-mr")
    aq.train()
    aq(x)
    s0 = float(x.abs().max()) / 7.5
    q0 = grid.round(x / s0)
    assert float(aq.scale) == pytest.approx(float((q0 * x).sum() / (q0 * q0).sum()), rel=1e-6)  # one step from min-max
    errs = []
    for _ in range(30):
        aq(x)
        s = float(aq.scale)
        errs.append(float(((grid.round(x / s) * s - x) ** 2).mean()))
    assert errs[-1] <= errs[0] + 1e-9
    # near the fixed point s = <x, q> / <q, q> (the plain step approaches it slowly, hence 0.5 %)
    q = grid.round(x / float(aq.scale))
    assert float(aq.scale) == pytest.approx(float((q * x).sum() / (q * q).sum()), rel=5e-3)
    aq.eval()  # eval uses the running estimate, not the last batch's scale
    assert isinstance(aq.export(), ActQuant) and float(aq.export().scale) == pytest.approx(float(aq.running))


@pytest.mark.parametrize(
    ("method", "fmt", "act"),
    [("statq", "int2", "uint4"), ("statq", "fp4", "fp4"), ("minmax", "mxfp4", "mxfp4"), ("lsq", "nvfp4", "nvfp4")],
)
def test_trained_model_converts_saves_reloads_identically(method: str, fmt: str, act: str, tmp_path: Path) -> None:
    x, y = _data()
    qat = prepare_qat(_net(), QATConfig(method=method, format=fmt, act_format=act))
    before = [p.detach().clone() for p in qat.parameters()]
    state = train_qat(qat, lambda step: (x, y), steps=3, lr=1e-2)
    assert state.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, qat.parameters(), strict=True))
    conv = convert(qat)
    with torch.no_grad():
        fake = qat(x)
        assert torch.equal(conv(x), fake)
    assert all(isinstance(conv[i], QuantModule) and conv[i].input_quant is not None for i in (0, 3, 6))
    path = save_quantized(conv, tmp_path / "m.safetensors", source={"toy": 1})
    assert "input_quant" in read_manifest(path)["layers"]["0"]
    loaded, _ = load_quantized(path, build=lambda src: _net())
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)


@pytest.mark.parametrize("gran", ["channel", "group:16"])
def test_iterative_weight_rule_starts_at_ptq_and_takes_least_squares_steps(gran: str, tmp_path: Path) -> None:
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.pipeline.quantize import quantize_model

    x, y = _data()
    net = _net()
    qat = prepare_qat(net, QATConfig(format="int3", granularity=gran, weight_rule="iterative")).eval()
    rule = LayerRule("statq", 3, gran, options={"format": "int3-mr"})
    ptq, _ = quantize_model(net, QuantConfig(rule, bias_correction=False))
    with torch.no_grad():
        assert torch.equal(qat(x), ptq(x))  # the start is the post-training result, exactly
    # one training forward = one step s <- <w, q> / <q, q>, which never raises a group's squared error
    wq = qat[6].wq
    w = qat[6].layer.weight.detach()
    rows = w.reshape(-1, wq.glen)
    s0 = wq.wscale.clone()

    def sq_err(s: torch.Tensor) -> torch.Tensor:
        q = round_to_levels(rows / s[:, None], wq.levels)
        return ((rows - q * s[:, None]) ** 2).sum(dim=1)

    qat.train()
    qat(x).sum().backward()
    q0 = round_to_levels(rows / s0[:, None], wq.levels)
    expect = (rows * q0).sum(dim=1) / (q0 * q0).sum(dim=1)
    torch.testing.assert_close(wq.wscale, expect)
    assert bool((sq_err(wq.wscale) <= sq_err(s0) + 1e-12).all())
    # trained: converts, saves and reloads to the same outputs; the manifest names the rule
    train_qat(qat, lambda step: (x, y), steps=3, lr=1e-2)
    conv = convert(qat)
    with torch.no_grad():
        fake = qat(x)
        assert torch.equal(conv(x), fake)
    path = save_quantized(conv, tmp_path / "it.safetensors", source={"toy": 1})
    assert read_manifest(path)["layers"]["6"]["terms"][0]["options"]["rule"] == "iterative"
    loaded, _ = load_quantized(path, build=lambda src: _net())
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)


def test_files_without_input_quantizers_have_no_new_key(tmp_path: Path) -> None:
    from dfquant.pipeline.quantize import quantize_model

    q, _ = quantize_model(_net())
    man = read_manifest(save_quantized(q, tmp_path / "p.safetensors", source={"toy": 1}))
    assert all("input_quant" not in lay for lay in man["layers"].values())


def test_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    x, y = _data()
    cfg = QATConfig(format="int4", act_format="uint8")
    ref = prepare_qat(_net(), cfg)
    train_qat(ref, lambda s: (x + 0.01 * s, y), steps=4, lr=1e-2)

    class StopError(Exception):
        pass

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise StopError

    ckpt = tmp_path / "ckpt.pt"
    first = prepare_qat(_net(), cfg)
    with pytest.raises(StopError):
        train_qat(
            first, lambda s: (x + 0.01 * s, y), steps=4, lr=1e-2, checkpoint=ckpt, checkpoint_every=1, on_step=stop_at_2
        )
    again = prepare_qat(_net(), cfg)
    state = train_qat(again, lambda s: (x + 0.01 * s, y), steps=4, lr=1e-2, checkpoint=ckpt)
    assert state.step == 4 and len(state.losses) == 4
    for a, b in zip(ref.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_configs_name_the_value() -> None:
    with pytest.raises(ConfigError, match="'int9x'"):
        QATConfig(format="int9x")
    with pytest.raises(ConfigError, match="'adam'"):
        QATConfig(method="adam")
    with pytest.raises(ModelError, match="keep_float"):
        prepare_qat(_net(), QATConfig(keep_float=("*",)))
    with pytest.raises(ConfigError, match="'newton'"):
        QATConfig(weight_rule="newton")
    with pytest.raises(ConfigError, match="'lsq'"):
        QATConfig(method="lsq", weight_rule="iterative")
    with pytest.raises(ConfigError, match="'uint4'"):
        QATConfig(format="uint4", weight_rule="iterative")
    with pytest.raises(ModelError, match="LayerNorm"):
        QATLayer(nn.LayerNorm(4), QATConfig())
    with pytest.raises(ModelError, match="prepare_qat"):
        convert(_net())
