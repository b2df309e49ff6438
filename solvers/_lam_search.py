"""Bisection on the lasso weight ``lam`` so that FISTA lands on a sparsity pattern.

For each row (or the whole matrix, for ``Unstructured(..., scope="matrix")``) bisect ``lam`` on a
log scale in ``[1e-6, 1] * max|c|``: a ``lam`` is *feasible* when the lasso solution still has
enough nonzeros for the pattern (at least the kept count per row / matrix, or ``n`` per N:M
group), and the search keeps the largest feasible ``lam``. Larger ``lam`` means fewer nonzeros
(approximately monotone). The final hard projection onto the pattern (FISTAPruner's rounding,
arXiv 2408.03728) then keeps exactly the pattern's count, all of them nonzero, whenever the
smallest ``lam`` was feasible. Each bisection solve warm-starts from the best feasible one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._admm import admm_solve, factorize
from ._fista import fista, lasso_certificate, run_lasso
from ._info import Result, SolverInfo, finite_rows
from ._quadratic import compute_dtype
from ._sparsity import (
    NM,
    Pattern,
    check_pattern_fits,
    project_pattern,
    pruned_in_matrix,
    pruned_per_row,
    row_separable,
)


class LamSearchInfo(NamedTuple):
    lam: jax.Array  # (m,) the chosen lam of each row (equal across rows for a matrix scope)
    feasible: jax.Array  # (m,) the chosen lam leaves enough nonzeros for the pattern
    nnz_lasso: jax.Array  # (m,) nonzeros of the lasso solution before the projection
    lasso: SolverInfo  # solver info of the chosen lasso solve
    objective: jax.Array  # (m,) lasso objective after the projection
    # (m,) int32 Result: the chosen lasso solve's, NONFINITE also for a row whose projected W
    # or objective is not finite.
    result: jax.Array


def _feasible(W: jax.Array, pattern: Pattern) -> jax.Array:
    """Per row: the lasso solution has enough nonzeros for ``pattern`` to keep only nonzeros."""
    nonzero = W != 0
    d_out, d_in = W.shape
    if isinstance(pattern, NM):
        groups = nonzero.reshape(d_out, d_in // pattern.m, pattern.m).sum(-1)
        return jnp.all(groups >= pattern.n, axis=-1)
    if pattern.scope == "row":
        keep = d_in - pruned_per_row(pattern, W.shape)
        return nonzero.sum(-1) >= jnp.asarray(keep, jnp.int32)
    keep = W.size - pruned_in_matrix(pattern, W.shape)
    return jnp.broadcast_to(nonzero.sum() >= keep, (d_out,))


LASSO_SOLVERS = ("fista", "admm")


@functools.partial(jax.jit, static_argnames=("num_bisect", "maxiter", "tol", "solver"))
def lam_search(
    H: jax.Array,
    C: jax.Array,
    pattern: Pattern,
    *,
    W0: jax.Array | None = None,
    mask: jax.Array | None = None,
    num_bisect: int = 20,
    maxiter: int = 200,
    tol: float = 1e-5,
    solver: str = "fista",
) -> tuple[jax.Array, LamSearchInfo]:
    """Find ``lam`` (per row, or per matrix) so that the lasso fits ``pattern``; project onto it.

    ``solver``: ``"fista"`` or ``"admm"`` (``lasso_admm``; its factorization of ``H`` is made
    once and shared by every bisection step). Returns the projected ``W`` (in ``C``'s dtype)
    and a :class:`LamSearchInfo`.
    """
    if solver not in LASSO_SOLVERS:
        raise ValueError(f"unknown lasso solver {solver!r}; choose one of {LASSO_SOLVERS}")
    check_pattern_fits(pattern, C.shape)
    dtype = compute_dtype(H, C, W0)
    out_dtype, H, C = C.dtype, H.astype(dtype), C.astype(dtype)
    mask = jnp.ones(C.shape, bool) if mask is None else jnp.broadcast_to(mask, C.shape)
    scale = jnp.max(jnp.where(mask, jnp.abs(C), 0), axis=-1)
    if row_separable(pattern):
        log_hi = jnp.log(jnp.maximum(scale, jnp.finfo(dtype).tiny))
    else:
        log_hi = jnp.full(scale.shape, jnp.log(jnp.maximum(scale.max(), jnp.finfo(dtype).tiny)))
    log_lo = log_hi + math.log(1e-6)

    factors = factorize(H) if solver == "admm" else None

    def solve(log_lam, W_start):
        lam = jnp.exp(log_lam)
        if solver == "fista":
            return fista(H, C, lam, W0=W_start, mask=mask, maxiter=maxiter, tol=tol)
        return run_lasso(admm_solve(factors), H, C, lam, W_start, mask, maxiter, tol)

    W_best, info_best = solve(log_lo, W0)
    feasible_best = _feasible(W_best, pattern)

    def bisect(_, carry):
        lo, hi, W_best, info_best, feasible_best = carry
        mid = 0.5 * (lo + hi)
        W, info = solve(mid, W_best)
        ok = _feasible(W, pattern)

        def take(new, old):
            if new.ndim == 0:  # the shared iteration count: report the latest
                return new
            return jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)

        info_best = jax.tree.map(take, info, info_best)
        return (
            jnp.where(ok, mid, lo),
            jnp.where(ok, hi, mid),
            take(W, W_best),
            info_best,
            feasible_best | ok,
        )

    log_lam, _, W_best, info_best, feasible_best = jax.lax.fori_loop(
        0, num_bisect, bisect, (log_lo, log_hi, W_best, info_best, feasible_best)
    )
    W = project_pattern(W_best, pattern)
    lam = jnp.exp(log_lam)
    objective, _, _ = lasso_certificate(W, H, C, lam, mask)
    W = W.astype(out_dtype)
    result = jnp.where(finite_rows(W, objective), info_best.result, Result.NONFINITE)
    nnz = (W_best != 0).sum(-1)
    return W, LamSearchInfo(lam, feasible_best, nnz, info_best, objective, result)
