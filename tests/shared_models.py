"""The small models the tests share: a plain MLP, a residual block, and BatchNorm statistics "as training would
leave them".

Import as ``from shared_models import Block, mlp, trained_like`` (the tests folder is on the path through its conftest).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def mlp(*widths: int) -> nn.Sequential:
    """``Linear(w0, w1), ReLU, Linear(w1, w2), ...``: a plain MLP of the given widths (initialized from torch's
    global generator, as ``nn.Linear`` is)."""
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least two widths, got {widths}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def trained_like(model: nn.Module, seed: int = 0, bias_std: float = 0.3) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would (from its own
    generator, so the global seed does not matter): ``mean ~ N(0, 0.3^2)``, ``var ~ U(0.5, 1.5)``,
    ``gamma ~ U(0.5, 1.5)``, ``beta ~ N(0, bias_std^2)``. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * bias_std)
    return model.eval()


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity shortcut, then ReLU (functional activations)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)
