"""The ``dfquant`` command line: one module per verb, each parsing arguments, calling the library and
printing.
"""

from dfquant.cli.main import main

__all__ = ["main"]
