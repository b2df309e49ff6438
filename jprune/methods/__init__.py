"""Pruning methods, one small file each, in one registry (``METHODS``).

Unstructured / N:M methods are layer functions (``register_layer_method``); the structured
methods (fasp, spap, wanda-sp) are block programs in ``jprune.structured``. Every method has a
typed options dataclass; ``get_method(name).parse_options(raw)`` checks user values.
"""

from . import fista, l0_admm, magnitude, optima, sparsegpt, wanda
from .base import (
    METHODS,
    LayerProblem,
    LayerResult,
    Method,
    NoOptions,
    corrected_gram,
    get_method,
    register,
    register_layer_method,
    result_counts,
)

__all__ = [
    "METHODS",
    "LayerProblem",
    "LayerResult",
    "Method",
    "NoOptions",
    "corrected_gram",
    "fista",
    "get_method",
    "l0_admm",
    "magnitude",
    "optima",
    "register",
    "register_layer_method",
    "result_counts",
    "sparsegpt",
    "wanda",
]


def _register_structured() -> None:
    # The structured programs import the engine's helpers, which import this package: they
    # are registered once the package is complete.
    from jprune import structured  # noqa: F401


_register_structured()
