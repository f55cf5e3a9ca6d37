"""What to quantize and how: a default :class:`LayerRule` plus ordered per-layer overrides.

A :class:`QuantConfig` resolves one complete :class:`LayerRule` for every layer name: start from ``default``,
then apply each :class:`PatternRule` whose pattern matches the layer's qualified name, in order, each setting
only the fields it names (later rules win). A pattern is a shell-style glob matched against the whole name
(``"layer1.*"``, ``"*.conv2"``; ``*`` also crosses dots) or, with the prefix ``re:``, a regular expression
that must match the whole name (``"re:layer[12]\\.\\d+\\.conv1"``). Mixed precision is nothing more than such
rules.

Quantizer options belong to one quantizer: when a rule changes the quantizer without giving options, the
options are reset to ``{}`` rather than carried over to a rule that may not accept them.

The JSON form (``QuantConfig.from_dict`` / ``from_file`` / ``to_dict``)::

    {
      "default": {"quantizer": "lloyd-max", "bits": 4, "granularity": "channel", "options": {},
                  "scale_dtype": "float16"},
      "rules": [
        {"pattern": "conv1", "bits": 8},
        {"pattern": "*embeddings*", "skip": true, "reason": "embeddings kept float"},
        {"pattern": "re:.*downsample.*", "skip": true, "reason": "kept float on purpose"}
      ],
      "fold_bn": true,
      "bias_correction": true,
      "strict": false,
      "sparsity_split": "linear",
      "budget": null,
      "budget_bits": [2, 3, 4, 5, 6, 8]
    }

``budget`` (default null) is a target of stored bits per weight over the quantized layers (codes, scales,
offsets and levels counted, as the report counts them): each layer then takes the bits from ``budget_bits``
(and, when its rule rotates, the rotation on or off) that minimize the predicted output error
(:mod:`dfquant.methods.allocate`); the rest of its rule stays.

``scale_dtype`` (``"float32"``, the default, ``"float16"`` or ``"bfloat16"``) is the dtype per-group scales
and offsets are stored in: it is part of the rule because it changes both the codes (scales are rounded before
encoding) and the bits per weight (``bits + 16 / G`` instead of ``bits + 32 / G`` for one scale per group of
``G``, plus as much again for offsets).

``expand`` (default 1) is the residual expansion order ``K`` of :mod:`dfquant.methods.rex` (Yvinec et al.
2023): the layer holds ``K`` terms, ``R_1 = Q(W)``, ``R_k = Q(W - sum_{i<k} R_i)``, each with its own scales.
``sparsity`` (default 0, dense) is the fraction of output channels dropped from each order ``k >= 2``; it is a
budget for all the layers whose rule names it: :func:`dfquant.methods.rex.layer_sparsities` splits it across
them by ``sparsity_split`` (``"linear"``: kept fractions growing linearly with depth, more toward the head, as
in the paper; ``"uniform"``: the same for every layer), weighted by each layer's parameters, so that the
fraction of dropped expansion weights over those layers is ``sparsity``.

``act_bits`` (default null: float inputs) quantizes the layer's input to that many bits and expands it to the
same order ``K`` (:mod:`dfquant.methods.rex_act`); ``outliers`` (default 0) is the fraction of largest weights
kept in a sparse binary-valued residual next to the bulk (:mod:`dfquant.methods.outliers`), chosen by
``outlier_select`` (``"global"``: the tensor's largest, the default; ``"row"``: each output channel's largest);
``residual_quantizer`` (default null: the rule's own quantizer) is the rule of expansion orders ``k >= 2``.

Unknown keys anywhere raise :class:`~dfquant.errors.ConfigError` naming them. Whether a quantizer name and
its bits exist is checked against the registry when a model is planned
(:func:`dfquant.pipeline.plan.plan_quantization`), because rules may be registered after a config is read.

Example:
    >>> cfg = QuantConfig(LayerRule("minmax", 4), rules=(PatternRule("linear", bits=8),))
    >>> cfg.rule_for("linear").bits, cfg.rule_for("conv1").bits
    (8, 4)
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import torch

from dfquant.errors import ConfigError
from dfquant.methods.rotate import parse_rotation
from dfquant.nn.terms import term_layout
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import SCALE_DTYPES
from dfquant.quantizers.registry import get_quantizer

__all__ = ["DEVICES", "LayerRule", "PatternRule", "QuantConfig", "parse_device"]

#: What a device setting may say (``--device`` and every ``device=`` argument).
DEVICES = "auto, cpu, cuda or cuda:N"


def parse_device(spec: str | torch.device | None, what: str = "device") -> torch.device:
    """The device a setting names, checked once: ``auto`` (or None) is the first CUDA device when one is available
    and the CPU otherwise; ``cpu``; ``cuda``; ``cuda:N``.

    Args:
        spec: the setting (a string or a :class:`torch.device`).
        what: how the setting is called in an error (``"--device"`` on the command line).

    Raises:
        ConfigError: another name, or a CUDA device this machine does not have (naming how many it has).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = spec if isinstance(spec, torch.device) else torch.device(str(spec).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} must be one of {DEVICES}, got {spec!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"{what} must be one of {DEVICES}, got {spec!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if dev.index is None else dev.index
    if index >= count:
        have = "no CUDA device" if count == 0 else f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
        raise ConfigError(f"{what} {spec!r}: this machine has {have}; use {what} cpu or auto")
    return torch.device("cuda", index)


_CONFIG_KEYS = ("default", "rules", "fold_bn", "bias_correction", "strict", "sparsity_split", "budget", "budget_bits")
#: The bit widths a layer may take under a budget, unless the config names others.
BUDGET_BITS = (2, 3, 4, 5, 6, 8)
#: How a rule's expansion sparsity is split across layers (see :data:`dfquant.methods.rex.SPLIT_RULES`).
SPARSITY_SPLITS = ("linear", "uniform")


def _check_bits(bits: object, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"{where}: bits must be an integer in 1..8, got {bits!r}")
    return bits


def _check_str(value: object, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _freeze_options(options: object, where: str) -> Mapping[str, Any]:
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: 'options' must be a mapping of option name to value, got {options!r}")
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: option names must be strings, got {bad!r}")
    return MappingProxyType(dict(options))


def _check_granularity(spec: object, where: str) -> Granularity:
    """The granularity ``spec`` names, parsed once (a :class:`Granularity` is kept as it is)."""
    if not isinstance(spec, (str, Granularity)):
        raise ConfigError(f"{where}: 'granularity' must be a string such as 'channel' or 'group:64', got {spec!r}")
    try:
        return Granularity.parse(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_scale_dtype(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in SCALE_DTYPES:
        raise ConfigError(f"{where}: 'scale_dtype' must be one of {', '.join(SCALE_DTYPES)}, got {value!r}")
    return value


def _check_expand(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ConfigError(f"{where}: 'expand' (expansion order) must be an integer in 1..16, got {value!r}")
    return value


def _check_sparsity(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: 'sparsity' must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_act_bits(value: object, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8):
        raise ConfigError(f"{where}: 'act_bits' (input bits) must be an integer in 2..8 or null (float), got {value!r}")
    return value


def _check_outliers(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 0.5:
        raise ConfigError(f"{where}: 'outliers' (fraction of weights) must be a number in [0, 0.5], got {value!r}")
    return float(value)


OUTLIER_SELECTS = ("global", "row")


def _check_outlier_select(value: object, where: str) -> str:
    if value not in OUTLIER_SELECTS:
        raise ConfigError(f"{where}: 'outlier_select' must be one of {', '.join(OUTLIER_SELECTS)}, got {value!r}")
    return str(value)


def _check_keys(data: object, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return data


def _check_flag(value: object, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


#: The string values of a rule's ``balance`` (besides true and false): see :class:`LayerRule`.
BALANCE_MODES = ("absorbed", "stored")


def _check_balance(value: object, where: str) -> bool | str:
    if isinstance(value, bool) or value in BALANCE_MODES:
        return cast("bool | str", value)
    raise ConfigError(
        f"{where}: 'balance' must be true, false, {' or '.join(repr(m) for m in BALANCE_MODES)}, got {value!r}"
    )


def _check_reason(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: 'reason' must be a string, got {value!r}")
    return value


def _check_optional_str(key: str) -> Callable[[object, str], str | None]:
    def check(value: object, where: str) -> str | None:
        return None if value is None else _check_str(value, key, where)

    return check


#: A rule's granularity unless it names one: one scale per output channel.
DEFAULT_GRANULARITY = Granularity.parse("channel")

#: The one table of rule fields: name -> the function that checks a value and returns it normalized (parsed
#: once: ``granularity`` becomes a :class:`Granularity`, ``options`` a read-only mapping, numbers floats).
#: :class:`LayerRule` checks every field with it, :class:`PatternRule` every field it sets; the defaults are
#: :class:`LayerRule`'s.
RULE_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "quantizer": lambda v, where: _check_str(v, "quantizer", where),
    "bits": _check_bits,
    "granularity": _check_granularity,
    "options": _freeze_options,
    "skip": lambda v, where: _check_flag(v, "skip", where),
    "reason": _check_reason,
    "scale_dtype": _check_scale_dtype,
    "expand": _check_expand,
    "sparsity": _check_sparsity,
    "act_bits": _check_act_bits,
    "outliers": _check_outliers,
    "outlier_select": _check_outlier_select,
    "residual_quantizer": _check_optional_str("residual_quantizer"),
    "rotate": lambda v, where: parse_rotation(v, where),
    "balance": _check_balance,
}
_RULE_KEYS = tuple(RULE_FIELDS)
_PATTERN_KEYS = ("pattern", *_RULE_KEYS)


def _normalize(obj: object, where: str, skip_none: bool) -> None:
    """Check and normalize every rule field of a frozen dataclass in place, from :data:`RULE_FIELDS`."""
    for name, check in RULE_FIELDS.items():
        value = getattr(obj, name)
        if skip_none and value is None:
            continue
        object.__setattr__(obj, name, check(value, where))


def _field_values(obj: object) -> tuple[Any, ...]:
    """The rule fields' values as a hashable tuple (options as sorted JSON)."""
    out = []
    for name in RULE_FIELDS:
        v = getattr(obj, name)
        out.append(json.dumps(dict(v), sort_keys=True, default=repr) if name == "options" and v is not None else v)
    return tuple(out)


def _json_value(name: str, value: Any) -> Any:
    if name == "options":
        return dict(value)
    if name == "granularity":
        return str(value)
    return value


@dataclass(frozen=True)
class LayerRule:
    """The complete rule for one layer.

    Attributes:
        quantizer: a registered quantizer name (see :func:`dfquant.available`).
        bits: code bits, 1..8 (the quantizer may allow fewer).
        granularity: ``"tensor"``, ``"channel[:AXIS]"`` or ``"group:G[:AXIS]"`` (see
            :class:`~dfquant.quantizers.granularity.Granularity`); axes refer to the weight in ``(out, in, ...)``
            layout, also for Hugging Face ``Conv1D`` layers whose stored weight is ``(in, out)``.
        options: options passed to the quantizer (read-only mapping).
        skip: keep the layer in float.
        reason: why it is skipped (shown in the report and the warning).
        scale_dtype: the dtype per-group scales and offsets are stored in: ``"float32"``, ``"float16"`` or
            ``"bfloat16"`` (rounded before encoding, so a saved file decodes to exactly the in-memory model).
        expand: residual expansion order ``K`` (1: plain quantization), see :mod:`dfquant.methods.rex`.
        sparsity: fraction of output channels dropped from each expansion order ``k >= 2`` (0: dense), a budget
            split across layers by :attr:`QuantConfig.sparsity_split`.
        rotate: ``"none"`` or ``"hadamard[:B]"``: quantize ``W R^T`` for a random block Walsh-Hadamard ``R``
            along the fan-in (blocks of ``B``, default 64) and decode ``Q R`` (:mod:`dfquant.methods.rotate`);
            stored in normal form ``"hadamard:B"``.
        balance: quantize ``W diag(1/c)`` for a per-fan-in-column scale ``c`` found by Sinkhorn-style row and
            column normalization and decode ``Q diag(c)`` (:mod:`dfquant.methods.balance`). ``True``: where the
            layer is the only reader of a BatchNorm (and ReLU) output, a per-input-channel ``c`` moves into that
            BatchNorm (:mod:`dfquant.pipeline.absorb`, nothing stored), elsewhere ``c`` is stored in float16 with
            the layer. ``"absorbed"``: only the layers whose scale can move are balanced (no bits spent).
            ``"stored"``: every layer stores its scale. ``False``: none.
    """

    quantizer: str = "minmax"
    bits: int = 4
    granularity: Granularity = DEFAULT_GRANULARITY
    options: Mapping[str, Any] = field(default_factory=dict)
    skip: bool = False
    reason: str = ""
    scale_dtype: str = "float32"
    expand: int = 1
    sparsity: float = 0.0
    act_bits: int | None = None
    outliers: float = 0.0
    outlier_select: str = "global"
    residual_quantizer: str | None = None
    rotate: str = "none"
    balance: bool | str = False

    def __post_init__(self) -> None:
        _normalize(self, "layer rule", skip_none=False)
        self.check()

    @property
    def stores_balance(self) -> bool:
        """Whether a balanced layer whose scale cannot move into a BatchNorm stores it (``True``, ``"stored"``)."""
        return self.balance is True or self.balance == "stored"

    @property
    def moves_balance(self) -> bool:
        """Whether the layer's scale moves into the BatchNorm before it where the graph allows (``True``,
        ``"absorbed"``; :mod:`dfquant.pipeline.absorb`)."""
        return self.balance is True or self.balance == "absorbed"

    def check(self) -> None:
        """The checks that tie fields together (each field alone is checked by :data:`RULE_FIELDS`).

        Raises:
            ConfigError: ``outliers`` with an expansion (the outlier residual sits next to one plain term),
                ``outlier_select`` other than ``global`` without ``outliers``, or a ``residual_quantizer`` (the rule
                of expansion orders >= 2) without an expansion.
        """
        if self.skip:
            return
        if self.residual_quantizer is not None and self.expand < 2:
            raise ConfigError(
                f"layer rule: residual_quantizer '{self.residual_quantizer}' is the rule of expansion orders >= 2: "
                f"give expand >= 2 (got {self.expand})"
            )
        if self.outliers > 0 and self.expand > 1:
            raise ConfigError(
                f"layer rule: outliers ({self.outliers}) combine with plain terms only, not expand={self.expand}"
            )
        if self.outlier_select != "global" and self.outliers == 0:
            raise ConfigError(
                f"layer rule: outlier_select '{self.outlier_select}' chooses the weights of 'outliers': "
                "give outliers too"
            )

    def check_layer(self, shape: tuple[int, ...], where: str) -> Quantizer:
        """This rule's quantizer, after checking that the rule applies to a weight of ``shape`` (in ``(out, in,
        ...)`` layout): a registered quantizer that takes these bits and options, and a granularity that fits the
        shape. The one rule-against-layer check of the pipeline and the streaming planner.

        Raises:
            ConfigError: naming ``where`` (the layer), the value and what is allowed.
        """
        try:
            q = get_quantizer(self.quantizer, self.bits, **dict(self.options))
            term_layout(shape, self.granularity)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return q

    def __hash__(self) -> int:
        return hash(_field_values(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "'default'") -> LayerRule:
        """Build from a JSON object with keys among ``quantizer, bits, granularity, options, skip, reason,
        scale_dtype, expand, sparsity``.

        Raises:
            ConfigError: unknown keys or invalid values, naming them.
        """
        d = _check_keys(data, _RULE_KEYS, where)
        try:
            return cls(**dict(d))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (every field; the granularity as its text form)."""
        return {name: _json_value(name, getattr(self, name)) for name in RULE_FIELDS}


@dataclass(frozen=True)
class PatternRule:
    """An override for the layers whose qualified name matches ``pattern``; ``None`` fields are inherited.

    Attributes:
        pattern: a glob matched against the whole name, or ``re:REGEX`` (full match).
        quantizer, bits, granularity, options, skip, reason, scale_dtype, expand, sparsity: as in
            :class:`LayerRule`; ``None`` keeps the value resolved so far.
    """

    pattern: str
    quantizer: str | None = None
    bits: int | None = None
    granularity: Granularity | None = None
    options: Mapping[str, Any] | None = None
    skip: bool | None = None
    reason: str | None = None
    scale_dtype: str | None = None
    expand: int | None = None
    sparsity: float | None = None
    act_bits: int | None = None
    outliers: float | None = None
    outlier_select: str | None = None
    residual_quantizer: str | None = None
    rotate: str | None = None
    balance: bool | str | None = None

    def __post_init__(self) -> None:
        where = f"rule '{self.pattern}'"
        _check_str(self.pattern, "pattern", "rule")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ConfigError(f"{where}: invalid regular expression: {e}") from None
        _normalize(self, where, skip_none=True)

    def __hash__(self) -> int:
        return hash((self.pattern, *_field_values(self)))

    def matches(self, name: str) -> bool:
        """Whether the qualified layer name matches this rule's pattern."""
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def apply(self, rule: LayerRule) -> LayerRule:
        """``rule`` with this override's fields set (options reset when the quantizer changes without any)."""
        changes: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "pattern" and getattr(self, f.name) is not None
        }
        if "quantizer" in changes and changes["quantizer"] != rule.quantizer and "options" not in changes:
            changes["options"] = {}
        if "skip" in changes and "reason" not in changes:
            changes["reason"] = f"skipped by rule '{self.pattern}'" if changes["skip"] else ""
        return replace(rule, **changes) if changes else rule

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "rule") -> PatternRule:
        """Build from a JSON object with ``pattern`` and any of the :class:`LayerRule` keys.

        Raises:
            ConfigError: missing pattern, unknown keys or invalid values, naming them.
        """
        d = _check_keys(data, _PATTERN_KEYS, where)
        if "pattern" not in d:
            raise ConfigError(f"{where} has no 'pattern' (a glob, or 're:' followed by a regular expression)")
        try:
            return cls(**dict(d))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding the pattern and the fields this rule sets."""
        out: dict[str, Any] = {"pattern": self.pattern}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "pattern" and value is not None:
                out[f.name] = _json_value(f.name, value)
        return out


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model quantization plan: a default rule, per-layer overrides and the methods to apply.

    Attributes:
        default: the rule of every layer no override touches.
        rules: ordered overrides; for each layer every matching rule applies in order (later ones win).
        fold_bn: fold each BatchNorm into the conv/linear right before it (exact in eval mode).
        bias_correction: subtract the expected output shift of each quantized layer whose input comes from a
            BatchNorm (optionally through a ReLU), as in Nagel et al. 2019 (DFQ).
        strict: raise instead of warning when a layer is left in float.
        sparsity_split: how each rule's expansion sparsity is split across its layers: ``"linear"`` in depth
            (more kept toward the head) or ``"uniform"``.
        budget: stored bits per weight for the data-free bit allocation (None: every layer keeps its rule's bits).
        budget_bits: the bit widths a layer may take under ``budget``.
    """

    default: LayerRule = field(default_factory=LayerRule)
    rules: tuple[PatternRule, ...] = ()
    fold_bn: bool = True
    bias_correction: bool = True
    strict: bool = False
    sparsity_split: str = "linear"
    budget: float | None = None
    budget_bits: tuple[int, ...] = BUDGET_BITS

    def __post_init__(self) -> None:
        if not isinstance(self.default, LayerRule):
            raise ConfigError(f"config: 'default' must be a LayerRule, got {type(self.default).__name__}")
        rules = tuple(self.rules) if isinstance(self.rules, Iterable) else self.rules
        if not isinstance(rules, tuple) or not all(isinstance(r, PatternRule) for r in rules):
            raise ConfigError("config: 'rules' must be a sequence of PatternRule")
        object.__setattr__(self, "rules", rules)
        for key in ("fold_bn", "bias_correction", "strict"):
            _check_flag(getattr(self, key), key, "config")
        if self.sparsity_split not in SPARSITY_SPLITS:
            raise ConfigError(
                f"config: 'sparsity_split' must be one of {', '.join(SPARSITY_SPLITS)}, got {self.sparsity_split!r}"
            )
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 64:
                raise ConfigError(f"config: 'budget' must be a number of bits per weight in (0, 64], got {b!r}")
            object.__setattr__(self, "budget", float(b))
        bits = self.budget_bits
        if (
            isinstance(bits, (str, bytes))
            or not isinstance(bits, Iterable)
            or not (bits := tuple(bits))
            or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 16 for x in bits)
        ):
            raise ConfigError(
                f"config: 'budget_bits' must be a non-empty list of bit widths from 1 to 16, got {self.budget_bits!r}"
            )
        object.__setattr__(self, "budget_bits", tuple(sorted(set(bits))))

    def rule_for(self, name: str) -> LayerRule:
        """The resolved rule of the layer called ``name`` (qualified module name)."""
        rule = self.default
        for r in self.rules:
            if r.matches(name):
                rule = r.apply(rule)
        return rule

    def unused_rules(self, names: Iterable[str]) -> list[PatternRule]:
        """The overrides that match none of ``names`` (usually a typo in a pattern)."""
        names = list(names)
        return [r for r in self.rules if not any(r.matches(n) for n in names)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build from the JSON form shown in the module docstring.

        Raises:
            ConfigError: unknown keys or invalid values, naming them.
        """
        d = _check_keys(data, _CONFIG_KEYS, "config")
        default = LayerRule.from_dict(d.get("default", {}))
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise ConfigError(f"config: 'rules' must be a list of objects, got {type(raw_rules).__name__}")
        rules = tuple(PatternRule.from_dict(r, f"rule #{i}") for i, r in enumerate(raw_rules))
        flags = {k: d[k] for k in _CONFIG_KEYS[2:] if k in d}
        return cls(default=default, rules=rules, **flags)

    @classmethod
    def from_file(cls, path: str | Path) -> QuantConfig:
        """Read a JSON config file.

        Raises:
            ConfigError: unreadable file, invalid JSON, unknown keys or invalid values.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file '{p}': {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid JSON: {e.msg} at line {e.lineno}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"config file '{p}': {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``QuantConfig.from_dict(cfg.to_dict()) == cfg``."""
        return {
            "default": self.default.to_dict(),
            "rules": [r.to_dict() for r in self.rules],
            "fold_bn": self.fold_bn,
            "bias_correction": self.bias_correction,
            "strict": self.strict,
            "sparsity_split": self.sparsity_split,
            "budget": self.budget,
            "budget_bits": list(self.budget_bits),
        }
