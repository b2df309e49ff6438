"""The one loop every solver runs: step an immutable state until every row has converged.

A solver supplies ``init`` (build the state) and ``step`` (state -> state); states are
NamedTuples carrying at least ``iteration`` (int32 scalar) and ``converged`` (bool, per row).
Rows that converged are frozen by their ``step``, so running more iterations for the slower
rows (or for other problems in a ``vmap`` batch) never changes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

State = TypeVar("State")


def run_loop(step: Callable[[State], State], state: State, *, maxiter: int) -> State:
    """Apply ``step`` until all rows converged or ``maxiter`` iterations ran."""

    def keep_going(s):
        return (s.iteration < maxiter) & ~jnp.all(s.converged)

    return jax.lax.while_loop(keep_going, step, state)


def advance_active_rows(old: State, converged_now: jax.Array, **iterates: jax.Array) -> State:
    """``old`` with the new ``iterates`` taken only by rows still running, counters advanced.

    Each iterate has the row axis first ((m, d) or (m,)); a row that had converged keeps its
    old values, which is how ``step`` functions freeze finished rows.
    """
    active = ~old.converged

    def pick(new: jax.Array, current: jax.Array) -> jax.Array:
        return jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, current)

    return old._replace(
        **{name: pick(value, getattr(old, name)) for name, value in iterates.items()},
        iteration=old.iteration + 1,
        num_steps=old.num_steps + active,
        converged=old.converged | converged_now,
    )


def row_scale(B: jax.Array) -> jax.Array:
    """Per-row norm used to make tolerances relative; never zero, so ``0 <= tol * scale``."""
    norm = jnp.linalg.norm(B, axis=-1)
    return jnp.maximum(norm, jnp.finfo(B.dtype).tiny)
