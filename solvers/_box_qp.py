"""Row-batched box-constrained QP with a shared Hessian.

    min_W  1/2 sum_i w_i H w_i^T - sum_i c_i . w_i   s.t.  lower <= W <= upper  (elementwise)

``lower == upper`` fixes an entry: the OPTIMA reconstruction (Fang et al., arXiv 2512.13886)
fixes pruned weights at 0 and leaves kept weights free. Two methods, one API:

* ``"cg"``: masked conjugate gradient (``_cg.py``) on the free entries, exact for the
  fixed/free case (every bound is either an equality or infinite). Converges in
  O(sqrt(cond)) GEMMs against O(cond) for gradient methods: the fast path for OPTIMA.
* ``"apg"``: accelerated projected gradient (``_apg.py``, Beck & Teboulle 2009) for general
  boxes.
* ``"auto"`` (default): ``"cg"`` when the bounds are fixed/free, else ``"apg"``; decided at run
  time by ``lax.cond`` (under ``vmap`` both branches run, so pick a method there if you know it).

Certificate: ``kkt = ||W - clip(W - (W H - C), lower, upper)||_inf`` per row, the projected
gradient residual, zero iff ``W`` is optimal; ``gap`` is the duality gap over the entries whose
gradient pushes toward a finite bound (``SolverInfo``), 0 for the fixed/free case.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from ._apg import apg
from ._cg import masked_cg
from ._implicit import box_solution
from ._info import SolverInfo, finite_rows, result_codes
from ._quadratic import compute_dtype, lipschitz, row_objective
from ._sparsity import project_box

BoxQPInfo = SolverInfo  # the name from before every row solver returned one info type


def _by_cg(maxiter, tol, H, C, lower, upper, W0):
    fixed = lower == upper
    state = masked_cg(H, C, ~fixed, jnp.where(fixed, lower, W0), maxiter=maxiter, tol=tol)
    return state.X, (state.num_steps, state.converged, state.iteration)


def _by_apg(maxiter, tol, H, C, lower, upper, W0):
    def prox(V):
        return project_box(V, lower, upper)

    state = apg(H, C, prox, prox(W0), lipschitz(H), maxiter=maxiter, tol=tol)
    return state.W, (state.num_steps, state.converged, state.iteration)


def _solve(maxiter, tol, method, H, C, lower, upper, W0):
    args = (maxiter, tol, H, C, lower, upper, W0)
    if method == "cg":
        return _by_cg(*args)
    if method == "apg":
        return _by_apg(*args)
    fixed_or_free = (lower == upper) | (jnp.isneginf(lower) & jnp.isposinf(upper))
    return jax.lax.cond(jnp.all(fixed_or_free), lambda a: _by_cg(*a), lambda a: _by_apg(*a), args)


_box = box_solution(_solve)


def box_certificate(W, H, C, lower, upper):
    """Per-row objective, duality gap and projected-gradient residual of the box QP at ``W``."""
    G = W @ H - C
    kkt = jnp.max(jnp.abs(W - project_box(W - G, lower, upper)), axis=-1)
    # The bound each gradient pushes toward; an infinite one is dual infeasibility, which kkt
    # measures, so it is left out (replaced by W, a zero term that keeps the gap finite).
    target = jnp.where(G > 0, lower, upper)
    target = jnp.where(jnp.isfinite(target), target, W)
    gap = jnp.sum(G * (W - target), axis=-1)
    return row_objective(W, H, C), gap, kkt


@functools.partial(jax.jit, static_argnames=("maxiter", "tol", "method"))
def box_qp(
    H: jax.Array,
    C: jax.Array,
    lower: jax.Array | float,
    upper: jax.Array | float,
    *,
    W0: jax.Array | None = None,
    maxiter: int = 1000,
    tol: float = 1e-5,
    method: Literal["auto", "cg", "apg"] = "auto",
) -> tuple[jax.Array, SolverInfo]:
    """Solve the box QP for all rows of ``C`` (m, d) with the shared ``H`` (d, d).

    ``lower`` / ``upper`` broadcast to (m, d) and may be infinite. With ``method="cg"`` every
    entry with ``lower < upper`` is treated as free (its bounds ignored). ``W0`` warm-starts
    (default zeros). Differentiable in ``H``, ``C`` and the bounds by implicit differentiation.
    Returns ``W`` in ``C``'s dtype and a :class:`SolverInfo` whose objective is ``f_i(w_i)``.
    """
    if method not in ("auto", "cg", "apg"):
        raise ValueError(f"unknown box_qp method {method!r}")
    dtype = compute_dtype(H, C, W0)
    H32, C32 = H.astype(dtype), C.astype(dtype)
    lower = jnp.broadcast_to(jnp.asarray(lower, dtype), C.shape)
    upper = jnp.broadcast_to(jnp.asarray(upper, dtype), C.shape)
    W0 = jnp.zeros(C.shape, dtype) if W0 is None else W0.astype(dtype)
    W, (num_steps, converged, iterations) = _box(maxiter, tol, method, H32, C32, lower, upper, W0)
    objective, gap, kkt = box_certificate(W, H32, C32, lower, upper)
    W = W.astype(C.dtype)
    result = result_codes(converged, finite_rows(W, objective))
    return W, SolverInfo(objective, gap, kkt, num_steps, converged, iterations, result)
