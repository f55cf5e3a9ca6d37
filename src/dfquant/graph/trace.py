"""Tracing a model: conv->BatchNorm pairs, BatchNorm->ReLU->layer chains and the moment program that
propagates BatchNorm statistics through residual sums (:func:`analyze_graph`).

Graph facts come from ``torch.fx`` symbolic tracing when the model traces (quantizable layers and BatchNorms
are kept as leaves, so the graph shows which module feeds which); otherwise from the order in which modules
are registered, accepting only patterns whose checks pass (consecutive siblings under the same parent with
matching channel counts). :attr:`GraphInfo.method` says which was used, and why tracing failed. Nothing here
computes a scale or touches a weight's values.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfquant.graph.modules import BATCHNORM_TYPES, RELU_FUNCTIONS, TRANSPARENT_TYPES
from dfquant.methods.bn import MomentOp
from dfquant.nn.base import QuantModule, layer_kind, oriented_weight

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
        sole_input_bn: the layers of ``input_bn`` that are the only reader of their BatchNorm's output: every node
            from the BatchNorm to the layer (the BatchNorm, the ReLU, dropout or identity modules) has one user
            (fx only). A per-input-channel scale of such a layer can move into the BatchNorm's affine parameters
            (:mod:`dfquant.pipeline.absorb`).
    """

    method: str
    note: str = ""
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    input_bn: dict[str, tuple[str, str]] = field(default_factory=dict)
    moment_program: list[MomentOp] = field(default_factory=list)
    input_moments: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    sole_input_bn: dict[str, tuple[str, str]] = field(default_factory=dict)


class LeafTracer(fx.Tracer):
    """Keeps quantizable layers and BatchNorms as leaf calls so the graph names them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_kind(m) is not None or isinstance(m, (BATCHNORM_TYPES, QuantModule)):
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
    if not isinstance(bn, BATCHNORM_TYPES) or bn.running_mean is None or bn.running_var is None:
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


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _analyze_fx(model: nn.Module) -> GraphInfo:
    graph = LeafTracer().trace(model)
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
        if isinstance(mod, BATCHNORM_TYPES) and len(node.args) == 1 and not node.kwargs:
            layer = single_module_call(src)
            if isinstance(src, fx.Node) and layer is not None and len(src.users) == 1 and _bn_fits(layer, mod, "out"):
                info.bn_pairs.append((str(src.target), str(node.target)))
        elif layer_kind(mod) is not None and isinstance(src, fx.Node):
            cur: Any = src
            path = [cur]  # the nodes from the layer's input back to the BatchNorm
            while isinstance(single_module_call(cur), TRANSPARENT_TYPES) and cur.args:
                cur = cur.args[0]
                path.append(cur)
            act = "none"
            if isinstance(cur, fx.Node) and is_relu(cur, modules) and cur.args:
                act, cur = "relu", cur.args[0]
                path.append(cur)
            bn = single_module_call(cur)
            if isinstance(bn, BATCHNORM_TYPES) and _bn_fits(mod, bn, "in"):
                info.input_bn[str(node.target)] = (str(cur.target), act)
                if all(isinstance(n, fx.Node) and len(n.users) == 1 for n in path):
                    info.sole_input_bn[str(node.target)] = (str(cur.target), act)
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
        if isinstance(mod, BATCHNORM_TYPES) and mod.running_mean is not None and len(node.args) == 1:
            ndim = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(type(mod))
            value = _Value(mod.num_features, ndim, False, str(node.target), ref=str(node.target))
            return MomentOp(name, "batchnorm", source=str(node.target)), value
        if x is None:
            return None
        if isinstance(mod, nn.ReLU):
            return step("relu", replace(x, ops=(*x.ops, "relu"), ref=str(node.target)))
        if isinstance(mod, TRANSPARENT_TYPES):
            return step("identity", x)
        if isinstance(mod, _POOLS) and set(_const_ints(mod.output_size) or ()) == {1}:
            return step("mean", replace(x, spatial_one=True, ops=(*x.ops, "mean")))
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1 and x.spatial_one:
            return step("identity", replace(x, ndim=2))
        return None
    if x is None:
        return None
    target = node.target
    is_relu = (node.op == "call_function" and target in RELU_FUNCTIONS) or (
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
        if i + 2 < len(leaves) and isinstance(m, BATCHNORM_TYPES):
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
    if not any(isinstance(m, BATCHNORM_TYPES) for m in model.modules()):
        return GraphInfo("none", "the model has no BatchNorm")
    try:
        return _analyze_fx(model)
    except Exception as e:  # tracing fails in many ways (control flow, unsupported ops): fall back, say why
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return _analyze_order(model, f"torch.fx tracing failed ({type(e).__name__}: {first})")
