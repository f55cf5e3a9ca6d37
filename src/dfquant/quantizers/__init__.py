"""Quantizer rules and their registry. Importing this package registers every built-in rule."""

# Registration order is the order in which rules are listed: keep these lines in this order.
# isort: off
from dfquant.quantizers import uniform  # noqa: F401  (registers minmax, mse)
from dfquant.quantizers import lloyd  # noqa: F401  (registers lloyd-max, lloyd-empirical)
from dfquant.quantizers import codebook  # noqa: F401  (registers nf4, apot)
from dfquant.quantizers import aciq  # noqa: F401  (registers aciq)
from dfquant.quantizers import statq  # noqa: F401  (registers statq)
from dfquant.quantizers import optimal  # noqa: F401  (registers lloyd-optimal)
from dfquant.quantizers import ternary  # noqa: F401  (registers ternary, dorefa)
from dfquant.quantizers import blockscaled  # noqa: F401  (registers mxfp4, nvfp4)

# isort: on
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.codes import QParams
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor
from dfquant.quantizers.registry import available, get_quantizer, quantizer_class, register

__all__ = [
    "Granularity",
    "QParams",
    "QTensor",
    "Quantizer",
    "available",
    "get_quantizer",
    "quantizer_class",
    "register",
]
