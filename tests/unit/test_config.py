"""QuantConfig / LayerRule / PatternRule: resolution order, JSON round trip, refusals that name the input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.quantizers import Granularity


def test_defaults() -> None:
    cfg = QuantConfig()
    assert cfg.default == LayerRule("minmax", 4, "channel")
    assert (cfg.fold_bn, cfg.bias_correction, cfg.strict) == (True, True, False)
    assert cfg.rule_for("anything") == cfg.default


def test_later_rules_win_field_by_field() -> None:
    cfg = QuantConfig(
        LayerRule("minmax", 4, "channel"),
        rules=(
            PatternRule("layer1.*", bits=3, granularity="group:64"),
            PatternRule("re:layer1\\.0\\..*", bits=8),
            PatternRule("*.conv2", quantizer="mse"),
        ),
    )
    r = cfg.rule_for("layer1.0.conv1")
    assert (r.quantizer, r.bits, str(r.granularity)) == ("minmax", 8, "group:64")
    r = cfg.rule_for("layer1.1.conv2")
    assert (r.quantizer, r.bits, str(r.granularity)) == ("mse", 3, "group:64")
    assert r.granularity == Granularity("group", 0, 64)  # parsed once, when the rule is made
    assert cfg.rule_for("layer2.0.conv1") == cfg.default


def test_glob_and_regex_match_whole_name() -> None:
    assert PatternRule("conv1").matches("conv1")
    assert not PatternRule("conv1").matches("layer1.0.conv1")
    assert PatternRule("*conv1").matches("layer1.0.conv1")
    assert PatternRule("re:layer\\d\\.0\\.conv\\d").matches("layer3.0.conv2")
    assert not PatternRule("re:conv").matches("layer1.conv1")  # full match, not search


def test_changing_quantizer_resets_options() -> None:
    cfg = QuantConfig(
        LayerRule("minmax", 4, options={"grid": "uint"}),
        rules=(
            PatternRule("a", quantizer="lloyd-max"),
            PatternRule("b", quantizer="mse", options={"grid": "int"}),
        ),
    )
    assert dict(cfg.rule_for("a").options) == {}
    assert dict(cfg.rule_for("b").options) == {"grid": "int"}
    assert dict(cfg.rule_for("c").options) == {"grid": "uint"}


def test_skip_gets_a_reason() -> None:
    cfg = QuantConfig(rules=(PatternRule("fc", skip=True), PatternRule("head", skip=True, reason="tiny")))
    assert cfg.rule_for("fc").skip and "fc" in cfg.rule_for("fc").reason
    assert cfg.rule_for("head").reason == "tiny"
    assert not cfg.rule_for("conv").skip


def test_round_trip_through_json(tmp_path) -> None:
    data = {
        "default": {"quantizer": "mse", "bits": 3, "granularity": "group:32", "options": {"grid": "int"}},
        "rules": [{"pattern": "conv1", "bits": 8}, {"pattern": "re:.*fc", "skip": True, "reason": "head"}],
        "fold_bn": False,
        "bias_correction": False,
        "strict": True,
    }
    cfg = QuantConfig.from_dict(data)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["rules"] == data["rules"]
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert QuantConfig.from_file(p) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_frozen_and_read_only_options() -> None:
    rule = LayerRule(options={"grid": "int"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.bits = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        rule.options["grid"] = "uint"  # type: ignore[index]
    assert hash(rule) == hash(LayerRule(options={"grid": "int"}))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"defualt": {}}, "defualt"),
        ({"default": {"bitz": 4}}, "bitz"),
        ({"rules": [{"pattern": "a", "bist": 3}]}, "bist"),
        ({"rules": [{"bits": 3}]}, "pattern"),
        ({"rules": {"pattern": "a"}}, "list"),
        ({"default": {"bits": 9}}, "1..8"),
        ({"default": {"bits": True}}, "bits"),
        ({"default": {"granularity": "row"}}, "row"),
        ({"rules": [{"pattern": "re:(", "bits": 2}]}, "regular expression"),
        ({"strict": "yes"}, "strict"),
        ({"default": {"options": [1]}}, "options"),
    ],
)
def test_bad_dicts_name_the_problem(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        QuantConfig.from_dict(data)
    assert needle in str(e.value)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        QuantConfig.from_file(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_file(p)
    p.write_text(json.dumps({"default": {"quantiser": "mse"}}))
    with pytest.raises(ConfigError, match="quantiser"):
        QuantConfig.from_file(p)


def test_unused_rules() -> None:
    cfg = QuantConfig(rules=(PatternRule("conv*"), PatternRule("typo")))
    assert [r.pattern for r in cfg.unused_rules(["conv1", "fc"])] == ["typo"]


def test_scale_dtype_in_rules() -> None:
    cfg = QuantConfig.from_dict(
        {
            "default": {"scale_dtype": "float16"},
            "rules": [{"pattern": "fc", "scale_dtype": "bfloat16"}, {"pattern": "conv*", "bits": 3}],
        }
    )
    assert LayerRule().scale_dtype == "float32"
    assert cfg.rule_for("fc").scale_dtype == "bfloat16" and cfg.rule_for("conv1").scale_dtype == "float16"
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["rules"][1] == {"pattern": "conv*", "bits": 3}
    assert hash(LayerRule(scale_dtype="float16")) != hash(LayerRule())
    with pytest.raises(ConfigError, match=r"'scale_dtype' must be one of float32, float16, bfloat16"):
        QuantConfig.from_dict({"default": {"scale_dtype": "half"}})
    with pytest.raises(ConfigError, match=r"rule #0.*scale_dtype"):
        QuantConfig.from_dict({"rules": [{"pattern": "a", "scale_dtype": 16}]})


def test_parse_device_names_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dfquant.config import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device("auto") == parse_device(None) == parse_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "mps", "cuda:x", "", 3):
        with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda or cuda:N"):
            parse_device(bad, "--device")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--device 'cuda': this machine has no CUDA device; use --device cpu"):
        parse_device("cuda", "--device")
    # a machine with two GPUs: auto is the first; cuda:1 exists, cuda:2 does not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("auto") == parse_device("cuda") == torch.device("cuda", 0)
    assert parse_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        parse_device("cuda:2")
