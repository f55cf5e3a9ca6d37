"""Streaming quantization of sharded checkpoints: writer, planning, serial vs pool bytes, the folder loader, and
agreement with the in-memory pipeline."""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, FileFormatError, InputError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import read_manifest
from dfquant.nn.terms import QuantTerm
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.registry import get_quantizer
from dfquant.stream import quantize_sharded, read_checkpoint, worker
from dfquant.stream.plan import plan_checkpoint
from dfquant.stream.shards import ShardWriter
from dfquant.stream.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(hidden=64, intermediate=160, layers=2, vocab=256, heads=4, kv_heads=2)
CFG = QuantConfig(LayerRule("minmax", 4, "group:32"), fold_bn=False, bias_correction=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "in", SPEC, 3)


def test_shard_writer_round_trip_and_alignment(tmp_path: Path) -> None:
    tensors = {
        "b": torch.arange(7, dtype=torch.uint8),
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "c": torch.randn(4, dtype=torch.float64),
        "d": torch.tensor([True, False]),
    }
    for name in ("x.safetensors", "y.safetensors"):
        w = ShardWriter(tmp_path / name, {"format": "pt"})
        for k in ("b", "a", "c", "d"):
            w.add(k, tensors[k])
        size = w.finish()
        assert size == (tmp_path / name).stat().st_size
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert filecmp.cmp(tmp_path / "x.safetensors", tmp_path / "y.safetensors", shallow=False)
    n = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8 : 8 + n])
    assert n % 8 == 0 and header["c"]["data_offsets"][0] == 0  # 8-byte items first: every tensor aligned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "y.safetensors"]  # no scratch left


def test_plan_classifies_by_name(ckpt: Path) -> None:
    cfg = QuantConfig(LayerRule("minmax", 4, "group:32"), rules=(PatternRule("*down_proj", skip=True),))
    plan = plan_checkpoint(read_checkpoint(ckpt), cfg)
    tasks = {t.key: t for ts in plan.tasks.values() for t in ts}
    assert tasks["model.embed_tokens.weight"].kind == "embedding"
    assert tasks["model.layers.1.self_attn.k_proj.weight"].args == {"in_features": 64, "out_features": 32}
    assert tasks["model.norm.weight"].role == "copy"
    assert tasks["model.layers.0.mlp.down_proj.weight"].role == "copy"
    assert [s["name"] for s in plan.skipped] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(plan.layers) == 2 * 6 + 2


def test_bad_rule_names_layer_before_work(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"layer 'model\.embed_tokens' \(Embedding 256x64\).*axis 2"):
        quantize_sharded(ckpt, tmp_path / "o", QuantConfig(LayerRule("minmax", 4, "channel:2")))
    assert not any(tmp_path.iterdir())


def test_index_naming_a_missing_shard_is_refused(ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InputError, match="elsewhere"):
        read_checkpoint(bad)


def test_serial_and_pool_bytes_identical_and_loadable(ckpt: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    a = quantize_sharded(ckpt, tmp_path / "a", CFG)
    b = quantize_sharded(ckpt, tmp_path / "b", CFG, workers=2)
    assert b.mode == "pool" and a.mode == "serial"
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(names) == 4
    assert all(filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False) for n in names)
    assert a.params == sum(t.numel() for t in _float_tensors(ckpt).values())
    assert a.peak_rss_driver > 0 and b.peak_rss_worker > 0
    assert read_manifest(tmp_path / "a")["layers"].keys() == a.manifest["layers"].keys()
    # The folder loads with the file loader, and each layer decodes to what the in-memory pipeline makes.
    model, manifest = load_quantized(tmp_path / "a")
    float_model = _float_llama(ckpt)
    qmodel, _ = quantize_model(float_model, CFG)
    for name in manifest["layers"]:
        got, want = model.get_submodule(name), qmodel.get_submodule(name)
        for tg, tw in zip(got.quant_terms, want.quant_terms, strict=True):
            assert tg.meta() == tw.meta()
            assert all(
                torch.equal(x, y) for x, y in zip(tg.state_dict().values(), tw.state_dict().values(), strict=True)
            )
    norm = load_file(ckpt / "model-00003-of-00003.safetensors")["model.norm.weight"]
    assert torch.equal(model.get_submodule("model.norm").weight, norm)


def test_rerun_replaces_output_and_corrupt_shard_is_refused(ckpt: Path, tmp_path: Path) -> None:
    quantize_sharded(ckpt, tmp_path / "o", CFG)
    r = quantize_sharded(ckpt, tmp_path / "o", QuantConfig(LayerRule("minmax", 8, "channel")))
    assert r.report.layers[0].bits == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    shard = tmp_path / "o" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(FileFormatError, match="truncated"):
        load_quantized(tmp_path / "o")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="exists"):
        quantize_sharded(ckpt, tmp_path / "x", CFG)


def test_row_blocks_give_the_whole_tensor_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "BLOCK_ELEMENTS", 4096)
    w = (torch.randn(700, 96) * 0.02).to(torch.bfloat16)
    w[5, 7] = 0.9
    for name, gran in (("minmax", "group:32"), ("mse", "channel"), ("nf4", "group:64"), ("aciq", "channel")):
        q, g = get_quantizer(name, 4), Granularity.parse(gran)
        joined = worker._blocked(q, w, g, "w", "float16")
        assert joined is not None
        a, b = QuantTerm.from_qtensor(q.quantize(w, g, scale_dtype="float16")), QuantTerm.from_qtensor(joined[0])
        assert a.meta() == b.meta()
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
        ref = w.float()
        err = float(((a.dequantize() - ref) ** 2).sum())
        assert joined[1] == pytest.approx(err, rel=1e-5) and joined[2] == pytest.approx(float((ref**2).sum()), rel=1e-6)


def _float_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(f).items() if v.is_floating_point()})
    return out


def _float_llama(folder: Path) -> torch.nn.Module:
    from dfquant.stream.plan import HFLayout
    from dfquant.zoo import build_architecture

    model = build_architecture(HFLayout(folder).source)
    state = _float_tensors(folder)
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)
    return model.to(torch.bfloat16)


def test_synthetic_laplace_is_finite_at_the_edges() -> None:
    from dfquant.stream.synthetic import laplace_from_uniform

    u = torch.tensor([0.0, 1e-9, 0.25, 0.5, 0.75, 1 - 2**-24])
    x = laplace_from_uniform(u, 0.02)
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 12 * 0.02
    # the inverse cdf in the bulk: u = 1/4 -> -log(2) * sigma / sqrt(2)
    assert float(x[2]) == pytest.approx(-math.log(2) * 0.02 / math.sqrt(2), rel=1e-6)
    torch.manual_seed(0)
    big = laplace_from_uniform(torch.rand(1_000_000), 1.0)
    assert float(big.std()) == pytest.approx(1.0, rel=0.01)


def test_device_of_a_streamed_run(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary and report say where the weights were quantized; a GPU is driven by one process, so
    more workers with a CUDA device are refused before any tensor is read."""
    res = quantize_sharded(ckpt, tmp_path / "out", CFG, device="cpu")
    assert res.summary()["device"] == "cpu" and res.report.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="driven by one process"):
        quantize_sharded(ckpt, tmp_path / "out2", CFG, device="cuda", workers=2)
    assert not (tmp_path / "out2").exists()
