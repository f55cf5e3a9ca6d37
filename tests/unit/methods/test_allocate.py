"""Data-free bit allocation: the knapsack plan against brute force, sensitivities against their closed form on
linear models, and the pipeline stage (budget kept, plan in the report, tied layers choosing together)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.methods.allocate import Candidate, LayerOptions, allocate, layer_sensitivities, output_error
from dfquant.pipeline.quantize import quantize_model


def _units(seed: int, n_units: int, n_cands: int) -> list[LayerOptions]:
    g = torch.Generator().manual_seed(seed)
    units = []
    for i in range(n_units):
        params = int(torch.randint(50, 5000, (1,), generator=g))
        bpw = sorted(float(b) for b in torch.rand(n_cands, generator=g) * 7 + 1)
        err = sorted((float(e) for e in torch.rand(n_cands, generator=g)), reverse=True)
        cands = [Candidate(round(b), "none", e, b) for b, e in zip(bpw, err, strict=True)]
        units.append(LayerOptions((f"l{i}",), params, float(torch.rand(1, generator=g)) * 10, cands))
    return units


@pytest.mark.parametrize("seed", range(6))
def test_plan_fits_the_budget_and_matches_brute_force(seed: int) -> None:
    units = _units(seed, 4, 4)
    total = sum(u.params for u in units)
    budget = 3.5
    resolution = 4096
    reached = allocate(units, budget, resolution=resolution)
    chosen = sum(u.sensitivity * u.choice.rel_mse for u in units)
    assert reached <= budget + 1e-12
    assert reached == pytest.approx(sum(u.params * u.choice.bits_per_weight for u in units) / total)
    # brute force over every combination: the plan is at least as good as the best one that fits with the
    # rounding slack (one step per unit) to spare, and no combination within the budget beats it by more
    # than what that slack can buy
    step = budget * total / resolution
    best_strict = math.inf
    best_any = math.inf
    for combo in itertools.product(*(range(len(u.candidates)) for u in units)):
        cost = sum(u.params * u.candidates[k].bits_per_weight for u, k in zip(units, combo, strict=True))
        obj = sum(u.sensitivity * u.candidates[k].rel_mse for u, k in zip(units, combo, strict=True))
        if cost <= budget * total:
            best_any = min(best_any, obj)
        if cost <= budget * total - len(units) * step:
            best_strict = min(best_strict, obj)
    assert chosen <= best_strict + 1e-12
    assert chosen >= best_any - 1e-12


def test_budget_below_the_cheapest_plan_is_refused() -> None:
    units = [
        LayerOptions(("a",), 100, 1.0, [Candidate(2, "none", 0.1, 2.5), Candidate(4, "none", 0.01, 4.5)]),
        LayerOptions(("b",), 300, 1.0, [Candidate(3, "none", 0.05, 3.5)]),
    ]
    with pytest.raises(ConfigError, match=r"budget 3.0 bits per weight is below the 3.2500 the cheapest"):
        allocate(units, 3.0)
    # exactly the cheapest plan is allowed
    assert allocate(units, 3.25) == pytest.approx(3.25)
    assert [u.choice.bits for u in units] == [2, 3]


def test_more_budget_goes_to_the_more_sensitive_layer() -> None:
    cands = [Candidate(2, "none", 0.1, 2.0), Candidate(4, "none", 0.01, 4.0)]
    units = [LayerOptions(("a",), 100, 1.0, list(cands)), LayerOptions(("b",), 100, 50.0, list(cands))]
    assert allocate(units, 3.0) == pytest.approx(3.0)
    assert [u.choice.bits for u in units] == [2, 4]


def _identity_probe(model: nn.Module) -> torch.Tensor:
    """The outputs on the basis vectors: ``||f(W + E) - f(W)||^2 = ||E||^2`` for a linear layer."""
    return model(torch.eye(64))


def test_sensitivity_of_a_linear_layer_is_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    w = model[0].weight.detach().clone()
    (alpha,) = layer_sensitivities(model, [["0"]], _identity_probe, noise=1e-3)
    # D = ||E||^2 / ||W||^2 with E of relative MSE 1e-3 drawn once (4096 Gaussians): alpha = 1 within a few
    # percent of chi-square spread
    assert alpha == pytest.approx(1.0, rel=0.08)
    assert torch.equal(model[0].weight, w)  # restored bit for bit


class TwoBranches(nn.Module):
    """``y = [A x, 0.1 B x]``: B's share of the output energy is ``0.01 ||B||^2 / (||A||^2 + 0.01 ||B||^2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32, bias=False)
        self.b = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), 0.1 * self.b(x)], dim=-1)


def test_sensitivities_follow_each_layers_share_of_the_output() -> None:
    torch.manual_seed(1)
    model = TwoBranches()
    na, nb = float(model.a.weight.detach().pow(2).sum()), float(model.b.weight.detach().pow(2).sum())
    alpha_a, alpha_b = layer_sensitivities(model, [["a"], ["b"]], _identity_probe)
    assert alpha_a == pytest.approx(na / (na + 0.01 * nb), rel=0.1)
    assert alpha_b == pytest.approx(0.01 * nb / (na + 0.01 * nb), rel=0.1)


def test_output_error() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert output_error(torch.tensor([3.0, 5.0]), ref) == pytest.approx(1 / 25)
    assert output_error(ref, torch.zeros(2)) == 0.0


class Branches(nn.Module):
    """``y = [A relu(L x), 0.05 B relu(L x)]``: B's relative error reaches the output 400 times attenuated."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 128)
        self.a = nn.Linear(128, 64)
        self.b = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return torch.cat([self.a(h), 0.05 * self.b(h)], dim=-1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Branches()


def _probe(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0])
def test_pipeline_keeps_the_budget_and_reports_the_plan(budget: float) -> None:
    cfg = QuantConfig(LayerRule("minmax", 4, "channel"), budget=budget, budget_bits=(2, 3, 4, 6))
    _, report = quantize_model(_net(), cfg, probe=_probe)
    assert report.bits_per_weight <= budget + 1e-9
    plan = report.allocation
    assert plan is not None and plan["budget"] == budget
    assert plan["bits_per_weight"] == pytest.approx(report.bits_per_weight)
    assert [u["names"] for u in plan["layers"]] == [["first"], ["a"], ["b"]]
    assert [u["bits"] for u in plan["layers"]] == [r.bits for r in report.layers]
    assert [u["rel_mse"] for u in plan["layers"]] == pytest.approx([r.rel_mse for r in report.layers], rel=1e-12)
    _, a, b = plan["layers"]
    assert a["sensitivity"] > 50 * b["sensitivity"]  # 400x by construction, less what `first` shares
    assert a["bits"] >= b["bits"] and (a["bits"] > b["bits"]) == (budget == 4.0)
    assert f"bit allocation: budget {budget:.3f} bits/weight" in report.to_text()
    assert report.to_dict()["allocation"]["layers"][1]["names"] == ["a"]


def test_a_larger_budget_never_predicts_more_error() -> None:
    net = _net()
    errors = []
    for budget in (2.5, 3.0, 4.0, 5.0):
        cfg = QuantConfig(LayerRule("minmax", 4, "channel"), budget=budget, budget_bits=(2, 3, 4, 6))
        _, report = quantize_model(net, cfg, probe=_probe)
        assert report.allocation is not None
        errors.append(report.allocation["predicted_error"])
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]


def test_rotation_is_a_choice_when_the_rule_rotates() -> None:
    net = _net()
    cfg = QuantConfig(LayerRule("minmax", 3, "channel", rotate="hadamard:32"), budget=3.5, budget_bits=(2, 3, 4))
    _, report = quantize_model(net, cfg, probe=_probe)
    assert report.allocation is not None
    assert {u["rotate"] for u in report.allocation["layers"]} <= {"none", "hadamard:32"}
    assert [u["rotate"] for u in report.allocation["layers"]] == [r.rotate for r in report.layers]


def test_tied_layers_choose_together() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(32, 32, bias=False)
            self.mid = nn.Linear(32, 32)
            self.head = nn.Linear(32, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    model = Tied()
    cfg = QuantConfig(LayerRule("minmax", 4, "channel"), budget=3.0, budget_bits=(2, 3, 4))
    _, report = quantize_model(
        model, cfg, probe=lambda m: m(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    )
    assert report.allocation is not None
    assert [u["names"] for u in report.allocation["layers"]] == [["emb", "head"], ["mid"]]
    bits = {r.name: r.bits for r in report.layers}
    assert bits["emb"] == bits["head"]
    assert next(r for r in report.layers if r.name == "head").tied_to == "emb"


def test_a_budget_needs_a_probe() -> None:
    with pytest.raises(ConfigError, match="a bit budget needs a probe"):
        quantize_model(_net(), QuantConfig(LayerRule("minmax", 4), budget=3.0))


def test_a_rule_without_any_budget_width_is_refused() -> None:
    cfg = QuantConfig(LayerRule("nf4", 4, "group:32"), budget=3.0, budget_bits=(2, 3))
    with pytest.raises(ConfigError, match=r"takes none of the budget's bit widths 2, 3"):
        quantize_model(_net(), cfg, probe=_probe)
