"""What every iterative row solver returns next to its answer: certificate, counters, result code.

One ``SolverInfo`` serves ``fista``, ``lasso_admm`` and ``box_qp``, so callers read a run's
outcome the same way whichever solver made it. ``result`` is a traced int32 array, never a
Python value or an exception: it survives ``jit`` and ``vmap``, and a caller decides what a
non-converged or non-finite row means for it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Result(enum.IntEnum):
    """Per-row outcome codes, stored as int32 in ``result`` fields."""

    CONVERGED = 0  # the stopping test passed (for the continuations: the decision settled)
    MAX_ITERATIONS = 1  # the iteration cap ran out first; the answer is the last iterate
    NONFINITE = 2  # the row's answer or objective holds a nan or inf (e.g. a nan/inf in H or C)


class SolverInfo(NamedTuple):
    """Outcome of a row-batched solve; every field but ``iterations`` has one entry per row.

    ``gap`` is the duality gap of the Gram-form dual ``max_u -1/2 u H u^T - h*(-u H)`` at
    ``u = w``, without the dual-feasibility indicator (``kkt`` measures that part):

    * lasso (``h = -c.w + lam ||w||_1``): ``lam ||w||_1 + w . g``;
    * box QP (``h = -c.w`` + the box): ``sum_j g_j (w_j - b_j)`` with ``g = w H - c`` and
      ``b_j`` the bound the gradient pushes toward (``lower`` if ``g_j > 0``, else ``upper``),
      over the entries where that bound is finite: the Frank-Wolfe gap of those entries,
      ``>= 0`` for a feasible ``w``. A fixed entry (``lower == upper``) contributes 0, so in the
      fixed/free case (OPTIMA's refit) ``gap`` is 0 and ``kkt`` is the whole certificate.

    Either way ``gap`` is the exact duality gap, so it bounds ``objective - optimum``, whenever
    ``w`` is dual feasible (lasso: ``|g_j| <= lam`` on the mask; box: no nonzero ``g_j`` pushes
    toward an infinite bound), and it is 0 at the optimum. ``kkt`` is the solver's own residual
    (``fista``: minimum-norm subgradient; ``box_qp``: projected gradient), zero iff optimal.
    """

    objective: jax.Array  # (m,) the row's objective at the answer
    gap: jax.Array  # (m,) duality gap, see above
    kkt: jax.Array  # (m,) inf-norm of the optimality residual (zero iff optimal)
    num_steps: jax.Array  # (m,) int32 iterations taken by each row
    converged: jax.Array  # (m,) bool: the row passed its stopping test
    iterations: jax.Array  # () int32 iterations of the shared loop
    result: jax.Array  # (m,) int32 Result code: result_codes(converged, finite_rows(...))


def finite_rows(W: jax.Array, objective: jax.Array) -> jax.Array:
    """Per row: every entry of ``W`` (m, d) and the row's ``objective`` (m,) is finite."""
    return jnp.all(jnp.isfinite(W), axis=-1) & jnp.isfinite(objective)


def result_codes(converged: jax.Array, finite: jax.Array) -> jax.Array:
    """int32 ``Result`` per row; a non-finite row is ``NONFINITE`` even if it stopped.

    The two arguments broadcast against each other (a scalar ``converged`` for a whole-matrix
    decision with per-row ``finite``).
    """
    stopped = jnp.where(
        converged,
        jnp.asarray(Result.CONVERGED, jnp.int32),
        jnp.asarray(Result.MAX_ITERATIONS, jnp.int32),
    )
    return jnp.where(finite, stopped, jnp.asarray(Result.NONFINITE, jnp.int32))
