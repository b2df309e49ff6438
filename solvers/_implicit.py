"""Implicit differentiation of the lasso and box-QP solutions through their optimality conditions.

Both solutions are, on their active set, the solution of a linear system with ``H``:

* lasso, support ``S = {j in mask : w_j != 0}``:  ``H_SS w_S = c_S - lam sign(w_S)``, ``w_j = 0`` off S;
* box QP, free set ``F = {j : lower_j < w_j < upper_j}``:  ``H_FF w_F = c_F - H_FB w_B``,
  ``w_B`` = the active bound.

Differentiating these identities (the active set is locally constant at a strictly
complementary solution) gives the vector-Jacobian product from one adjoint solve per row,
``H_SS u_S = v_S`` (resp. on F), done for all rows by the masked CG:

    dC = u,   dH = -sym(U^T W),   dlam_i = -u_i . sign(w_i),   d(bound)_B = (v - U H)_B.

Nothing is unrolled, so memory does not grow with the number of solver iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._cg import masked_cg


def _adjoint(H: jax.Array, V: jax.Array, active: jax.Array) -> jax.Array:
    """Solve ``H_AA u_A = v_A`` for every row (``u = 0`` off ``A``)."""
    eps = jnp.finfo(H.dtype).eps
    d = H.shape[-1]
    return masked_cg(H, V, active, jnp.zeros_like(V), maxiter=4 * d, tol=float(eps**0.75)).X


def _grad_H(U: jax.Array, W: jax.Array) -> jax.Array:
    G = U.T @ W
    return -0.5 * (G + G.T)


def lasso_solution(solve: Callable) -> Callable:
    """``solve(maxiter, tol, H, C, lam_rows, W0, mask) -> (W, stats)`` with an implicit VJP."""
    differentiable = jax.custom_vjp(solve, nondiff_argnums=(0, 1))

    def fwd(maxiter, tol, H, C, lam, W0, mask):
        W, stats = solve(maxiter, tol, H, C, lam, W0, mask)
        return (W, stats), (H, W, mask, W0)

    def bwd(maxiter, tol, residuals, cotangents):
        H, W, mask, W0 = residuals
        V, _ = cotangents
        U = _adjoint(H, V, mask & (W != 0))
        dlam = -jnp.sum(U * jnp.sign(W), axis=-1)
        return _grad_H(U, W), U, dlam, jnp.zeros_like(W0), None

    differentiable.defvjp(fwd, bwd)
    return differentiable


def box_solution(solve: Callable) -> Callable:
    """``solve(maxiter, tol, method, H, C, lower, upper, W0) -> (W, stats)`` with an implicit VJP."""
    differentiable = jax.custom_vjp(solve, nondiff_argnums=(0, 1, 2))

    def fwd(maxiter, tol, method, H, C, lower, upper, W0):
        W, stats = solve(maxiter, tol, method, H, C, lower, upper, W0)
        return (W, stats), (H, W, lower, upper, W0)

    def bwd(maxiter, tol, method, residuals, cotangents):
        H, W, lower, upper, W0 = residuals
        V, _ = cotangents
        at_lower = W == lower
        at_upper = (W == upper) & ~at_lower
        U = _adjoint(H, V, ~(at_lower | at_upper))
        bound = V - U @ H
        d_lower = jnp.where(at_lower, bound, 0)
        d_upper = jnp.where(at_upper, bound, 0)
        return _grad_H(U, W), U, d_lower, d_upper, jnp.zeros_like(W0)

    differentiable.defvjp(fwd, bwd)
    return differentiable
