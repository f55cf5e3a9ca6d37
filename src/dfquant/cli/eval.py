"""``dfquant eval FILE``: evaluate a saved quantized model against its float model."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from dfquant.cli.common import (
    Progress,
    add_common,
    add_device,
    check_limit,
    check_tasks,
    evaluate_tasks,
    parse_tasks,
    print_summary,
)
from dfquant.cli.inspect import manifest_bits, manifest_layers, manifest_method
from dfquant.config import parse_device
from dfquant.errors import ConfigError
from dfquant.graph.modules import replace_module, state_dict_bytes
from dfquant.io.hf import is_hf_folder, load_hf, read_hf_config
from dfquant.io.load import load_quantized
from dfquant.zoo import build_architecture, load_from_source


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:

    tasks = parse_tasks(args.eval or "fidelity")
    check_limit(args.eval_limit)
    extra: dict[str, Any] = {"builder": args.builder} if args.builder else {}
    device = parse_device(args.device, "--device")
    if is_hf_folder(args.file):  # a Hugging Face folder: transformers builds it, dfquant's source the float model
        manifest = read_hf_config(args.file)["quantization_config"]
        if not isinstance(manifest.get("source"), dict):
            raise ConfigError(f"'{args.file}' does not say which float model it came from (no 'source')")
        hf = load_hf(args.file, device=device)
        loaded = load_from_source(manifest["source"], **extra)
        loaded.model.to(device)
        prefix = str(manifest.get("prefix", ""))
        qmodel = hf if not prefix else replace_module(copy.deepcopy(loaded.model), prefix, hf)
    else:
        qmodel, manifest = load_quantized(
            args.file,
            build=lambda src: build_architecture(src, **extra),
            cache_weight=args.cache_weights,
            device=device,
        )
        loaded = load_from_source(manifest.get("source", {}), **extra)
        loaded.model.to(device)
    check_tasks(tasks, loaded)
    progress = Progress(not (args.quiet or args.json))
    evals = evaluate_tasks(tasks, loaded, loaded.model, qmodel, progress, args.eval_limit)
    layers = manifest_layers(manifest)
    result = {
        "model": loaded.name,
        "method": manifest_method(manifest),
        "bits": manifest_bits(manifest),
        "bits_per_weight": manifest.get("report", {}).get("totals", {}).get("bits_per_weight"),
        "size_bytes": _size(Path(args.file)),
        "size_is_file": True,
        "float_size_bytes": state_dict_bytes(loaded.model),
        "eval": evals,
        "layers": layers,
        "device": str(device),
    }
    if not args.json:
        print_summary(result)
    return result


def _size(path: Path) -> int:
    """Bytes of a file, or of a folder's weight files."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    return path.stat().st_size


def add_command(sub: Any) -> None:
    """Register ``eval`` on the ``dfquant`` subparsers."""
    p = sub.add_parser("eval", help="evaluate a saved quantized model against its float model")
    p.add_argument("file", help="a dfquant .safetensors file or output folder, or a Hugging Face folder (--format hf)")
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
    add_device(p)
    add_common(p)
    p.set_defaults(func=cmd_eval)
