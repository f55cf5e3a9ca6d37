"""The package version (one place; the file format records it)."""

__version__ = "0.1.0"
