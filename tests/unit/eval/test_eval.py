"""Evaluators and metrics without real assets: correlations, the STS parser, perplexity on a tiny fake LM,
the data-free fidelity check on tiny models, the demo pairs, and the registry's checks."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.eval import (
    agreement,
    available_tasks,
    encode_sentences,
    evaluate,
    lm_logits,
    load_demo_pairs,
    parse_pairs,
    parse_sts,
    pearson,
    perplexity,
    relative_error,
    spearman,
    synthetic_inputs,
    top1_accuracy,
)
from dfquant.eval.cifar10 import preprocess
from dfquant.eval.registry import no_grad_eval
from dfquant.zoo import LoadedModel

# ------------------------------------------------------------------------------------------------------------
# metrics


def test_top1_and_agreement() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 0])
    assert top1_accuracy(logits, labels) == 75.0
    assert top1_accuracy(logits.argmax(-1), labels) == 75.0
    assert agreement(logits, logits.flip(-1)) == 0.0
    assert agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == pytest.approx(200 / 3)
    with pytest.raises(InputError):
        agreement(torch.zeros(3, 2), torch.zeros(4, 2))


def test_relative_error() -> None:
    y = torch.tensor([3.0, 4.0])
    assert relative_error(y, y) == 0.0
    assert relative_error(torch.tensor([3.0, 5.0]), y) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert math.isinf(relative_error(torch.ones(2), torch.zeros(2)))


def test_correlations_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)  # many ties
    y = x + rng.standard_normal(200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y**3)) == pytest.approx(spearman(x, y))
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(InputError):
        spearman([1.0], [2.0])


# ------------------------------------------------------------------------------------------------------------
# STS parsing and the demo pairs

STS_SAMPLE = (
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA girl is styling her hair.\tA girl brushes her hair.\n"
    'main-news\theadlines\t2015\t0002\t1.4\tHe said "no deal.\tThe "talks" ended\tsource-a\tlicense-b\r\n'
    "\n"
    'main-forums\tanswers\t2016\t0003\t0.0\t"Quoted start\tend" here\n'
)


def test_parse_sts_splits_on_tabs_only() -> None:
    pairs = parse_sts(STS_SAMPLE)
    assert pairs == [
        ("A girl is styling her hair.", "A girl brushes her hair.", 5.0),
        ('He said "no deal.', 'The "talks" ended', 1.4),
        ('"Quoted start', 'end" here', 0.0),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a\tb\tc\td\t5\tonly one sentence\n", "7 TAB-separated"),
        ("a\tb\tc\td\tfive\ts1\ts2\n", "not a number"),
    ],
)
def test_parse_sts_bad_lines(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_sts(text, "sample.csv")


def test_parse_pairs_and_the_shipped_demo_set() -> None:
    assert parse_pairs("# comment\n\n4.5\tA b.\tC d.\n") == [("A b.", "C d.", 4.5)]
    with pytest.raises(InputError, match="score<TAB>"):
        parse_pairs("4.5\tonly one\n")
    demo = load_demo_pairs()
    assert 18 <= len(demo) <= 30
    scores = [s for _, _, s in demo]
    assert min(scores) >= 0.0 and max(scores) <= 5.0 and len(set(scores)) > 10
    assert all(a and b and a != b for a, b, _ in demo)


class _CharTokenizer:
    """Characters -> ids (a-z = 1..26, else 27), padded with 0."""

    def __call__(self, texts: list[str], **_: object) -> dict[str, torch.Tensor]:
        ids = [[(ord(c) - 96) if "a" <= c <= "z" else 27 for c in t.lower()] for t in texts]
        n = max(len(i) for i in ids)
        out = torch.zeros(len(ids), n, dtype=torch.long)
        mask = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            out[r, : len(i)] = torch.tensor(i)
            mask[r, : len(i)] = 1
        return {"input_ids": out, "attention_mask": mask}


class _BagOfChars(nn.Module):
    """A toy sentence encoder: normalized character histogram (padding ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(28, 28, bias=False)
        nn.init.eye_(self.proj.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hist = (F.one_hot(input_ids, 28).float() * attention_mask[..., None]).sum(1)
        return F.normalize(self.proj(hist), dim=-1)


def test_encode_sentences_returns_rows_in_input_order() -> None:
    model, tok = _BagOfChars(), _CharTokenizer()
    sents = ["a much longer sentence here", "hi", "medium one", "z"]
    emb = encode_sentences(model, tok, sents, batch_size=2)
    for i, s in enumerate(sents):
        one = tok([s])
        assert torch.allclose(emb[i], model(one["input_ids"], one["attention_mask"])[0])


def test_pairs_evaluator_on_a_toy_encoder() -> None:
    model = _BagOfChars()
    loaded = LoadedModel(
        model, "toy", {"zoo": "toy"}, task="pairs", kind="sentence-encoder", tokenizer=_CharTokenizer()
    )
    quant = copy.deepcopy(model)
    with torch.no_grad():
        quant.proj.weight.add_(0.05 * torch.randn(28, 28))
    calls: list[tuple[str, int, int]] = []
    r = evaluate("pairs", loaded, model, quant, progress=lambda *a: calls.append(a))
    assert r["task"] == "pairs" and r["setup"]["pairs"] == len(load_demo_pairs())
    # an independent computation: float64 character histograms, each model's matrix, cosine, scipy's statistics
    pairs = load_demo_pairs()
    gold = np.array([g for _, _, g in pairs])

    def hist(text: str) -> np.ndarray:
        h = np.zeros(28)
        for c in text.lower():
            h[(ord(c) - 96) if "a" <= c <= "z" else 27] += 1
        return h

    for key, net in (("float", model), ("quantized", quant)):
        w = net.proj.weight.detach().double().numpy()
        cos = []
        for a, b, _ in pairs:
            ea, eb = w @ hist(a), w @ hist(b)
            cos.append(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
        assert r[key]["spearman"] == pytest.approx(100 * stats.spearmanr(cos, gold).statistic, abs=2e-4), key
        assert r[key]["pearson"] == pytest.approx(100 * stats.pearsonr(cos, gold).statistic, abs=2e-4), key
    assert 0.9 < r["quantized"]["embedding_cosine"] < 1.0
    assert calls and calls[-1][1] == calls[-1][2]
    only_float = evaluate("pairs", loaded, model, None, limit=5)
    assert "quantized" not in only_float and only_float["setup"]["pairs"] == 5


# ------------------------------------------------------------------------------------------------------------
# perplexity


class _UniformLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class _CopyLM(nn.Module):
    """Predicts 'previous token + 1' with probability p, the rest spread evenly (a known likelihood)."""

    def __init__(self, vocab: int, p: float) -> None:
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        q = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*ids.shape, self.vocab), q)
        probs.scatter_(-1, ((ids + 1) % self.vocab)[..., None], self.p)
        return SimpleNamespace(logits=probs.log())


def test_perplexity_of_uniform_lm_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (1000,))
    r = perplexity(_UniformLM(50), ids, window=100, windows=3)
    assert r["ppl"] == pytest.approx(50.0, rel=1e-6)
    assert (r["windows"], r["tokens"]) == (3, 3 * 99)
    full = perplexity(_UniformLM(50), ids, window=300, windows=None)
    assert (full["windows"], full["tokens"]) == (3, 3 * 299)


def test_perplexity_counts_only_predictions_inside_each_window() -> None:
    vocab, p, window = 10, 0.8, 5
    # windows [0..4], [5..9]: in-window steps always follow +1 except one step per window; the step across the
    # window boundary (4 -> 5) is never scored
    ids = torch.tensor([0, 1, 2, 3, 7, 5, 6, 7, 8, 2])
    q = (1 - p) / (vocab - 1)
    nll = -(6 * math.log(p) + 2 * math.log(q)) / 8
    r = perplexity(_CopyLM(vocab, p), ids, window=window, windows=None, keep_predictions=True)
    assert r["nll"] == pytest.approx(nll, rel=1e-6) and r["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert r["predictions"].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


def test_perplexity_bad_input() -> None:
    with pytest.raises(InputError, match="fewer than one window"):
        perplexity(_UniformLM(5), torch.arange(10) % 5, window=16)
    with pytest.raises(InputError, match=">= 2"):
        perplexity(_UniformLM(5), torch.arange(10) % 5, window=1)


def test_lm_logits_accepts_hf_style_outputs() -> None:
    class HFStyle(nn.Module):
        config = SimpleNamespace(use_cache=True)

        def forward(self, ids: torch.Tensor, use_cache: bool = True) -> SimpleNamespace:
            assert use_cache is False
            return SimpleNamespace(logits=torch.zeros(*ids.shape, 4))

    assert lm_logits(HFStyle(), torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 4)
    with pytest.raises(InputError, match="logits"):
        lm_logits(nn.Identity(), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------------------
# fidelity (data-free)


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).eval()


def test_fidelity_on_a_tiny_cnn() -> None:
    model = _tiny_cnn()
    loaded = LoadedModel(model, "tiny", {"zoo": "tiny"}, kind="image-classifier", input_shape=(3, 8, 8))
    same = evaluate("fidelity", loaded, model, copy.deepcopy(model))
    assert same["setup"]["inputs"] == "synthetic"
    assert same["quantized"] == {"agreement": 100.0, "rel_error": 0.0, "cosine": 1.0}
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    r = evaluate("fidelity", loaded, model, noisy, limit=100)
    x = synthetic_inputs(loaded, 100)
    with torch.no_grad():
        y_f, y_q = model(x), noisy(x)
    assert r["quantized"]["rel_error"] == pytest.approx(relative_error(y_q, y_f), rel=1e-5)
    assert r["quantized"]["agreement"] == pytest.approx(agreement(y_q, y_f), abs=1e-3)
    assert r["quantized"]["rel_error"] > 0 and r["quantized"]["agreement"] < 100
    assert evaluate("fidelity", loaded, model, noisy, limit=100) == r  # fixed seed


def test_fidelity_on_a_tiny_lm_uses_random_tokens() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 11)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids).cumsum(1))

    tok = SimpleNamespace(all_special_ids=[0, 10], added_tokens_decoder={})
    model = TinyLM().eval()
    loaded = LoadedModel(model, "lm", {"zoo": "lm"}, kind="causal-lm", tokenizer=tok, vocab_size=11)
    x = synthetic_inputs(loaded, 4)
    assert x.shape == (4, 128) and int(x.min()) >= 1 and int(x.max()) <= 9
    r = evaluate("fidelity", loaded, model, copy.deepcopy(model), limit=4)
    assert r["quantized"]["agreement"] == 100.0 and "random token" in r["setup"]["drawn"]


def test_fidelity_needs_both_models_and_an_input_shape() -> None:
    model = _tiny_cnn()
    loaded = LoadedModel(model, "tiny", {"zoo": "tiny"}, kind="image-classifier", input_shape=(3, 8, 8))
    with pytest.raises(ConfigError, match="give both"):
        evaluate("fidelity", loaded, model, None)
    no_shape = LoadedModel(model, "tiny", {"zoo": "tiny"}, kind="module")
    with pytest.raises(ConfigError, match="input shape"):
        evaluate("fidelity", no_shape, model, model)


# ------------------------------------------------------------------------------------------------------------
# registry and helpers


def test_registry_checks_task_kind_and_limit() -> None:
    assert {"cifar10", "stsb", "wikitext2", "fidelity", "pairs"} <= set(available_tasks())
    model = _tiny_cnn()
    loaded = LoadedModel(
        model, "tiny", {"zoo": "tiny"}, task="fidelity", kind="image-classifier", input_shape=(3, 8, 8)
    )
    with pytest.raises(ConfigError, match="unknown evaluation task 'mnist'"):
        evaluate("mnist", loaded, model, model)
    with pytest.raises(ConfigError, match="needs a model of kind sentence-encoder"):
        evaluate("stsb", loaded, model, model)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="limit"):
            evaluate("fidelity", loaded, model, model, limit=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate("cifar10", loaded, None, None)


def test_no_grad_eval_restores_training_flags() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with no_grad_eval(model):
        assert not model.training and not model[1].training and not torch.is_grad_enabled()
    assert model.training and model[1].training


def test_cifar_preprocessing() -> None:
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = preprocess(x)
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(expected))
    assert y.dtype == torch.float32
