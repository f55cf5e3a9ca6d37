"""Rules on the input's device: a rule with ``runs_on_device`` fits, encodes and decodes where the tensor is (a
CUDA tensor stays on the GPU) and gives the CPU's codes, up to exact ties (at most 1e-4 of the elements), and
its relative MSE within 1e-6; every other rule says so and returns CPU tensors whatever the input's device."""

from __future__ import annotations

import copy

import pytest
import torch

from dfquant.config import LayerRule, QuantConfig
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import available, get_quantizer, quantizer_class
from shared_models import mlp

ON_DEVICE = sorted(n for n in available() if quantizer_class(n).runs_on_device)
ON_HOST = sorted(n for n in available() if not quantizer_class(n).runs_on_device)
GRANULARITY = {"mxfp4": "group:32", "nvfp4": "group:16"}


def _rule(name: str):  # type: ignore[no-untyped-def]
    bits = 4 if 4 in quantizer_class(name).supported_bits else quantizer_class(name).supported_bits[-1]
    return get_quantizer(name, bits)


def _rel_mse(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x = x.to(torch.float32).cpu()
    return float(((x_hat.to(torch.float32).cpu() - x) ** 2).sum() / (x * x).sum())


def test_the_device_rules_are_the_expected_ones() -> None:
    assert ON_DEVICE == ["dorefa", "lloyd-optimal", "minmax", "mse", "mxfp4", "nf4", "nvfp4", "ternary"]


@pytest.mark.parametrize("name", ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_rule_matches_the_cpu(name: str, dtype: torch.dtype, device: torch.device) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g).to(dtype)
    w[5] = 0.25  # a constant row: decodes exactly on every device
    gran = GRANULARITY.get(name, "group:64")
    rule = _rule(name)
    ref = rule.quantize(w, gran)
    qt = rule.quantize(w.to(device), gran)
    for t in (qt.codes, qt.scale, qt.levels):
        assert t.device.type == device.type
    deq = qt.dequantize()
    assert deq.device.type == device.type and deq.dtype == dtype
    mismatch = float((qt.codes.cpu() != ref.codes).float().mean())
    assert mismatch <= 1e-4, f"{name}: {mismatch:.2e} of the codes differ from the CPU's"
    assert abs(_rel_mse(deq, w) - _rel_mse(ref.dequantize(), w)) <= 1e-6
    if name not in ("mxfp4", "nvfp4"):  # block formats round the block scale: constants are not exact there
        assert torch.equal(deq[5].cpu().float(), torch.full((256,), 0.25))


@pytest.mark.parametrize("name", ON_HOST)
def test_host_rules_return_cpu_tensors(name: str, device: torch.device) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    qt = _rule(name).quantize(w.to(device), "group:64")
    assert qt.codes.device.type == "cpu" and qt.scale.device.type == "cpu"
    assert torch.equal(qt.codes, _rule(name).quantize(w, "group:64").codes)
    assert qt.rel_mse(w.to(device)) == qt.rel_mse(w)


@pytest.mark.parametrize("name", ["minmax", "lloyd-max"])
def test_a_model_on_the_device_quantizes_and_runs_there(name: str, device: torch.device) -> None:
    """The pipeline on a model that sits on ``device``: a device rule (minmax) and a host rule (lloyd-max) both
    give quantized layers on the model's device, whose outputs match the same model quantized on the CPU."""
    torch.manual_seed(0)
    model = mlp(32, 64, 10)
    ref, _ = quantize_model(model, QuantConfig(LayerRule(name, 4, "group:16")))
    q, report = quantize_model(copy.deepcopy(model).to(device), QuantConfig(LayerRule(name, 4, "group:16")))
    assert all(p.device.type == device.type for p in q.state_dict().values())
    x = torch.randn(8, 32)
    out, expect = q(x.to(device)).cpu(), ref(x)
    assert torch.allclose(out, expect, rtol=1e-4, atol=1e-5)
    assert len(report.layers) == 2


def test_device_argument_of_quantize_and_load(device: torch.device, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``quantize_model(device=)`` moves the copy there (the float model stays put) and the report says where;
    ``load_quantized(device=)`` puts the file's bit-identical tensors there."""
    from dfquant.io.load import load_quantized
    from dfquant.io.save import save_quantized

    torch.manual_seed(0)
    model = mlp(32, 64, 10)
    q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4, "group:16")), device=device)
    assert report.device == str(torch.device(device.type, 0) if device.type == "cuda" else device)
    assert all(t.device.type == device.type for t in q.state_dict().values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert f"device: {report.device}" in report.to_text() and report.to_dict()["device"] == report.device
    path = save_quantized(q, tmp_path / "m.safetensors", source={"kind": "test"}, report=report)
    back, _ = load_quantized(path, build=lambda src: mlp(32, 64, 10), device=device)
    for k, v in q.state_dict().items():
        got = back.state_dict()[k]
        assert got.device.type == device.type and torch.equal(got.cpu(), v.cpu()), k
    x = torch.randn(4, 32)
    assert torch.equal(back(x.to(device)).cpu(), q(x.to(device)).cpu())


def test_a_device_the_machine_lacks_is_refused_before_any_work() -> None:
    from dfquant.errors import ConfigError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"cuda:{count}"):
        quantize_model(mlp(8, 8, 2), device=f"cuda:{count}")
