"""QAT of a causal LM: a tiny random LLaMA trained on synthetic token windows, converted, saved and reloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require_module
from dfquant.errors import InputError
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.nn.base import QuantModule
from dfquant.qat.fake import QATConfig, QATLayer, convert, prepare_qat
from dfquant.qat.lm import LM_KEEP_FLOAT, causal_lm_loss, lm_perplexity, lm_train_batches
from dfquant.qat.train import train_qat

transformers = require_module("transformers")  # the LM QAT path needs LlamaForCausalLM


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _stream() -> torch.Tensor:
    """A learnable token stream: a fixed random sequence of 97 tokens repeated."""
    gen = torch.Generator().manual_seed(1)
    return torch.randperm(97, generator=gen).repeat(8)


def test_causal_lm_loss_equals_the_transformers_labels_loss() -> None:
    model = _tiny_llama()
    x, y = lm_train_batches(_stream(), seq=16, batch=3)(5)
    with torch.no_grad():
        ref = model(x, labels=y, use_cache=False).loss
        ours = causal_lm_loss(model, x, y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_batches_are_windows_of_the_stream_and_repeat_per_step() -> None:
    ids = torch.arange(1000)
    get = lm_train_batches(ids, seq=32, batch=4, seed=3)
    x, y = get(7)
    assert x.shape == (4, 32) and torch.equal(x, y)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 31, dtype=torch.long))  # consecutive tokens
    assert torch.equal(get(7)[0], x) and not torch.equal(get(8)[0], x)
    with pytest.raises(InputError, match="fewer than one window of 32"):
        lm_train_batches(torch.arange(10), seq=32, batch=1)


def test_llama_qat_learns_converts_saves_and_reloads_identically(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = _tiny_llama()
    qat = prepare_qat(model, QATConfig(format="int4", keep_float=LM_KEEP_FLOAT))
    wrapped = [n for n, m in qat.named_modules() if isinstance(m, QATLayer)]
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head and embeddings stay float
    assert qat.lm_head.weight is qat.model.embed_tokens.weight  # the tie survives prepare_qat
    batches = lm_train_batches(_stream(), seq=24, batch=4)
    state = train_qat(qat, batches, steps=12, lr=3e-3, loss_fn=causal_lm_loss)
    first, last = sum(state.losses[:3]) / 3, sum(state.losses[-3:]) / 3
    assert last < first - 0.3, state.losses  # ln(97) = 4.57 at the start

    conv = convert(qat)
    assert sum(isinstance(m, QuantModule) for m in conv.modules()) == 14
    assert conv.lm_head.weight is conv.model.embed_tokens.weight
    x, _ = batches(100)
    with torch.no_grad():
        fake = qat(x, use_cache=False).logits
        assert torch.equal(conv(x, use_cache=False).logits, fake)
    path = save_quantized(conv, tmp_path / "lm.safetensors", source={"toy": "llama"})
    loaded, _ = load_quantized(path, build=lambda src: _tiny_llama())
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, fake)
    # evaluation through the WikiText-2 window logic agrees between the fake-quantized and the reloaded model
    stream = _stream()
    a = lm_perplexity(qat, stream, windows=2, window=48)
    b = lm_perplexity(loaded, stream, windows=2, window=48)
    assert a["tokens"] == 2 * 47 and a["ppl"] == b["ppl"]


def test_cli_refuses_unknown_tasks_and_bad_lm_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dfquant.cli.main import main

    out = str(tmp_path / "m.safetensors")
    base = ["qat", "smollm2-135m", "--format", "int4", "--steps", "2", "--out", out]
    assert main([*base, "--data", "imagenet"]) == 2
    assert "--data 'imagenet' is not supported by 'qat'; allowed: cifar10, wikitext2" in capsys.readouterr().err
    assert main([*base, "--data", "wikitext2", "--seq", "1"]) == 2
    assert "--seq must be >= 2 and --eval-windows >= 1, got 1, 4" in capsys.readouterr().err
