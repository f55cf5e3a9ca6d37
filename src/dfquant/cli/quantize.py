"""Whole-model commands of the ``dfquant`` command line: ``quantize``, ``eval`` and ``inspect``.

``quantize`` with no model runs the embedded default: the MiniLM sentence encoder at 4 bits with ``lloyd-max``
in groups of 64, evaluated with the data-free fidelity check and on the sentence pairs the project ships.

``quantize`` checks everything it can before the long work (the rules, the task names, the output folder,
then, once the model is loaded, that each task fits it), quantizes, evaluates, and writes ``--out`` last,
atomically: a command that fails leaves no output file (and no temporary file) behind. Progress is shown on
stderr only when stderr is a terminal (and neither ``--quiet`` nor ``--json`` is given).

``--expand K`` quantizes every layer as a residual expansion of order ``K`` (:mod:`dfquant.methods.rex`) and
``--sparsity GAMMA`` (a fraction in [0, 1), or a percentage) drops that fraction of output channels from each
order ``k >= 2``, split across layers by ``--sparsity-split``; the command then also prints the bit operations
(BOPs) against float and plain ``b``-bit quantization (the ``cost`` entry of ``--json`` always holds them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dfquant.errors import ConfigError

DEFAULT_MODEL = "minilm"
DEFAULT_METHOD = "lloyd-max"
DEFAULT_BITS = 4
DEFAULT_GRANULARITY = "group:64"
DEFAULT_EVALS = "fidelity,pairs"


class _Progress:
    """A one-line progress display on stderr (silent with --quiet or --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = ""

    def layers(self, done: int, total: int, name: str) -> None:
        self._show(f"quantizing [{_bar(done, total)}] {done}/{total} {name}")

    def eval(self, what: str, done: int, total: int) -> None:
        self._show(f"{what} [{_bar(done, total)}] {done}/{total}")

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


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled)


def _parse_tasks(text: str | None) -> list[str]:
    if not text:
        return []
    from dfquant.eval import available_tasks

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    known = available_tasks()
    for t in tasks:
        if t not in known:
            raise ConfigError(f"unknown evaluation task '{t}'; available: {', '.join(known)}")
    return tasks


def _build_config(args: argparse.Namespace) -> Any:
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.quantizers import quantizer_class

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
            overrides["sparsity"] = _parse_sparsity(args.sparsity)
        if args.options is not None:
            overrides["options"] = _method_options(args)
        overrides.update(_rex_extras(args))
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
                granularity=args.granularity or "channel",
                scale_dtype=args.scale_dtype or "float32",
                expand=args.expand if args.expand is not None else 1,
                sparsity=_parse_sparsity(args.sparsity) if args.sparsity is not None else 0.0,
                options=_method_options(args) if args.options is not None else {},
                **_rex_extras(args),
            )
        )
    if args.sparsity_split is not None:
        d = cfg.to_dict()
        d["sparsity_split"] = args.sparsity_split
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


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
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


def _rex_extras(args: argparse.Namespace) -> dict[str, Any]:
    """``--act-bits``, ``--residual-method``, ``--outliers`` and ``--outlier-select`` as rule fields (absent when
    not given)."""
    out: dict[str, Any] = {}
    if getattr(args, "act_bits", None) is not None:
        out["act_bits"] = args.act_bits
    if getattr(args, "outliers", None) is not None:
        out["outliers"] = args.outliers
    if getattr(args, "residual_method", None) is not None:
        if not (getattr(args, "expand", None) or 1) > 1:
            raise ConfigError("--residual-method is the rule of expansion orders >= 2: give --expand K (K >= 2)")
        from dfquant.quantizers import quantizer_class

        quantizer_class(args.residual_method)  # unknown names fail here, with the list of known ones
        out["residual_quantizer"] = args.residual_method
    if getattr(args, "outlier_select", None) is not None:
        if not out.get("outliers"):
            raise ConfigError("--outlier-select chooses the weights of --outliers F: give --outliers too")
        out["outlier_select"] = args.outlier_select
    return out


def _parse_sparsity(value: float) -> float:
    """``--sparsity``: a fraction in [0, 1), or a percentage in [1, 100)."""
    frac = value / 100.0 if value >= 1.0 else value
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"--sparsity must be a fraction in [0, 1) or a percentage below 100, got {value}")
    return frac


def _cost(loaded: Any, report: Any) -> dict[str, Any]:
    import torch

    from dfquant.report.cost import cost_summary, layer_macs

    shape = getattr(loaded, "input_shape", None)
    example = torch.zeros((1, *shape)) if shape else None
    per = "input" if example is not None else "output position (token)"
    try:
        macs = layer_macs(loaded.model, example)
    except Exception:  # a model whose forward does not take a zero image: count per position instead
        macs, per = layer_macs(loaded.model, None), "output position (token)"
    out = cost_summary(report, macs)
    out["macs_per"] = per
    return out


def _check_out(out: Path) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    folder = out.parent
    if not folder.is_dir():
        raise ConfigError(f"output folder '{folder}' does not exist")
    if out.is_dir():
        raise ConfigError(f"output '{out}' is a folder; give a file name such as '{out / 'model.safetensors'}'")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{folder}' is not writable")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--eval-limit must be a positive integer, got {limit}")


def _load(args: argparse.Namespace) -> Any:
    from dfquant.zoo import load_model

    kwargs: dict[str, Any] = {}
    if getattr(args, "checkpoint", None):
        kwargs["checkpoint"] = args.checkpoint
    if getattr(args, "builder", None):
        kwargs["builder"] = args.builder
    return load_model(args.model, **kwargs)


def _evaluate(
    tasks: list[str], loaded: Any, float_model: Any, quant_model: Any, progress: _Progress, limit: int | None
) -> dict[str, Any]:
    from dfquant.eval import evaluate

    out: dict[str, Any] = {}
    for task in tasks:
        out[task] = evaluate(task, loaded, float_model, quant_model, progress=progress.eval, limit=limit)
        progress.done()
    return out


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from dfquant.graph.modules import state_dict_bytes
    from dfquant.pipeline.quantize import quantize_model

    if args.method == "dfmpc":
        from dfquant.cli.dfmpc import cmd_quantize_dfmpc

        return cmd_quantize_dfmpc(args)
    from dfquant.cli.stream import cmd_stream, wants_stream

    if wants_stream(args):  # a sharded .safetensors folder: quantized tensor by tensor into --out
        return cmd_stream(args)
    default_run = args.model is None
    if default_run:
        args.model = DEFAULT_MODEL
        args.granularity = args.granularity or DEFAULT_GRANULARITY
        args.eval = args.eval if args.eval is not None else DEFAULT_EVALS
    config = _build_config(args)
    tasks, progress, loaded = _start_quantize(args)
    qmodel, report = quantize_model(loaded.model, config, progress=progress.layers)
    progress.done()
    float_bytes = state_dict_bytes(loaded.model)
    evals = _evaluate(tasks, loaded, loaded.model, qmodel, progress, args.eval_limit)
    cost = _cost(loaded, report)
    size_bytes = None
    if args.out:  # written last: a command that fails leaves no file
        from dfquant.io.save import save_quantized

        path = save_quantized(qmodel, args.out, source=loaded.source, report=report)
        size_bytes = path.stat().st_size
    result = {
        "model": loaded.name,
        "method": config.default.quantizer,
        "bits": config.default.bits,
        "granularity": config.default.granularity,
        "scale_dtype": config.default.scale_dtype,
        "bits_per_weight": report.bits_per_weight,
        "size_bytes": size_bytes if size_bytes is not None else report.model_bytes,
        "size_is_file": size_bytes is not None,
        "float_size_bytes": float_bytes,
        "out": str(args.out) if args.out else None,
        "eval": evals,
        "layers": report.to_dict()["layers"],
        "report": report.to_dict(),
        "notes": list(getattr(loaded, "notes", []) or []),
        "expand": config.default.expand,
        "sparsity": config.default.sparsity,
        "cost": cost,
    }
    if not args.json:
        print(report.to_text())
        _print_summary(result)
        if args.expand is not None or getattr(args, "act_bits", None) is not None:
            _print_cost(cost, config.default.bits)
    return result


def _print_cost(cost: dict[str, Any], bits: int) -> None:
    t = cost["totals"]
    print(
        f"BOPs per {cost['macs_per']}: {t['bops']:.4g} (weight bits per MAC {t['weight_bits_per_mac']:.3f}, "
        f"activations {cost['act_bits']} bits); float {t['float_bops']:.4g} ({t['bops_vs_float']:.3f}x), "
        f"plain W{bits} {t['plain_bops']:.4g} ({t['bops_vs_plain']:.3f}x)"
    )


def _start_quantize(args: argparse.Namespace) -> tuple[list[str], _Progress, Any]:
    """What every ``quantize`` variant checks and loads before quantizing: the tasks and the eval limit, the
    ``--out`` folder, then the model (and that it can run the tasks). Returns ``(tasks, progress, loaded)``."""
    tasks = _parse_tasks(args.eval)
    _check_limit(args.eval_limit)
    if args.out:
        _check_out(Path(args.out))
    progress = _Progress(not (args.quiet or args.json))
    loaded = _load(args)
    _check_tasks(tasks, loaded)
    return tasks, progress, loaded


def _check_tasks(tasks: list[str], loaded: Any) -> None:
    from dfquant.eval import check_task

    for task in tasks:
        check_task(task, loaded)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from dfquant.graph.modules import state_dict_bytes
    from dfquant.io.load import load_quantized
    from dfquant.zoo import build_architecture, load_from_source

    tasks = _parse_tasks(args.eval or "fidelity")
    _check_limit(args.eval_limit)
    extra: dict[str, Any] = {"builder": args.builder} if args.builder else {}
    qmodel, manifest = load_quantized(
        args.file, build=lambda src: build_architecture(src, **extra), cache_weight=args.cache_weights
    )
    source = manifest.get("source", {})
    loaded = load_from_source(source, **extra)
    _check_tasks(tasks, loaded)
    progress = _Progress(not (args.quiet or args.json))
    evals = _evaluate(tasks, loaded, loaded.model, qmodel, progress, args.eval_limit)
    layers = _layers(manifest)
    result = {
        "model": loaded.name,
        "method": _manifest_method(manifest),
        "bits": _manifest_bits(manifest),
        "bits_per_weight": manifest.get("report", {}).get("totals", {}).get("bits_per_weight"),
        "size_bytes": Path(args.file).stat().st_size,
        "size_is_file": True,
        "float_size_bytes": state_dict_bytes(loaded.model),
        "eval": evals,
        "layers": layers,
    }
    if not args.json:
        _print_summary(result)
    return result


def _layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    layers = manifest.get("layers", {})
    return [dict(v, name=k) for k, v in layers.items()] if isinstance(layers, dict) else list(layers)


def _manifest_method(manifest: dict[str, Any]) -> str | None:
    names = {t.get("quantizer") for lay in _layers(manifest) for t in lay.get("terms", [])}
    names.discard(None)
    return ",".join(sorted(str(n) for n in names)) or None


def _manifest_bits(manifest: dict[str, Any]) -> int | list[int] | None:
    bits = sorted({int(t["bits"]) for lay in _layers(manifest) for t in lay.get("terms", []) if "bits" in t})
    if not bits:
        return None
    return bits[0] if len(bits) == 1 else bits


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from dfquant.io.manifest import read_manifest

    manifest = read_manifest(args.file)
    if not args.json:
        print(json.dumps(manifest, indent=2))
    return manifest


def _print_summary(result: dict[str, Any]) -> None:
    print()
    print(f"model {result['model']}  method {result['method']}  bits {result['bits']}")
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
        cells = ", ".join(f"{k} {_fmt(f.get(k))} -> {_fmt(q.get(k))}" for k in keys)
        print(f"{task}: {cells}")
        setup = figs.get("setup")
        if isinstance(setup, dict):
            print("  " + ", ".join(f"{k}={v}" for k, v in setup.items() if not isinstance(v, dict | list)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def add_commands(sub: Any) -> None:
    """Register ``quantize``, ``eval`` and ``inspect`` on the ``dfquant`` subparsers."""
    from dfquant.cli.main import _common

    p = sub.add_parser("quantize", help="quantize a model, report per layer, evaluate, write the file")
    p.add_argument("model", nargs="?", help="zoo name (cifar-resnet20, minilm, smollm2-135m, ...) or a local path")
    p.add_argument("--method", help=f"quantizer name (default {DEFAULT_METHOD}), or dfmpc (DF-MPC mixed precision)")
    p.add_argument(
        "--options",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="options of the --method rule, e.g. weighting=input-variance for lloyd-optimal or mse, "
        "format=fp4_e2m1 for statq (replace a --config default rule's options)",
    )
    p.add_argument("--bits", type=int, help=f"code bits (default {DEFAULT_BITS})")
    p.add_argument("--granularity", help="tensor | channel | group:G (default channel; the default run: group:64)")
    p.add_argument(
        "--scale-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the per-group scales and offsets (default float32; float16 saves 16 bits per group)",
    )
    p.add_argument(
        "--expand", type=int, help="residual expansion order K: K quantized terms per layer (default 1, plain)"
    )
    p.add_argument(
        "--residual-method",
        help="quantizer of expansion orders >= 2 (default: --method; mse suits the nearly uniform residual of a "
        "uniform grid, whose extremes minmax would spend its outer levels on)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        help="fraction (or percentage) of output channels dropped from each expansion order >= 2 (default 0)",
    )
    p.add_argument(
        "--sparsity-split",
        choices=("linear", "uniform"),
        help="split of the sparsity budget across layers: linear in depth, more toward the head (default), or uniform",
    )
    p.add_argument(
        "--act-bits",
        type=int,
        help="quantize each layer's input to A bits and expand it to the order of --expand (default: float inputs)",
    )
    p.add_argument(
        "--outliers",
        type=float,
        help="fraction of largest weights kept in a sparse binary residual next to the bulk (e.g. 0.002)",
    )
    p.add_argument(
        "--outlier-select",
        choices=("global", "row"),
        help="which weights --outliers keeps: the tensor's largest (global, the default) or each output "
        "channel's largest (row; for language models at 4 bits, where the largest weights must stay exact)",
    )
    p.add_argument("--config", help="JSON file with per-layer rules (see dfquant.config.QuantConfig)")
    p.add_argument("--eval", help="comma-separated tasks: cifar10, stsb, wikitext2, fidelity, pairs")
    p.add_argument("--eval-limit", type=int, help="evaluate on fewer items (windows, pairs, images) for a quick look")
    p.add_argument("--out", help="write the quantized model to this .safetensors file")
    p.add_argument("--checkpoint", help="weights file for zoo models that take one (cifar-resnet*)")
    p.add_argument("--builder", help="module:callable building the architecture of a .safetensors state dict")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers separate")
    p.add_argument("--no-bias-correction", action="store_true", help="skip data-free bias correction")
    p.add_argument("--strict", action="store_true", help="fail instead of warning when a layer stays float")
    p.add_argument("--workers", type=int, help="sharded folder: worker processes (default 1)")
    p.add_argument("--ray", metavar="ADDRESS", help="sharded folder: run shards on this Ray cluster, or 'local'")
    p.add_argument("--threads", type=int, help="sharded folder: threads per worker (default 1; fixes the bytes)")
    from dfquant.cli.dfmpc import add_dfmpc_arguments

    add_dfmpc_arguments(p)
    _common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="evaluate a saved quantized model against its float model")
    p.add_argument("file")
    p.add_argument("--eval", help="comma-separated tasks (default fidelity)")
    p.add_argument("--eval-limit", type=int)
    p.add_argument(
        "--builder",
        help="module:callable building the architecture, for a file made from a .safetensors state dict "
        "(dfquant never imports code named in a file)",
    )
    p.add_argument(
        "--cache-weights",
        action="store_true",
        help="keep each dequantized weight after its first use (float speed, float memory); default: decode per "
        "forward, only the packed codes stay resident",
    )
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="print the manifest of a saved quantized model")
    p.add_argument("file")
    _common(p)
    p.set_defaults(func=cmd_inspect)
