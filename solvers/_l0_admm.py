"""ADMM on the l0-constrained layer reconstruction, with one eigendecomposition per layer.

    min_W  1/2 sum_i w_i H w_i^T - sum_i c_i . w_i   s.t.  W fits a sparsity pattern

(per-row or per-matrix l0 budget, or N:M), split as ``V = Z`` with ``Z`` in the pattern's set
and solved by scaled ADMM with a growing penalty (the nonconvex ADMM of Boyd et al. 2011,
sec. 9.1; for layer pruning the l0 version with a penalty schedule is ALPS, Meng et al.,
arXiv 2406.07831):

    V_{k+1} = (C + rho_k (Z_k - U_k)) (H + rho_k I)^{-1}
    Z_{k+1} = project_pattern(V_{k+1} + U_k)
    U_{k+1} = U_k + V_{k+1} - Z_{k+1}
    rho_{k+1} = growth * rho_k

Everything runs in unit-input coordinates (``H`` scaled to a unit diagonal), so the projection
keeps the largest ``|w_ij| ||X_j||``, Wanda's score, and ``rho`` is relative to one input's
energy. ``H = Q diag(lam) Q^T`` is decomposed once; every ``(H + rho I)^{-1}`` is then
``Q diag(1 / (lam + rho)) Q^T``, so the penalty may change every iteration and an iteration
costs two GEMMs ``(m, d) @ (d, d)`` plus one projection. The small starting penalty lets the
support move while ``V`` follows the data; the growth pulls ``V`` onto ``Z`` and freezes it.

The answer is ``Z``'s support, refit by masked CG on the exact (undamped) objective: exact
pattern counts, and the least squares on that support up to the refit's tolerance.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._box_qp import box_qp
from ._info import Result, SolverInfo, finite_rows
from ._loop import advance_active_rows, row_scale, run_loop
from ._quadratic import compute_dtype, row_objective
from ._sparsity import Pattern, check_pattern_fits, keep_mask, project_pattern, row_separable


class L0ADMMState(NamedTuple):
    V: jax.Array  # (m, d) quadratic-step iterate (unit inputs)
    Z: jax.Array  # (m, d) pattern-feasible iterate (unit inputs)
    U: jax.Array  # (m, d) scaled dual variable
    rho: jax.Array  # (m,) current penalty of each row
    iteration: jax.Array  # () int32
    num_steps: jax.Array  # (m,) int32 iterations each row took
    changes: jax.Array  # (m,) int32 support entries that changed in the row's last iteration
    converged: jax.Array  # (m,) bool: the support is stable and V has reached Z


class L0ADMMInfo(NamedTuple):
    objective: jax.Array  # (m,) f(w_i) of the refit answer
    iterations: jax.Array  # () int32 ADMM iterations of the shared loop
    num_steps: jax.Array  # (m,) int32 ADMM iterations each row took
    support_changes: jax.Array  # (m,) int32 support entries changed by the row's last iteration
    primal_residual: jax.Array  # (m,) ||v_i - z_i|| / ||z_i|| at the end (unit inputs)
    refit: SolverInfo  # the masked CG refit's info (its kkt: the refit's residual)
    # (m,) int32 Result: CONVERGED if the support settled before the cap, MAX_ITERATIONS if the
    # cap came first, NONFINITE for a row whose answer or objective is not finite.
    result: jax.Array


def unit_scale(H: jax.Array) -> jax.Array:
    """``1 / sqrt(H_jj)`` per input; a dead input (``H_jj = 0``, no signal) keeps scale 1."""
    diag = jnp.diagonal(H)
    positive = diag > 0
    return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, diag, 1.0)), 1.0)


def _relative_residual(V: jax.Array, Z: jax.Array) -> jax.Array:
    """Per row ``||v_i - z_i|| / ||z_i||``."""
    return jnp.linalg.norm(V - Z, axis=-1) / row_scale(Z)


def l0_admm_init(V0: jax.Array, pattern: Pattern, rho0: float) -> L0ADMMState:
    rows = V0.shape[0]
    return L0ADMMState(
        V=V0,
        Z=project_pattern(V0, pattern),
        U=jnp.zeros_like(V0),
        rho=jnp.full((rows,), rho0, V0.dtype),
        iteration=jnp.zeros((), jnp.int32),
        num_steps=jnp.zeros((rows,), jnp.int32),
        changes=jnp.zeros((rows,), jnp.int32),
        converged=jnp.zeros((rows,), bool),
    )


def l0_admm_step(
    s: L0ADMMState,
    CQ: jax.Array,
    Q: jax.Array,
    eigenvalues: jax.Array,
    pattern: Pattern,
    growth: float,
    tol: float,
) -> L0ADMMState:
    """One ADMM iteration: two GEMMs with the eigenvectors, one projection, a dual step.

    A row whose support stayed put with ``||v_i - z_i|| <= tol ||z_i||`` is frozen (for a
    matrix budget, which couples the rows, only when every row is), so a row's answer does not
    depend on which other rows share the batch.
    """
    rho = s.rho[:, None]
    V = ((CQ + rho * ((s.Z - s.U) @ Q)) / (eigenvalues[None, :] + rho)) @ Q.T
    Z = project_pattern(V + s.U, pattern)
    U = s.U + V - Z
    changes = jnp.sum((Z != 0) != (s.Z != 0), axis=-1).astype(jnp.int32)
    settled = (changes == 0) & (_relative_residual(V, Z) <= tol)
    if not row_separable(pattern):
        settled = jnp.broadcast_to(jnp.all(settled), settled.shape)
    return advance_active_rows(s, settled, V=V, Z=Z, U=U, rho=s.rho * growth, changes=changes)


@functools.partial(
    jax.jit,
    static_argnames=("maxiter", "rho0", "growth", "tol", "refit_maxiter", "refit_tol"),
)
def l0_admm(
    H: jax.Array,
    C: jax.Array,
    pattern: Pattern,
    *,
    W0: jax.Array | None = None,
    maxiter: int = 30,
    rho0: float = 0.03,
    growth: float = 1.2,
    tol: float = 1e-3,
    refit_maxiter: int = 30,
    refit_tol: float = 1e-6,
) -> tuple[jax.Array, L0ADMMInfo]:
    """Minimize ``f(W) = 1/2 sum_i w_i H w_i^T - c_i . w_i`` over ``W`` fitting ``pattern``.

    ``W0`` starts the iteration (default ``C``'s rows scaled by ``1 / H_jj``, a Jacobi step
    from zero); ``maxiter`` ADMM iterations at penalties ``rho0 * growth^k`` (unit inputs),
    stopping early once an iteration leaves the support unchanged with
    ``||V - Z|| <= tol ||Z||``; then at most ``refit_maxiter`` masked CG steps (relative
    residual ``refit_tol``) refit the support. Returns ``W`` in ``C``'s dtype, exactly fitting
    ``pattern`` (the refit may make a kept entry exactly 0 only by cancellation), and an
    :class:`L0ADMMInfo`.
    """
    check_pattern_fits(pattern, C.shape)
    dtype = compute_dtype(H, C, W0)
    H, C32 = H.astype(dtype), C.astype(dtype)
    scale = unit_scale(H)
    inverse = 1.0 / scale
    H_unit = H * scale[:, None] * scale[None, :]
    C_unit = C32 * scale[None, :]
    if W0 is None:
        V0 = C_unit  # unit diagonal: one Jacobi step from zero
    else:
        V0 = W0.astype(dtype) * inverse[None, :]
    eigenvalues, Q = jnp.linalg.eigh(H_unit)
    # A PSD Gram's round-off can give tiny negative eigenvalues; rho > 0 keeps the shift safe.
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    CQ = C_unit @ Q

    def step(s):
        return l0_admm_step(s, CQ, Q, eigenvalues, pattern, growth, tol)

    state = run_loop(step, l0_admm_init(V0, pattern, rho0), maxiter=maxiter)
    # The kept support: exactly the pattern's count, ties among zeros broken by keep_mask.
    keep = keep_mask(jnp.abs(state.Z), pattern)
    start = jnp.where(keep, state.Z, 0) * scale[None, :]
    lower = jnp.where(keep, -jnp.inf, 0.0).astype(dtype)
    upper = jnp.where(keep, jnp.inf, 0.0).astype(dtype)
    W, refit_info = box_qp(
        H, C32, lower, upper, W0=start, maxiter=refit_maxiter, tol=refit_tol, method="cg"
    )
    objective = row_objective(W, H, C32)
    residual = _relative_residual(state.V, state.Z)
    settled = jnp.where(state.converged, Result.CONVERGED, Result.MAX_ITERATIONS)
    result = jnp.where(finite_rows(W, objective), settled, Result.NONFINITE).astype(jnp.int32)
    info = L0ADMMInfo(
        objective, state.iteration, state.num_steps, state.changes, residual, refit_info, result
    )
    return W.astype(C.dtype), info
