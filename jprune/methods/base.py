"""The contract between the block engine and a pruning method.

The engine hands a method one linear layer at a time as a ``LayerProblem``: the dense weight
and Gram matrices of that layer's calibration inputs. A method returns the new weight and an
``info`` dict of plain numbers (outcomes as data; nothing prints).

Notation (torch layout): ``W0`` is (d_out, d_in); ``X`` (d_in, n) are the inputs the *dense*
model feeds the layer, ``Xp`` the inputs the already-pruned model feeds it.

* ``gram = Xp Xp^T`` (d_in, d_in), float32, summed (not averaged) over calibration tokens.
* ``cross_gram = X Xp^T``, or ``None`` when the two inputs coincide (then it equals ``gram``).

The layer-wise reconstruction objective every method is measured by is
``||W Xp - W0 X||_F^2 = tr(W G W^T) - 2 tr(W0 C W^T) + tr(W0 H_dense W0^T)``; the engine
computes it for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jprune.errors import JpruneError
from jprune.solvers import Pattern


class LayerProblem(NamedTuple):
    weight: jax.Array  # (d_out, d_in) dense weight W0
    gram: jax.Array  # (d_in, d_in) Xp Xp^T of the inputs the pruned model feeds this layer
    cross_gram: jax.Array | None  # (d_in, d_in) X Xp^T, None when Xp == X
    num_tokens: int  # calibration tokens summed into the Grams
    name: str = ""  # e.g. "layers.3.mlp.down_proj", for reports and errors

    @property
    def target_gram(self) -> jax.Array:
        """``X Xp^T``: the Gram that multiplies ``W0`` in the linear term."""
        return self.gram if self.cross_gram is None else self.cross_gram


class LayerResult(NamedTuple):
    weight: jax.Array  # (d_out, d_in) pruned weight, dtype of the dense weight
    info: dict[str, Any]  # plain numbers: iterations, objective, certificate, ...


# A method: (problem, pattern, **options) -> LayerResult
LayerMethod = Callable[..., LayerResult]

METHODS: dict[str, LayerMethod] = {}
# Methods whose published algorithm prunes a block's linears in stages, each seeing the
# already-pruned upstream operators (the engine's ``intra_block`` default for them).
INTRA_BLOCK_METHODS: set[str] = set()


def register(name: str, *, intra_block: bool = False) -> Callable[[LayerMethod], LayerMethod]:
    """Add a layer method to the registry under ``name`` (the CLI's ``--method``)."""

    def add(fn: LayerMethod) -> LayerMethod:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = fn
        if intra_block:
            INTRA_BLOCK_METHODS.add(name)
        return fn

    return add


def get_method(name: str) -> LayerMethod:
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise JpruneError(f"unknown method {name!r}; known methods: {known}")
    return METHODS[name]


__all__ = [
    "INTRA_BLOCK_METHODS",
    "LayerMethod",
    "LayerProblem",
    "LayerResult",
    "METHODS",
    "Pattern",
    "get_method",
    "register",
]
