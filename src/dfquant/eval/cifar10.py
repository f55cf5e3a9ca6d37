"""CIFAR-10: top-1 on the exact test images 0..1016 and top-1 agreement on the 10,000-image JPEG copy.

The assets hold the bit-exact first 1017 CIFAR-10 test images (``cifar10-test/cifar10_test_first1017.npz``)
and a lossy JPEG-q75 copy of all 10,000 (``cifar10-test/cifar10_test_jpeg_q75_10k.npz``). Top-1 is measured on
the exact images (ResNet-20: 91.64 %, ResNet-32: 92.82 %); the JPEG copy costs about 10 points of accuracy, so
it serves only as a low-variance fidelity figure: the percentage of images where the quantized model's top-1
class equals the float model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dfquant.errors import ConfigError
from dfquant.eval.metrics import agreement, top1_accuracy
from dfquant.eval.registry import Progress, models_to_run, no_grad_eval, register_evaluator
from dfquant.graph.modules import model_device
from dfquant.zoo.assets import asset_path, missing_reason
from dfquant.zoo.registry import LoadedModel

__all__ = ["EXACT_FILE", "JPEG_FILE", "load_cifar10", "predict", "preprocess"]

ASSET_DIR = "cifar10-test"
EXACT_FILE = "cifar10_test_first1017.npz"
JPEG_FILE = "cifar10_test_jpeg_q75_10k.npz"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BATCH = 500


def load_cifar10(which: str = EXACT_FILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, N x 3 x 32 x 32) and labels (int64, N) of one CIFAR-10 asset file.

    Raises:
        ConfigError: when the file is missing.
    """
    p = asset_path(ASSET_DIR, which)
    if p is None:
        raise ConfigError(f"task 'cifar10' needs its data: {missing_reason(ASSET_DIR, which)}")
    with np.load(p) as z:
        images = torch.from_numpy(np.ascontiguousarray(z["images"]))
        labels = torch.from_numpy(np.ascontiguousarray(z["labels"])).long()
    return images, labels


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 CHW images -> float32 ``(x / 255 - mean) / std`` per channel."""
    x = images.float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def predict(
    model: nn.Module, images: torch.Tensor, *, what: str = "images", progress: Progress | None = None
) -> torch.Tensor:
    """Top-1 class of each uint8 image, computed in batches of 500 without autograd."""
    preds = []
    n = images.shape[0]
    with no_grad_eval(model):
        for i in range(0, n, BATCH):
            preds.append(model(preprocess(images[i : i + BATCH]).to(model_device(model))).argmax(-1).cpu())
            if progress is not None:
                progress(what, min(i + BATCH, n), n)
    return torch.cat(preds)


@register_evaluator("cifar10", kinds=("image-classifier",), description="CIFAR-10 top-1 and agreement")
def evaluate_cifar10(
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Top-1 (%) on the exact 1017 test images; top-1 agreement (%) with the float model on the 10k JPEG copy.

    Args:
        loaded: the loaded model (unused beyond its kind).
        float_model: the float model, or None.
        quant_model: the quantized model, or None.
        progress: optional ``progress(what, done, total)``.
        limit: use only the first ``limit`` images of the JPEG copy (top-1 always uses all 1017 images).

    Returns:
        ``float`` / ``quantized``: ``top1`` (exact images), ``correct``, ``top1_jpeg`` (JPEG copy) and, for
        the quantized model when both are given, ``agreement``; ``setup`` states the data and preprocessing.
    """
    exact_x, exact_y = load_cifar10(EXACT_FILE)
    jpeg_x, jpeg_y = load_cifar10(JPEG_FILE)
    if limit is not None:
        jpeg_x, jpeg_y = jpeg_x[:limit], jpeg_y[:limit]
    out: dict[str, Any] = {
        "task": "cifar10",
        "setup": {
            "top1_images": int(exact_x.shape[0]),
            "top1_data": f"{ASSET_DIR}/{EXACT_FILE} (bit-exact test images 0..{exact_x.shape[0] - 1})",
            "agreement_images": int(jpeg_x.shape[0]),
            "agreement_data": f"{ASSET_DIR}/{JPEG_FILE} (lossy JPEG-q75 copy of the test set)",
            "preprocessing": f"x/255, normalize mean {MEAN}, std {STD}",
        },
    }
    jpeg_preds: dict[str, torch.Tensor] = {}
    for key, model in models_to_run(float_model, quant_model):
        pe = predict(model, exact_x, what=f"{key} exact", progress=progress)
        pj = predict(model, jpeg_x, what=f"{key} jpeg", progress=progress)
        jpeg_preds[key] = pj
        out[key] = {
            "top1": round(top1_accuracy(pe, exact_y), 4),
            "correct": int((pe == exact_y).sum()),
            "top1_jpeg": round(top1_accuracy(pj, jpeg_y), 4),
        }
    if len(jpeg_preds) == 2:
        out["float"]["agreement"] = 100.0
        out["quantized"]["agreement"] = round(agreement(jpeg_preds["quantized"], jpeg_preds["float"]), 4)
    return out
