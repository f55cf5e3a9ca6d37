"""What the verbs share: the argument parser that reports usage errors in one line, the common flags
(``--json``, ``--quiet``), JSON output, progress, reading tasks, rules and options from arguments, loading the
model argument, evaluating and printing a summary.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfquant.config import DEFAULT_GRANULARITY, LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.eval import available_tasks, check_task, evaluate
from dfquant.io.gguf_out import gguf_template
from dfquant.io.hf import hf_model_of
from dfquant.quantizers import quantizer_class
from dfquant.quantizers.granularity import Granularity
from dfquant.zoo import load_model

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], dict[str, Any]]


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"dfquant: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda[:N]`` (checked by :func:`dfquant.config.parse_device`)."""
    p.add_argument(
        "--device",
        default="auto",
        help="where to quantize and run: auto (CUDA when available, the default), cpu, cuda or cuda:N",
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def json_ready(o: object) -> object:
    """``o`` as strict JSON values: tensors as lists, tuples and sets as lists, NaN and infinities as ``null``
    (JSON has no such numbers), any other object as its text."""
    import torch

    if isinstance(o, torch.Tensor):
        return json_ready(o.tolist())
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, list | tuple | set):
        return [json_ready(v) for v in o]
    if o is None or isinstance(o, bool | str):
        return o
    if isinstance(o, numbers.Integral):
        return int(o)
    if isinstance(o, numbers.Real):
        return float(o) if math.isfinite(o) else None
    return str(o)


DEFAULT_MODEL = "minilm"
DEFAULT_METHOD = "lloyd-max"
DEFAULT_BITS = 4
DEFAULT_RUN_GRANULARITY = "group:64"
DEFAULT_EVALS = "fidelity,pairs"


class Progress:
    """A one-line progress display on stderr (silent with --quiet or --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = ""

    def layers(self, done: int, total: int, name: str) -> None:
        self._show(f"quantizing [{progress_bar(done, total)}] {done}/{total} {name}")

    def eval(self, what: str, done: int, total: int) -> None:
        self._show(f"{what} [{progress_bar(done, total)}] {done}/{total}")

    def _show(self, text: str) -> None:
        if not self.enabled:
            return
        text = text[:110]
        sys.stderr.write("\r" + text + " " * max(0, len(self._last) - len(text)))
        sys.stderr.flush()
        self._last = text

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r" + " " * len(self._last) + "\r")
            sys.stderr.flush()
            self._last = ""


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled)


def parse_tasks(text: str | None) -> list[str]:
    if not text:
        return []

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    known = available_tasks()
    for t in tasks:
        if t not in known:
            raise ConfigError(f"unknown evaluation task '{t}'; available: {', '.join(known)}")
    return tasks


def build_config(args: argparse.Namespace) -> Any:

    if args.config:
        cfg = QuantConfig.from_file(args.config)
        overrides: dict[str, Any] = {}
        if args.method is not None:
            overrides["quantizer"] = args.method
        if args.bits is not None:
            overrides["bits"] = args.bits
        if args.granularity is not None:
            overrides["granularity"] = args.granularity
        if args.scale_dtype is not None:
            overrides["scale_dtype"] = args.scale_dtype
        if args.expand is not None:
            overrides["expand"] = args.expand
        if args.sparsity is not None:
            overrides["sparsity"] = parse_sparsity(args.sparsity)
        if args.options is not None:
            overrides["options"] = method_options(args)
        overrides.update(rex_extras(args))
        if overrides:
            d = cfg.to_dict()
            d["default"] = {**d["default"], **overrides}
            cfg = QuantConfig.from_dict(d)
    else:
        method = args.method or DEFAULT_METHOD
        quantizer_class(method)  # unknown names fail here, with the list of known ones
        cfg = QuantConfig(
            default=LayerRule(
                quantizer=method,
                bits=args.bits if args.bits is not None else DEFAULT_BITS,
                granularity=Granularity.parse(args.granularity) if args.granularity else DEFAULT_GRANULARITY,
                scale_dtype=args.scale_dtype or "float32",
                expand=args.expand if args.expand is not None else 1,
                sparsity=parse_sparsity(args.sparsity) if args.sparsity is not None else 0.0,
                options=method_options(args) if args.options is not None else {},
                **rex_extras(args),
            )
        )
    if args.sparsity_split is not None:
        d = cfg.to_dict()
        d["sparsity_split"] = args.sparsity_split
        cfg = QuantConfig.from_dict(d)
    budget, budget_bits = getattr(args, "budget", None), getattr(args, "budget_bits", None)
    if budget_bits is not None and budget is None and cfg.budget is None:
        raise ConfigError("--budget-bits chooses among bit widths under a budget: give --budget too")
    if budget is not None or budget_bits is not None:
        d = cfg.to_dict()
        if budget is not None:
            d["budget"] = budget
        if budget_bits is not None:
            d["budget_bits"] = parse_bit_list(budget_bits, "--budget-bits")
        cfg = QuantConfig.from_dict(d)
    if args.no_fold_bn or args.no_bias_correction or args.strict:
        d = cfg.to_dict()
        if args.no_fold_bn:
            d["fold_bn"] = False
        if args.no_bias_correction:
            d["bias_correction"] = False
        if args.strict:
            d["strict"] = True
        cfg = QuantConfig.from_dict(d)
    return cfg


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--options KEY=VALUE[,...]``: the options of the ``--method`` rule (checked with the rule)."""
    return parse_options(args.options, "--options")


def parse_options(text: str, flag: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (integers and floats converted, everything else a string);
    ``flag`` names the option in errors."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{flag}: expected KEY=VALUE items separated by commas, got {item!r}")
        parsed: Any = value
        for conv in (int, float):
            try:
                parsed = conv(value)
                break
            except ValueError:
                continue
        out[key] = parsed
    return out


def rex_extras(args: argparse.Namespace) -> dict[str, Any]:
    """``--act-bits``, ``--residual-method``, ``--outliers``, ``--outlier-select``, ``--rotate`` and ``--balance``
    as rule fields (absent when not given)."""
    out: dict[str, Any] = {}
    if getattr(args, "act_bits", None) is not None:
        out["act_bits"] = args.act_bits
    if getattr(args, "outliers", None) is not None:
        out["outliers"] = args.outliers
    if getattr(args, "residual_method", None) is not None:
        quantizer_class(args.residual_method)  # unknown names fail here, with the list of known ones
        out["residual_quantizer"] = args.residual_method
    if getattr(args, "outlier_select", None) is not None:
        out["outlier_select"] = args.outlier_select
    if getattr(args, "rotate", None) is not None:
        out["rotate"] = args.rotate
    balance = getattr(args, "balance", None)
    if balance:
        out["balance"] = True if balance == "true" else balance
    return out


def parse_bit_list(text: str, flag: str) -> list[int]:
    """``2,3,4``: a comma-separated list of bit widths (checked by the config)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated bit widths such as 2,3,4, got {text!r}") from None


def parse_sparsity(value: float) -> float:
    """``--sparsity``: a fraction in [0, 1), or a percentage in [1, 100)."""
    frac = value / 100.0 if value >= 1.0 else value
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"--sparsity must be a fraction in [0, 1) or a percentage below 100, got {value}")
    return frac


def check_out(out: Path, fmt: str = "dfquant") -> None:
    """Refuse an output path that cannot be written, before any work is done (``fmt="hf"``: a folder to create or
    replace)."""
    folder = out.parent
    if not folder.is_dir():
        raise ConfigError(f"output folder '{folder}' does not exist")
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--format hf writes a folder, but '{out}' is a file")
    elif out.is_dir():
        raise ConfigError(f"output '{out}' is a folder; give a file name such as '{out / 'model.safetensors'}'")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{folder}' is not writable")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--eval-limit must be a positive integer, got {limit}")


def load_model_arg(args: argparse.Namespace) -> Any:

    kwargs: dict[str, Any] = {}
    if getattr(args, "checkpoint", None):
        kwargs["checkpoint"] = args.checkpoint
    if getattr(args, "builder", None):
        kwargs["builder"] = args.builder
    return load_model(args.model, **kwargs)


def evaluate_tasks(
    tasks: list[str], loaded: Any, float_model: Any, quant_model: Any, progress: Progress, limit: int | None
) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for task in tasks:
        out[task] = evaluate(task, loaded, float_model, quant_model, progress=progress.eval, limit=limit)
        progress.done()
    return out


def print_cost(cost: dict[str, Any], bits: int) -> None:
    t = cost["totals"]
    print(
        f"BOPs per {cost['macs_per']}: {t['bops']:.4g} (weight bits per MAC {t['weight_bits_per_mac']:.3f}, "
        f"activations {cost['act_bits']} bits); float {t['float_bops']:.4g} ({t['bops_vs_float']:.3f}x), "
        f"plain W{bits} {t['plain_bops']:.4g} ({t['bops_vs_plain']:.3f}x)"
    )


def start_quantize(args: argparse.Namespace) -> tuple[list[str], Progress, Any]:
    """What every ``quantize`` variant checks and loads before quantizing: the tasks and the eval limit, the
    ``--out`` folder, then the model (and that it can run the tasks). Returns ``(tasks, progress, loaded)``."""
    tasks = parse_tasks(args.eval)
    check_limit(args.eval_limit)
    if args.out:
        check_out(Path(args.out), getattr(args, "format", None) or "dfquant")
    progress = Progress(not (args.quiet or args.json))
    loaded = load_model_arg(args)
    check_tasks(tasks, loaded)
    if getattr(args, "format", None) == "hf":
        hf_model_of(loaded.model)  # a model without a transformers model inside fails here, before quantizing
    if getattr(args, "format", None) == "gguf":
        gguf_template(loaded.source)  # so does a model not loaded from a GGUF file
    return tasks, progress, loaded


def check_tasks(tasks: list[str], loaded: Any) -> None:

    for task in tasks:
        check_task(task, loaded)


def print_summary(result: dict[str, Any]) -> None:
    print()
    device = f"  device {result['device']}" if result.get("device") else ""
    print(f"model {result['model']}  method {result['method']}  bits {result['bits']}{device}")
    bpw = result.get("bits_per_weight")
    if bpw is not None:
        print(f"bits per quantized weight (codes + scales + offsets + codebooks): {bpw:.3f}")
    size, fsize = result.get("size_bytes"), result.get("float_size_bytes")
    if size and fsize:
        what = "file" if result.get("size_is_file") else "in memory"
        print(f"size ({what}): {size / 1e6:.2f} MB vs float32 {fsize / 1e6:.2f} MB ({fsize / size:.2f}x smaller)")
    for task, figs in result.get("eval", {}).items():
        f, q = figs.get("float", {}), figs.get("quantized", {})
        keys = [k for k in q if isinstance(q.get(k), int | float) and not isinstance(q.get(k), bool)]
        cells = ", ".join(f"{k} {fmt(f.get(k))} -> {fmt(q.get(k))}" for k in keys)
        print(f"{task}: {cells}")
        setup = figs.get("setup")
        if isinstance(setup, dict):
            print("  " + ", ".join(f"{k}={v}" for k, v in setup.items() if not isinstance(v, dict | list)))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
