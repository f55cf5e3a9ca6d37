"""``dfquant inspect FILE``: print the manifest of a saved quantized model."""

from __future__ import annotations

import argparse
from typing import Any

from dfquant.cli.common import add_common
from dfquant.io.hf import is_hf_folder, read_hf_config
from dfquant.io.manifest import read_manifest


def manifest_layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    layers = manifest.get("layers", {})
    return [dict(v, name=k) for k, v in layers.items()] if isinstance(layers, dict) else list(layers)


def manifest_method(manifest: dict[str, Any]) -> str | None:
    names = {t.get("quantizer") for lay in manifest_layers(manifest) for t in lay.get("terms", [])}
    names.discard(None)
    return ",".join(sorted(str(n) for n in names)) or None


def manifest_bits(manifest: dict[str, Any]) -> int | list[int] | None:
    bits = sorted({int(t["bits"]) for lay in manifest_layers(manifest) for t in lay.get("terms", []) if "bits" in t})
    if not bits:
        return None
    return bits[0] if len(bits) == 1 else bits


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    import json

    manifest = read_hf_config(args.file)["quantization_config"] if is_hf_folder(args.file) else read_manifest(args.file)
    if not args.json:
        print(json.dumps(manifest, indent=2))
    return manifest


def add_command(sub: Any) -> None:
    """Register ``inspect`` on the ``dfquant`` subparsers."""
    p = sub.add_parser("inspect", help="print the manifest of a saved quantized model")
    p.add_argument("file")
    add_common(p)
    p.set_defaults(func=cmd_inspect)
