"""``dfquant quantize [MODEL]``: quantize a model, report per layer, evaluate, write the file.

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
from typing import Any

from dfquant.cli.common import (
    DEFAULT_BITS,
    DEFAULT_EVALS,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    DEFAULT_RUN_GRANULARITY,
    add_common,
    add_device,
    build_config,
    evaluate_tasks,
    print_cost,
    print_summary,
    start_quantize,
)
from dfquant.cli.dfmpc import add_dfmpc_arguments, cmd_quantize_dfmpc
from dfquant.cli.stream import cmd_stream, wants_stream
from dfquant.config import parse_device
from dfquant.eval.fidelity import fidelity_probe
from dfquant.graph.modules import state_dict_bytes
from dfquant.io.gguf_out import save_gguf
from dfquant.io.hf import save_hf
from dfquant.io.save import save_quantized
from dfquant.pipeline.quantize import quantize_model
from dfquant.report.cost import model_cost


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:

    if args.method == "dfmpc":
        return cmd_quantize_dfmpc(args)

    if wants_stream(args):  # a sharded .safetensors folder: quantized tensor by tensor into --out
        return cmd_stream(args)
    default_run = args.model is None
    if default_run:
        args.model = DEFAULT_MODEL
        args.granularity = args.granularity or DEFAULT_RUN_GRANULARITY
        args.eval = args.eval if args.eval is not None else DEFAULT_EVALS
    config = build_config(args)
    device = parse_device(args.device, "--device")
    tasks, progress, loaded = start_quantize(args)
    loaded.model.to(device)  # the float reference runs where the quantized model does
    probe = fidelity_probe(loaded) if config.budget is not None else None
    qmodel, report = quantize_model(loaded.model, config, progress=progress.layers, device=device, probe=probe)
    progress.done()
    float_bytes = state_dict_bytes(loaded.model)
    evals = evaluate_tasks(tasks, loaded, loaded.model, qmodel, progress, args.eval_limit)
    cost = model_cost(loaded, report)
    size_bytes = None
    if args.out and args.format == "gguf":  # llama.cpp's format, each layer in its exact type (or refused)
        size_bytes = save_gguf(qmodel, args.out, loaded.source, name=str(args.model)).stat().st_size
    elif args.out and args.format == "hf":  # a folder that from_pretrained loads, written last and atomically
        folder = save_hf(qmodel, args.out, tokenizer=loaded.tokenizer, source=loaded.source)
        size_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    elif args.out:  # written last: a command that fails leaves no file
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
        "device": report.device,
    }
    if not args.json:
        print(report.to_text())
        print_summary(result)
        if args.expand is not None or getattr(args, "act_bits", None) is not None:
            print_cost(cost, config.default.bits)
    return result


def add_command(sub: Any) -> None:
    """Register ``quantize`` on the ``dfquant`` subparsers."""

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
    p.add_argument(
        "--rotate",
        metavar="none|hadamard[:BLOCK]",
        help="quantize W R^T for a random block Walsh-Hadamard R along each layer's fan-in (blocks of BLOCK, "
        "default 64) and decode Q R: heavy-tailed rows become near Gaussian (default none)",
    )
    p.add_argument(
        "--balance",
        nargs="?",
        const="true",
        choices=("true", "absorbed", "stored"),
        metavar="absorbed|stored",
        help="quantize W diag(1/c) for a per-column scale c from Sinkhorn-style row/column normalization (SINQ) "
        "and decode Q diag(c). Where a layer is the only reader of a BatchNorm (and ReLU) output, c moves into "
        "that BatchNorm (no bits); elsewhere it is stored in float16 (16 bits per fan-in column). 'absorbed': "
        "balance only the layers whose c can move; 'stored': store every c",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="B",
        help="stored bits per weight (scales counted) for the data-free bit allocation: each layer takes the bits "
        "(and, with --rotate, the rotation on or off) that minimize the predicted output error; the plan is printed",
    )
    p.add_argument(
        "--budget-bits",
        metavar="B1,B2,...",
        help="the bit widths a layer may take under --budget (default 2,3,4,5,6,8)",
    )
    p.add_argument("--config", help="JSON file with per-layer rules (see dfquant.config.QuantConfig)")
    p.add_argument("--eval", help="comma-separated tasks: cifar10, stsb, wikitext2, fidelity, pairs")
    p.add_argument("--eval-limit", type=int, help="evaluate on fewer items (windows, pairs, images) for a quick look")
    p.add_argument("--out", help="write the quantized model to this .safetensors file (--format hf: this folder)")
    p.add_argument(
        "--format",
        choices=("dfquant", "hf", "gguf"),
        default="dfquant",
        help="--out as one dfquant .safetensors file (default); a Hugging Face folder that transformers' "
        "from_pretrained loads (config.json with quantization_config, tokenizer, weights); or a GGUF file for "
        "llama.cpp (LLaMA models loaded from GGUF; settings with an exact GGUF type only: Q4_0, Q4_1, Q5_0, Q5_1, "
        "Q8_0, IQ4_NL in groups of 32 with float16 scales)",
    )
    p.add_argument("--checkpoint", help="weights file for zoo models that take one (cifar-resnet*)")
    p.add_argument("--builder", help="module:callable building the architecture of a .safetensors state dict")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers separate")
    p.add_argument("--no-bias-correction", action="store_true", help="skip data-free bias correction")
    p.add_argument("--strict", action="store_true", help="fail instead of warning when a layer stays float")
    p.add_argument("--workers", type=int, help="sharded folder: worker processes (default 1)")
    p.add_argument("--ray", metavar="ADDRESS", help="sharded folder: run shards on this Ray cluster, or 'local'")
    p.add_argument("--threads", type=int, help="sharded folder: threads per worker (default 1; fixes the bytes)")

    add_dfmpc_arguments(p)
    add_device(p)
    add_common(p)
    p.set_defaults(func=cmd_quantize)
