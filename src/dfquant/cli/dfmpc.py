"""``dfquant quantize MODEL --method dfmpc``: data-free mixed-precision compensation from the command line.

``--low-bits`` (default 2) and ``--high-bits`` (default 6) set the two precisions; the low rule is ``ternary``
at 2 bits and ``mse`` otherwise (``--low-quantizer`` overrides it), the high rule ``minmax``
(``--high-quantizer``). Every layer outside a pair (stem, downsample, final layer) gets the high rule. The
report lists every pair with its ``c`` statistics and the whole model's bits per weight; ``--out`` writes an
ordinary quantized file (mixed precision is per-layer rules).
"""

from __future__ import annotations

import argparse
from typing import Any

from dfquant.cli.common import evaluate_tasks, parse_options, print_summary, start_quantize
from dfquant.config import DEFAULT_GRANULARITY, LayerRule, parse_device
from dfquant.errors import ConfigError
from dfquant.graph.modules import state_dict_bytes
from dfquant.io.save import save_quantized
from dfquant.methods.dfmpc import COEFFICIENT_RULES, STAT_RULES
from dfquant.pipeline.compensate import compensate_model
from dfquant.quantizers import quantizer_class
from dfquant.quantizers.granularity import Granularity

__all__ = ["add_dfmpc_arguments", "cmd_quantize_dfmpc"]

METHOD = "dfmpc"


def add_dfmpc_arguments(p: argparse.ArgumentParser) -> None:
    """The DF-MPC options of ``quantize`` (used only with ``--method dfmpc``)."""

    g = p.add_argument_group("DF-MPC (--method dfmpc)")
    g.add_argument("--low-bits", type=int, help="bits of the low layers of each pair (default 2)")
    g.add_argument("--high-bits", type=int, help="bits of every other layer (default 6)")
    g.add_argument("--low-quantizer", help="rule of the low layers (default ternary at 2 bits, else mse)")
    g.add_argument("--high-quantizer", help="rule of every other layer (default minmax)")
    g.add_argument(
        "--low-options",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="options of the low rule, e.g. weighting=input-variance for --low-quantizer lloyd-optimal",
    )
    g.add_argument("--lambda1", type=float, help="weight of the bias term of the DF-MPC loss (default 0.5)")
    g.add_argument("--lambda2", type=float, help="ridge weight of the DF-MPC loss (default 0)")
    g.add_argument(
        "--bn-stats",
        choices=STAT_RULES,
        help="data-free re-derivation of the low layers' BatchNorm statistics (default projection)",
    )
    g.add_argument(
        "--coefficient",
        choices=COEFFICIENT_RULES,
        help="per-channel coefficients: none (c = 1, the re-derived statistics alone; the default) or loss (the "
        "paper's closed-form minimum of the DF-MPC loss; the default when --lambda1 or --lambda2 is given)",
    )


def _rules(args: argparse.Namespace) -> tuple[Any, Any]:

    flags = (
        ("--bits", args.bits),
        ("--config", args.config),
        ("--expand", args.expand),
        ("--residual-method", args.residual_method),
        ("--budget", args.budget),
        ("--balance", args.balance or None),
        ("--budget-bits", args.budget_bits),
    )
    for flag, value in flags:
        if value is not None:
            raise ConfigError(f"--method dfmpc takes --low-bits/--high-bits and per-pair rules, not {flag}")
    if args.sparsity is not None or args.no_fold_bn:
        raise ConfigError("--method dfmpc folds BatchNorms and quantizes plainly: drop --sparsity / --no-fold-bn")
    low_bits = args.low_bits if args.low_bits is not None else 2
    high_bits = args.high_bits if args.high_bits is not None else 6
    low_q = args.low_quantizer or ("ternary" if low_bits == 2 else "mse")
    high_q = args.high_quantizer or "minmax"
    quantizer_class(low_q)
    quantizer_class(high_q)
    gran = Granularity.parse(args.granularity) if args.granularity else DEFAULT_GRANULARITY
    sdt = args.scale_dtype or "float32"
    if getattr(args, "options", None):
        raise ConfigError("--method dfmpc: give the low layers' rule options with --low-options, not --options")

    options = parse_options(args.low_options, "--low-options") if args.low_options else {}
    rotate = args.rotate or "none"  # both rules: every layer, low and high, rotated alike
    low = LayerRule(low_q, low_bits, gran, scale_dtype=sdt, options=options, rotate=rotate)
    return low, LayerRule(high_q, high_bits, gran, scale_dtype=sdt, rotate=rotate)


def cmd_quantize_dfmpc(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``quantize --method dfmpc``; returns the JSON-ready result."""

    if args.model is None:
        raise ConfigError("--method dfmpc needs a MODEL (for example cifar-resnet20)")
    low, high = _rules(args)
    lambdas = args.lambda1 is not None or args.lambda2 is not None
    if args.coefficient == "none" and lambdas:
        raise ConfigError("--lambda1/--lambda2 weight the DF-MPC loss: they apply to --coefficient loss, not none")
    # the lambdas only mean something for the loss coefficients: giving them selects those
    coefficient = args.coefficient or ("loss" if lambdas else "none")
    if parse_device(args.device, "--device").type != "cpu" and args.device != "auto":
        raise ConfigError(f"--method dfmpc runs on the CPU: use --device cpu or auto, not {args.device!r}")
    tasks, progress, loaded = start_quantize(args)
    qmodel, report, dreport = compensate_model(
        loaded.model,
        low=low,
        high=high,
        lambda1=args.lambda1 if args.lambda1 is not None else 0.5,
        lambda2=args.lambda2 if args.lambda2 is not None else 0.0,
        stats=args.bn_stats or "projection",
        bias_correction=not args.no_bias_correction,
        progress=progress.layers,
        coefficient=coefficient,
    )
    progress.done()
    evals = evaluate_tasks(tasks, loaded, loaded.model, qmodel, progress, args.eval_limit)
    size_bytes = None
    if args.out:
        size_bytes = save_quantized(qmodel, args.out, source=loaded.source, report=report).stat().st_size
    result = {
        "model": loaded.name,
        "method": METHOD,
        "bits": [low.bits, high.bits],
        "granularity": low.granularity,
        "bits_per_weight": report.bits_per_weight,
        "size_bytes": size_bytes if size_bytes is not None else report.model_bytes,
        "size_is_file": size_bytes is not None,
        "float_size_bytes": state_dict_bytes(loaded.model),
        "out": str(args.out) if args.out else None,
        "device": "cpu",
        "eval": evals,
        "dfmpc": dreport.to_dict(),
        "layers": report.to_dict()["layers"],
        "report": report.to_dict(),
    }
    if not args.json:
        print(report.to_text())
        print()
        print(dreport.to_text())
        print_summary(result)
    return result
