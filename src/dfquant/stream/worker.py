"""One shard's work: read its tensors one at a time, quantize the layer weights, write the output shard.

:func:`process_shard` is a plain function of plain data (a :class:`ShardJob`), so a process pool and a Ray
task run the very same code. It holds one input tensor (and what is made from it) at a time. The output shard
appears under its final name only when complete, and its completion marker (``NAME.done.json``: the layers'
manifest entries, the tensor table, the per-layer report) is written after it, so a shard with a marker is
finished and one without is redone from the start.

Each layer is quantized exactly as :func:`dfquant.quantize_model` quantizes a module's weight
(:func:`dfquant.pipeline.quantize.quantize_weight`: one term, or a residual expansion), stored with
:class:`~dfquant.nn.terms.QuantTerm` under the single-file format's names (``LAYER.terms.i.packed``, ``.scale``, ...).
Computation runs with a fixed number of intra-op threads (``threads``, default 1): float32 reductions give
the same bits for the same thread count, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dfquant.config import LayerRule
from dfquant.errors import DfquantError, InputError
from dfquant.io.atomic import write_atomic
from dfquant.nn.base import QUANT_MODULES
from dfquant.nn.terms import DTYPES, QuantTerm
from dfquant.pipeline.plan import LayerPlan
from dfquant.pipeline.quantize import (
    layer_balance,
    layer_rotation,
    quantize_weight,
    realized_sparsity,
    weight_bits_per_mac,
)
from dfquant.pipeline.report import LayerReport, dist_summary
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor
from dfquant.quantizers.registry import get_quantizer
from dfquant.stream.plan import ST_TO_TORCH, TYPE_NAMES, TensorTask
from dfquant.stream.shards import ShardWriter, open_shard, read_tensor

__all__ = ["ShardJob", "marker_path", "peak_rss_bytes", "process_shard"]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for one shard (picklable)."""

    input_path: str
    work_dir: str
    name: str
    tasks: tuple[TensorTask, ...]
    threads: int = 1
    #: Where each weight is quantized (``"cpu"``, ``"cuda:0"``): it is read on the host, copied there, and its
    #: codes and scales come back to the host to be written.
    device: str = "cpu"


def marker_path(work_dir: str | Path, name: str) -> Path:
    """The completion marker of output shard ``name``."""
    return Path(work_dir) / f"{name}.done.json"


def peak_rss_bytes() -> int:
    """This process's peak resident memory, in bytes (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _dtype_name(dt: str) -> str:
    for name, t in DTYPES.items():
        if t == ST_TO_TORCH[dt]:
            return name
    raise InputError(f"dtype {dt} is not a layer dtype")


#: Tensors with more elements are quantized in blocks of rows of about this many elements.
BLOCK_ELEMENTS = 1 << 22


def _blocked(
    quantizer: Quantizer, w: torch.Tensor, gran: Granularity, name: str, scale_dtype: str
) -> tuple[QTensor, float, float] | None:
    """Quantize ``w`` (oriented) in blocks of whole rows and join them, with ``(sum dW^2, sum W^2)``; None when
    the blocks cannot be joined (their level tables differ).

    With per-channel or per-group granularity along axis 0 every group lies inside one row and is fitted on
    its own values, so a block of rows gets the scales, offsets and codes the whole tensor would; only the
    blocks' shared level tables must agree (they do for fixed grids). Peak memory then scales with the block,
    not the tensor."""
    rows = w.shape[0]
    step = max(1, BLOCK_ELEMENTS // max(1, w[0].numel()))
    parts: list[QTensor] = []
    err = den = 0.0
    for r0 in range(0, rows, step):
        block = w[r0 : r0 + step]
        qt = quantizer.quantize(block, gran, name=name, scale_dtype=scale_dtype)
        if (
            qt.levels.dim() != 1
            or qt.table_index is not None
            or (parts and not torch.equal(qt.levels, parts[0].levels))
        ):
            return None
        ref = block.to(torch.float32)
        err += float(((qt.dequantize(torch.float32) - ref) ** 2).sum())
        den += float((ref * ref).sum())
        parts.append(qt)
    offsets = [p.offset for p in parts]
    offset = None
    if any(o is not None for o in offsets):
        offset = torch.cat(
            [o if o is not None else torch.zeros_like(p.scale) for o, p in zip(offsets, parts, strict=True)]
        )
    info = {k: torch.cat([p.info[k] for p in parts]) for k in parts[0].info if all(k in p.info for p in parts)}
    joined = replace(
        parts[0],
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        offset=offset,
        shape=tuple(w.shape),
        info=info,
    )
    return joined, err, den


def _quantize(task: TensorTask, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any], LayerReport]:

    rule = LayerRule.from_dict(task.rule)
    quantizer = get_quantizer(rule.quantizer, rule.bits, **dict(rule.options))
    gran = rule.granularity
    shape = tuple(int(s) for s in w.shape)
    plan = LayerPlan(task.layer, task.kind, TYPE_NAMES[task.kind], shape, rule, quantizer, gran)
    oriented = w.t().contiguous() if task.kind == "hf-conv1d" else w
    where = f"layer '{task.layer}' ({plan.type} {'x'.join(map(str, shape))})"
    blocked = None
    sparse = None
    balance = None
    try:
        if (
            rule.expand == 1
            and rule.outliers == 0
            and rule.rotate == "none"
            and not rule.stores_balance  # streaming has no graph: "absorbed" balances nothing
            and gran.kind != "tensor"
            and gran.axis == 0
            and oriented.numel() > BLOCK_ELEMENTS
        ):
            blocked = _blocked(quantizer, oriented, gran, task.layer, rule.scale_dtype)
        if blocked is not None:
            qt = blocked[0]
            terms = [QuantTerm.from_qtensor(qt, options=rule.options)]
        else:
            balance = layer_balance(plan, oriented)
            terms, qt, sparse = quantize_weight(plan, oriented, task.sparsity, balance=balance)
    except DfquantError as e:
        raise type(e)(f"{where}: {e}") from None
    dtype = DTYPES[_dtype_name(task.dtype)]
    qmod = QUANT_MODULES[task.kind]._from_args(dict(task.args), dtype, False)
    for t in terms:
        qmod.add_term(t)
    qmod.outliers = sparse
    qmod.rotation = layer_rotation(plan)
    qmod.balance = balance
    if blocked is not None:
        err, den = blocked[1], blocked[2]
    else:
        ref = oriented.to(torch.float32)
        den = float((ref * ref).sum())
        err = float(((qmod.dequantize_weight().to(torch.float32) - ref) ** 2).sum())
        del ref
    meta = qmod.layer_meta()
    tensors = {f"{task.layer}.{k}": v for k, v in qmod.state_dict().items() if k != "bias"}
    report = LayerReport(
        name=task.layer,
        type=plan.type,
        shape=shape,
        quantizer=quantizer.name,
        bits=quantizer.bits,
        granularity=str(gran),
        terms=len(terms),
        params=w.numel(),
        rel_mse=err / den if den > 0 else (0.0 if err == 0 else math.inf),
        bits_per_weight=qmod.bits_per_weight(),
        bytes=qmod.nbytes(),
        float_bytes=w.numel() * w.element_size(),
        dist=dist_summary(qt.info.get("dist")),
        options=dict(rule.options),
        order=rule.expand,
        sparsity=realized_sparsity(qmod, rule.expand),
        weight_bits_per_mac=weight_bits_per_mac(qmod),
        rotate=rule.rotate,
        balance=balance is not None,
    )
    return tensors, meta, report


def process_shard(job: ShardJob) -> dict[str, Any]:
    """Quantize and write one shard; returns its completion record (also written as its marker).

    Raises:
        DfquantError: a tensor that cannot be quantized (naming the layer), or an unwritable work folder.
    """
    torch.set_num_threads(max(1, job.threads))
    start = time.perf_counter()
    dest = Path(job.work_dir) / job.name
    writer = ShardWriter(dest, {"format": "pt"})
    layers: dict[str, Any] = {}
    reports: list[dict[str, Any]] = []
    params = 0
    try:
        with open_shard(Path(job.input_path)) as f:
            for task in job.tasks:
                t = read_tensor(f, task.key)
                if t.is_floating_point():
                    params += t.numel()
                if task.role == "weight":
                    tensors, meta, rep = _quantize(task, t.to(job.device))
                    layers[task.layer] = meta
                    reports.append(asdict(rep))
                    for k, v in tensors.items():
                        writer.add(k, v.cpu())
                    del tensors
                elif task.role == "bias":
                    writer.add(task.out, t.to(ST_TO_TORCH[task.dtype]))
                else:
                    writer.add(task.out, t)
                del t
        table = writer.table()
        size = writer.finish()
    except BaseException:
        writer.abort()
        raise
    record = {
        "shard": job.name,
        "size": size,
        "layers": layers,
        "tensors": table,
        "reports": reports,
        "params": params,
        "seconds": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "pid": os.getpid(),
    }
    marker = marker_path(job.work_dir, job.name)
    write_atomic(marker, json.dumps(record, allow_nan=True).encode("utf-8"))
    return record
