"""Pruning methods, one small file each, in one registry (``METHODS``)."""

from . import fista, magnitude, optima, sparsegpt, wanda
from .base import INTRA_BLOCK_METHODS, METHODS, LayerProblem, LayerResult, get_method, register

__all__ = [
    "INTRA_BLOCK_METHODS",
    "METHODS",
    "LayerProblem",
    "LayerResult",
    "fista",
    "get_method",
    "magnitude",
    "optima",
    "register",
    "sparsegpt",
    "wanda",
]
