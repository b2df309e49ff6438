"""Masked, Jacobi-preconditioned conjugate gradient on all rows at once.

For every row ``i`` with free set ``F_i`` (a boolean mask) and the other entries held at their
value in ``X0``, solves

    min_w  1/2 w H w^T - b_i . w   s.t.  w_j = X0_ij  for j not in F_i,

i.e. ``H_FF w_F = b_F - H_FB x_B``. Each row runs its own CG recurrence (Hestenes & Stiefel,
"Methods of Conjugate Gradients for Solving Linear Systems", J. Res. NBS 1952), but all rows
share one GEMM per iteration, ``(F * D) @ H``. Masking the search directions keeps every row
inside its own subspace, so this is exact CG on each ``H_FF`` without gathering supports.
A row stops when its residual ``||F * (b - w H)||`` is below ``tol * ||F * b||``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._loop import row_scale, run_loop


class CGState(NamedTuple):
    X: jax.Array  # (m, d) iterate
    R: jax.Array  # (m, d) masked residual b - X H
    D: jax.Array  # (m, d) search direction
    rz: jax.Array  # (m,) preconditioned residual norm r . M^-1 r
    iteration: jax.Array  # () int32
    num_steps: jax.Array  # (m,) int32
    converged: jax.Array  # (m,) bool


def masked_cg(
    H: jax.Array,
    B: jax.Array,
    free: jax.Array,
    X0: jax.Array,
    *,
    maxiter: int,
    tol: float,
) -> CGState:
    """Solve every row's system on its free set; ``X0`` gives the fixed values and the start."""
    diag = jnp.diagonal(H)
    # A dead input (H_jj = 0) has no curvature; a unit scale keeps the preconditioner finite.
    inv_diag = jnp.where(diag > 0, 1.0 / jnp.where(diag > 0, diag, 1.0), 1.0)
    threshold = tol * row_scale(jnp.where(free, B, 0))
    R = jnp.where(free, B - X0 @ H, 0)
    Z = inv_diag * R
    rz = jnp.sum(R * Z, axis=-1)
    init = CGState(
        X=X0,
        R=R,
        D=Z,
        rz=rz,
        iteration=jnp.zeros((), jnp.int32),
        num_steps=jnp.zeros(rz.shape, jnp.int32),
        converged=jnp.linalg.norm(R, axis=-1) <= threshold,
    )

    def step(s: CGState) -> CGState:
        Q = jnp.where(free, s.D @ H, 0)
        curvature = jnp.sum(s.D * Q, axis=-1)
        active = ~s.converged & (curvature > 0)
        alpha = jnp.where(active, s.rz / jnp.where(active, curvature, 1.0), 0.0)
        X = s.X + alpha[:, None] * s.D
        R = s.R - alpha[:, None] * Q
        Z = inv_diag * R
        rz = jnp.sum(R * Z, axis=-1)
        beta = jnp.where(active, rz / jnp.where(active, s.rz, 1.0), 0.0)
        D = jnp.where(active[:, None], Z + beta[:, None] * s.D, s.D)
        return CGState(
            X=X,
            R=R,
            D=D,
            rz=jnp.where(active, rz, s.rz),
            iteration=s.iteration + 1,
            num_steps=s.num_steps + active,
            converged=s.converged | ~active | (jnp.linalg.norm(R, axis=-1) <= threshold),
        )

    return run_loop(step, init, maxiter=maxiter)
