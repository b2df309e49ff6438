"""Pruning methods, one small file each, in one registry (``METHODS``).

Unstructured / N:M methods are layer functions (``register_layer_method``); the structured
methods (fasp, spap, wanda-sp) are a selection rule and a restoration given to the channel
block program (``channels.ChannelProgram``, ``register_channel_method``). Every method has a
typed options dataclass; ``get_method(name).parse_options(raw)`` checks user values.
"""

from . import fasp, fista, l0_admm, magnitude, optima, spap, sparsegpt, wanda, wanda_sp
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
from .channels import (
    ChannelOptions,
    ChannelProblem,
    ChannelProgram,
    Channels,
    Coupling,
    Restoration,
    register_channel_method,
)
from .fasp import FaspOptions
from .spap import SpapOptions
from .wanda_sp import WandaSPOptions

__all__ = [
    "METHODS",
    "ChannelOptions",
    "ChannelProblem",
    "ChannelProgram",
    "Channels",
    "Coupling",
    "FaspOptions",
    "LayerProblem",
    "LayerResult",
    "Method",
    "NoOptions",
    "Restoration",
    "SpapOptions",
    "WandaSPOptions",
    "corrected_gram",
    "fasp",
    "fista",
    "get_method",
    "l0_admm",
    "magnitude",
    "optima",
    "register",
    "register_channel_method",
    "register_layer_method",
    "result_counts",
    "sparsegpt",
    "spap",
    "wanda",
    "wanda_sp",
]
