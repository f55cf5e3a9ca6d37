"""GGUF out: a quantized LLaMA-family model as a file llama.cpp runs, with each quantized layer in the GGUF type
that holds its codes exactly, or refused.

A dfquant term maps onto a GGUF block type only when the type decodes every weight to the very value dfquant
decodes (``levels[code] * scale + offset`` in float32). GGUF's legacy types keep one float16 scale ``d`` (and
minimum ``m``) per block of 32 weights along a row (ggml's ``block_q4_0`` etc.):

========  ==================================  ========================================================
type      decodes                             dfquant setting
========  ==================================  ========================================================
Q4_0      ``d * (q - 8)``, q in 0..15         levels -8..7 (``--options grid=int`` or statq ``format=int4``), no offset
Q4_1      ``d * q + m``, q in 0..15           levels 0..15 with offsets (``--options grid=uint``, statq ``format=uint``)
Q5_0      ``d * (q - 16)``, q in 0..31        levels -16..15, no offset (5 bits)
Q5_1      ``d * q + m``, q in 0..31           levels 0..31 with offsets (5 bits)
Q8_0      ``d * q``, q in -128..127           levels -128..127, no offset (8 bits)
IQ4_NL    ``d * T[q]``, IQ4_NL's table T      a 16-level codebook equal to T, no offset
========  ==================================  ========================================================

and every one of them needs ``group:32`` along the input dimension, float16 scales and offsets
(``--scale-dtype float16``), one term, no rotation, balance, outlier residual or channel subset. Anything else is
refused, naming the closest exact type and a command that produces it: nothing is converted with a loss.

The other tensors (norms, embeddings left float) are written as F32, the values dfquant holds. The file's
metadata (architecture, hyperparameters, tokenizer) and tensor names are those of the GGUF file the model was
loaded from (:func:`dfquant.zoo.gguf_llama.load_gguf`); Q and K rows get llama.cpp's RoPE row order back
(:func:`dfquant.zoo.gguf_llama.permute_qk`, a row permutation, which keeps per-row codes exact). When the source
ties the output head to ``token_embd`` (no ``output.weight``) and the model's head no longer equals the embedding
(a quantized head, say), the head is written as its own ``output.weight``, so llama.cpp runs the head dfquant runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfquant.errors import ConfigError, InputError, ModelError
from dfquant.grids.formats import IQ4_NL_LEVELS
from dfquant.io.atomic import replace_atomic
from dfquant.nn.base import QuantModule
from dfquant.nn.terms import QuantTerm, term_layout
from dfquant.quantizers.packing import unpack
from dfquant.zoo.gguf_llama import hf_name, permute_qk

__all__ = ["GGUF_TYPES", "IQ4_NL_TABLE", "exact_gguf_type", "gguf_template", "pack_blocks", "save_gguf"]

#: IQ4_NL's 16 levels (ggml's ``kvalues_iq4nl``), the ``iq4_nl`` grid.
IQ4_NL_TABLE = tuple(int(v) for v in IQ4_NL_LEVELS)
#: GGUF type -> (bits, levels, has offset).
GGUF_TYPES: dict[str, tuple[int, tuple[int, ...], bool]] = {
    "Q4_0": (4, tuple(range(-8, 8)), False),
    "Q4_1": (4, tuple(range(0, 16)), True),
    "Q5_0": (5, tuple(range(-16, 16)), False),
    "Q5_1": (5, tuple(range(0, 32)), True),
    "Q8_0": (8, tuple(range(-128, 128)), False),
    "IQ4_NL": (4, IQ4_NL_TABLE, False),
}
#: A command line that produces each type (for the refusal message).
_HOW = {
    "Q4_0": "--method minmax --options grid=int --bits 4",
    "Q4_1": "--method minmax --options grid=uint --bits 4",
    "Q5_0": "--method minmax --options grid=int --bits 5",
    "Q5_1": "--method minmax --options grid=uint --bits 5",
    "Q8_0": "--method minmax --options grid=int --bits 8",
    "IQ4_NL": "--method statq --options format=iq4_nl --bits 4",
}
_FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "IQ4_NL": 25}  # llama.cpp's LlamaFileType
BLOCK = 32


def _closest(term: QuantTerm) -> str:
    """The exact type nearest to a term's setting: same bits and offset use first."""
    has_offset = term.offset is not None
    best = [n for n, (b, _, off) in GGUF_TYPES.items() if b == term.bits and off == has_offset]
    best = best or [n for n, (b, _, _) in GGUF_TYPES.items() if b == term.bits]
    return best[0] if best else ("Q8_0" if term.bits > 5 else "Q4_1")


def exact_gguf_type(term: QuantTerm) -> tuple[str | None, str]:
    """``(type, "")`` when ``term`` is stored exactly by a GGUF type, else ``(None, why)``."""
    gran = term.granularity
    if len(term.shape) != 2:
        return None, f"a {len(term.shape)}-D weight"
    if term.channels is not None:
        return None, "a term of a subset of channels"
    if gran.kind != "group" or gran.group_size != BLOCK or gran.axis != 0:
        return None, f"granularity {gran} (GGUF blocks are group:32 along the input dimension)"
    if term.shape[1] % BLOCK:
        return None, f"{term.shape[1]} inputs, not a multiple of 32"
    if term.scale.dtype != torch.float16 or (term.offset is not None and term.offset.dtype != torch.float16):
        return (
            None,
            f"{str(term.scale.dtype).removeprefix('torch.')} scales (GGUF stores float16: --scale-dtype float16)",
        )
    if term.levels.dim() != 1:
        return None, "per-group level tables (GGUF's types have one fixed table)"
    levels = tuple(float(v) for v in term.levels.tolist())
    for name, (bits, table, has_offset) in GGUF_TYPES.items():
        if term.bits == bits and levels == tuple(float(v) for v in table) and (term.offset is not None) == has_offset:
            return name, ""
    return (
        None,
        f"{term.bits}-bit levels {levels[:3]}...{levels[-1:]} with{'' if term.offset is not None else 'out'} offsets",
    )


def pack_blocks(kind: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """ggml blocks of 32 for ``(rows, cols)`` codes (level indices) and float16 ``(rows, cols // 32)`` scales and
    minimums: ``uint8 (rows, cols // 32 * block bytes)``."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    q: np.ndarray = codes.reshape(rows, nb, BLOCK).astype(np.uint8)
    parts = [d.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)]
    if m is not None:
        parts.append(m.astype(np.float16).reshape(rows, nb, 1).view(np.uint8))
    if kind == "Q8_0":
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))  # code k is level k - 128
    else:
        if kind in ("Q5_0", "Q5_1"):
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            parts.append(high.sum(axis=2, dtype=np.uint32).reshape(rows, nb, 1).view(np.uint8))
            q = q & 0xF
        parts.append((q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def gguf_template(source: dict[str, Any]) -> Path:
    """The GGUF file a model was loaded from (its metadata and tokenizer are copied into the output).

    Raises:
        InputError: a model not loaded from a GGUF file.
    """
    from dfquant.zoo.gguf_llama import smollm2_path

    if source.get("zoo") == "smollm2-135m":
        return smollm2_path()
    path = source.get("path")
    if isinstance(path, str) and path.lower().endswith(".gguf"):
        return Path(path)
    raise InputError(
        "GGUF out copies the metadata and tokenizer of the GGUF file the model was loaded from; "
        f"this model's source {dict((k, v) for k, v in source.items() if k != 'arch')} names none"
    )


def save_gguf(model: nn.Module, out: str | os.PathLike[str], source: dict[str, Any], *, name: str = "") -> Path:
    """Write a quantized LLaMA-family model as a GGUF file (see the module docstring), atomically.

    Args:
        model: the quantized ``transformers`` LLaMA model (:func:`dfquant.quantize_model` of a GGUF-loaded one).
        out: the ``.gguf`` file.
        source: the model's dfquant source (``LoadedModel.source``): which GGUF file the metadata come from.
        name: the model name for the error messages and the command suggested (default: the zoo name).

    Raises:
        ConfigError: a quantized layer with no exact GGUF type, naming the closest type and a command for it.
        InputError: a model not loaded from a GGUF file, or a tensor of the template the model lacks.
    """
    import gguf  # the hf extra

    template = gguf_template(source)
    try:
        reader = gguf.GGUFReader(str(template))
    except (ValueError, OSError) as e:
        raise ModelError(f"'{template}' is not a readable GGUF file: {e}") from None
    arch = str(reader.fields["general.architecture"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    modules = dict(model.named_modules())
    state = model.state_dict()
    who = name or str(source.get("zoo", "MODEL"))
    planned: list[tuple[str, np.ndarray, Any]] = []
    kinds: set[str] = set()
    for t in reader.tensors:
        key, part = hf_name(t.name, template)
        layer = modules.get(key.removesuffix(".weight"))
        perm_heads = n_head if part == "attn_q" else n_kv if part == "attn_k" else None
        if isinstance(layer, QuantModule):
            planned.append(_quantized(t.name, key, layer, perm_heads, who))
            kinds.add(planned[-1][2].name)
            continue
        if key not in state:
            raise InputError(f"the model has no tensor '{key}' for GGUF tensor '{t.name}'")
        a = state[key].detach().to(torch.float32).cpu().numpy()
        if perm_heads is not None:
            a = permute_qk(a, perm_heads)
        planned.append((t.name, np.ascontiguousarray(a), gguf.GGMLQuantizationType.F32))
    if not any(t.name == "output.weight" for t in reader.tensors):
        planned += _untied_head(modules, state, who)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value: Any = field.contents()
            if key == "general.file_type" and len(kinds) == 1:
                value = _FILE_TYPE[next(iter(kinds))]
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, value, field.types[0], sub)
        for tname, data, qtype in planned:
            w.add_tensor(tname, data, raw_dtype=qtype)  # quantized: uint8 blocks, shape from their bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    dest = Path(out)
    replace_atomic(dest, write, "GGUF file")
    return dest


def _untied_head(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], who: str) -> list[Any]:
    """``output.weight`` for a model whose source GGUF ties the head to ``token_embd``, when the head no longer
    equals the embedding (quantized, or changed): llama.cpp then reads its own head instead of the embedding."""
    import gguf

    head = modules.get("lm_head")
    if isinstance(head, QuantModule):
        return [_quantized("output.weight", "lm_head.weight", head, None, who)]
    if head is None or "lm_head.weight" not in state:
        return []
    w, e = state["lm_head.weight"], state.get("model.embed_tokens.weight")
    if e is not None and w.shape == e.shape and torch.equal(w, e):
        return []
    a = np.ascontiguousarray(w.detach().to(torch.float32).cpu().numpy())
    return [("output.weight", a, gguf.GGMLQuantizationType.F32)]


def _quantized(
    gname: str, key: str, layer: QuantModule, perm_heads: int | None, who: str
) -> tuple[str, np.ndarray, Any]:
    import gguf

    label = key.removesuffix(".weight")
    terms = layer.quant_terms
    extras = (layer.outliers, layer.rotation, layer.balance, layer.input_spec)
    if len(terms) != 1 or any(e is not None for e in extras):
        raise ConfigError(
            f"layer '{label}': {len(terms)} term(s), outliers, a rotation, a balance or an input expansion have no "
            "GGUF type; "
            f"plain terms only: dfquant quantize {who} {_HOW['Q4_1']} --granularity group:32 --scale-dtype float16 "
            "--format gguf --out OUT.gguf"
        )
    term = terms[0]
    kind, why = exact_gguf_type(term)
    if kind is None:
        near = _closest(term)
        raise ConfigError(
            f"layer '{label}': {term.quantizer} {why} has no exact GGUF type; the closest is {near}: "
            f"dfquant quantize {who} {_HOW[near]} --granularity group:32 --scale-dtype float16 --format gguf "
            "--out OUT.gguf"
        )
    rows, cols, _ = term_layout(term.shape, term.granularity)
    codes = unpack(term.packed, term.bits, term.numel).view(rows, cols).cpu().numpy()
    d = term.scale.detach().cpu().numpy()
    m = None if term.offset is None else term.offset.detach().cpu().numpy()
    if perm_heads is not None:  # llama.cpp's RoPE row order: a row permutation of codes, scales and offsets
        order = permute_qk(np.arange(rows)[:, None], perm_heads)[:, 0]
        codes, d = codes[order], d[order]
        m = None if m is None else m[order]
    blocks = pack_blocks(kind, codes, d, m)
    return gname, blocks, gguf.GGMLQuantizationType[kind]
