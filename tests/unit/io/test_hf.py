"""Hugging Face folders: dfquant -> folder -> ``from_pretrained`` gives dfquant's outputs bit for bit (tiny
``transformers`` models built from a configuration, no hub), sharding, ``save_pretrained`` again, the
registration hook, and clear refusals of newer, truncated and foreign folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_module
from dfquant.cli.main import main
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import FileFormatError, InputError
from dfquant.io.hf import INDEX_FILE, is_hf_folder, load_hf, read_hf_config, save_hf
from dfquant.io.manifest import FORMAT_VERSION
from dfquant.nn.base import QuantModule
from dfquant.pipeline.quantize import quantize_model
from shared_models import mlp

transformers = require_module("transformers")


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    cfg.architectures = ["BertModel"]
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return transformers.LlamaForCausalLM(cfg).eval()


CFG = QuantConfig(
    LayerRule("minmax", 4, "group:16"),
    rules=(
        PatternRule("*embed*", skip=True),
        PatternRule("*query*", quantizer="lloyd-max", rotate="hadamard:16"),
        PatternRule("*down_proj", balance=True),  # a balanced layer (its column scale travels with the weights)
        PatternRule("*value*", balance=True),
    ),
)
IDS = torch.tensor([[3, 9, 27, 5, 1, 60], [7, 7, 2, 40, 11, 0]])


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        y = model(input_ids=IDS)
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


@pytest.mark.parametrize("build", [_bert, _llama])
def test_folder_loads_with_from_pretrained_bit_identical(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    q, _ = quantize_model(build(), CFG)
    folder = save_hf(q, tmp_path / "q")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert is_hf_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "dfquant" and qc["format_version"] == FORMAT_VERSION
    assert set(qc["layers"]) == {n for n, m in q.named_modules() if isinstance(m, QuantModule)}
    loaded = (
        transformers.AutoModel.from_pretrained(folder)
        if build is _bert
        else (transformers.AutoModelForCausalLM.from_pretrained(folder))
    )
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, QuantModule)]
    assert set(quantized) == set(qc["layers"])
    assert torch.equal(_out(loaded), _out(q))
    if build is _llama:  # the quantized head was tied to the float embedding: written untied
        assert config["tie_word_embeddings"] is False and isinstance(loaded.lm_head, QuantModule)
    # save_pretrained of the loaded model writes a folder that loads again, to the same outputs
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert torch.equal(_out(type(loaded).from_pretrained(again)), _out(q))


def test_sharded_folder_and_load_hf(tmp_path: Path) -> None:
    q, _ = quantize_model(_llama(), CFG)
    folder = save_hf(q, tmp_path / "q", max_shard_bytes=20_000)
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
    for s in shards:  # each shard within the limit, unless one tensor alone exceeds it
        keys = [k for k, v in index["weight_map"].items() if v == s]
        size = sum(q.state_dict()[k].numel() * q.state_dict()[k].element_size() for k in keys)
        assert size <= 20_000 or len(keys) == 1, (s, size)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in q.state_dict().values())
    model = load_hf(folder, device="cpu")
    assert not model.training and torch.equal(_out(model), _out(q))
    # replacing a folder keeps it whole: the new one takes its place only once written
    save_hf(q, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, _ = quantize_model(_llama(), CFG)
    with pytest.raises(InputError, match="holds no transformers model"):
        save_hf(quantize_model(mlp(8, 8))[0], tmp_path / "x")
    folder = save_hf(q, tmp_path / "q", max_shard_bytes=20_000)
    # a truncated shard, then a missing one
    shard = sorted(folder.glob("model-00002-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        read_hf_config(folder)
    assert main(["eval", str(folder), "--eval", "fidelity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfquant: error: ") and "truncated" in err[0]
    shard.unlink()
    with pytest.raises(FileFormatError, match="is missing"):
        read_hf_config(folder)
    # a newer format version: dfquant's check and transformers' load both name it
    newer = save_hf(q, tmp_path / "newer")
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="format version 99 is newer"):
        read_hf_config(newer)
    with pytest.raises(ValueError, match="format version 99 is newer"):
        transformers.AutoModelForCausalLM.from_pretrained(newer)
    assert main(["inspect", str(newer)]) == 2
    assert "newer" in capsys.readouterr().err


def test_importing_dfquant_registers_with_transformers_when_it_is_imported() -> None:
    """``import dfquant`` does not import transformers (several seconds), yet a later import of transformers
    finds quant_method "dfquant" registered."""
    code = (
        "import sys, dfquant\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['dfquant'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['dfquant'].__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["DfquantHfQuantizer", "DfquantHfConfig"]
