"""Rate-distortion of weight quantizers: relative weight MSE and SQNR against bits per weight, dfquant and peers.

For every model (ResNet-20/32, MiniLM, SmolLM2-135M, plus an i.i.d. Gaussian and Laplace tensor) and every
setting of :mod:`peers` (dfquant's rules at 2/3/4/8 bits, per group of 32/64/128 and per channel, float16
scales; REx with two terms; the peers' offered settings), the model's weights are quantized tensor by tensor and
aggregated:

* relative MSE ``sum ||W_hat - W||^2 / sum ||W||^2`` over the tensors, SQNR ``= -10 log10(rel MSE)`` dB;
* bits per weight ``= sum of stored bits / number of weights`` (codes + scales + zero points + code maps, at
  the dtype the library stores them; see :mod:`peers`). torchao stores its codes unpacked (one int8 each);
  ``nominal_bpw`` is its cost if they were packed.

A setting that cannot quantize one of a model's tensors is recorded (with the reason and the count) and has no
point for that model. The lower envelope of each side is ``min rel MSE over settings with bpw <= B``; the
verdict compares dfquant's envelope with the peers' (at their nominal cost, the comparison most favourable to
them) at budgets ``B = 2.5, 2.75, ..., 8``.

Large models are row-subsampled to about ``--max-params`` weights (evenly spaced output rows of every tensor:
every setting here fits whole rows or groups within rows, so each sees a subset of the groups it would form on
the full tensor).

Writes ``rate_distortion.json`` (every setting's row, with the command, versions, machine and date),
``rate_distortion.md`` (the verdict per model, the table ``benchmarks/README.md`` shows),
``rate_distortion_settings.md`` (every setting's row) and ``rd_<model>.png`` into ``--out``.

Usage:
    python benchmarks/rate_distortion.py [--out benchmarks/results] [--models cifar-resnet20,gaussian]
        [--max-params 400000] [--curves minmax,lloyd-max] [--no-peers] [--update]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REAL_MODELS, RESULTS, SYNTHETIC, load_weights, provenance, write_atomic, write_result
from peers import Setting, UnsupportedError, dfquant_settings, library_status, peer_settings

BUDGETS = [2.5 + 0.25 * i for i in range(23)]


def run_setting(setting: Setting, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Quantize every tensor with ``setting``; aggregate error and bits (or record why it could not)."""
    err = ref = 0.0
    bits = nominal = numel = 0
    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    for name, w in weights.items():
        try:
            r = setting.fn(w)
        except UnsupportedError as e:
            failures[name] = str(e)
            continue
        wf = w.to(torch.float32)
        err += float(((r.dequantized - wf) ** 2).sum(dtype=torch.float64))
        ref += float((wf * wf).sum(dtype=torch.float64))
        bits += r.bits
        nominal += r.nominal_bits
        numel += r.numel
    row: dict[str, Any] = {
        "library": setting.library,
        "method": setting.method,
        "bits": setting.bits,
        "granularity": setting.granularity,
        "note": setting.note,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if failures:
        first = next(iter(failures.items()))
        row["unsupported"] = {"tensors": len(failures), "of": len(weights), "example": f"{first[0]}: {first[1]}"}
        return row
    rel = err / ref
    row.update(
        rel_mse=rel,
        sqnr_db=-10 * math.log10(rel) if rel > 0 else math.inf,
        bpw=bits / numel,
        nominal_bpw=nominal / numel,
    )
    return row


def envelope(rows: list[dict[str, Any]], budget: float, key: str = "bpw") -> dict[str, Any] | None:
    """The row with the lowest rel MSE among those costing at most ``budget`` bits per weight."""
    ok = [r for r in rows if "rel_mse" in r and r[key] <= budget + 1e-9]
    return min(ok, key=lambda r: r["rel_mse"]) if ok else None


#: Relative MSE difference under which dfquant's and the peers' envelopes count as a tie.
TIE_RTOL = 1e-6

#: The outcomes of one budget, counted apart: a tie or a budget with no peer setting is never a win.
OUTCOMES = ("win", "tie", "loss", "no peer setting", "no dfquant setting")


def verdict(rows: list[dict[str, Any]], peer_cost: str = "nominal_bpw") -> list[dict[str, Any]]:
    """dfquant's envelope against the peers' at every budget, the peers at their nominal (packed) cost or, with
    ``peer_cost="bpw"``, at the cost they store. Each budget's ``outcome`` is one of :data:`OUTCOMES`: ``win``
    (dfquant's MSE lower by more than :data:`TIE_RTOL`), ``tie``, ``loss``, or a budget only one side reaches."""
    ours = [r for r in rows if r["library"] == "dfquant"]
    theirs = [r for r in rows if r["library"] != "dfquant"]
    out = []
    for b in BUDGETS:
        d = envelope(ours, b)
        p = envelope(theirs, b, peer_cost)
        if d is None and p is None:
            continue
        entry: dict[str, Any] = {"budget": b}
        if d is not None:
            entry["dfquant"] = {"label": _label(d), "rel_mse": d["rel_mse"], "bpw": d["bpw"]}
        if p is not None:
            entry["peer"] = {"label": _label(p), "rel_mse": p["rel_mse"], "bpw": p[peer_cost]}
        if d is not None and p is not None:
            a, b = d["rel_mse"], p["rel_mse"]
            if abs(a - b) <= TIE_RTOL * max(a, b):
                entry["outcome"] = "tie"
            else:
                entry["outcome"] = "win" if a < b else "loss"
            entry["mse_ratio_dfquant_over_peer"] = a / b if b > 0 else None
        else:  # only one side has a setting this cheap
            entry["outcome"] = "no peer setting" if p is None else "no dfquant setting"
        out.append(entry)
    return out


def count_outcomes(entries: list[dict[str, Any]]) -> str:
    """``"W wins, T ties, L losses, P budgets with no peer setting, D with no dfquant setting"``."""
    n = {o: sum(1 for v in entries if v["outcome"] == o) for o in OUTCOMES}
    return (
        f"{n['win']} wins, {n['tie']} ties, {n['loss']} losses, {n['no peer setting']} budgets with no peer "
        f"setting, {n['no dfquant setting']} with no dfquant setting"
    )


def _label(r: dict[str, Any]) -> str:
    return f"{r['method']} w{r['bits']} {r['granularity']}"


def plot(model: str, rows: list[dict[str, Any]], path: Path) -> None:
    """One curve per method (its own lower-left envelope), all points, and both sides' envelopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    methods = sorted({r["method"] for r in rows if "rel_mse" in r})
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        pts = sorted((r["bpw"], r["rel_mse"]) for r in rows if r["method"] == m and "rel_mse" in r)
        front, best = [], math.inf
        for x, y in pts:
            if y < best:
                front.append((x, y))
                best = y
        lib = next(r["library"] for r in rows if r["method"] == m)
        style = "-" if lib == "dfquant" else "--"
        mk = "o" if lib == "dfquant" else "s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, color=cmap(i % 20), ms=3, alpha=0.5)
        ax.plot([p[0] for p in front], [p[1] for p in front], style + mk, color=cmap(i % 20), ms=4, lw=1, label=m)
    for lib_side, color, name in (("dfquant", "black", "dfquant envelope"), ("peers", "red", "peers envelope")):
        side = [r for r in rows if "rel_mse" in r and (r["library"] == "dfquant") == (lib_side == "dfquant")]
        xs = sorted({r["bpw"] for r in side})
        ys = [envelope(side, x)["rel_mse"] for x in xs]  # type: ignore[index]
        ax.step(xs, ys, where="post", color=color, lw=2.2, alpha=0.7, label=name)
    ax.set_xscale("linear")
    ax.set_yscale("log")
    ax.set_xlim(1.8, 10)
    ax.set_xlabel("bits per weight (codes + scales + zero points + codebooks, as stored)")
    ax.set_ylabel("relative weight MSE  ||W_hat - W||^2 / ||W||^2")
    ax.set_title(f"{model}: weight rate-distortion (dashed/squares: peers; solid/circles: dfquant)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown(result: dict[str, Any]) -> str:
    """The verdict of every model: outcome counts, dfquant's and the peers' envelopes at each budget."""
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {result['machine']['cpu']}. "
        f"Peers: {', '.join(f'{k} {v}' for k, v in result['libraries'].items())}.",
        "",
    ]
    for model, entry in result["models"].items():
        info = entry["weights"]
        lines += [f"**{model}**: {info['params']:,} weights in {info['tensors']} tensors. {info.get('note', '')}"]
        if info.get("rows_per_tensor") not in (None, "all"):
            lines[-1] += (
                f" Row-subsampled: {info['rows_per_tensor']} evenly spaced rows per tensor "
                f"(of {info['params_full']:,} weights)."
            )
        earlier = [r for r in entry["rows"] if r.get("earlier_run")]
        if earlier:
            lines[-1] += (
                f" {len(earlier)} of {len(entry['rows'])} settings come from an earlier run merged by --update "
                "(marked earlier_run in the JSON)."
            )
        lines += [
            "",
            "Budgets 2.5 to 8 bits per weight; peers at their nominal (packed) cost: "
            f"{count_outcomes(entry['verdict'])}; at the cost they store (torchao keeps one int8 per code): "
            f"{count_outcomes(entry.get('verdict_stored_cost', []))}.",
            "",
            "| budget | outcome | dfquant best | bpw | rel MSE | peer best (nominal bpw) | rel MSE | dfquant / peer |",
            "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: |",
        ]
        for v in entry["verdict"]:
            d, p = v.get("dfquant"), v.get("peer")
            ratio = v.get("mse_ratio_dfquant_over_peer")
            lines.append(
                f"| {v['budget']:.2f} | {v['outcome']} | "
                + (f"{d['label']} | {d['bpw']:.3f} | {d['rel_mse']:.3e} | " if d else "- | - | - | ")
                + (f"{p['label']} ({p['bpw']:.3f}) | {p['rel_mse']:.3e} | " if p else "- | - | ")
                + ("-" if ratio is None else f"{ratio:.2f}x")
                + " |"
            )
        lines.append("")
    if result.get("not_offered"):
        lines += ["Settings the peers do not offer:", "", "| library | setting | reason |", "| --- | --- | --- |"]
        lines += [f"| {n['library']} | {n['setting']} | {n['reason']} |" for n in result["not_offered"]]
        lines.append("")
    return "\n".join(lines)


def settings_markdown(result: dict[str, Any]) -> str:
    """Every setting's row of every model: method, bits, granularity, stored and nominal bpw, rel MSE, SQNR."""
    lines = [f"# Weight rate-distortion, every setting\n\n`{result['command']}` ({result['date']})", ""]
    for model, entry in result["models"].items():
        lines += [f"## {model}", "", f"![{model}](rd_{model}.png)", ""]
        lines += ["| method | bits | granularity | bpw | nominal bpw | rel MSE | SQNR dB |", "|" + " --- |" * 7]
        for r in sorted(entry["rows"], key=lambda r: (r["library"] != "dfquant", r["method"], r["bits"])):
            if "rel_mse" in r:
                lines.append(
                    f"| {r['method']} | {r['bits']} | {r['granularity']} | {r['bpw']:.3f} | {r['nominal_bpw']:.3f} | "
                    f"{r['rel_mse']:.3e} | {r['sqnr_db']:.2f} |"
                )
            else:
                u = r["unsupported"]
                lines.append(
                    f"| {r['method']} | {r['bits']} | {r['granularity']} | - | - | "
                    f"unsupported on {u['tensors']}/{u['of']} tensors ({u['example'][:90]}) | - |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--models", default=",".join(REAL_MODELS + SYNTHETIC))
    ap.add_argument("--max-params", type=int, default=400_000)
    ap.add_argument("--curves", default="", help="dfquant curves to run (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--update",
        action="store_true",
        help="merge these settings into the existing rate_distortion.json in --out (the kept rows are marked "
        "earlier_run and the table says how many)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = dfquant_settings(args.curves.split(",") if args.curves else None)
    not_offered: list[dict[str, str]] = []
    if not args.no_peers:
        peer, not_offered = peer_settings()
        settings += peer
    previous = out / "rate_distortion.json"
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "libraries": library_status(),
        "not_offered": not_offered,
        "budgets": BUDGETS,
        "models": {},
    }
    if args.update and previous.exists():
        old = json.loads(previous.read_text(encoding="utf-8"))
        result["models"] = old.get("models", {})
        result["not_offered"] = old.get("not_offered", []) or not_offered
    for model in args.models.split(","):
        weights, info = load_weights(model, args.max_params)
        new_keys = {(s.library, s.method, s.bits, s.granularity) for s in settings}
        kept = result["models"].get(model, {}).get("rows", []) if args.update else []
        rows = [
            {**r, "earlier_run": True}
            for r in kept
            if (r["library"], r["method"], r["bits"], r["granularity"]) not in new_keys
        ]
        for s in settings:
            rows.append(run_setting(s, weights))
            r = rows[-1]
            shown = f"rel MSE {r['rel_mse']:.3e} bpw {r['bpw']:.3f}" if "rel_mse" in r else "unsupported"
            print(f"{model:>15} {s.label:<34} {shown} ({r['seconds']:.1f} s)", flush=True)
        result["models"][model] = {
            "weights": info,
            "rows": rows,
            "verdict": verdict(rows),
            "verdict_stored_cost": verdict(rows, "bpw"),
        }
        plot(model, rows, out / f"rd_{model}.png")
        write_result(out, "rate_distortion", result, markdown)
        write_atomic(out / "rate_distortion_settings.md", settings_markdown(result))
    return result


if __name__ == "__main__":
    main()
