"""dfquant's quantization config and quantizer for ``transformers``: ``from_pretrained`` of a dfquant folder.

``transformers`` reads ``quantization_config`` from a folder's ``config.json`` and hands the model skeleton to the
quantizer registered for its ``quant_method`` (``register_quantization_config`` / ``register_quantizer``, its
public hooks). :class:`DfquantHfQuantizer` replaces every layer named in ``quantization_config["layers"]`` by
the dfquant layer its metadata describe (:meth:`dfquant.nn.base.QuantModule.from_meta`), before the weights are
read; ``transformers`` then loads the packed codes, scales and tables into those layers like any other tensor.
The model computes exactly what :func:`dfquant.load_quantized` of the same quantized model computes.

:func:`register` is idempotent. ``import dfquant`` calls it when ``transformers`` is already imported, and
otherwise as soon as ``transformers.quantizers.auto`` is (a post-import hook), so that the import of
``transformers``, several seconds, is never paid by code that does not use it.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dfquant.errors import ConfigError
from dfquant.graph.modules import replace_module
from dfquant.io.hf import HF_QUANT_METHOD
from dfquant.io.manifest import FORMAT_VERSION, READ_VERSIONS
from dfquant.io.manifest import library_version as installed_version
from dfquant.nn.base import QuantModule

__all__ = ["DfquantHfConfig", "DfquantHfQuantizer", "register"]


class DfquantHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a dfquant Hugging Face folder (see :mod:`dfquant.io.hf`).

    Args:
        layers: per layer (qualified name in the ``transformers`` model), the layer metadata of the file format.
        format_version: the file format version the folder was written with.
        library_version: the dfquant that wrote it.

    Raises:
        ValueError: a format version this dfquant does not read (naming both), or no layers.
    """

    def __init__(
        self,
        layers: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        library_version: str = "",
        **kwargs: Any,
    ) -> None:
        self.quant_method = HF_QUANT_METHOD  # type: ignore[assignment]
        self.layers = dict(layers or {})
        self.format_version = format_version
        self.library_version = library_version
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(
                f"dfquant quantization_config: format_version must be a positive integer, got {format_version!r}"
            )
        if format_version not in READ_VERSIONS:
            raise ValueError(
                f"dfquant folder format version {format_version} is newer than this dfquant ({installed_version()}) "
                f"reads (version {FORMAT_VERSION}); upgrade dfquant"
            )
        if not self.layers:
            raise ValueError("dfquant quantization_config lists no quantized layer")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": HF_QUANT_METHOD,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "layers": self.layers,
        }


class DfquantHfQuantizer(HfQuantizer):
    """Loads dfquant folders (pre-quantized only: quantizing happens in dfquant, without data)."""

    requires_calibration = True
    quantization_config: DfquantHfConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        for name, meta in self.quantization_config.layers.items():
            try:
                replace_module(model, name, QuantModule.from_meta(meta, cache_weight=False))
            except (ConfigError, KeyError, TypeError) as e:
                raise ValueError(f"dfquant quantization_config: layer '{name}': {e}") from None

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for m in model.modules():
            if isinstance(m, QuantModule):
                m.clear_cache()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register :class:`DfquantHfConfig` and :class:`DfquantHfQuantizer` under ``quant_method="dfquant"`` (once)."""
    if HF_QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(HF_QUANT_METHOD)(DfquantHfConfig)
    if HF_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(HF_QUANT_METHOD)(DfquantHfQuantizer)
