"""``dfquant quantize FOLDER`` on a sharded ``.safetensors`` folder: the streaming path (:mod:`dfquant.stream`).

A folder holding ``*.safetensors.index.json`` (or ``.safetensors`` files and no ``config.json``) is quantized
tensor by tensor into the output folder ``--out`` (shards plus an index), with ``--workers N`` processes or on
a Ray cluster (``--ray ADDRESS``, or ``--ray local``). The summary states the throughput and the peak resident
memory. An interrupted run, started again with the same arguments, keeps the shards it had finished.
Evaluation runs afterwards on the output: ``dfquant eval OUTDIR --eval TASK``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dfquant.cli.common import Progress, build_config
from dfquant.config import parse_device
from dfquant.errors import ConfigError
from dfquant.stream import is_streamable, quantize_sharded


def wants_stream(args: argparse.Namespace) -> bool:
    """Whether ``quantize`` should stream ``args.model``."""

    if args.model is None or args.builder:
        return False
    return is_streamable(args.model)


def cmd_stream(args: argparse.Namespace) -> dict[str, Any]:

    if not args.out:
        raise ConfigError(f"streaming '{args.model}' needs --out OUTDIR (the output folder)")
    if getattr(args, "format", "dfquant") != "dfquant":
        raise ConfigError(f"streaming writes dfquant shards; --format {args.format} takes a model that fits in memory")
    if args.eval:
        raise ConfigError(f"streaming does not evaluate; run 'dfquant eval {args.out} --eval {args.eval}' afterwards")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    config = build_config(args)
    if config.budget is not None:
        raise ConfigError(
            "--budget measures each layer's sensitivity on the whole model's outputs: it needs the model in memory, "
            "not a sharded folder streamed tensor by tensor"
        )
    progress = Progress(not (args.quiet or args.json))

    def shard_done(done: int, total: int, name: str) -> None:
        progress._show(f"shards {done}/{total} {name}")

    result = quantize_sharded(
        Path(args.model),
        Path(args.out),
        config,
        workers=args.workers or 1,
        ray_address=args.ray,
        threads=args.threads or 1,
        device=parse_device(args.device, "--device"),
        progress=shard_done,
    )
    progress.done()
    summary = result.summary()
    out = {
        "model": str(args.model),
        "method": config.default.quantizer,
        "bits": config.default.bits,
        "granularity": config.default.granularity,
        "scale_dtype": config.default.scale_dtype,
        "streaming": summary,
        "report": result.report.to_dict(),
    }
    if not args.json:
        print(result.report.to_text())
        print()
        print(
            f"streamed {summary['params']:,} parameters in {summary['shards']} shard(s) "
            f"({summary['resumed_shards']} resumed) with {summary['mode']} x{summary['workers']}: "
            f"{summary['seconds']:.1f} s, {summary['params_per_second']:.3g} parameters/s"
        )
        print(
            f"peak resident memory: driver {summary['peak_rss_driver_bytes'] / 2**20:.0f} MiB, busiest worker "
            f"{summary['peak_rss_worker_bytes'] / 2**20:.0f} MiB"
        )
        print(
            f"wrote '{result.out}': {summary['size_bytes'] / 1e6:.2f} MB, {summary['bits_per_weight']:.3f} bits/weight"
        )
        for note in summary["notes"]:
            print(f"note: {note}")
    return out
