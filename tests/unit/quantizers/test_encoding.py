"""Every rule encodes through the lookup-table encoder; its codes are those of the plain nearest-level encoder
``encode_rows`` (binary search over the decision thresholds), checked end to end on the rules' own fits."""

from __future__ import annotations

import pytest
import torch

from dfquant.quantizers import get_quantizer
from dfquant.quantizers.codes import encode_rows
from dfquant.quantizers.qtensor import to_rows

CASES = [
    ("minmax", {}),
    ("nf4", {}),
    ("mse", {}),
    ("aciq", {}),
    ("apot", {}),
    ("statq", {"format": "fp4_e2m1"}),
    ("statq", {"format": "uint4"}),
    ("lloyd-max", {}),
    ("lloyd-empirical", {}),
]


def _data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(48, 96, generator=g)
    if kind == "laplace":
        u = torch.rand(48, 96, generator=g).clamp(1e-6, 1 - 1e-6) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif kind == "grid":  # many values exactly on decision thresholds
        x = torch.randint(-16, 17, (48, 96), generator=g).float() / 8
    elif kind == "sparse":
        x = x * (torch.rand(48, 96, generator=g) > 0.8)
    return x


@pytest.mark.parametrize(("rule", "opts"), CASES)
@pytest.mark.parametrize("gran", ["channel", "group:32", "group:40"])
@pytest.mark.parametrize("kind", ["gauss", "laplace", "grid", "sparse"])
def test_codes_equal_the_binary_search_encoder(rule: str, opts: dict, gran: str, kind: str) -> None:
    x = _data(kind)
    bits = 4 if rule == "nf4" or opts.get("format") in ("fp4_e2m1", "uint4") else 3
    qt = get_quantizer(rule, bits, **opts).quantize(x, gran)
    rows = to_rows(x, qt.granularity)
    offset = qt.offset if qt.offset is not None else torch.zeros_like(qt.scale)
    ref = encode_rows(rows, qt.scale.float(), offset.float(), qt.levels, qt.group_len, qt.table_index)
    assert torch.equal(qt.codes, ref)
    assert int(qt.codes.max()) < qt.levels.shape[-1]
