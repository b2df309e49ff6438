"""Pruning methods, one small file each, in one registry (``METHODS``)."""

from . import magnitude, sparsegpt, wanda
from .base import METHODS, LayerProblem, LayerResult, get_method, register

__all__ = [
    "METHODS",
    "LayerProblem",
    "LayerResult",
    "get_method",
    "magnitude",
    "register",
    "sparsegpt",
    "wanda",
]
