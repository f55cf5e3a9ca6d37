"""Helpers shared by the benchmarks: atomic writes, where results go and what each records (command, versions,
machine, date), the load average, and the weights each benchmark quantizes."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.io.atomic import write_atomic as _write_atomic_bytes

#: The models of the peer benchmarks (zoo names) and two synthetic references.
REAL_MODELS = ("cifar-resnet20", "cifar-resnet32", "minilm", "smollm2-135m")
SYNTHETIC = ("gaussian", "laplace")
NOTES = {
    "smollm2-135m": "weights dequantized from a 4-bit GGUF: in blocks of 32 they already lie on a 4-bit grid "
    "per block, which favours any 4-bit rule whose groups align with those blocks",
    "cifar-resnet20": "conv and linear weights as trained (BatchNorm not folded, for every method alike)",
    "cifar-resnet32": "conv and linear weights as trained (BatchNorm not folded, for every method alike)",
    "minilm": "the linear layers of the 6 encoder blocks (embeddings left out)",
    "gaussian": "i.i.d. N(0, 1) tensor, seed 0",
    "laplace": "i.i.d. Laplace(0, 1) tensor, seed 0",
}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`dfquant.io.atomic.write_atomic`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


#: The committed raw results: one ``NAME.json`` per benchmark; ``benchmarks/README.md`` shows the table each
#: benchmark renders from its file, verbatim (``python benchmarks/readme_tables.py`` rewrites them, and
#: ``tests/unit/benchmarks/test_benchmark_tables.py`` checks them).
RESULTS = Path(__file__).resolve().parent / "results"

#: Packages whose versions a result records (those installed).
VERSIONED = ("dfquant", "torch", "numpy", "scipy", "transformers", "hqq", "bitsandbytes", "optimum-quanto", "torchao")


def versions() -> dict[str, str]:
    """Python's and every installed package of :data:`VERSIONED`'s version."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What a result records about its run: the command that reproduces it, the versions, the machine and the
    date (UTC).

    Args:
        script: the script's ``__file__``.
        argv: the arguments its ``main`` was given (None: the process's own).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    rel = Path(script).resolve().relative_to(Path(__file__).resolve().parent.parent)
    return {
        "command": " ".join(["python", str(rel), *(shlex.quote(a) for a in args)]),
        "versions": versions(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_result(out: Path, name: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/NAME.json`` (the raw result, with its provenance) and ``out/NAME.md`` (its table), each
    atomically."""
    for key in ("command", "versions", "machine", "date"):
        if key not in result:
            raise ValueError(f"result '{name}' has no '{key}': build it with provenance()")
    write_json(out / f"{name}.json", result)
    write_atomic(out / f"{name}.md", markdown(result))


def pooled_rel_mse(model: nn.Module, qmodel: nn.Module, names: Sequence[str]) -> float:
    """Pooled relative weight MSE ``sum ||W_hat - W||^2 / sum ||W||^2`` over the layers ``names`` of ``model``
    (float) and ``qmodel`` (dfquant's quantized layers, or a peer's model holding its decoded weights)."""
    num = den = 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach().to(torch.float32)
        layer = qmodel.get_submodule(name)
        w_hat = layer.dequantize_weight() if hasattr(layer, "dequantize_weight") else layer.weight.detach()
        num += float(((w_hat.to(torch.float32).reshape(w.shape) - w) ** 2).sum())
        den += float((w * w).sum())
    return num / den


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints), or [] where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def quantizable_weights(model: nn.Module, *, convs: bool = True) -> dict[str, torch.Tensor]:
    """``{layer name: weight}`` of every ``nn.Linear`` (and conv when ``convs``) in ``model``; embeddings, norms
    and an output head tied to the embedding (``lm_head``) left out."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d) if convs else (nn.Linear,)
    return {
        n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, kinds) and not n.endswith("lm_head")
    }


def subsample_rows(weights: dict[str, torch.Tensor], max_params: int | None) -> tuple[dict[str, torch.Tensor], int]:
    """Keep evenly spaced output rows of every weight so that the total is about ``max_params``.

    Per-channel and per-group rules (groups along a row) see whole rows, so a row subset is a subset of the
    groups every setting would form on the full tensor. The row count is a multiple of 8 (at least 8) so that
    libraries packing several groups per word (HQQ packs 2-bit groups four at a time) accept the subset
    whenever they accept the full tensor. Returns the weights and the rows kept per tensor (0: all rows).
    """
    total = sum(w.numel() for w in weights.values())
    if max_params is None or total <= max_params:
        return weights, 0
    row_len = sum(w[0].numel() for w in weights.values())
    rows = max(8, max_params // row_len // 8 * 8)
    out = {}
    for name, w in weights.items():
        k = min(rows, w.shape[0])
        idx = torch.linspace(0, w.shape[0] - 1, k).round().long().unique()
        out[name] = w[idx].contiguous()
    return out, rows


def load_weights(name: str, max_params: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a zoo model or a synthetic tensor, and a description of what was taken."""
    if name in SYNTHETIC:
        g = torch.Generator().manual_seed(0)
        shape = (256, 2048)
        if name == "gaussian":
            w = torch.randn(shape, generator=g)
        else:
            u = torch.rand(shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
            w = -torch.sign(u) * torch.log1p(-2 * u.abs())
        return {name: w}, {"tensors": 1, "params": w.numel(), "shape": list(shape), "note": NOTES[name]}
    from dfquant.zoo import load_model

    loaded = load_model(name)
    weights = quantizable_weights(loaded.model)
    full = sum(w.numel() for w in weights.values())
    weights, rows = subsample_rows(weights, max_params)
    info = {
        "tensors": len(weights),
        "params": sum(w.numel() for w in weights.values()),
        "params_full": full,
        "rows_per_tensor": rows or "all",
        "note": NOTES.get(name, ""),
    }
    return weights, info
