"""Block Walsh-Hadamard rotation: the transform against Sylvester's Hadamard matrix, the rule setting, what it
does to heavy-tailed weights, and rotated layers through the pipeline, a file, a reload and a stream."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.linalg import hadamard
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, FileFormatError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import FORMAT_VERSION, METADATA_KEY
from dfquant.io.save import save_quantized
from dfquant.methods.rotate import Rotation, parse_rotation
from dfquant.pipeline.quantize import quantize_model
from shared_models import mlp


def _dense(rot: Rotation, n: int) -> torch.Tensor:
    """``R = H D`` as a dense ``(n, n)`` matrix from scipy's Sylvester Hadamard blocks and the signs."""
    h = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for b in rot.blocks(n):
        h[start : start + b, start : start + b] = torch.from_numpy(hadamard(b).astype(np.float64)) / math.sqrt(b)
        start += b
    return h @ torch.diag(rot.signs(n).double())


@pytest.mark.parametrize(("n", "block", "blocks"), [(144, 64, [64, 64, 16]), (27, 16, [16, 8, 2, 1]), (64, 64, [64])])
def test_rotation_is_the_dense_block_hadamard(n: int, block: int, blocks: list[int]) -> None:
    rot = Rotation(block=block, seed=5)
    assert rot.blocks(n) == blocks
    r = _dense(rot, n)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)  # orthogonal
    w = torch.randn(6, n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rot.apply(w).double(), w.double() @ r.T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rot.undo(w).double(), w.double() @ r, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(2))
    # (W R^T)(R x) = W x: the run-time form gives the layer's output
    torch.testing.assert_close(rot.rotate_input(x) @ rot.apply(w).T, x @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(rot.signs(n), Rotation(block=block, seed=5).signs(n))  # drawn again, the same
    assert not torch.equal(rot.signs(n), Rotation(block=block, seed=6).signs(n))


def test_conv_weight_rotates_along_its_flattened_fan_in() -> None:
    rot = Rotation(block=16, seed=0)
    w = torch.randn(4, 3, 3, 3)
    flat = rot.apply(w.reshape(4, 27))
    assert torch.equal(rot.apply(w).reshape(4, 27), flat)
    torch.testing.assert_close(rot.undo(rot.apply(w)), w, rtol=0, atol=1e-6)


def test_rotate_setting_normal_form_and_errors() -> None:
    assert parse_rotation("none") == "none"
    assert parse_rotation("hadamard") == "hadamard:64"
    assert parse_rotation(" Hadamard:128 ") == "hadamard:128"
    assert LayerRule(rotate="hadamard:32").rotate == "hadamard:32"
    for bad in ("hadamard:48", "hadamard:1", "hadamard:x", "givens", "none:4", 64, None):
        with pytest.raises(ConfigError, match="'rotate' must be 'none', 'hadamard' or 'hadamard:B'"):
            parse_rotation(bad)
    with pytest.raises(ConfigError, match="power of two"):
        Rotation(block=12)
    with pytest.raises(ConfigError, match="rotation must be"):
        Rotation.from_meta({"kind": "givens", "block": 8, "seed": 0})


def _rel_mse(model: nn.Module, q: nn.Module, name: str) -> float:
    w = model.get_submodule(name).weight.detach()
    w_hat = q.get_submodule(name).dequantize_weight()
    return float(((w_hat - w) ** 2).sum() / (w * w).sum())


def test_rotation_makes_heavy_tailed_rows_gaussian_for_the_analytic_grid() -> None:
    """Student-t (3 degrees of freedom) rows with a few large weights: the Gaussian Lloyd-Max grid per channel
    at 3 bits gains much from the rotation, and the report's measured error is the error of the decoded weight
    in the layer's own basis."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    t = torch.distributions.StudentT(3.0).sample((128, 256))
    with torch.no_grad():
        model[0].weight.copy_(t * 0.02)
        model[0].bias.copy_(torch.randn(128, generator=g) * 0.01)
    errs = {}
    for rotate in ("none", "hadamard:64"):
        cfg = QuantConfig(LayerRule("lloyd-max", 3, "channel", rotate=rotate), fold_bn=False, bias_correction=False)
        q, report = quantize_model(model, cfg)
        errs[rotate] = _rel_mse(model, q, "0")
        assert report.layers[0].rel_mse == pytest.approx(errs[rotate], rel=1e-5)
        assert report.layers[0].rotate == rotate
    assert errs["hadamard:64"] < 0.8 * errs["none"], errs
    assert "rot64" in report.to_text()
    # the report: the groups' Gaussian KS statistic falls with the rotation
    r = report.layers[0]
    assert r.ks_before is not None and r.ks_after is not None
    assert r.ks_after < 0.6 * r.ks_before, (r.ks_before, r.ks_after)
    assert f"Gaussian KS of its groups {r.ks_before:.4f} -> {r.ks_after:.4f}" in report.to_text()
    # with the Gaussian table forced, the error model predicts Max's (1960) 0.03455 at 3 bits: far from the
    # measured error of the heavy-tailed rows, close to it once they are rotated
    gap = {}
    for rotate in ("none", "hadamard:64"):
        rule = LayerRule("lloyd-max", 3, "channel", options={"dist": "gaussian"}, rotate=rotate)
        _, rep = quantize_model(model, QuantConfig(rule, fold_bn=False, bias_correction=False))
        assert rep.layers[0].predicted_rel_mse == pytest.approx(0.03455, rel=2e-4)
        gap[rotate] = abs(rep.layers[0].rel_mse / 0.03455 - 1)
    assert gap["hadamard:64"] < 0.1 and gap["none"] > 2 * gap["hadamard:64"], gap


def _block_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_rotated_file_reloads_bit_identical(tmp_path: Path) -> None:
    model = _block_model().eval()
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:16"),
        rules=(PatternRule("0", rotate="hadamard:16"), PatternRule("3", quantizer="mse", rotate="hadamard")),
    )
    q, _ = quantize_model(model, cfg)
    path = save_quantized(q, tmp_path / "m.safetensors", source={"kind": "test"})
    back, manifest = load_quantized(path, build=lambda src: _block_model())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["layers"]["3"]["rotation"]["block"] == 64
    for name in ("0", "3"):
        a, b = q.get_submodule(name), back.get_submodule(name)
        assert a.rotation == b.rotation
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight())
        rows = torch.tensor([3, 0, 5])
        assert torch.equal(a.dequantize_weight_rows(rows), a.dequantize_weight()[rows])
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(back(x), q(x))
    torch.testing.assert_close(q(x), model(x), rtol=0.15, atol=0.15)  # 4 bits: close to float, not equal

    # a rotation in a version-2 file, or a malformed one, is refused by name
    with safe_open(str(path), "pt") as f:
        man = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(path)
    for edit, needle in (
        (lambda m: m.update(format_version=2), "needs format version 3"),
        (lambda m: m["layers"]["0"]["rotation"].update(block=6), "power of two"),
        (lambda m: m["layers"]["0"]["rotation"].update(kind="givens"), "rotation must be"),
    ):
        bad_man = json.loads(json.dumps(man))
        edit(bad_man)
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(bad_man)})
        with pytest.raises(FileFormatError, match=needle):
            load_quantized(bad, build=lambda src: _block_model())


def test_rotation_with_outliers_expansion_and_bias_correction() -> None:
    """Everything that acts on a layer's terms acts in the rotated basis; the decoded weight is undone."""
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    for extra in ({"outliers": 0.01}, {"expand": 2}):
        rule = LayerRule("minmax", 3, "group:32", rotate="hadamard:32", **extra)  # type: ignore[arg-type]
        plain = LayerRule("minmax", 3, "group:32", **extra)  # type: ignore[arg-type]
        q, _ = quantize_model(model, QuantConfig(rule))
        p, _ = quantize_model(model, QuantConfig(plain))
        for name in ("0", "2"):
            assert q.get_submodule(name).rotation is not None and p.get_submodule(name).rotation is None
            assert _rel_mse(model, q, name) < 0.05, (extra, name)
