"""Quantizer registry: name -> rule class. Names are resolved only through this table (never from a class path)."""

from __future__ import annotations

from typing import Any, TypeVar

from dfquant.errors import ConfigError
from dfquant.quantizers.base import Quantizer

_REGISTRY: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])


def register(cls: Q) -> Q:
    """Class decorator: add a :class:`Quantizer` subclass under its ``name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"quantizer name '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered quantizer names, in registration order."""
    return list(_REGISTRY)


def quantizer_class(name: str) -> type[Quantizer]:
    """The class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown quantizer '{name}'; available: {', '.join(available())}") from None


def get_quantizer(name: str, bits: int, **options: Any) -> Quantizer:
    """Build the rule ``name`` at ``bits`` with ``options`` (validated by the rule)."""
    return quantizer_class(name)(bits, **options)
