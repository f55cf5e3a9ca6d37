"""Reading float weights from files: ``.safetensors`` or PyTorch checkpoints, never by unpickling code.

PyTorch checkpoints are read with ``torch.load(..., weights_only=True)`` only; a file that needs anything beyond
tensors and plain containers is refused (there is no unsafe fallback).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from dfquant.errors import FileFormatError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the tensors of a ``.safetensors`` file or a PyTorch checkpoint.

    A checkpoint that is a dict holding ``state_dict`` (or ``model``) uses that entry; a ``module.`` prefix (from
    ``nn.DataParallel``) is stripped.

    Raises:
        FileFormatError: missing file, unreadable content, or a pickle that would run code.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"no such file: '{p}'")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise FileFormatError(f"'{p}' is not a readable safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileFormatError(
                f"'{p}' is refused: it is not a plain tensor checkpoint (weights_only loading failed: {first})"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise FileFormatError(f"'{p}' is not a readable PyTorch checkpoint: {e}") from None
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict):
            raise FileFormatError(f"'{p}' holds a {type(obj).__name__}, not a dict of tensors")
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise FileFormatError(f"'{p}' holds no tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
