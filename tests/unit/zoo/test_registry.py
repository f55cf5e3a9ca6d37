"""The model zoo without real assets: CIFAR ResNet architecture and checkpoint loading, the registry, the
safetensors + builder loader, sentence pooling, and the GGUF Q/K layout (on tiny files written here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file
from torch import nn

from conftest import require_module
from dfquant.errors import FileFormatError, ModelError
from dfquant.zoo import (
    CifarResNet,
    LoadedModel,
    SentenceEncoder,
    available_models,
    build_architecture,
    load_from_source,
    load_model,
    register_model,
)
from dfquant.zoo import registry as zoo_registry
from dfquant.zoo.cifar_resnet import BasicBlock, ShortcutA
from dfquant.zoo.gguf_llama import permute_qk, unpermute_qk

# ------------------------------------------------------------------------------------------------------------
# CIFAR ResNet architecture


@pytest.mark.parametrize(("depth", "params", "tensors"), [(20, 269_722, 97), (32, 464_154, 157)])
def test_cifar_resnet_parameter_and_tensor_counts(depth: int, params: int, tensors: int) -> None:
    net = CifarResNet(depth)
    assert sum(p.numel() for p in net.parameters()) == params
    # the akamaster checkpoints hold these tensors (no num_batches_tracked)
    assert len([k for k in net.state_dict() if not k.endswith("num_batches_tracked")]) == tensors
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_names_match_akamaster_keys() -> None:
    keys = set(CifarResNet(20).state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer3.2.bn2.bias",
        "linear.weight",
    ):
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # option A has no parameters


def test_option_a_shortcut_subsamples_and_zero_pads_channels() -> None:
    x = torch.randn(2, 16, 32, 32)
    y = ShortcutA(8)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    block = BasicBlock(16, 32, stride=2)
    assert isinstance(block.shortcut, ShortcutA)
    assert block(x).shape == (2, 32, 16, 16)
    assert isinstance(BasicBlock(32, 32).shortcut, nn.Identity)


def test_cifar_resnet_stages_downsample() -> None:
    net = CifarResNet(20)
    x = torch.randn(1, 3, 32, 32)
    a = net.layer1(net.relu(net.bn1(net.conv1(x))))
    b = net.layer2(a)
    c = net.layer3(b)
    assert (a.shape, b.shape, c.shape) == ((1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8))


@pytest.mark.parametrize("depth", [7, 21, 0])
def test_bad_depth_is_refused(depth: int) -> None:
    with pytest.raises(ModelError, match=r"6n\+2"):
        CifarResNet(depth)


def _akamaster_file(tmp_path: Path, net: nn.Module, name: str = "ck.th") -> Path:
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / name
    torch.save({"state_dict": state, "best_prec1": 91.0}, p)
    return p


def test_load_akamaster_style_checkpoint(tmp_path: Path) -> None:
    ref = CifarResNet(20)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    ref.eval()
    p = _akamaster_file(tmp_path, ref)
    loaded = load_model("cifar-resnet20", checkpoint=str(p))
    assert loaded.task == "cifar10" and loaded.kind == "image-classifier"
    assert loaded.input_shape == (3, 32, 32)
    assert loaded.source == {"zoo": "cifar-resnet20", "checkpoint": str(p)}
    assert not loaded.model.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))
    again = load_from_source(json.loads(json.dumps(loaded.source)))
    with torch.no_grad():
        assert torch.equal(again.model(x), ref(x))


def test_checkpoint_of_another_depth_is_named(tmp_path: Path) -> None:
    p = _akamaster_file(tmp_path, CifarResNet(20))
    with pytest.raises(ModelError, match=r"ResNet-20.*not the ResNet-32"):
        load_model("cifar-resnet32", checkpoint=p)


def test_checkpoint_with_missing_tensor_is_named(tmp_path: Path) -> None:
    state = {k: v for k, v in CifarResNet(20).state_dict().items() if k != "linear.bias"}
    p = tmp_path / "ck.th"
    torch.save({"state_dict": state}, p)
    with pytest.raises(ModelError, match=r"missing.*linear.bias"):
        load_model("cifar-resnet20", checkpoint=p)


class _NotATensor:
    pass


def test_checkpoint_needing_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.th"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _NotATensor()}, p)
    with pytest.raises(FileFormatError, match="weights_only"):
        load_model("cifar-resnet20", checkpoint=p)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="no such file"):
        load_model("cifar-resnet20", checkpoint=tmp_path / "nope.th")


def test_depth_without_asset_needs_a_checkpoint() -> None:
    with pytest.raises(ModelError, match=r"cifar-resnet44.*checkpoint=PATH"):
        load_model("cifar-resnet44")


# ------------------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_the_zoo() -> None:
    names = available_models()
    for n in (
        "cifar-resnet20",
        "cifar-resnet32",
        "cifar-resnet44",
        "cifar-resnet56",
        "minilm",
        "smollm2-135m",
    ):
        assert names.get(n)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet9000'.*cifar-resnet20"):
        load_model("resnet9000")


def test_bare_checkpoint_path_needs_an_architecture(tmp_path: Path) -> None:
    p = _akamaster_file(tmp_path, CifarResNet(20))
    with pytest.raises(ModelError, match="bare checkpoint"):
        load_model(str(p))


def test_register_a_new_model_without_touching_the_pipeline() -> None:
    def build(source: dict, **_: object) -> nn.Module:
        return nn.Linear(source["n"], 2)

    @register_model("test-tiny-linear", build=build, description="a test model")
    def load(n: int = 3) -> LoadedModel:
        return LoadedModel(nn.Linear(n, 2).eval(), "test-tiny-linear", {"zoo": "test-tiny-linear", "n": n})

    try:
        lm = load_model("test-tiny-linear", n=5)
        assert lm.model.in_features == 5
        assert build_architecture(lm.source).in_features == 5
        assert load_from_source(lm.source).model.in_features == 5
        with pytest.raises(ModelError, match="already registered"):
            register_model("test-tiny-linear")(lambda: lm)
    finally:
        zoo_registry._REGISTRY.pop("test-tiny-linear", None)


@pytest.mark.parametrize("source", [None, {}, {"zoo": 3}, {"zoo": "no-such-model"}])
def test_bad_source_is_refused(source: object) -> None:
    with pytest.raises(ModelError):
        build_architecture(source)  # type: ignore[arg-type]


def test_build_architecture_from_recorded_source() -> None:
    net = build_architecture({"zoo": "cifar-resnet32"})
    assert isinstance(net, CifarResNet) and net.depth == 32 and not net.training


def test_core_imports_do_not_import_transformers() -> None:
    code = "import sys, dfquant.zoo, dfquant.eval; print('transformers' in sys.modules, 'gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------------------
# safetensors + builder


def _linear_file(tmp_path: Path) -> tuple[Path, nn.Linear]:
    ref = nn.Linear(4, 3)
    p = tmp_path / "lin.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(p))
    return p, ref


def test_safetensors_with_explicit_builder(tmp_path: Path) -> None:
    p, ref = _linear_file(tmp_path)
    kw = {"in_features": 4, "out_features": 3}
    lm = load_model(str(p), builder="torch.nn:Linear", builder_kwargs=kw)
    assert torch.equal(lm.model.weight, ref.weight)
    assert lm.source["arch"] == {"builder": "torch.nn:Linear"}
    src = json.loads(json.dumps(lm.source))
    with pytest.raises(ModelError, match="never imports code named in a file"):
        build_architecture(src)
    assert isinstance(build_architecture(src, builder="torch.nn:Linear"), nn.Linear)
    with pytest.raises(ModelError, match="builder"):
        load_from_source(src)
    assert torch.equal(load_from_source(src, builder="torch.nn:Linear").model.bias, ref.bias)


@pytest.mark.parametrize(
    ("builder", "match"),
    [
        (None, "builder='package.module:callable'"),
        ("torch.nn.Linear", "must look like"),
        ("no_such_module_xyz:f", "cannot import"),
        ("torch.nn:NoSuchLayer", "no attribute"),
        ("torch:pi", "not callable"),
        ("torch.nn:Conv1d", "does not fit|missing"),
    ],
)
def test_safetensors_builder_errors(tmp_path: Path, builder: str | None, match: str) -> None:
    p, _ = _linear_file(tmp_path)
    kw = (
        {"in_features": 4, "out_features": 3}
        if builder != "torch.nn:Conv1d"
        else {"in_channels": 4, "out_channels": 3, "kernel_size": 1}
    )
    with pytest.raises(ModelError, match=match):
        load_model(str(p), builder=builder, builder_kwargs=kw)


# ------------------------------------------------------------------------------------------------------------
# sentence pooling


class _FakeEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.emb(input_ids))


def test_sentence_encoder_mean_pools_over_the_mask_and_normalizes() -> None:
    enc = _FakeEncoder()
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = SentenceEncoder(enc, "mean", normalize=False)(ids, mask)
    w = enc.emb.weight
    assert torch.allclose(out[0], (w[1] + w[2]) / 2) and torch.allclose(out[1], w[3])
    normed = SentenceEncoder(enc, "mean", normalize=True)(ids, mask)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2))
    assert torch.allclose(SentenceEncoder(enc, "cls", normalize=False)(ids, mask), w[ids[:, 0]])
    with pytest.raises(ModelError, match="pooling"):
        SentenceEncoder(enc, "max")


# ------------------------------------------------------------------------------------------------------------
# GGUF Q/K layout


def test_qk_permutation_example_and_inverse() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows
    assert permute_qk(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)


def _rope_half(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """transformers' LLaMA rotation: pairs (x[i], x[i + d/2])."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's rotation: pairs (x[2i], x[2i + 1])."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_unpermuted_qk_gives_the_same_attention_scores_as_llama_cpp() -> None:
    torch.manual_seed(0)
    heads, d, hidden, t = 2, 8, 16, 5
    wq = torch.randn(heads * d, hidden, dtype=torch.float64)
    x = torch.randn(t, hidden, dtype=torch.float64)
    pos = torch.arange(t, dtype=torch.float64)
    gguf_wq = torch.from_numpy(permute_qk(wq.numpy(), heads))  # what the converter writes
    hf_wq = torch.from_numpy(unpermute_qk(gguf_wq.numpy(), heads))  # what the loader gives transformers
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        q_cpp = _rope_interleaved(x @ gguf_wq[sl].T, pos)
        q_hf = _rope_half(x @ hf_wq[sl].T, pos)
        assert torch.allclose(q_cpp @ q_cpp.T, q_hf @ q_hf.T)


def _write_tiny_llama_gguf(path: Path) -> tuple[nn.Module, list[str]]:
    gguf = require_module("gguf")
    tf = require_module("transformers")
    from tokenizers.pre_tokenizers import ByteLevel

    torch.manual_seed(0)
    byte_chars = sorted(set(ByteLevel.alphabet()))
    tokens = ["<|endoftext|>", *byte_chars, "Ġt", "he", "12"]
    merges = ["Ġ t", "h e", "1 2"]
    cfg = tf.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    ref = tf.LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    block = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight":
            continue
        a = v.numpy().astype(np.float32)
        if k in names:
            w.add_tensor(names[k], a)
            continue
        _, _, i, *rest = k.split(".")
        part = block[".".join(rest[:-1])]
        if part == "attn_q":
            a = permute_qk(a, 4)
        elif part == "attn_k":
            a = permute_qk(a, 2)
        w.add_tensor(f"blk.{i}.{part}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref, tokens


def test_tiny_gguf_round_trip_matches_the_reference_llama(tmp_path: Path) -> None:
    p = tmp_path / "tiny.gguf"
    ref, tokens = _write_tiny_llama_gguf(p)
    lm = load_model(str(p))
    assert lm.kind == "causal-lm" and lm.task == "wikitext2" and lm.vocab_size == len(tokens)
    assert lm.notes == []  # F32 tensors: nothing was quantized
    ids = torch.tensor([[5, 9, 70, 3, 120, 7]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, ref(ids).logits, atol=1e-5)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    # "smollm" pre-tokenizer: digits split one by one before the GPT-2 byte-level split, so "1 2" never merges
    enc = lm.tokenizer("the 12 <|endoftext|>")["input_ids"]
    assert [tokens[i] for i in enc] == ["t", "he", "Ġ", "1", "2", "Ġ", "<|endoftext|>"]
    skeleton = build_architecture(json.loads(json.dumps(lm.source)))
    assert list(skeleton.state_dict()) == list(lm.model.state_dict())


# ------------------------------------------------------------------------------------------------------------
# local Hugging Face folders (tiny random models written here)


def _tiny_bert_folder(tmp_path: Path, sentence: bool) -> Path:
    tf = require_module("transformers")
    folder = tmp_path / ("st" if sentence else "bert")
    folder.mkdir()
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "cat",
        "dog",
        "sat",
        "ran",
        "a",
        "on",
        "mat",
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tok = tf.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    cfg = tf.BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    tf.BertModel(cfg).save_pretrained(str(folder))
    if sentence:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
        (folder / "1_Pooling").mkdir()
        pool = {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool), encoding="utf-8")
        (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 16}', encoding="utf-8")
    return folder


def test_local_sentence_transformers_folder(tmp_path: Path) -> None:
    folder = _tiny_bert_folder(tmp_path, sentence=True)
    lm = load_model(str(folder))
    assert lm.kind == "sentence-encoder" and lm.task == "stsb"
    assert isinstance(lm.model, SentenceEncoder) and lm.model.normalize
    assert getattr(lm.model.encoder, "pooler", None) is None  # unused by mean pooling: not loaded
    assert lm.tokenizer.model_max_length == 16
    src = json.loads(json.dumps(lm.source))
    assert src["zoo"] == "hf" and "_name_or_path" not in src["arch"]["config"]
    skeleton = build_architecture(src)
    skeleton.load_state_dict(lm.model.state_dict(), strict=True)
    enc = lm.tokenizer(["the cat sat on a mat", "a dog ran"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = lm.model(enc["input_ids"], enc["attention_mask"])
        b = skeleton(enc["input_ids"], enc["attention_mask"])
    assert a.shape == (2, 16) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_local_plain_encoder_folder(tmp_path: Path) -> None:
    folder = _tiny_bert_folder(tmp_path, sentence=False)
    lm = load_model(folder)
    assert lm.kind == "encoder" and lm.task == "fidelity" and lm.vocab_size == 13
    forced = load_model(folder, kind="sentence-encoder")
    assert forced.kind == "sentence-encoder" and forced.source["kind"] == "sentence-encoder"
    assert isinstance(build_architecture(json.loads(json.dumps(forced.source))), SentenceEncoder)
    with pytest.raises(ModelError, match="kind must be one of"):
        load_model(folder, kind="vision")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_local_causal_lm_folder(tmp_path: Path) -> None:
    tf = require_module("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", "the", "cat", "sat", "on", "a", "mat"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "lm"
    tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(folder))
    cfg = tf.LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    lm = load_model(str(folder))
    assert lm.kind == "causal-lm" and lm.task == "wikitext2" and lm.vocab_size == len(words)
    ids = lm.tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 3, 4, 5, 6, 7]]
    skeleton = build_architecture(json.loads(json.dumps(lm.source)))
    skeleton.load_state_dict(lm.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, lm.model(ids).logits)


def test_local_folder_with_pickle_weights_is_refused(tmp_path: Path) -> None:
    """A folder whose weights are a pickle (``pytorch_model.bin``) is refused before transformers opens it:
    loading a pickle can run code. The same folder in safetensors loads."""
    folder = _tiny_bert_folder(tmp_path, sentence=False)
    weights = load_safetensors(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(FileFormatError, match=r"only as Python pickles \(pytorch_model\.bin\).*safetensors only"):
        load_model(str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileFormatError, match=r"holds no weights: no \*\.safetensors file"):
        load_model(str(folder))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load_model(str(folder)).kind == "encoder"
