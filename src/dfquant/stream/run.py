"""Streaming quantization of a sharded checkpoint: plan, run the shards (serially, on a process pool or as Ray
tasks), resume after an interruption, and publish the output folder atomically.

Output folder (``OUT``): one output shard per input shard, under the input shard's file name, and
``model.safetensors.index.json``: ``{"metadata": {"total_size": N, "dfquant": MANIFEST}, "weight_map": {tensor:
shard}}``. ``MANIFEST`` is the JSON manifest of the single-file format (:mod:`dfquant.io.manifest`: format, version,
source, layers, tensors, aliases, report), so :func:`dfquant.io.load.load_quantized` reads the folder as it reads a
file, and the tensors carry the same names.

Work folder and resuming: the run works in ``.OUT.partial`` next to ``OUT``. It holds ``run.json`` (the
settings and the input's shard names, sizes and modification times), each finished shard and its completion
marker. A run that finds a work folder with the same ``run.json`` keeps the finished shards and does the others
(a shard is finished only when its marker exists and the shard has the size it records); with other settings
or another input it starts over. Only when every shard is finished does the driver write the index, remove the
markers and rename the work folder to ``OUT`` (an older output there is moved aside first and then deleted), so
``OUT`` is never half-written and never mixes shards of two runs.

Determinism: each shard's bytes depend only on its input tensors, the rules and the thread count
(``threads``, see :mod:`dfquant.stream.worker`); the index is written by the driver from the shards'
records in shard order. The serial run, a pool of any size and a Ray cluster write identical files.

Memory: a worker holds one input tensor and what is made from it at a time; ``N`` workers hold ``N``. The
summary states the peak resident memory of the driver and of the busiest worker (``getrusage``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfquant.config import QuantConfig, parse_device
from dfquant.errors import ConfigError, FileFormatError, InputError
from dfquant.io.atomic import write_atomic
from dfquant.io.manifest import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, library_version
from dfquant.pipeline.report import LayerReport, QuantizationReport, SkippedLayer
from dfquant.stream.plan import HFLayout, Plan, plan_checkpoint
from dfquant.stream.shards import INDEX_SUFFIX, Checkpoint, read_checkpoint
from dfquant.stream.worker import ShardJob, marker_path, peak_rss_bytes, process_shard

__all__ = ["OUTPUT_INDEX", "StreamResult", "quantize_sharded"]

OUTPUT_INDEX = "model.safetensors.index.json"
_RUN_FILE = "run.json"
#: ``progress(done, total, shard_name)`` after each finished shard.
Progress = Callable[[int, int, str], None]


@dataclass
class StreamResult:
    """What a streaming run did.

    Attributes:
        out: the output folder. report: the per-layer report (as :func:`dfquant.quantize_model` gives).
        manifest: the manifest stored in the index. shards: output shard names. resumed: shards kept from an
        earlier, interrupted run. params: floating-point parameters read. seconds: wall time of this run.
        peak_rss_driver / peak_rss_worker: peak resident memory (bytes) of this process and of the busiest
        worker process (the driver itself in a serial run). mode: ``serial``, ``pool`` or ``ray``.
        workers: worker processes. notes: facts the user should know.
    """

    out: Path
    report: QuantizationReport
    manifest: dict[str, Any]
    shards: list[str]
    resumed: list[str]
    params: int
    seconds: float
    peak_rss_driver: int
    peak_rss_worker: int
    mode: str
    workers: int
    notes: list[str] = field(default_factory=list)

    @property
    def params_per_second(self) -> float:
        return self.params / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the run."""
        return {
            "out": str(self.out),
            "mode": self.mode,
            "workers": self.workers,
            "shards": len(self.shards),
            "resumed_shards": len(self.resumed),
            "params": self.params,
            "seconds": self.seconds,
            "params_per_second": self.params_per_second,
            "peak_rss_driver_bytes": self.peak_rss_driver,
            "peak_rss_worker_bytes": self.peak_rss_worker,
            "bits_per_weight": self.report.bits_per_weight,
            "device": self.report.device,
            "size_bytes": sum(f.stat().st_size for f in self.out.iterdir()),
            "notes": list(self.notes),
        }


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _is_output(folder: Path) -> bool:
    """Whether ``folder`` is an output this module wrote (its index holds a dfquant manifest)."""
    try:
        data = json.loads((folder / OUTPUT_INDEX).read_text(encoding="utf-8"))
        return METADATA_KEY in data.get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, src: Path) -> None:
    if not out.parent.is_dir():
        raise ConfigError(f"output folder '{out.parent}' does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{out.parent}' is not writable")
    if out.resolve() == src.resolve():
        raise ConfigError(f"output '{out}' is the input folder")
    if out.exists() and not (out.is_dir() and (_is_output(out) or not any(out.iterdir()))):
        raise ConfigError(
            f"output '{out}' exists and is not an output of 'dfquant quantize' on a sharded folder; "
            "give a new folder name"
        )


def _prepare(work: Path, run: dict[str, Any], shard_names: list[str]) -> list[str]:
    """Create or reuse the work folder; returns the shards already finished by an earlier run."""
    ours = set(shard_names)
    if work.is_dir():
        try:
            same = json.loads((work / _RUN_FILE).read_text(encoding="utf-8")) == run
        except (OSError, ValueError):
            same = False
        for f in work.iterdir():  # leftovers of an interrupted shard, or everything of other settings
            known = f.name in ours or f.name.endswith((".done.json", ".tmp")) or f.name == _RUN_FILE
            if (f.name.startswith(".") or not same) and f.is_file() and known:
                f.unlink()
        if any(work.iterdir()) and not same:
            raise ConfigError(f"work folder '{work}' holds files this run did not write; remove it")
    work.mkdir(exist_ok=True)
    write_atomic(work / _RUN_FILE, json.dumps(run, sort_keys=True).encode("utf-8"))
    done = []
    for name in shard_names:
        try:
            rec = json.loads(marker_path(work, name).read_text(encoding="utf-8"))
            if (work / name).stat().st_size == rec["size"]:
                done.append(name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return done


def _run_pool(jobs: list[ShardJob], workers: int, progress: Progress | None, total: int, done0: int) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    out = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(process_shard, j) for j in jobs]
        try:
            for i, fut in enumerate(futures):
                out.append(fut.result())
                if progress is not None:
                    progress(done0 + i + 1, total, jobs[i].name)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out


def _run_ray(jobs: list[ShardJob], address: str, workers: int) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the 'ray' package: pip install 'dfquant[distributed]'") from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(process_shard)
        return list(ray.get([task.remote(j) for j in jobs]))
    finally:
        if started:
            ray.shutdown()


def _manifest(
    plan: Plan, records: dict[str, Any], layout: HFLayout | None, ckpt: Checkpoint, device: str
) -> tuple[dict[str, Any], dict[str, str], QuantizationReport]:
    layers: dict[str, Any] = {}
    reports: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    for s in ckpt.shards:
        rec = records[s.name]
        layers.update(rec["layers"])
        reports.update({r["name"]: r for r in rec["reports"]})
        tensors.update(rec["tensors"])
        weight_map.update(dict.fromkeys(rec["tensors"], s.name))
    for name in plan.layers:
        layers[name]["bias"] = plan.has_bias[name]
    aliases: dict[str, str] = {}
    for k, target in sorted(plan.ties.items()):
        head, thead = k.rpartition(".")[0], target.rpartition(".")[0]
        if thead not in layers:
            aliases[k] = target
            continue
        assert layout is not None  # ties come from a layout
        kind, args = layout.layer(head)
        tmeta = layers[thead]
        layers[head] = {**tmeta, "type": kind, "module": args, "bias": False}
        for key in tensors:
            if key.startswith(f"{thead}.terms."):
                aliases[f"{head}{key[len(thead) :]}"] = key
        reports[head] = {**reports[thead], "name": head, "type": "Linear", "tied_to": thead}
    order = [n for n in plan.layers] + [k.rpartition(".")[0] for k in sorted(plan.ties)]
    report = QuantizationReport(
        layers=[LayerReport(**reports[n]) for n in order if n in reports],
        skipped=[SkippedLayer(s["name"], "Tensor", tuple(s["shape"]), s["reason"]) for s in plan.skipped],
        graph_method="none",
        graph_note="streamed from tensor names: no BatchNorm folding or bias correction",
        device=device,
        total_params=sum(r["params"] for r in records.values()),
        float_model_bytes=sum(s.size for s in ckpt.shards),
        model_bytes=sum(r["size"] for r in records.values()),
    )
    return (
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "source": plan.source,
            "layers": {n: layers[n] for n in order if n in layers},
            "folded_bn": [],
            "tensors": dict(sorted(tensors.items())),
            "aliases": aliases,
            "report": report.to_dict(),
        },
        weight_map,
        report,
    )


def quantize_sharded(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: QuantConfig | None = None,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    threads: int = 1,
    device: str | torch.device | None = "cpu",
    progress: Progress | None = None,
) -> StreamResult:
    """Quantize a sharded ``.safetensors`` checkpoint tensor by tensor into the folder ``out``.

    Args:
        src: a folder with ``*.safetensors.index.json`` and its shards, or with ``.safetensors`` files.
        out: the output folder (created; an earlier output of this function there is replaced).
        config: the rules (see :mod:`dfquant.stream.plan` for how tensors become layers); default as
            :func:`dfquant.quantize_model`. BatchNorm folding and bias correction do not apply.
        workers: worker processes (1: in this process).
        ray_address: run the shards as Ray tasks on the cluster at this address, or on a local cluster of
            ``workers`` processes when ``"local"``; the work folder must be on a path every node sees.
        threads: intra-op threads per worker (the output bytes depend on it; keep it fixed to compare runs).
        device: where each weight is quantized (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see
            :func:`dfquant.config.parse_device`). Shards are read and written on the host either way, one tensor
            at a time, so the host's memory stays bounded as on the CPU.
        progress: called after each finished shard.

    Returns:
        The run's :class:`StreamResult`.

    Raises:
        ConfigError: bad rules (naming the layer), workers or output folder, before any tensor is read.
        InputError / FileFormatError: an unreadable checkpoint.
        ModelError: a ``config.json`` whose model does not fit the checkpoint's tensors.
    """
    start = time.perf_counter()
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    dev = parse_device(device)
    if dev.type != "cpu" and (workers > 1 or ray_address):
        raise ConfigError(f"device {dev} is driven by one process: use workers=1 without Ray (got {workers} workers)")
    src_p, out_p = Path(src), Path(out)
    ckpt = read_checkpoint(src_p)
    _check_out(out_p, src_p)
    layout = HFLayout(src_p) if (src_p / "config.json").is_file() else None
    plan = plan_checkpoint(ckpt, config, layout)
    if not plan.layers:
        raise InputError(f"'{src_p}' holds no tensor that a rule quantizes (2-D floating '*.weight' tensors)")
    names = [s.name for s in ckpt.shards]
    if OUTPUT_INDEX in names or any(n.endswith(INDEX_SUFFIX) for n in names):
        raise InputError(f"shard name clashes with the output index '{OUTPUT_INDEX}'")
    run = {
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "config": config.to_dict(),
        "input": ckpt.fingerprint(),
        "threads": threads,
        "device": str(dev),  # a device's codes may differ from another's at exact ties: no mixed resume
    }
    work = _work_dir(out_p)
    done = _prepare(work, run, names)
    jobs = [
        ShardJob(str(s.path), str(work), s.name, tuple(plan.tasks[s.name]), threads, str(dev))
        for s in ckpt.shards
        if s.name not in done
    ]
    records: dict[str, Any] = {}
    for name in done:
        records[name] = json.loads(marker_path(work, name).read_text(encoding="utf-8"))
    mode = "ray" if ray_address else ("pool" if workers > 1 and len(jobs) > 1 else "serial")
    if mode == "ray":
        new = _run_ray(jobs, str(ray_address), workers)
    elif mode == "pool":
        new = _run_pool(jobs, min(workers, len(jobs)), progress, len(names), len(done))
    else:
        new = []
        for i, job in enumerate(jobs):
            new.append(process_shard(job))
            if progress is not None:
                progress(len(done) + i + 1, len(names), job.name)
    for job, rec in zip(jobs, new, strict=True):
        records[job.name] = rec
    manifest, weight_map, report = _manifest(plan, records, layout, ckpt, str(dev))
    try:
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except ValueError as e:
        raise InputError(f"the manifest is not plain JSON: {e}") from None
    index = {
        "metadata": {"total_size": sum(records[n]["size"] for n in names), METADATA_KEY: text},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _publish(work, out_p, names, index)
    peak_workers = max([r["peak_rss"] for r in new], default=0) if mode != "serial" else peak_rss_bytes()
    return StreamResult(
        out=out_p,
        report=report,
        manifest=manifest,
        shards=names,
        resumed=done,
        params=sum(r["params"] for r in records.values()),
        seconds=time.perf_counter() - start,
        peak_rss_driver=peak_rss_bytes(),
        peak_rss_worker=peak_workers,
        mode=mode,
        workers=workers,
        notes=plan.notes,
    )


def _publish(work: Path, out: Path, names: list[str], index: dict[str, Any]) -> None:
    """Write the index, drop the bookkeeping, and rename the work folder to ``out`` (atomically)."""
    try:
        write_atomic(work / OUTPUT_INDEX, json.dumps(index, indent=1).encode("utf-8"))
        for name in names:
            marker_path(work, name).unlink()
        (work / _RUN_FILE).unlink()
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(work, out)
        if old is not None:
            shutil.rmtree(old)
    except OSError as e:
        raise FileFormatError(f"cannot publish the output '{out}': {e.strerror or e}") from None


def is_streamable(path: str | os.PathLike[str]) -> bool:
    """Whether the command line should stream ``path``: a folder with a safetensors index, or with
    ``.safetensors`` files and no ``config.json`` (no model to load whole)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if any(p.glob(f"*{INDEX_SUFFIX}")):
        return True
    return not (p / "config.json").is_file() and any(p.glob("*.safetensors"))
