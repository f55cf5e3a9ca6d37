"""CIFAR-10 ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2).

Depth 6n+2 with n BasicBlocks in each of three stages (16, 32, 64 channels); the shortcut is "option A": when
the shape changes it takes every second pixel and zero-pads the channels (no parameters). The parameter and
buffer names follow the widely used akamaster/pytorch_resnet_cifar10 checkpoints (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``), so those checkpoints load directly.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only (through
:func:`dfquant.io.checkpoints.load_state_dict`); a file that needs more than tensors is refused.

Example:
    >>> net = CifarResNet(20)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ModelError
from dfquant.io.checkpoints import load_state_dict
from dfquant.zoo.assets import asset_path, missing_reason
from dfquant.zoo.registry import LoadedModel, register_model

__all__ = ["DEPTHS", "BasicBlock", "CifarResNet", "ShortcutA", "load_cifar_resnet"]

DEPTHS = (20, 32, 44, 56)
ASSET_DIR = "cifar10-resnet"
ASSET_FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th"}
INPUT_SHAPE = (3, 32, 32)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: ``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if planes != 2 * in_planes or stride != 2:
                raise ModelError(
                    f"option-A shortcut needs planes = 2 x in_planes and stride 2; got {in_planes}->"
                    f"{planes}, stride {stride}"
                )
            self.shortcut = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...), option-A shortcuts.

    Args:
        depth: total depth, 6n+2 with n >= 1.
        num_classes: outputs of the final linear layer.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _blocks_per_stage(state: dict[str, torch.Tensor]) -> int:
    idx = {int(k.split(".")[1]) for k in state if k.startswith("layer1.") and k.split(".")[1].isdigit()}
    return max(idx) + 1 if idx else 0


def load_cifar_state(net: CifarResNet, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy an akamaster-style state dict (``module.`` prefix already stripped) into ``net``, checking it.

    Raises:
        ModelError: wrong depth, missing or unexpected tensors, or shape mismatches; the message names them.
    """
    n_file = _blocks_per_stage(state)
    n_net = (net.depth - 2) // 6
    if n_file != n_net:
        raise ModelError(
            f"'{origin}' holds a CIFAR ResNet-{6 * n_file + 2} ({n_file} blocks per stage), "
            f"not the ResNet-{net.depth} asked for"
        )
    own = net.state_dict()
    wanted = {k for k in own if not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - state.keys())
    unexpected = sorted(k for k in state.keys() - own.keys())
    bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in sorted(wanted & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append(f"shape mismatch {bad[:5]}")
        raise ModelError(f"'{origin}' does not fit cifar-resnet{net.depth}: " + "; ".join(parts))
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k].to(own[k].dtype))


def default_checkpoint(depth: int) -> Path:
    """The checkpoint of ResNet-``depth`` in the assets folder.

    Raises:
        ModelError: when the assets folder does not hold it (only ResNet-20 and ResNet-32 are shipped).
    """
    fname = ASSET_FILES.get(depth)
    p = asset_path(ASSET_DIR, fname) if fname else None
    if p is None:
        why = missing_reason(ASSET_DIR, fname) if fname else "the assets hold only ResNet-20 and ResNet-32"
        raise ModelError(f"no checkpoint for cifar-resnet{depth} ({why}); pass checkpoint=PATH (--checkpoint)")
    return p


def load_cifar_resnet(depth: int, checkpoint: str | Path | None = None) -> LoadedModel:
    """Load a CIFAR-10 ResNet from an akamaster-style checkpoint.

    Args:
        depth: 20, 32, 44 or 56.
        checkpoint: path of a ``torch.save`` dict with ``state_dict`` (keys may start with ``module.``) or of
            a ``.safetensors`` state dict; default: the asset file of that depth, when present.

    Returns:
        The model (eval mode, float32); task ``"cifar10"``; source ``{"zoo": "cifar-resnetNN"}`` plus the
        checkpoint path when one was given.

    Raises:
        ModelError: unknown depth, no checkpoint, or one that does not fit.
        FileFormatError: the file is missing, unreadable, or not a plain tensor checkpoint.
    """
    if depth not in DEPTHS:
        raise ModelError(f"cifar-resnet depth must be one of {DEPTHS}, got {depth}")
    path = Path(checkpoint).expanduser() if checkpoint is not None else default_checkpoint(depth)
    net = CifarResNet(depth)
    load_cifar_state(net, load_state_dict(path), str(path))
    source: dict[str, Any] = {"zoo": f"cifar-resnet{depth}"}
    if checkpoint is not None:
        source["checkpoint"] = str(path)
    return LoadedModel(
        model=net.float().eval(),
        name=f"cifar-resnet{depth}",
        source=source,
        task="cifar10",
        kind="image-classifier",
        input_shape=INPUT_SHAPE,
    )


def _build(source: dict[str, Any], **_: Any) -> nn.Module:
    return CifarResNet(int(source["zoo"].removeprefix("cifar-resnet")))


def _register(depth: int) -> None:
    def load(checkpoint: str | Path | None = None) -> LoadedModel:
        return load_cifar_resnet(depth, checkpoint)

    load.__name__ = f"load_cifar_resnet{depth}"
    desc = f"CIFAR-10 ResNet-{depth} (option-A shortcuts) from an akamaster-style checkpoint"
    register_model(f"cifar-resnet{depth}", build=_build, description=desc)(load)


for _d in DEPTHS:
    _register(_d)
