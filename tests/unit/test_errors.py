"""``check_finite``: every NaN or infinity is found (one reduction pass for floating tensors), counted in the
message, for every floating dtype and position."""

from __future__ import annotations

import pytest
import torch

from dfquant.errors import InputError, check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pos", [0, 777, -1])
def test_any_non_finite_value_is_refused_with_counts(dtype: torch.dtype, bad: float, pos: int) -> None:
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    check_finite(x, "layer.weight")
    x.view(-1)[pos] = bad
    nan, inf = (1, 0) if bad != bad else (0, 1)
    with pytest.raises(InputError, match=rf"'layer.weight' has {nan} NaN and {inf} infinite values out of 2000"):
        check_finite(x, "layer.weight")


def test_nan_and_inf_together_are_both_counted() -> None:
    x = torch.zeros(10)
    x[2], x[5], x[7] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(InputError, match="has 1 NaN and 2 infinite values out of 10"):
        check_finite(x, "w")


def test_integer_and_empty_tensors_pass_and_non_tensors_are_named() -> None:
    check_finite(torch.arange(5), "codes")
    check_finite(torch.empty(0), "empty")
    with pytest.raises(InputError, match=r"'w' must be a torch\.Tensor, got list"):
        check_finite([1.0], "w")
