"""A ``.safetensors`` state dict plus a user-named ``module:callable`` that builds its architecture.

Trust: resolving ``"package.module:function"`` imports that module, which runs its code with the user's
rights. dfquant does this only for a string the user gives explicitly (an argument or a command-line flag),
never for one read from a file: a saved dfquant file records the builder's name for information, and
rebuilding it needs the user to name the builder again:
``build_architecture(source, builder="package.module:function")``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dfquant.errors import ModelError
from dfquant.io.checkpoints import load_state_dict
from dfquant.zoo.registry import LoadedModel, register_model

__all__ = ["load_safetensors", "resolve_builder"]


def resolve_builder(spec: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:attr.path"`` and return the callable it names.

    Importing runs the module's code: pass only a string you trust (never one read from a file).

    Raises:
        ModelError: malformed string, module not importable, attribute missing or not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ModelError(f"builder must look like 'package.module:callable', got {spec!r}")
    mod_name, attr = spec.split(":")
    if not mod_name or not attr:
        raise ModelError(f"builder must look like 'package.module:callable', got {spec!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import the builder module '{mod_name}' (from {spec!r}): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"builder {spec!r}: '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"builder {spec!r} is not callable")
    return obj


def _make(builder: str, builder_kwargs: dict[str, Any] | None) -> nn.Module:
    model = resolve_builder(builder)(**(builder_kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ModelError(f"builder {builder!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build(source: dict[str, Any], builder: str | None = None, **_: Any) -> nn.Module:
    arch = source.get("arch") or {}
    recorded = arch.get("builder")
    if builder is None:
        raise ModelError(
            f"this model was built by {recorded!r}; dfquant never imports code named in a file: pass "
            "builder='package.module:callable' explicitly to rebuild it"
        )
    return _make(builder, source.get("builder_kwargs"))


@register_model("safetensors", build=_build, description="a .safetensors state dict + builder='module:callable'")
def load_safetensors(
    path: str | Path,
    builder: str | None = None,
    builder_kwargs: dict[str, Any] | None = None,
    task: str = "fidelity",
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load a ``.safetensors`` state dict into the module that ``builder`` returns.

    Args:
        path: the ``.safetensors`` file.
        builder: ``"package.module:callable"`` returning the float ``nn.Module`` (imported: see the module
            docstring for what that trusts).
        builder_kwargs: JSON-able keyword arguments for the builder.
        task: the default evaluation task.
        input_shape: one input's shape without the batch dimension (lets the fidelity check feed images).

    Returns:
        The model, loaded strictly (every tensor must match), float32, eval mode.

    Raises:
        ModelError: no builder, a builder that fails, or tensors that do not match the module.
        FileFormatError: the file is missing or not readable.
    """
    p = Path(path).expanduser()
    if builder is None:
        raise ModelError(
            f"'{p}' is a bare state dict: give builder='package.module:callable' (--builder) naming a "
            "function that returns the architecture"
        )
    state = load_state_dict(p)
    model = _make(builder, builder_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"'{p}' does not fit the module built by {builder!r}: {' '.join(first)[:400]}") from None
    source: dict[str, Any] = {
        "zoo": "safetensors",
        "path": str(p),
        "task": task,
        "arch": {"builder": builder},
    }
    if builder_kwargs:
        source["builder_kwargs"] = dict(builder_kwargs)
    if input_shape is not None:
        source["input_shape"] = list(input_shape)
    return LoadedModel(
        model=model.float().eval(),
        name=p.stem,
        source=source,
        task=task,
        kind="image-classifier" if input_shape is not None else "module",
        input_shape=tuple(input_shape) if input_shape is not None else None,
    )
