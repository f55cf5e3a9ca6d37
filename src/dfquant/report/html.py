"""``dfquant report``: a self-contained HTML page about a quantization result or a saved quantized model.

The input is either a JSON result printed by a ``--json`` command (``quantize``, ``eval``, ``analyze``, or any
result holding a ``points`` list for an accuracy-against-BOPs trade-off) or a dfquant ``.safetensors`` file. The
page holds, with no network access needed (inline CSS, inline JavaScript, plots as inline SVG):

* the summary (model, rule, sizes, bits per weight, evaluation figures, totals of the report);
* the per-layer table, sortable by clicking a column header;
* weight histograms with the quantization levels drawn over them for chosen layers. From a saved file the
  layers are decoded (``sum_k levels[code] * scale + offset`` over the terms, :mod:`dfquant.nn.layers`) and the levels
  shown are those of the layer's first group, ``levels * scale + offset``; from a JSON result, which holds no
  weights, the plot is the unit-variance density of the distribution fitted to the layer with the rule's unit
  levels for that source (:meth:`dfquant.quantizers.base.Quantizer.unit_levels`);
* predicted against measured relative error per layer: ``analyze`` results carry both; for a quantization
  report the prediction is the error model's ``sum_d f_d * E_d[(Q(X) - X)^2]`` over the fraction ``f_d`` of
  groups fitted with each unit-variance distribution ``d`` (:meth:`Quantizer.expected_mse`, the statistical
  tables of Lloyd 1982 / Max 1960 and the ACIQ clip of Banner et al. 2019 depending on the rule), raised to
  the power ``K`` for a residual expansion of order ``K`` (each order quantizes the previous residual again);
* accuracy against bit operations (BOPs) when the JSON holds ``points``.

Files are read with the loader's own checks (:mod:`dfquant.io.load`), never unpickled, and the page is written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfquant.errors import DfquantError, FileFormatError, InputError
from dfquant.io import load as io_load
from dfquant.io import manifest as io
from dfquant.io.atomic import write_atomic
from dfquant.io.manifest import read_manifest
from dfquant.pipeline.report import predicted_rel_mse
from dfquant.quantizers import quantizer_class

__all__ = ["build_page", "render_report", "write_atomic"]

MAX_HIST_LAYERS = 4
BX_KEYS = ("bops", "gbops", "bops_vs_float", "rel_bops", "bits_per_weight")
ACC_KEYS = ("value", "accuracy", "top1", "acc", "agreement", "spearman", "score", "metric")


# ------------------------------------------------------------------------------------------------------------
# Reading the input


def _read_input(path: Path) -> tuple[str, dict[str, Any]]:
    """``("file", manifest)`` for a dfquant file, ``("json", result)`` for a JSON result."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise FileFormatError(f"cannot read '{path}': {e.strerror or e}") from None
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise InputError(f"'{path}' is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise InputError(f"'{path}' holds a JSON {type(data).__name__}, not a dfquant result object")
        return "json", data

    return "file", read_manifest(path)


def _decode_layers(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """The quantized layers ``names`` of a dfquant file as modules, after the loader's checks."""
    from safetensors.torch import load_file

    header, _ = io.read_header(path)
    manifest = io.check_manifest(path, header)
    io.check_tensors(path, header, manifest)
    tensors = load_file(str(path))
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    sub = {"layers": {n: manifest["layers"][n] for n in names}}
    return io_load.build_quant_layers(path, sub, tensors, cache_weight=False)


def _predicted(layer: dict[str, Any]) -> float | None:
    """The error model's relative MSE for a report layer (None where the rule has no model)."""
    return predicted_rel_mse(layer)


def _unit_levels(layer: dict[str, Any], dist: str) -> list[float] | None:

    try:
        q = quantizer_class(layer["quantizer"])(layer["bits"], **dict(layer.get("options") or {}))
        lv = q.unit_levels(dist)
    except (NotImplementedError, DfquantError, KeyError, TypeError, ValueError):
        return None
    return None if lv is None else [float(v) for v in torch.as_tensor(lv).reshape(-1)]


def _dominant(dist: Any) -> str:
    if isinstance(dist, dict) and dist:
        best = max(dist, key=lambda d: dist[d] or 0)
        return best if best in ("gaussian", "laplace") else "gaussian"
    return dist if dist in ("gaussian", "laplace") else "gaussian"


# ------------------------------------------------------------------------------------------------------------
# Building the page content


def build_page(path: str | os.PathLike[str], layers: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain data: ``title``, ``summary`` (pairs), ``columns`` and ``rows`` of the
    layer table, ``histograms``, ``errors`` (layer, rule, predicted, measured) and ``points``.

    Raises:
        FileFormatError: an unreadable or invalid dfquant file.
        InputError: invalid JSON, or ``layers`` naming layers the input does not have.
    """
    p = Path(path)
    kind, data = _read_input(p)
    page: dict[str, Any] = {"title": f"dfquant report: {p.name}", "histograms": [], "errors": [], "points": []}
    summary: list[tuple[str, Any]] = []
    if kind == "file":
        summary += [("file", p.name), ("format version", data["format_version"]), ("source", data["source"])]
        summary += [("file size", f"{p.stat().st_size:,} bytes")]
        report: dict[str, Any] = data["report"] if isinstance(data.get("report"), dict) else {}
        rows = list(report.get("layers") or [])
        if not rows:
            rows = [_manifest_row(n, lay) for n, lay in data["layers"].items()]
    else:
        for key in ("model", "method", "bits", "granularity", "bits_per_weight", "size_bytes", "float_size_bytes"):
            if key in data and not isinstance(data[key], dict | list):
                summary.append((key, data[key]))
        for task, figs in (data.get("eval") or {}).items():
            if isinstance(figs, dict):
                f, q = figs.get("float") or {}, figs.get("quantized") or {}
                for k, v in q.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        summary.append((f"{task} {k}", f"{_fmt(f.get(k))} -> {_fmt(v)}"))
        report = data["report"] if isinstance(data.get("report"), dict) else {}
        rows = list(data.get("layers") or report.get("layers") or [])
        rows = [
            r if "terms" not in r or not isinstance(r["terms"], list) else _manifest_row(r["name"], r) for r in rows
        ]
    rows = [r for r in rows if isinstance(r, dict)]
    for k, v in (report.get("totals") or {}).items():
        if not isinstance(v, dict | list):
            summary.append((f"total {k}", v))
    for s in report.get("skipped") or []:
        summary.append((f"skipped {s.get('name') or '<root>'}", s.get("reason")))
    page["summary"] = summary

    if rows and "methods" in rows[0]:  # analyze: one measured / predicted pair per rule
        methods = list(rows[0]["methods"])
        page["columns"] = ["name", "shape", "dist", "ks_gaussian", "ks_laplace"] + [
            f"{m} {w}" for m in methods for w in ("rel_mse", "pred_rel_mse")
        ]
        page["rows"] = []
        for r in rows:
            cells = {c: r.get(c) for c in page["columns"][:5]}
            for m in methods:
                got = (r.get("methods") or {}).get(m) or {}
                cells[f"{m} rel_mse"], cells[f"{m} pred_rel_mse"] = got.get("rel_mse"), got.get("pred_rel_mse")
                page["errors"].append((r.get("name"), m, got.get("pred_rel_mse"), got.get("rel_mse")))
            page["rows"].append(cells)
    else:
        base = ["name", "type", "shape", "quantizer", "bits", "granularity", "terms", "params"]
        page["columns"] = [*base, "rel_mse", "predicted", "bits_per_weight", "bytes", "dist"]
        page["rows"] = []
        for r in rows:
            pred = _predicted(r) if "rel_mse" in r else None
            cells = {c: r.get(c) for c in page["columns"]}
            cells["predicted"] = pred
            if isinstance(r.get("dist"), dict):
                cells["dist"] = " ".join(f"{k} {v:.0%}" for k, v in r["dist"].items() if v)
            page["rows"].append(cells)
            if "rel_mse" in r:
                page["errors"].append((r.get("name"), r.get("quantizer"), pred, r.get("rel_mse")))

    names = [r.get("name") for r in rows]
    chosen = list(layers) if layers else [n for n in names if isinstance(n, str)][:MAX_HIST_LAYERS]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise InputError(f"--layers: no layer {', '.join(map(repr, unknown))} in '{p.name}'; layers: {names[:20]}")
    if kind == "file":
        page["histograms"] = _file_histograms(p, [n for n in chosen if n in data["layers"]])
    else:
        by_name = {r.get("name"): r for r in rows}
        page["histograms"] = [h for n in chosen if (h := _json_histogram(by_name[n])) is not None]
    for pt in data.get("points") or [] if kind == "json" else []:
        if isinstance(pt, dict):
            x = next((pt[k] for k in BX_KEYS if _num(pt.get(k))), None)
            y = next((pt[k] for k in ACC_KEYS if _num(pt.get(k))), None)
            xk = next((k for k in BX_KEYS if _num(pt.get(k))), "")
            yk = next((k for k in ACC_KEYS if _num(pt.get(k))), "")
            if yk == "value" and isinstance(pt.get("metric"), str):
                yk = pt["metric"]  # `dfquant tradeoff --json` names its headline metric beside the value
            if x is not None and y is not None:
                label = str(pt.get("label") or pt.get("name") or pt.get("config") or _tradeoff_label(pt))
                page["points"].append((float(x), float(y), label, xk, yk))
    return page


def _tradeoff_label(pt: dict[str, Any]) -> str:
    """``rex W2 K=3 s=0.5``-style label of a ``dfquant tradeoff`` point ("" when it has none of those keys)."""
    parts = [str(pt["kind"])] if isinstance(pt.get("kind"), str) else []
    if _num(pt.get("bits")):
        parts.append(f"W{pt['bits']}")
    if _num(pt.get("order")) and pt["order"] != 1:
        parts.append(f"K={pt['order']}")
    if _num(pt.get("sparsity")) and pt["sparsity"]:
        parts.append(f"s={pt['sparsity']}")
    return " ".join(parts)


def _manifest_row(name: str, layer: dict[str, Any]) -> dict[str, Any]:
    terms = [t for t in layer.get("terms") or [] if isinstance(t, dict)]
    first = terms[0] if terms else {}
    return {
        "name": name,
        "type": layer.get("type"),
        "shape": layer.get("weight_shape"),
        "quantizer": first.get("quantizer"),
        "bits": first.get("bits"),
        "granularity": first.get("granularity"),
        "terms": len(terms),
    }


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _file_histograms(path: Path, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name, mod in _decode_layers(path, names).items():
        w = mod.dequantize_weight().to(torch.float32).reshape(-1)
        t0 = mod.quant_terms[0]
        idx = t0.table_indices()
        lv = t0.levels if t0.levels.dim() == 1 else t0.levels[int(idx[0, 0]) if idx is not None else 0]
        s = float(t0.scale.reshape(-1)[0])
        o = float(t0.offset.reshape(-1)[0]) if t0.offset is not None else 0.0
        levels = sorted({float(v) * s + o for v in lv})
        note = (
            f"{w.numel():,} decoded weights; lines: the {len(levels)} levels of the first group of term 1 "
            f"({t0.quantizer} {t0.bits}-bit, scale {s:.4g}, offset {o:.4g})"
            + (f"; {len(mod.quant_terms)} terms summed" if len(mod.quant_terms) > 1 else "")
        )
        out.append({"layer": name, "values": w, "levels": levels, "note": note})
    return out


def _json_histogram(layer: dict[str, Any]) -> dict[str, Any] | None:
    if "quantizer" not in layer or "bits" not in layer:
        return None
    dist = _dominant(layer.get("dist"))
    levels = _unit_levels(layer, dist)
    if not levels:
        return None
    note = (
        f"unit-variance {dist} density (the fit of this layer) and the {layer['quantizer']} {layer['bits']}-bit levels"
    )
    return {"layer": layer.get("name"), "density": dist, "levels": levels, "note": note}


# ------------------------------------------------------------------------------------------------------------
# SVG plots

W, H, ML, MR, MT, MB = 560, 300, 62, 16, 30, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(min(int((hi - first) / step) + 1, 12))]


class _Axes:
    def __init__(self, x0: float, x1: float, y0: float, y1: float, logx: bool = False, logy: bool = False) -> None:
        self.logx, self.logy = logx, logy
        self.x0, self.x1 = self._t(x0, logx), self._t(x1, logx)
        self.y0, self.y1 = self._t(y0, logy), self._t(y1, logy)
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1

    @staticmethod
    def _t(v: float, log: bool) -> float:
        return math.log10(max(v, 1e-30)) if log else v

    def px(self, x: float) -> float:
        return ML + (self._t(x, self.logx) - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def py(self, y: float) -> float:
        return H - MB - (self._t(y, self.logy) - self.y0) / (self.y1 - self.y0) * (H - MT - MB)

    @staticmethod
    def _axis_ticks(lo: float, hi: float, log: bool) -> list[float]:
        if log and math.floor(hi) - math.ceil(lo) >= 1:
            return [float(d) for d in range(math.ceil(lo), math.floor(hi) + 1)]
        return _ticks(lo, hi)

    def frame(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        parts = [
            f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" class="frame"/>',
            f'<text x="{W / 2}" y="18" class="title">{html.escape(title)}</text>',
            f'<text x="{(W + ML) / 2}" y="{H - 8}" class="label">{html.escape(xlabel)}</text>',
            f'<text x="14" y="{(H - MB + MT) / 2}" class="label" transform="rotate(-90 14 {(H - MB + MT) / 2})">'
            f"{html.escape(ylabel)}</text>",
        ]
        for v in self._axis_ticks(self.x0, self.x1, self.logx):
            x = ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR)
            lab = f"{10**v:.3g}" if self.logx else f"{v:.3g}"
            parts.append(f'<text x="{x:.1f}" y="{H - MB + 15}" class="tick">{lab}</text>')
        for v in self._axis_ticks(self.y0, self.y1, self.logy):
            y = H - MB - (v - self.y0) / (self.y1 - self.y0) * (H - MT - MB)
            lab = f"{10**v:.3g}" if self.logy else f"{v:.3g}"
            parts.append(f'<text x="{ML - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">{lab}</text>')
        return parts


def _svg(parts: list[str], kind: str) -> str:
    body = "".join(parts)
    return f'<svg class="plot" data-plot="{kind}" viewBox="0 0 {W} {H}" width="{W}" height="{H}">{body}</svg>'


def svg_histogram(h: dict[str, Any]) -> str:
    """Histogram (or density) with the levels as vertical lines."""
    levels = h["levels"]
    if "values" in h:
        v = h["values"]
        lo, hi = float(v.min()), float(v.max())
        lo, hi = min(lo, *levels), max(hi, *levels)
        pad = (hi - lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
        counts = torch.histc(v, bins=80, min=lo, max=hi).tolist()
        edges = [lo + (hi - lo) * i / 80 for i in range(81)]
        ax = _Axes(lo, hi, 0, max(counts) * 1.08 or 1)
        parts = ax.frame(f"layer {h['layer']}", "weight value", "count")
        for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
            if c > 0:
                y = ax.py(c)
                parts.append(
                    f'<rect class="bar" x="{ax.px(a):.1f}" y="{y:.1f}" '
                    f'width="{max(ax.px(b) - ax.px(a) - 0.3, 0.5):.1f}" '
                    f'height="{ax.py(0) - y:.1f}"/>'
                )
    else:
        span = max(4.0, max(abs(x) for x in levels) * 1.15)
        xs = [-span + 2 * span * i / 200 for i in range(201)]
        pdf = [_pdf(h["density"], x) for x in xs]
        ax = _Axes(-span, span, 0, max(pdf) * 1.1)
        parts = ax.frame(f"layer {h['layer']}", "value / sigma", "density")
        pts = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y in zip(xs, pdf, strict=True))
        parts.append(f'<polyline class="curve" points="{pts}"/>')
    for lv in levels:
        parts.append(f'<line class="level" x1="{ax.px(lv):.1f}" x2="{ax.px(lv):.1f}" y1="{MT}" y2="{H - MB}"/>')
    return _svg(parts, "histogram")


def _pdf(dist: str, x: float) -> float:
    if dist == "laplace":  # unit variance: b = 1 / sqrt(2)
        b = 1 / math.sqrt(2)
        return math.exp(-abs(x) / b) / (2 * b)
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def svg_scatter(
    pts: list[tuple[float, float, str]], title: str, xlabel: str, ylabel: str, *, log: bool, diagonal: bool, line: bool
) -> str:
    """Points (with a tooltip each), optionally joined, with the ``y = x`` diagonal on request."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    if diagonal:
        lo_x = lo_y = min(lo_x, lo_y)
        hi_x = hi_y = max(hi_x, hi_y)
    if log:
        lo_x, hi_x, lo_y, hi_y = lo_x / 1.5, hi_x * 1.5, lo_y / 1.5, hi_y * 1.5
    else:
        dx, dy = (hi_x - lo_x) * 0.08 or 1.0, (hi_y - lo_y) * 0.08 or 0.05
        lo_x, hi_x, lo_y, hi_y = lo_x - dx, hi_x + dx, lo_y - dy, hi_y + dy
    ax = _Axes(lo_x, hi_x, lo_y, hi_y, log, log)
    parts = ax.frame(title, xlabel, ylabel)
    if diagonal:
        parts.append(
            f'<line class="diag" x1="{ax.px(lo_x):.1f}" y1="{ax.py(lo_x):.1f}" x2="{ax.px(hi_x):.1f}" '
            f'y2="{ax.py(hi_x):.1f}"/>'
        )
    if line and len(pts) > 1:
        order = sorted(pts)
        parts.append(
            '<polyline class="curve" points="' + " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y, _ in order) + '"/>'
        )
    for x, y, label in pts:
        parts.append(
            f'<circle class="pt" cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="4">'
            f"<title>{html.escape(label)}: {x:.4g}, {y:.4g}</title></circle>"
        )
    return _svg(parts, "scatter")


# ------------------------------------------------------------------------------------------------------------
# The page

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px} h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none} th.sorted-asc::after{content:" \\25B2"}
th.sorted-desc::after{content:" \\25BC"} td.text,th.text{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{font-size:12px;color:#555;max-width:560px}
.frame{fill:none;stroke:#999} .title{font-size:13px;text-anchor:middle} .label{font-size:12px;text-anchor:middle}
.tick{font-size:10px;text-anchor:middle;fill:#555} .bar{fill:#6a9fd4} .level{stroke:#d62728;stroke-width:1}
.curve{fill:none;stroke:#1f77b4;stroke-width:1.5} .pt{fill:#ff7f0e;stroke:#333} .diag{stroke:#888;stroke-dasharray:4 3}
"""

# Installed first, in its own script element: records errors of the page's own script (syntax errors included).
ERROR_TRAP = """
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message)); });
"""

SORT_JS = """
(function () {
  function key(td) {
    var v = td.getAttribute('data-v');
    var n = parseFloat(v);
    return (v !== '' && !isNaN(n) && isFinite(n)) ? [0, n] : [1, (v || '').toLowerCase()];
  }
  function cmp(a, b) { return a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0); }
  function sortBy(table, col, desc) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var c = cmp(key(r1.cells[col]), key(r2.cells[col]));
      return desc ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.classList.remove('sorted-asc', 'sorted-desc');
      if (i === col) { th.classList.add(desc ? 'sorted-desc' : 'sorted-asc'); }
    });
  }
  var table = document.getElementById('layers');
  if (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener('click', function () { sortBy(table, i, th.classList.contains('sorted-asc')); });
    });
  }
  window.dfquantSortBy = function (col, desc) { sortBy(table, col, desc); };
  document.body.setAttribute('data-ready', '1');
})();
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return "x".join(str(x) for x in v)
    return str(v)


def _cell(v: Any) -> str:
    raw = "" if v is None else (str(v) if isinstance(v, int | float) and not isinstance(v, bool) else _fmt(v))
    cls = "" if isinstance(v, int | float) and not isinstance(v, bool) else ' class="text"'
    return f'<td{cls} data-v="{html.escape(raw)}">{html.escape(_fmt(v))}</td>'


def render_report(path: str | os.PathLike[str], layers: Sequence[str] | None = None) -> tuple[str, dict[str, int]]:
    """The HTML page for ``path`` and counts of what it holds (``rows``, ``histograms``, ``plots``).

    Raises:
        FileFormatError, InputError: see :func:`build_page`.
    """
    page = build_page(path, layers)
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(page['title'])}</title><style>{CSS}</style>",
        f"<script>{ERROR_TRAP}</script></head><body>",
        f"<h1>{html.escape(page['title'])}</h1><h2>Summary</h2><table id='summary'><tbody>",
    ]
    for k, v in page["summary"]:
        shown = json.dumps(v) if isinstance(v, dict) else _fmt(v)
        out.append(f"<tr><th class='text'>{html.escape(str(k))}</th><td class='text'>{html.escape(shown)}</td></tr>")
    out.append("</tbody></table><h2>Layers</h2>")
    cols = page["columns"]
    out.append("<p>Click a column header to sort.</p><table id='layers'><thead><tr>")
    out += [f"<th>{html.escape(c)}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    for r in page["rows"]:
        out.append("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>")
    out.append("</tbody></table>")
    plots = 0
    if page["histograms"]:
        out.append("<h2>Weights and quantization levels</h2><div class='plots'>")
        for h in page["histograms"]:
            out.append(f"<figure>{svg_histogram(h)}<figcaption>{html.escape(h['note'])}</figcaption></figure>")
            plots += 1
        out.append("</div>")
    errs = [(f"{n} ({m})", p, q) for n, m, p, q in page["errors"] if _num(p) and _num(q) and p > 0 and q > 0]
    if errs:
        pts = [(p, q, label) for label, p, q in errs]
        out.append("<h2>Predicted against measured error</h2><div class='plots'><figure>")
        out.append(
            svg_scatter(
                pts,
                "relative MSE per layer",
                "predicted (error model)",
                "measured",
                log=True,
                diagonal=True,
                line=False,
            )
        )
        out.append(
            "<figcaption>One point per layer (and rule); dashed: predicted = measured.</figcaption></figure></div>"
        )
        plots += 1
    if page["points"]:
        xk, yk = page["points"][0][3], page["points"][0][4]
        pts = [(x, y, label) for x, y, label, _, _ in page["points"]]
        out.append("<h2>Accuracy against bit operations</h2><div class='plots'><figure>")
        out.append(svg_scatter(pts, "trade-off", xk, yk, log=False, diagonal=False, line=True))
        out.append("</figure></div>")
        plots += 1
    out.append(f"<script>{SORT_JS}</script></body></html>")
    return "".join(out), {"rows": len(page["rows"]), "histograms": len(page["histograms"]), "plots": plots}


# ------------------------------------------------------------------------------------------------------------
# Command line
