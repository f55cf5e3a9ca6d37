"""Whole-model quantization: plan, fold, fit, correct, swap, report.

:func:`quantize_model` is the one orchestrator. It

1. plans every layer (:func:`dfquant.pipeline.plan.plan_quantization`): resolves its rule, builds its
   quantizer through the registry and checks the granularity against the weight's shape and the weight's
   values, raising before any module is changed;
2. copies the model (unless ``inplace``), finds conv->BatchNorm pairs and BatchNorm->(ReLU)->layer chains
   (:func:`dfquant.graph.trace.analyze_graph`), moves the column scale of each balanced layer that alone reads a
   BatchNorm output into that BatchNorm (:mod:`dfquant.pipeline.absorb`), and captures the BatchNorm statistics
   bias correction needs (before folding erases those BatchNorms);
3. folds each BatchNorm into the layer before it (:mod:`dfquant.pipeline.fold`);
4. quantizes each layer into a quantized module holding one term (or ``K`` terms for a rule with
   ``expand = K``: the residual expansion of :mod:`dfquant.methods.rex`, group-sparse when the rule has a
   ``sparsity``, split across layers by ``config.sparsity_split``), and corrects its bias for the expected
   output shift (:func:`dfquant.methods.bn.correct_bias`); layers that share one weight tensor (tied weights,
   such as an output head tied to the token embedding) and resolve to the same rule are quantized once and
   share the very same terms, so the tie survives (and a file stores the codes once);
5. swaps all modules at the end (so a failure while fitting leaves even an ``inplace`` model untouched) and
   returns the model with a :class:`~dfquant.pipeline.report.QuantizationReport`.

Example:
    >>> import torch
    >>> from dfquant.config import LayerRule, QuantConfig, parse_device
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> qnet, report = quantize_model(net, QuantConfig(LayerRule("minmax", 4)))
    >>> [r.bits for r in report.layers]
    [4, 4]
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dfquant.config import LayerRule, QuantConfig, parse_device
from dfquant.errors import ConfigError, DfquantError, ModelError, check_finite
from dfquant.graph.modules import (
    find_unsupported,
    get_module,
    model_device,
    module_names,
    replace_module,
    state_dict_bytes,
)
from dfquant.graph.trace import GraphInfo, analyze_graph
from dfquant.methods.allocate import Probe
from dfquant.methods.balance import apply_balance, column_scale
from dfquant.methods.bn import (
    MomentOp,
    Moments,
    correct_bias,
    expected_input_mean,
    propagate_moments,
)
from dfquant.methods.outliers import split_outliers
from dfquant.methods.rex import expand
from dfquant.methods.rex_act import InputSpec, choose_input_spec, pair_bits_per_mac
from dfquant.methods.rotate import Rotation, gaussian_ks
from dfquant.nn.balance import ColumnScale
from dfquant.nn.base import QuantModule, oriented_weight
from dfquant.nn.rex import SparseTerm
from dfquant.nn.terms import QuantTerm
from dfquant.pipeline.absorb import Absorbed, absorb_column_scales, restore
from dfquant.pipeline.allocate import allocate_bits, group_units
from dfquant.pipeline.fold import apply_folds, plan_folds
from dfquant.pipeline.plan import LayerPlan, layer_label, plan_quantization, split_sparsity
from dfquant.pipeline.report import (
    BiasCorrectionRecord,
    FoldedBN,
    LayerReport,
    QuantizationReport,
    SkippedLayer,
    dist_summary,
    predicted_rel_mse,
)
from dfquant.quantizers.qtensor import QTensor
from dfquant.quantizers.registry import get_quantizer

#: ``progress(done, total, layer_name)``, called after each layer is quantized (done = 1..total).
Progress = Callable[[int, int, str], None]


def _batchnorm(model: nn.Module, name: str) -> _BatchNorm:
    m = get_module(model, name)
    if not isinstance(m, _BatchNorm):
        raise ModelError(f"'{name}' is a {type(m).__name__}, not a BatchNorm")
    return m


def _batchnorm_affine(model: nn.Module, program: list[MomentOp]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(beta, gamma)`` of each BatchNorm a moment program reads (0 and 1 without affine parameters)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for op in program:
        if op.op == "batchnorm" and op.source not in out:
            bn = _batchnorm(model, op.source)
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
            check_finite(beta, f"{op.source}.bias")
            check_finite(gamma, f"{op.source}.weight")
            out[op.source] = (beta, gamma)
    return out


def _input_importance(
    layer: nn.Module, weight: torch.Tensor, moments: Moments | None, centred: bool
) -> torch.Tensor | None:
    """Element weights ``a[o, c, taps] = s_c^2`` for an oriented weight ``(out, in/groups, ...)`` whose input
    channel ``c`` has variance ``s_c^2`` (``s_c^2 + E[x_c]^2`` when bias correction does not remove the mean
    error, ``centred=False``): ``sum a dW^2`` is then the layer's expected output error for uncorrelated
    input channels (see :class:`dfquant.quantizers.optimal.LloydOptimal`). After spatial averaging only the
    relative variances are known (:attr:`dfquant.methods.bn.Moments.rel_var`), which is enough with bias
    correction (a row's weights matter only relative to each other). None when the variance is unknown."""
    if moments is None:
        return None
    if centred:
        per_in = moments.relative_variance  # the weights of one row matter only relative to each other
    else:
        per_in = None if moments.var is None else moments.var + moments.mean**2
    if per_in is None:
        return None
    groups = int(getattr(layer, "groups", 1)) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else 1
    out, ipg = weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1
    if per_in.numel() != ipg * groups or out % groups:
        return None
    rows = per_in.reshape(groups, ipg)[torch.arange(out) // (out // groups)]  # (out, in/groups)
    return rows.reshape(out, ipg, *([1] * (weight.dim() - 2))).expand(weight.shape).contiguous()


def _bias_of(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


def _tie_key(w: torch.Tensor) -> tuple[object, ...]:
    """What makes two oriented weights the very same values: storage, offset, shape, strides, dtype."""
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype)


def _same_rule(a: LayerRule, b: LayerRule) -> bool:
    keys = (
        "quantizer",
        "bits",
        "granularity",
        "scale_dtype",
        "expand",
        "sparsity",
        "outliers",
        "outlier_select",
        "residual_quantizer",
    )
    return all(getattr(a, k) == getattr(b, k) for k in keys) and dict(a.options) == dict(b.options)


def quantize_weight(
    p: LayerPlan,
    w: torch.Tensor,
    sparsity: float,
    importance: torch.Tensor | None = None,
    balance: ColumnScale | None = None,
) -> tuple[list[QuantTerm], QTensor, SparseTerm | None]:
    """Quantize one layer's (oriented, BatchNorm-folded) weight by its plan: the pipeline's per-layer stage, which
    :func:`quantize_model` and the streaming workers both call.

    Args:
        p: the layer's plan (:func:`dfquant.pipeline.plan.plan_quantization`: its checked rule, quantizer and
            granularity).
        w: the float weight in ``(out, in, *kernel)`` layout.
        sparsity: the fraction of output channels dropped from each expansion order ``k >= 2`` for this layer.
        importance: element weights of a plain term's error (see :func:`_input_importance`), for rules that ask
            for them.
        balance: the layer's column scale when its rule balances (:func:`layer_balance` of ``w``): the terms are
            then fitted to ``W diag(1/c)`` and the layer built from them must carry it.

    Returns:
        The layer's terms (one for plain quantization, ``K`` residual expansion orders otherwise), the first
        order's QTensor, and the sparse outlier residual when the rule has ``outliers``
        (:mod:`dfquant.methods.outliers`: the bulk is fitted with the outliers clipped), else None. With a
        ``rotate`` rule all of them hold ``W R^T`` (:func:`layer_rotation`); the layer built from them must carry
        that rotation.
    """
    assert p.quantizer is not None and p.granularity is not None
    name = p.name or "<root>"
    if balance is not None:  # the terms are fitted to W diag(1/c); the layer decodes (...) diag(c)
        w = apply_balance(w, balance.scale)
        if importance is not None:  # sum a (w - c q)^2 = sum a c^2 (w / c - q)^2: the weights follow the columns
            c2 = balance.scale.to(device=importance.device, dtype=torch.float32).square()
            importance = (importance.reshape(importance.shape[0], -1) * c2).reshape(importance.shape)
    rotation = layer_rotation(p)
    if rotation is not None:  # every term is fitted to W R^T; the layer decodes (sum of terms) R
        w = rotation.apply(w)
        importance = None  # per-input-channel weights do not survive the rotation
    if p.rule.outliers > 0:
        bulk, res = split_outliers(
            w,
            p.quantizer,
            p.rule.outliers,
            granularity=p.granularity,
            select=p.rule.outlier_select,
            name=name,
            scale_dtype=p.rule.scale_dtype,
        )
        return [QuantTerm.from_qtensor(bulk, options=p.rule.options)], bulk, SparseTerm.from_residual(res)
    if p.rule.expand == 1:
        imp = importance if p.quantizer.wants_importance else None
        qt = p.quantizer.quantize(w, p.granularity, name=name, scale_dtype=p.rule.scale_dtype, importance=imp)
        return [QuantTerm.from_qtensor(qt, options=p.rule.options)], qt, None
    rq = p.rule.residual_quantizer
    terms = expand(
        w,
        p.quantizer,
        p.rule.expand,
        granularity=p.granularity,
        sparsity=sparsity,
        name=name,
        scale_dtype=p.rule.scale_dtype,
        residual_quantizer=None if rq is None else get_quantizer(rq, p.rule.bits),
    )
    qterms = [QuantTerm.from_qtensor(t.qtensor, options=p.rule.options, channels=t.channels) for t in terms]
    return qterms, terms[0].qtensor, None


def _matmul_label(path: tuple[str, str]) -> str:
    return path[0] if path[0] == "kernel" else f"decode: {path[1]}"


def layer_rotation(p: LayerPlan) -> Rotation | None:
    """The rotation of a layer by its rule's ``rotate`` (None for ``"none"``): blocks as the rule says, signs
    seeded by the layer's name (:meth:`dfquant.methods.rotate.Rotation.for_layer`)."""
    return Rotation.for_rule(p.rule.rotate, p.name)


def layer_balance(p: LayerPlan, w: torch.Tensor) -> ColumnScale | None:
    """The stored column scale of a layer whose rule balances (:func:`dfquant.methods.balance.column_scale` of
    its oriented, folded weight ``w``), else None; ``balance="absorbed"`` stores none (the layers whose scale can
    move into a BatchNorm are balanced by :mod:`dfquant.pipeline.absorb` before this stage)."""
    return ColumnScale(column_scale(w)).to(w.device) if p.rule.stores_balance else None


def weight_bits_per_mac(qmod: QuantModule) -> float:
    """``sum_k bits_k c_k / C`` over the layer's terms (plus one bit per outlier weight, the sparse residual
    being binary); with an input expansion, :func:`~dfquant.methods.rex_act.pair_bits_per_mac` over the
    activation bits."""
    C = qmod.weight_shape[0]
    term_bits = [(t.bits, C if t.channels is None else int(t.channels.numel())) for t in qmod.quant_terms]
    sparse = qmod.outliers.count / max(math.prod(qmod.weight_shape), 1) if qmod.outliers is not None else 0.0
    if qmod.input_spec is not None:
        A = qmod.input_spec.bits
        return pair_bits_per_mac(term_bits, C, A) / A + sparse * qmod.input_spec.order
    return sum(b * c for b, c in term_bits) / C + sparse


def _input_specs(
    target: nn.Module, active: dict[str, LayerPlan], graph: GraphInfo | None, moments: dict[str, Moments]
) -> dict[str, InputSpec]:
    """The input expansion of each layer whose rule has ``act_bits`` (embeddings take ids: none), with its
    data-free range (:func:`dfquant.methods.rex_act.choose_input_spec`)."""
    out: dict[str, InputSpec] = {}
    for name, p in active.items():
        if p.rule.act_bits is None or p.kind == "embedding":
            continue
        bn = mom = None
        if graph is not None and name in graph.input_bn:
            bn_name, act = graph.input_bn[name]
            m = _batchnorm(target, bn_name)
            beta = m.bias.detach() if m.bias is not None else torch.zeros(m.num_features)
            bn = (bn_name, beta, None if m.weight is None else m.weight.detach(), act)
        elif graph is not None and name in graph.input_moments and name in moments:
            _, source, act = graph.input_moments[name]
            mom = (source, moments[name].mean, moments[name].var, act)
        out[name] = choose_input_spec(p.rule.act_bits, p.rule.expand, p.kind, bn=bn, moments=mom)
    return out


def realized_sparsity(qmod: QuantModule, order: int) -> float:
    """Fraction of the ``(K - 1) C`` channel-terms of orders ``2..K`` that were dropped."""
    if order < 2:
        return 0.0
    C = qmod.weight_shape[0]
    kept = sum(C if t.channels is None else t.channels.numel() for t in qmod.quant_terms[1:])
    return 1.0 - kept / ((order - 1) * C)


def _untied(plans: list[LayerPlan], model: nn.Module, shared: dict[str, str]) -> list[str]:
    """Groups of layers whose weights share storage in ``model`` but will not share quantized terms."""
    groups: dict[int, list[tuple[str, str | None]]] = {}
    for p in plans:
        w = oriented_weight(get_module(model, p.name))
        root = None if p.skip else shared.get(p.name, p.name)  # None: stays float, keeps the tie
        groups.setdefault(w.untyped_storage().data_ptr(), []).append((p.name, root))
    out = []
    for members in groups.values():
        if len({root for _, root in members}) > 1:
            out.append(" / ".join(n or "<root>" for n, _ in members))
    return out


def _summary(skipped: list[SkippedLayer], unused: list[str], untied: list[str] | None = None) -> str:
    parts = []
    if skipped:
        items = "; ".join(f"{s.name or '<root>'} ({s.reason})" for s in skipped[:20])
        more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        parts.append(f"{len(skipped)} layer(s) left in float: {items}{more}")
    if unused:
        parts.append(f"rule pattern(s) matching no layer: {', '.join(repr(u) for u in unused)}")
    if untied:
        parts.append(
            "tied weights no longer shared (their rules, layouts or BatchNorm folding differ, or one is "
            f"skipped): {'; '.join(untied)}"
        )
    return ". ".join(parts)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    progress: Progress | None = None,
    inplace: bool = False,
    device: str | torch.device | None = None,
    probe: Probe | None = None,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantize every Linear/Conv1d/Conv2d/HF-Conv1D layer of ``model`` following ``config``.

    Layers are replaced by :class:`~dfquant.nn.base.QuantModule` subclasses holding one quantized term (packed
    codes, scales, levels) and the float bias. With ``config.fold_bn``, BatchNorms that directly follow a
    conv/linear are folded into it first (exact for inference; they become
    :class:`~dfquant.graph.modules.FoldedBatchNorm`). With ``config.bias_correction``, a quantized layer whose input
    is ``ReLU(BN(.))`` or ``BN(.)`` gets ``b -= (W_hat - W) E[x]`` with ``E[x]`` from that BatchNorm's
    ``beta``/``gamma`` (Nagel et al. 2019); where the input is derived further from BatchNorm outputs (a
    residual sum ``ReLU(BN(.) + shortcut)``, zero-padded or pooled), ``E[x]`` comes from the moments
    propagated through the traced graph (:func:`dfquant.methods.bn.propagate_moments`). Layers skipped by a
    rule stay float; one summary warning lists them (or ``config.strict`` raises). Folding uses the
    BatchNorms' running statistics: the result is meant for inference (eval mode).

    Args:
        model: the float model (left unchanged unless ``inplace``).
        config: the rules; default: ``minmax`` 4 bits per channel, BatchNorm folding and bias correction on.
        progress: called as ``progress(done, total, name)`` after each layer is quantized.
        inplace: change ``model`` itself instead of a deep copy (all swaps happen after every layer has been
            fitted, so an error while fitting leaves it unchanged).
        device: where to quantize and where the result lives (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see
            :func:`dfquant.config.parse_device`): the copy (or, with ``inplace``, the model) moves there first.
            None: where the model's parameters are. Rules without ``runs_on_device`` fit on the CPU either way;
            their layers then move to the model's device. The report records the device
            (:attr:`QuantizationReport.device`).
        probe: with ``config.budget``, ``probe(model)`` gives the model's outputs on fixed synthetic inputs
            (:func:`dfquant.eval.fidelity.fidelity_probe`), from which each layer's sensitivity is measured for
            the bit allocation (:func:`dfquant.pipeline.allocate.allocate_bits`; the plan is in
            :attr:`QuantizationReport.allocation`).

    Returns:
        ``(quantized model, report)``; the model is ``model`` itself when ``inplace`` (or the new root module
        when the model is a single layer).

    Raises:
        ConfigError: an invalid rule for some layer (before anything changes), skipped layers with
            ``config.strict``, a device this machine does not have, or a budget without a probe or below the
            cheapest plan.
        InputError: NaN/Inf weights or BatchNorm statistics, naming the layer.
        ModelError: no quantizable layer.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    dev = None if device is None else parse_device(device)
    if config.budget is not None and probe is None:
        raise ConfigError(
            "a bit budget needs a probe: the model's outputs on synthetic inputs "
            "(probe=dfquant.eval.fidelity_probe(loaded))"
        )
    absorbed: dict[str, Absorbed] = {}
    try:
        return _quantize(model, config, progress, inplace, dev, probe, absorbed)
    except BaseException:
        if inplace:  # the fit failed: the BatchNorms and weights the absorption changed get their values back
            restore(model, absorbed)
        raise


def _quantize(
    model: nn.Module,
    config: QuantConfig,
    progress: Progress | None,
    inplace: bool,
    dev: torch.device | None,
    probe: Probe | None,
    absorbed: dict[str, Absorbed],
) -> tuple[nn.Module, QuantizationReport]:
    """:func:`quantize_model` after its checks; ``absorbed`` is filled by the absorption stage as it changes the
    model (so that a failure can undo it)."""
    plans = plan_quantization(model, config)
    skipped = [SkippedLayer(p.name, p.type, p.shape, p.rule.reason or "skipped by rule") for p in plans if p.skip]
    unused = [r.pattern for r in config.unused_rules(p.name for p in plans)]
    if config.strict and (skipped or unused):
        raise ConfigError(f"strict mode: {_summary(skipped, unused)}")

    report = _start_report(model, skipped)

    if inplace:
        target = model
    else:
        try:
            target = copy.deepcopy(model)
        except Exception as e:  # models may hold attributes that cannot be copied
            raise ModelError(
                f"cannot copy {type(model).__name__} ({type(e).__name__}: {e}); pass inplace=True to "
                "quantize it in place"
            ) from None
    if dev is not None:
        target = target.to(dev)
    report.device = str(model_device(target))
    active = {p.name: p for p in plans if not p.skip}
    balanced = any(p.rule.moves_balance for p in active.values())
    graph = analyze_graph(target) if (config.fold_bn or config.bias_correction or balanced) else None
    if graph is not None:
        report.graph_method, report.graph_note = graph.method, graph.note
    if balanced:  # column scales into the BatchNorms before their layers, where the graph allows it
        folds = plan_folds(target, graph) if graph is not None and config.fold_bn else None
        absorbed.update(absorb_column_scales(target, graph, active, folds))
    sparsities = split_sparsity(plans, config.sparsity_split)

    input_stats, input_moments = input_statistics(target, graph, active, config)
    input_specs = _input_specs(target, active, graph, input_moments)

    # BatchNorm folding, computed first and applied at the end.
    folded = plan_folds(target, graph) if graph is not None and config.fold_bn else {}

    def float_weight(p: LayerPlan) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        layer = get_module(target, p.name)
        if p.name in folded:
            return layer, folded[p.name].weight, folded[p.name].bias
        return layer, oriented_weight(layer).detach().contiguous(), _bias_of(layer)

    if config.budget is not None:
        assert probe is not None

        def measure(v: LayerPlan) -> tuple[float, float]:
            layer, w, _ = float_weight(v)
            importance = _input_importance(layer, w, input_moments.get(v.name), v.name in input_stats)
            try:
                bal = None if v.name in absorbed else layer_balance(v, w)
                qterms, _, sparse = quantize_weight(v, w, sparsities.get(v.name, 0.0), importance, bal)
            except DfquantError as e:
                raise type(e)(f"{layer_label(v.name, layer, v.shape)}: {e}") from None
            qmod = QuantModule.from_float(layer, qterms)
            qmod.outliers, qmod.rotation, qmod.balance = sparse, layer_rotation(v), bal
            ref = w.to(torch.float32)
            den = float((ref * ref).sum())
            err = float(((qmod.to(w.device).dequantize_weight().to(torch.float32) - ref) ** 2).sum())
            return (err / den if den > 0 else 0.0), qmod.bits_per_weight()

        def tie_of(name: str) -> tuple[object, ...] | None:
            return None if name in folded else _tie_key(oriented_weight(get_module(target, name)))

        active, report.allocation = allocate_bits(target, group_units(active, tie_of), config, probe, measure)

    new_modules: dict[str, QuantModule] = {}
    # Tied weights: the first layer holding a weight quantizes it; later ones with its rule share its terms.
    first_of: dict[tuple[object, ...], str] = {}
    shared: dict[str, str] = {}
    dists: dict[str, dict[str, float] | None] = {}
    for i, p in enumerate(active.values()):
        layer, w_float, bias = float_weight(p)
        assert p.quantizer is not None and p.granularity is not None  # active plans are never skipped
        tie = None if p.name in folded else _tie_key(oriented_weight(layer))
        owner = first_of.get(tie) if tie is not None else None
        if owner is not None and _same_rule(active[owner].rule, p.rule):
            shared[p.name] = owner
            qmod = QuantModule.from_float(layer, new_modules[owner].quant_terms)
            qmod.outliers = new_modules[owner].outliers
            qmod.rotation = new_modules[owner].rotation
            qmod.balance = new_modules[owner].balance
            dists[p.name] = dists[owner]
        else:
            if tie is not None and owner is None:
                first_of[tie] = p.name
            try:
                stats = input_moments.get(p.name)
                importance = _input_importance(layer, w_float, stats, p.name in input_stats)
                balance = None if p.name in absorbed else layer_balance(p, w_float)
                qterms, qt, sparse = quantize_weight(p, w_float, sparsities.get(p.name, 0.0), importance, balance)
            except DfquantError as e:
                raise type(e)(f"{layer_label(p.name, layer, p.shape)}: {e}") from None
            qmod = QuantModule.from_float(layer, qterms)
            qmod.outliers = sparse
            qmod.rotation = layer_rotation(p)
            qmod.balance = balance
            dists[p.name] = dist_summary(qt.info.get("dist"))
        qmod.input_spec = input_specs.get(p.name)
        qmod = qmod.to(w_float.device)
        qmod.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        w_hat = qmod.dequantize_weight().to(torch.float32)
        ref = w_float.to(torch.float32)
        den = float((ref * ref).sum())
        err = float(((w_hat - ref) ** 2).sum())
        if p.name in input_stats:
            bn_name, act, mean = input_stats[p.name]
            groups = int(cast(nn.Conv2d, layer).groups) if p.kind in ("conv1d", "conv2d") else 1
            new_bias, shift = correct_bias(ref, w_hat, qmod.bias, mean, groups)
            bias_l2 = 0.0 if qmod.bias is None else float(qmod.bias.detach().float().norm())
            qmod.bias = nn.Parameter(new_bias.to(qmod.dtype), requires_grad=False)
            report.bias_corrected.append(
                BiasCorrectionRecord(p.name, bn_name, act, float(shift.norm()), float(shift.abs().max()), bias_l2)
            )
        ks: tuple[float | None, float | None] = (None, None)
        if qmod.rotation is not None and p.name not in shared:
            ks = (gaussian_ks(w_float, p.granularity), gaussian_ks(qmod.rotation.apply(w_float), p.granularity))
        report.layers.append(
            LayerReport(
                name=p.name,
                type=p.type,
                shape=p.shape,
                quantizer=p.quantizer.name,
                bits=p.quantizer.bits,
                granularity=str(p.granularity),
                terms=len(qmod.terms),
                params=w_float.numel(),
                rel_mse=err / den if den > 0 else (0.0 if err == 0 else float("inf")),
                bits_per_weight=qmod.bits_per_weight(),
                bytes=qmod.nbytes(),
                float_bytes=w_float.numel() * w_float.element_size(),
                dist=dists[p.name],
                options=dict(p.rule.options),
                tied_to=shared.get(p.name, ""),
                order=p.rule.expand,
                sparsity=realized_sparsity(qmod, p.rule.expand),
                weight_bits_per_mac=weight_bits_per_mac(qmod),
                act_bits=qmod.input_spec.bits if qmod.input_spec is not None else 32,
                act=qmod.input_spec.to_dict() if qmod.input_spec is not None else None,
                outliers=qmod.outliers.count if qmod.outliers is not None else 0,
                rotate=p.rule.rotate,
                balance=qmod.balance is not None,
                balance_absorbed=absorbed[p.name].bn if p.name in absorbed else "",
                matmul=_matmul_label(qmod.matmul_path(model_device(qmod))),
                ks_before=ks[0],
                ks_after=ks[1],
            )
        )
        layer_report = report.layers[-1]
        layer_report.predicted_rel_mse = predicted_rel_mse(asdict(layer_report))
        new_modules[p.name] = qmod
        if progress is not None:
            progress(i + 1, len(active), p.name)

    untied = _untied(plans, target, shared)  # before the swaps, while the float weights are in place

    # Apply: folded float layers get their new weight and bias, BatchNorms become identities, layers are
    # swapped.
    target = apply_folds(target, folded, replaced=new_modules)
    report.folded_bn.extend(FoldedBN(f.layer, f.bn) for f in folded.values())
    target = swap_layers(target, new_modules)
    report.model_bytes = state_dict_bytes(target)

    if skipped or unused or untied:
        warnings.warn(f"quantize_model: {_summary(skipped, unused, untied)}", UserWarning, stacklevel=2)
    return target, report


def _start_report(model: nn.Module, skipped: list[SkippedLayer]) -> QuantizationReport:
    """The report before any layer is quantized: the layers skipped by a rule, those of a partly quantized model
    (kept as they are), the parameters of unsupported layer types, and the float model's size."""
    already = [
        SkippedLayer(n, type(m).__name__, m.weight_shape, "already quantized (kept as is)")
        for n, m in model.named_modules()
        if isinstance(m, QuantModule)
    ]
    report = QuantizationReport(
        skipped=[*skipped, *already],
        total_params=sum(p.numel() for p in model.parameters()),
        float_model_bytes=state_dict_bytes(model),
    )
    for name, m, params in find_unsupported(model):
        first = m._parameters[params[0]]
        shape = tuple(first.shape) if first is not None else ()
        what = ", ".join(params)
        report.unsupported.append(
            SkippedLayer(name, type(m).__name__, shape, f"layer type not supported; {what} kept float")
        )
    return report


def input_statistics(
    model: nn.Module, graph: GraphInfo | None, active: Mapping[str, LayerPlan], config: QuantConfig
) -> tuple[dict[str, tuple[str, str, torch.Tensor]], dict[str, Moments]]:
    """The statistics stage: what the BatchNorms say about each active layer's input, read before folding turns
    them into identities.

    Returns:
        ``(input_stats, input_moments)``: for bias correction (``config.bias_correction``), each layer's
        ``(source BatchNorm, activation, E[x])``, from the BatchNorm right before it (``E[ReLU(BN(.))]``) or
        from the moments propagated through the traced graph (residual sums, padding, pooling); and each layer's
        propagated per-channel input :class:`~dfquant.methods.bn.Moments`, also used by the rules that weight
        the error by input variance and by input quantization.
    """
    input_stats: dict[str, tuple[str, str, torch.Tensor]] = {}
    input_moments: dict[str, Moments] = {}
    if graph is not None and config.bias_correction:
        for layer_name, (bn_name, act) in graph.input_bn.items():
            if layer_name in active:
                bn = _batchnorm(model, bn_name)
                beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
                gamma = bn.weight.detach() if bn.weight is not None else None
                check_finite(beta, f"{bn_name}.bias")
                if gamma is not None:
                    check_finite(gamma, f"{bn_name}.weight")
                input_stats[layer_name] = (bn_name, act, expected_input_mean(beta, gamma, act))
    # Per-channel input moments propagated from the BatchNorms through the traced graph: the mean of inputs
    # derived further (a residual sum, a pooled map) for bias correction, the variance for rules that weight
    # the weight error by it.
    wants = any(p.quantizer is not None and p.quantizer.wants_importance for p in active.values())
    wants = wants or any(p.rule.act_bits is not None for p in active.values())  # input ranges (REx inputs)
    if graph is not None and graph.input_moments and (config.bias_correction or wants):
        moments = propagate_moments(graph.moment_program, _batchnorm_affine(model, graph.moment_program))
        for layer_name, (node, _, _) in graph.input_moments.items():
            if layer_name in active and node in moments:
                input_moments[layer_name] = moments[node]
    if graph is not None and config.bias_correction:
        for layer_name, (_, source, act) in graph.input_moments.items():
            if layer_name in input_moments and layer_name not in input_stats:
                input_stats[layer_name] = (source, act, input_moments[layer_name].mean)

    return input_stats, input_moments


def swap_layers(model: nn.Module, quantized: Mapping[str, QuantModule]) -> nn.Module:
    """The swap stage: put each quantized layer in its float layer's place, under every name the float layer is
    registered under. Returns the model (a new root if the root itself was a quantized layer)."""
    names = module_names(model)  # a layer registered under several names is replaced under all of them
    for name, qmod in quantized.items():
        for alias in names[id(get_module(model, name))]:
            model = replace_module(model, alias, qmod)
    return model
