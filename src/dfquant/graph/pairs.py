"""Finding DF-MPC layer pairs in a model's graph: a low-bit layer whose BatchNorm and ReLU feed one high-bit
layer.

A *link* ``l -> h`` is a quantizable layer ``l`` whose only consumer is a BatchNorm (with running statistics,
matching channels), whose only consumer is a ReLU (module or function), whose only consumer is the layer ``h``
(through dropout or identity modules at most), each called once. Everything else breaks a link: a residual
addition after the BatchNorm (``conv2 -> bn2 -> + shortcut`` in a ResNet block), a ReLU output read twice (the
stem of a ResNet, read by the first block and its shortcut), pooling, reshaping. So a pair never straddles a
residual addition, by construction.

Links form chains ``l_0 -> l_1 -> ... -> l_k``. The last layer of a chain has no high-bit layer after it to
compensate its error, so it must stay high-bit; pairs are taken from the end of each chain backwards,
alternating: ``(l_{k-1}, l_k), (l_{k-3}, l_{k-2}), ...``. This gives, with no per-model list:

* ResNet basic block (``conv1 -> bn1 -> relu -> conv2 -> bn2 -> +``): ``conv1`` low, ``conv2`` compensates;
* bottleneck block (``conv1 -> conv2 -> conv3 -> bn3 -> +``): ``conv2`` (3x3) low, ``conv3`` compensates,
  ``conv1`` stays high;
* plain chains (VGG-like): layers alternate, ending with a high-bit layer.

The graph comes from ``torch.fx`` symbolic tracing with quantizable layers and BatchNorms kept as leaves. A
model that does not trace has no verifiable graph (registration order cannot show a residual addition), so
it is refused with the tracing error rather than guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from dfquant.errors import ModelError
from dfquant.graph.modules import BATCHNORM_TYPES, TRANSPARENT_TYPES
from dfquant.graph.trace import LeafTracer, is_relu
from dfquant.nn.base import layer_kind, oriented_weight

__all__ = ["CompensationPair", "find_compensation_pairs"]


@dataclass(frozen=True)
class CompensationPair:
    """A low-bit layer, its BatchNorm, and the high-bit layer its ReLU output feeds.

    Attributes:
        low: the low-bit layer's qualified name. bn: its BatchNorm's. high: the compensating layer's.
    """

    low: str
    bn: str
    high: str


def _channels_fit(low: nn.Module, bn: nn.Module, high: nn.Module) -> bool:
    if not isinstance(bn, BATCHNORM_TYPES) or bn.running_mean is None or bn.running_var is None:
        return False
    kinds = (layer_kind(low), layer_kind(high))
    if kinds[0] not in ("conv1d", "conv2d", "linear") or kinds[1] not in ("conv1d", "conv2d", "linear"):
        return False
    out = int(oriented_weight(low).shape[0])
    groups = int(getattr(high, "groups", 1)) if kinds[1] != "linear" else 1
    return out == bn.num_features == int(oriented_weight(high).shape[1]) * groups


def _links(model: nn.Module) -> list[tuple[str, str, str]]:
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # tracing fails in many ways: say why, never guess a graph
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"DF-MPC needs the model's graph to find layer pairs, but torch.fx tracing of {type(model).__name__} "
            f"failed ({type(e).__name__}: {first})"
        ) from None
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")

    def module(node: fx.Node) -> nn.Module | None:
        if node.op == "call_module" and calls[str(node.target)] == 1:
            return modules.get(str(node.target))
        return None

    def only_user(node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    links = []
    for node in graph.nodes:
        low = module(node)
        if low is None or layer_kind(low) is None:
            continue
        bn_node = only_user(node)
        if bn_node is None or not isinstance(module(bn_node), BATCHNORM_TYPES) or len(bn_node.args) != 1:
            continue
        act = only_user(bn_node)
        if act is None or not is_relu(act, modules) or act.args[0] is not bn_node:
            continue
        nxt = only_user(act)
        while nxt is not None and isinstance(module(nxt), TRANSPARENT_TYPES):
            nxt = only_user(nxt)
        high = module(nxt) if nxt is not None else None
        bn = module(bn_node)
        if nxt is None or high is None or bn is None or not _via(nxt, act):
            continue
        if layer_kind(high) is not None and _channels_fit(low, bn, high):
            links.append((str(node.target), str(bn_node.target), str(nxt.target)))
    return links


def _via(node: fx.Node, src: fx.Node) -> bool:
    """Whether ``node``'s first argument reaches ``src`` through single-argument nodes only."""
    cur = node.args[0] if node.args else None
    while isinstance(cur, fx.Node):
        if cur is src:
            return True
        cur = cur.args[0] if len(cur.args) == 1 else None
    return False


def find_compensation_pairs(model: nn.Module) -> list[CompensationPair]:
    """The DF-MPC pairs of ``model`` (see the module docstring), in graph order.

    Args:
        model: the float model (BatchNorms with running statistics).

    Returns:
        The pairs; empty when no layer is followed by BatchNorm -> ReLU -> one layer.

    Raises:
        ModelError: the model does not trace with ``torch.fx``.
    """
    links = _links(model)
    nxt = {low: (bn, high) for low, bn, high in links}
    targets = {high for _, _, high in links}
    pairs: list[CompensationPair] = []
    for start in (low for low, _, _ in links if low not in targets):
        chain = [start]
        while chain[-1] in nxt and len(chain) <= len(links):
            chain.append(nxt[chain[-1]][1])
        for i in range(len(chain) - 2, -1, -2):
            pairs.append(CompensationPair(chain[i], nxt[chain[i]][0], chain[i + 1]))
    order = {low: i for i, (low, _, _) in enumerate(links)}
    return sorted(pairs, key=lambda p: order[p.low])
