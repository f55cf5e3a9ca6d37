"""The model zoo: loaders registered by name, and rebuilding a model from the ``source`` dict a file records.

Registered names: ``cifar-resnet20/32/44/56``, ``minilm``, ``smollm2-135m``, and the path-based ``hf`` (a
local Hugging Face folder), ``gguf`` (a LLaMA GGUF file) and ``safetensors`` (a state dict + ``builder``). Add
a model with :func:`register_model` without touching the pipeline. ``transformers`` is imported only when a
loader that needs it runs.

Example:
    >>> from dfquant.zoo import load_model
    >>> loaded = load_model("cifar-resnet20")  # doctest: +SKIP
    >>> loaded.task
    'cifar10'
"""

from dfquant.zoo import cifar_resnet, gguf_llama, hf, safetensors_builder
from dfquant.zoo.cifar_resnet import CifarResNet
from dfquant.zoo.hf import SentenceEncoder
from dfquant.zoo.registry import (
    LoadedModel,
    ZooEntry,
    available_models,
    build_architecture,
    load_from_source,
    load_model,
    register_model,
)

__all__ = [
    "CifarResNet",
    "LoadedModel",
    "SentenceEncoder",
    "ZooEntry",
    "available_models",
    "build_architecture",
    "cifar_resnet",
    "gguf_llama",
    "hf",
    "load_from_source",
    "load_model",
    "register_model",
    "safetensors_builder",
]
