"""Walking a model: quantizable layers, conv->BatchNorm pairs, BatchNorm->ReLU->layer chains, module swaps,
and the :class:`QuantizationReport` that :func:`dfquant.api.quantize_model` returns.

Graph facts come from ``torch.fx`` symbolic tracing when the model traces (quantizable layers and BatchNorms
are kept as leaves, so the graph shows which module feeds which); otherwise from the order in which modules
are registered, accepting only patterns whose checks pass (consecutive siblings under the same parent with
matching channel counts). :attr:`GraphInfo.method` says which was used, and why tracing failed. Nothing here
computes a scale or touches a weight's values.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import ModelError
from .methods.bn import MomentOp
from .nn import QuantModule, layer_kind, oriented_weight

__all__ = [
    "BiasCorrectionRecord",
    "FoldedBN",
    "FoldedBatchNorm",
    "GraphInfo",
    "LayerInfo",
    "LayerReport",
    "QuantizationReport",
    "SkippedLayer",
    "analyze_graph",
    "find_layers",
    "find_unsupported",
    "get_module",
    "module_names",
    "replace_module",
    "state_dict_bytes",
]

_BN = nn.modules.batchnorm._BatchNorm
_TRANSPARENT = (nn.Dropout, nn.Identity)
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)


class FoldedBatchNorm(nn.Identity):
    """What a BatchNorm becomes once folded into ``layer`` (an ``nn.Identity`` that remembers where it
    went)."""

    def __init__(self, layer: str = "") -> None:
        super().__init__()
        self.layer = layer

    def extra_repr(self) -> str:
        return f"folded into '{self.layer}'"


# ------------------------------------------------------------------------------------------------------------
# Finding and swapping modules


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: qualified name (``""`` for the root), module and kind (see :func:`layer_kind`)."""

    name: str
    module: nn.Module
    kind: str


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear, Conv1d, Conv2d (grouped and depthwise included), Hugging Face ``Conv1D`` and Embedding
    (without ``max_norm``) in registration order. A module registered under several names is listed once (its
    first name); distinct modules that share one weight tensor (tied weights) are each listed."""
    out = []
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is not None:
            out.append(LayerInfo(name, m, kind))
    return out


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of each module, by ``id`` (a module registered at several places has several)."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def find_unsupported(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules that directly own floating parameters of two or more dimensions but are not quantizable here
    (embedding bags, embeddings with ``max_norm``, transposed or 3-D convolutions, the packed input projection
    of ``nn.MultiheadAttention``, ...), with those parameters' names: they stay float, and the report lists
    them."""
    out = []
    for name, m in model.named_modules():
        if layer_kind(m) is not None or isinstance(m, QuantModule):
            continue
        params = [k for k, p in m._parameters.items() if p is not None and p.is_floating_point() and p.dim() >= 2]
        if params:
            out.append((name, m, params))
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself).

    Raises:
        ModelError: no such submodule.
    """
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"the model has no submodule '{name}'") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name``; returns the root (``new`` itself when ``name == ""``).

    Raises:
        ModelError: no such submodule.
    """
    if name == "":
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = get_module(model, parent_name)
    if attr not in parent._modules:
        raise ModelError(f"the model has no submodule '{name}'")
    setattr(parent, attr, new)
    return model


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers; shared tensors counted once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.element_size(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------------------
# Graph facts


@dataclass
class GraphInfo:
    """What the graph says about BatchNorms.

    Attributes:
        method: ``"fx"`` (symbolic tracing), ``"module-order"`` (registration order, checked) or ``"none"``
            (no BatchNorm in the model, nothing to find).
        note: why tracing was not used, when it was not.
        bn_pairs: ``(layer, batchnorm)`` names where the BatchNorm directly and only follows the layer.
        input_bn: layer name -> ``(batchnorm, activation)`` when the layer's input is ``activation(BN(...))``
            (activation ``"relu"`` or ``"none"``).
        moment_program: the steps from BatchNorm outputs to layer inputs through ReLUs, sums, zero channel
            padding, spatial slicing and averaging (fx only), for
            :func:`dfquant.methods.bn.propagate_moments`.
        input_moments: layer name -> ``(value, source, activation)``: the program's value that is the layer's
            input, the BatchNorms and propagated tensors it sums (e.g. ``"layer1.1.bn2 + layer1.0.relu2"``),
            and the ops after the sum (``"relu"``, ``"relu, mean"``, ``"none"``).
    """

    method: str
    note: str = ""
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    input_bn: dict[str, tuple[str, str]] = field(default_factory=dict)
    moment_program: list[MomentOp] = field(default_factory=list)
    input_moments: dict[str, tuple[str, str, str]] = field(default_factory=dict)


class _LeafTracer(fx.Tracer):
    """Keeps quantizable layers and BatchNorms as leaf calls so the graph names them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_kind(m) is not None or isinstance(m, (_BN, QuantModule)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _out_features(m: nn.Module) -> int | None:
    kind = layer_kind(m)
    return None if kind is None else int(oriented_weight(m).shape[0])


def _in_features(m: nn.Module) -> int | None:
    kind = layer_kind(m)
    if kind is None:
        return None
    groups = int(cast(nn.Conv2d, m).groups) if kind in ("conv1d", "conv2d") else 1
    return int(oriented_weight(m).shape[1]) * groups


def _bn_fits(layer: nn.Module, bn: nn.Module, side: str) -> bool:
    """Whether ``bn`` has running statistics and fits ``layer``'s output (side="out") or input (side="in")."""
    if not isinstance(bn, _BN) or bn.running_mean is None or bn.running_var is None:
        return False
    kind = layer_kind(layer)
    if kind == "conv2d":
        dims_ok = isinstance(bn, nn.BatchNorm2d)
    elif kind in ("conv1d", "linear"):
        dims_ok = isinstance(bn, nn.BatchNorm1d)
    else:
        dims_ok = side == "in" and isinstance(bn, nn.BatchNorm1d)
    n = _out_features(layer) if side == "out" else _in_features(layer)
    return dims_ok and n == bn.num_features


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _analyze_fx(model: nn.Module) -> GraphInfo:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    info = GraphInfo("fx")

    def single_module_call(node: object) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module" and calls[str(node.target)] == 1:
            return modules.get(str(node.target))
        return None

    for node in graph.nodes:
        mod = single_module_call(node)
        if mod is None or not node.args:
            continue
        src = node.args[0]
        if isinstance(mod, _BN) and len(node.args) == 1 and not node.kwargs:
            layer = single_module_call(src)
            if isinstance(src, fx.Node) and layer is not None and len(src.users) == 1 and _bn_fits(layer, mod, "out"):
                info.bn_pairs.append((str(src.target), str(node.target)))
        elif layer_kind(mod) is not None and isinstance(src, fx.Node):
            cur: Any = src
            while isinstance(single_module_call(cur), _TRANSPARENT) and cur.args:
                cur = cur.args[0]
            act = "none"
            if isinstance(cur, fx.Node) and _is_relu(cur, modules) and cur.args:
                act, cur = "relu", cur.args[0]
            bn = single_module_call(cur)
            if isinstance(bn, _BN) and _bn_fits(mod, bn, "in"):
                info.input_bn[str(node.target)] = (str(cur.target), act)
    info.moment_program, info.input_moments = _moment_program(graph, modules, calls)
    return info


@dataclass(frozen=True)
class _Value:
    """What the moment program knows of a value: channels, rank (None: BatchNorm1d's ``(N, C)`` or
    ``(N, C, L)``), whether its spatial extent is 1, its source label, the ops applied after the source, and
    the name a sum cites it by (the BatchNorm, or the module or node of the last ReLU)."""

    channels: int
    ndim: int | None
    spatial_one: bool
    source: str
    ops: tuple[str, ...] = ()
    ref: str = ""


_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _const_ints(x: object) -> tuple[int, ...] | None:
    if isinstance(x, int) and not isinstance(x, bool):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        return tuple(x)
    return None


def _arg(node: fx.Node, i: int, key: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _moment_step(
    node: fx.Node, modules: dict[str, nn.Module], vals: dict[str, _Value]
) -> tuple[MomentOp, _Value] | None:
    """The moment op computing ``node`` from known values, and what is known of its result; None if none."""
    src = node.args[0] if node.args else None
    x = vals.get(src.name) if isinstance(src, fx.Node) else None
    name = node.name

    def step(op: str, value: _Value, **kw: Any) -> tuple[MomentOp, _Value]:
        assert isinstance(src, fx.Node)
        return MomentOp(name, op, (src.name,), **kw), value

    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, _BN) and mod.running_mean is not None and len(node.args) == 1:
            ndim = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(type(mod))
            value = _Value(mod.num_features, ndim, False, str(node.target), ref=str(node.target))
            return MomentOp(name, "batchnorm", source=str(node.target)), value
        if x is None:
            return None
        if isinstance(mod, nn.ReLU):
            return step("relu", replace(x, ops=(*x.ops, "relu"), ref=str(node.target)))
        if isinstance(mod, _TRANSPARENT):
            return step("identity", x)
        if isinstance(mod, _POOLS) and set(_const_ints(mod.output_size) or ()) == {1}:
            return step("mean", replace(x, spatial_one=True, ops=(*x.ops, "mean")))
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1 and x.spatial_one:
            return step("identity", replace(x, ndim=2))
        return None
    if x is None:
        return None
    target = node.target
    is_relu = (node.op == "call_function" and target in _RELU_FUNCS) or (
        node.op == "call_method" and target in ("relu", "relu_")
    )
    if is_relu:
        return step("relu", replace(x, ops=(*x.ops, "relu"), ref=name))
    if (node.op == "call_function" and target in _ADD_FUNCS) or (
        node.op == "call_method" and target in ("add", "add_")
    ):
        other = node.args[1] if len(node.args) == 2 else None
        y = vals.get(other.name) if isinstance(other, fx.Node) else None
        if y is None or node.kwargs or y.channels != x.channels or x.ndim != y.ndim:
            return None
        assert isinstance(src, fx.Node) and isinstance(other, fx.Node)
        value = _Value(x.channels, x.ndim, x.spatial_one and y.spatial_one, f"{x.ref} + {y.ref}", ref=name)
        return MomentOp(name, "add", (src.name, other.name)), value
    if node.op == "call_function" and target is operator.getitem and x.ndim is not None:
        idx = node.args[1]
        full = slice(None, None, None)
        if (
            isinstance(idx, tuple)
            and 2 <= len(idx) <= x.ndim
            and idx[0] == full
            and idx[1] == full
            and all(isinstance(i, slice) for i in idx)
        ):
            return step("identity", x)
        return None
    if node.op == "call_function" and target is F.pad and x.ndim is not None:
        pad = _const_ints(_arg(node, 1, "pad"))
        mode, fill = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        if pad is None or len(pad) != 2 * (x.ndim - 1) or mode != "constant" or fill not in (None, 0, 0.0):
            return None
        before, after = pad[-2], pad[-1]
        if any(pad[:-2]) or before < 0 or after < 0:
            return None
        return step("pad", replace(x, channels=x.channels + before + after), pad=(before, after))
    if node.op == "call_method" and target == "mean" and x.ndim is not None:
        dims = _const_ints(_arg(node, 1, "dim"))
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None or {d % x.ndim for d in dims} != set(range(2, x.ndim)):
            return None
        return step("mean", replace(x, ndim=x.ndim if keep else 2, spatial_one=True, ops=(*x.ops, "mean")))
    is_flatten = (node.op == "call_function" and target is torch.flatten) or (
        node.op == "call_method" and target == "flatten"
    )
    flat_all = _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    if is_flatten and x.spatial_one and flat_all:
        return step("identity", replace(x, ndim=2))
    return None


def _moment_program(
    graph: fx.Graph, modules: dict[str, nn.Module], calls: Counter[str]
) -> tuple[list[MomentOp], dict[str, tuple[str, str, str]]]:
    """The moment program of a traced graph and the value each quantizable layer reads (see
    :class:`GraphInfo`). A layer qualifies when it is called once and its input's channel count and rank fit
    it (Conv2d: a 4-D value; Linear and Conv1D: ``(N, C)``)."""
    program: list[MomentOp] = []
    vals: dict[str, _Value] = {}
    inputs: dict[str, tuple[str, str, str]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and calls[str(node.target)] == 1:
            layer = modules.get(str(node.target))
            kind = layer_kind(layer) if layer is not None else None
            src = node.args[0] if node.args else None
            x = vals.get(src.name) if isinstance(src, fx.Node) else None
            if kind is not None and layer is not None and x is not None and isinstance(src, fx.Node):
                ranks = {"conv2d": (4,), "conv1d": (3, None)}.get(kind, (2, None))
                if x.ndim in ranks and x.channels == _in_features(layer):
                    inputs[str(node.target)] = (src.name, x.source, ", ".join(x.ops) or "none")
        found = _moment_step(node, modules, vals)
        if found is not None:
            program.append(found[0])
            vals[node.name] = found[1]
    return program, inputs


def _analyze_order(model: nn.Module, note: str) -> GraphInfo:
    info = GraphInfo("module-order", note)
    leaves = [(n, m) for n, m in model.named_modules() if not m._modules and n]

    def parent(n: str) -> str:
        return n.rpartition(".")[0]

    for i, (name, m) in enumerate(leaves):
        nxt = leaves[i + 1] if i + 1 < len(leaves) else None
        kind = layer_kind(m)
        if nxt is not None and kind is not None and parent(nxt[0]) == parent(name) and _bn_fits(m, nxt[1], "out"):
            info.bn_pairs.append((name, nxt[0]))
        # BN -> ReLU module -> layer, all siblings; a BN right before a layer is ambiguous (a functional
        # activation may sit between them), so it is not taken without a graph.
        if i + 2 < len(leaves) and isinstance(m, _BN):
            (rn, relu), (ln, layer) = leaves[i + 1], leaves[i + 2]
            same = parent(rn) == parent(name) == parent(ln)
            if same and isinstance(relu, nn.ReLU) and layer_kind(layer) is not None and _bn_fits(layer, m, "in"):
                info.input_bn[ln] = (name, "relu")
    return info


def analyze_graph(model: nn.Module) -> GraphInfo:
    """Find conv/linear -> BatchNorm pairs and BatchNorm -> (ReLU) -> layer chains.

    Uses ``torch.fx`` symbolic tracing, and falls back to module registration order when tracing fails. A pair
    needs the BatchNorm to be the only consumer of the layer's output, both called once, and matching channel
    counts and dimensions (Conv2d-BatchNorm2d, Conv1d/Linear-BatchNorm1d); a Linear-BatchNorm1d pair assumes
    ``(N, C)`` inputs, which a graph without shapes cannot check.

    Returns:
        A :class:`GraphInfo`; ``method == "none"`` when the model has no BatchNorm.
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return GraphInfo("none", "the model has no BatchNorm")
    try:
        return _analyze_fx(model)
    except Exception as e:  # tracing fails in many ways (control flow, unsupported ops): fall back, say why
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return _analyze_order(model, f"torch.fx tracing failed ({type(e).__name__}: {first})")


# ------------------------------------------------------------------------------------------------------------
# Report

DIST_NAMES = {0: "gaussian", 1: "laplace", 2: "empirical"}


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        name: qualified name. type: the float layer's class name. shape: its weight shape (as stored).
        quantizer, bits, granularity, options: the rule applied. terms: number of quantized terms.
        params: weights quantized. rel_mse: measured ``||W_hat - W||^2 / ||W||^2`` (W after BatchNorm
            folding).
        bits_per_weight: storage bits of the terms (codes, scales, offsets, fitted levels) per weight.
        bytes: bytes the terms occupy in a file. float_bytes: bytes of the float weight.
        dist: fraction of groups fitted with each distribution (``gaussian``/``laplace``/``empirical``) when
            the quantizer reports it, else None.
        tied_to: the layer whose quantized terms this one shares (their float weights were tied), else
            ``""``; such a layer is not counted again in the report's totals.
        order: residual expansion order ``K`` of the rule (1: plain). sparsity: fraction of output channels
            dropped from each expansion order ``k >= 2`` in this layer (after the split across layers).
        weight_bits_per_mac: ``sum_k bits_k c_k / C`` over the terms (``c_k`` of ``C`` output channels): a MAC
            of the layer costs this many weight bits, so ``BOPs = MACs x weight_bits_per_mac x activation
            bits`` (see :mod:`dfquant.methods.rex`).
        act_bits: input bits (32: float input); act: the input expansion's spec (bits, order, range mode,
            static range and where it comes from), see :mod:`dfquant.methods.rex_act`; with an input
            expansion a MAC costs :func:`~dfquant.methods.rex_act.pair_bits_per_mac` bit products, reported
            as ``weight_bits_per_mac = pair bits / act_bits``. outliers: weights in the sparse outlier residual.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    quantizer: str
    bits: int
    granularity: str
    terms: int
    params: int
    rel_mse: float
    bits_per_weight: float
    bytes: int
    float_bytes: int
    dist: dict[str, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tied_to: str = ""
    order: int = 1
    sparsity: float = 0.0
    weight_bits_per_mac: float = math.nan
    act_bits: int = 32
    act: dict[str, Any] | None = None
    outliers: int = 0


@dataclass
class SkippedLayer:
    """A layer left in float, and why."""

    name: str
    type: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class FoldedBN:
    """A BatchNorm folded into the layer before it."""

    layer: str
    bn: str


@dataclass
class BiasCorrectionRecord:
    """A bias corrected for the expected output shift ``dW E[x]`` (``shift`` is what was subtracted).

    Attributes:
        layer, bn, activation: the corrected layer and the chain its input statistics come from.
        shift_l2, shift_max_abs: size of the correction. bias_l2: size of the bias before correction.
    """

    layer: str
    bn: str
    activation: str
    shift_l2: float
    shift_max_abs: float
    bias_l2: float


def dist_summary(codes: torch.Tensor | None) -> dict[str, float] | None:
    """Fractions of groups per distribution code (0 gaussian, 1 laplace, 2 empirical), or None."""
    if codes is None or codes.numel() == 0:
        return None
    flat = codes.reshape(-1).round().to(torch.int64)
    return {DIST_NAMES.get(k, str(k)): float((flat == k).sum()) / flat.numel() for k in sorted(set(flat.tolist()))}


@dataclass
class QuantizationReport:
    """What :func:`dfquant.api.quantize_model` did, with measured errors and sizes.

    Attributes:
        layers: quantized layers. skipped: layers left float by a rule. unsupported: modules with a weight
            matrix the pipeline does not quantize (they stay float). folded_bn, bias_corrected: methods
            applied.
        graph_method, graph_note: how graph facts were found (see :class:`GraphInfo`).
        total_params: parameters of the float model. float_model_bytes / model_bytes: state-dict bytes of the
            float and the quantized model.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    unsupported: list[SkippedLayer] = field(default_factory=list)
    folded_bn: list[FoldedBN] = field(default_factory=list)
    bias_corrected: list[BiasCorrectionRecord] = field(default_factory=list)
    graph_method: str = "none"
    graph_note: str = ""
    total_params: int = 0
    float_model_bytes: int = 0
    model_bytes: int = 0

    def _own(self) -> list[LayerReport]:
        """The layers that hold their own terms (tied layers share another's and are counted once)."""
        return [r for r in self.layers if not r.tied_to]

    @property
    def quantized_params(self) -> int:
        return sum(r.params for r in self._own())

    @property
    def bits_per_weight(self) -> float:
        """Storage bits of all quantized layers over their weights (scales and fitted levels included)."""
        n = self.quantized_params
        return sum(r.bits_per_weight * r.params for r in self._own()) / n if n else math.nan

    @property
    def quantized_bytes(self) -> int:
        return sum(r.bytes for r in self._own())

    @property
    def quantized_float_bytes(self) -> int:
        return sum(r.float_bytes for r in self._own())

    def totals(self) -> dict[str, Any]:
        """Whole-model figures."""
        return {
            "total_params": self.total_params,
            "quantized_params": self.quantized_params,
            "bits_per_weight": self.bits_per_weight,
            "quantized_bytes": self.quantized_bytes,
            "quantized_float_bytes": self.quantized_float_bytes,
            "model_bytes": self.model_bytes,
            "float_model_bytes": self.float_model_bytes,
            "compression": self.float_model_bytes / self.model_bytes if self.model_bytes else math.nan,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shapes as lists, NaN as None)."""
        return _jsonable(
            {
                "layers": [asdict(r) for r in self.layers],
                "skipped": [asdict(r) for r in self.skipped],
                "unsupported": [asdict(r) for r in self.unsupported],
                "folded_bn": [asdict(r) for r in self.folded_bn],
                "bias_corrected": [asdict(r) for r in self.bias_corrected],
                "graph": {"method": self.graph_method, "note": self.graph_note},
                "totals": self.totals(),
            }
        )

    def to_text(self) -> str:
        """A plain-text table of the layers followed by skipped layers, methods applied and totals."""
        head = (
            "layer",
            "type",
            "shape",
            "quantizer",
            "bits",
            "granularity",
            "dist",
            "rel.MSE",
            "bits/w",
            "bytes",
        )
        rows = [head]
        for r in self.layers:
            dist = "-" if not r.dist else " ".join(f"{k[0]}{v:.0%}" for k, v in r.dist.items())
            q = r.quantizer + (f" x{r.terms}" if r.terms > 1 else "")
            if r.order > 1:
                q += f" (K={r.order}" + (f", {r.sparsity:.0%} sparse)" if r.sparsity > 0 else ")")
            q += f" +{r.outliers} outliers" if r.outliers else ""
            q += f" A{r.act_bits} {r.act['mode']}" if r.act else ""
            q += f" (tied to {r.tied_to})" if r.tied_to else ""
            shape = "x".join(str(s) for s in r.shape)
            rows.append(
                (
                    r.name or "<root>",
                    r.type,
                    shape,
                    q,
                    str(r.bits),
                    r.granularity,
                    dist,
                    f"{r.rel_mse:.3e}",
                    f"{r.bits_per_weight:.3f}",
                    str(r.bytes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for title, items in (("skipped (float)", self.skipped), ("not supported (float)", self.unsupported)):
            for s in items:
                shape = "x".join(str(d) for d in s.shape)
                lines.append(f"{title}: {s.name or '<root>'} ({s.type} {shape}): {s.reason}")
        if self.folded_bn:
            lines.append("BatchNorm folded: " + ", ".join(f"{f.bn} -> {f.layer}" for f in self.folded_bn))
        for b in self.bias_corrected:
            lines.append(
                f"bias corrected: {b.layer} (from {b.bn}, {b.activation}): |shift| = {b.shift_l2:.3e} "
                f"(max {b.shift_max_abs:.3e}), |bias| = {b.bias_l2:.3e}"
            )
        t = self.totals()
        lines.append(f"graph: {self.graph_method}" + (f" ({self.graph_note})" if self.graph_note else ""))
        lines.append(
            f"total: {t['quantized_params']:,} of {t['total_params']:,} parameters quantized at "
            f"{t['bits_per_weight']:.3f} bits/weight; quantized weights {t['quantized_bytes']:,} B vs "
            f"{t['quantized_float_bytes']:,} B float; model {t['model_bytes']:,} B vs "
            f"{t['float_model_bytes']:,} B float ({t['compression']:.2f}x smaller)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
