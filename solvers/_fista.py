"""FISTA for the row-batched, masked lasso.

    min_W  1/2 sum_i w_i H w_i^T - sum_i c_i . w_i + sum_i lam_i ||w_i||_1
    s.t.   W_ij = 0 where mask_ij is False

with step ``1/L``, ``L = lambda_max(H)``, Nesterov momentum and adaptive restart
(Beck & Teboulle, SIAM J. Imaging Sci. 2009; the iteration itself is in ``_apg.py``).

Certificate: the duality gap of the Gram-form dual ``max_u -1/2 u H u^T`` s.t.
``|c - u H|_j <= lam`` on the mask, evaluated at ``u = w``:
``gap_i = lam_i ||w_i||_1 + w_i . (w_i H - c_i)``. It bounds the suboptimality of ``w`` whenever
``w`` is dual feasible; ``kkt`` is the norm of the minimum-norm subgradient (zero iff optimal).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._apg import apg
from ._implicit import lasso_solution
from ._info import SolverInfo, finite_rows, result_codes
from ._quadratic import compute_dtype, lipschitz, per_row, row_objective
from ._sparsity import prox_l1

LassoInfo = SolverInfo  # the name from before every row solver returned one info type


def _solve(maxiter, tol, H, C, lam, W0, mask):
    L = lipschitz(H)
    threshold = (lam / L)[:, None]

    def prox(V):
        return jnp.where(mask, prox_l1(V, threshold), 0)

    state = apg(H, C, prox, jnp.where(mask, W0, 0), L, maxiter=maxiter, tol=tol)
    return state.W, (state.num_steps, state.converged, state.iteration)


_lasso = lasso_solution(_solve)


def lasso_certificate(W, H, C, lam, mask):
    """Per-row objective, duality gap and KKT residual of the masked lasso at ``W``."""
    G = W @ H - C
    l1 = jnp.sum(jnp.abs(W), axis=-1)
    lam_col = lam[:, None]
    subgradient = jnp.where(
        W != 0, jnp.abs(G + lam_col * jnp.sign(W)), jnp.maximum(jnp.abs(G) - lam_col, 0)
    )
    kkt = jnp.max(jnp.where(mask, subgradient, 0), axis=-1)
    objective = row_objective(W, H, C) + lam * l1
    return objective, lam * l1 + jnp.sum(W * G, axis=-1), kkt


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def fista(
    H: jax.Array,
    C: jax.Array,
    lam: jax.Array | float,
    *,
    W0: jax.Array | None = None,
    mask: jax.Array | None = None,
    maxiter: int = 500,
    tol: float = 1e-5,
) -> tuple[jax.Array, SolverInfo]:
    """Solve the masked lasso for all rows of ``C`` (m, d) with the shared ``H`` (d, d).

    ``lam`` is a scalar or one value per row; ``W0`` warm-starts (default zeros); ``mask``
    (bool, m x d) fixes the entries outside it at 0. A row stops when its gradient mapping is
    below ``tol * ||c_i||``. Differentiable in ``H``, ``C`` and ``lam`` by implicit
    differentiation. Returns ``W`` in ``C``'s dtype and a :class:`SolverInfo` whose objective
    is ``f_i(w_i) + lam_i ||w_i||_1``.
    """
    return run_lasso(_lasso, H, C, lam, W0, mask, maxiter, tol)


def run_lasso(solve, H, C, lam, W0, mask, maxiter, tol) -> tuple[jax.Array, SolverInfo]:
    """The lasso solvers' shared front end: compute dtype, per-row ``lam``, default start and
    mask, then ``solve(maxiter, tol, H, C, lam, W0, mask) -> (W, stats)`` and the certificate."""
    dtype = compute_dtype(H, C, W0)
    H32, C32 = H.astype(dtype), C.astype(dtype)
    lam_rows = per_row(lam, C.shape[0], dtype)
    W0 = jnp.zeros(C.shape, dtype) if W0 is None else W0.astype(dtype)
    mask = jnp.ones(C.shape, bool) if mask is None else jnp.broadcast_to(mask, C.shape)
    W, (num_steps, converged, iterations) = solve(maxiter, tol, H32, C32, lam_rows, W0, mask)
    objective, gap, kkt = lasso_certificate(W, H32, C32, lam_rows, mask)
    W = W.astype(C.dtype)
    result = result_codes(converged, finite_rows(W, objective))
    return W, SolverInfo(objective, gap, kkt, num_steps, converged, iterations, result)
