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
gradient residual, zero iff ``W`` is optimal.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from ._apg import apg
from ._cg import masked_cg
from ._implicit import box_solution
from ._quadratic import compute_dtype, lipschitz, row_objective
from ._sparsity import project_box


class BoxQPInfo(NamedTuple):
    objective: jax.Array  # (m,) f_i(w_i)
    kkt: jax.Array  # (m,) projected-gradient residual, inf-norm
    num_steps: jax.Array  # (m,) iterations taken by each row
    converged: jax.Array  # (m,) bool
    iterations: jax.Array  # () iterations of the shared loop


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
) -> tuple[jax.Array, BoxQPInfo]:
    """Solve the box QP for all rows of ``C`` (m, d) with the shared ``H`` (d, d).

    ``lower`` / ``upper`` broadcast to (m, d) and may be infinite. With ``method="cg"`` every
    entry with ``lower < upper`` is treated as free (its bounds ignored). ``W0`` warm-starts
    (default zeros). Differentiable in ``H``, ``C`` and the bounds by implicit differentiation.
    Returns ``W`` in ``C``'s dtype and a :class:`BoxQPInfo`.
    """
    if method not in ("auto", "cg", "apg"):
        raise ValueError(f"unknown box_qp method {method!r}")
    dtype = compute_dtype(H, C, W0)
    H32, C32 = H.astype(dtype), C.astype(dtype)
    lower = jnp.broadcast_to(jnp.asarray(lower, dtype), C.shape)
    upper = jnp.broadcast_to(jnp.asarray(upper, dtype), C.shape)
    W0 = jnp.zeros(C.shape, dtype) if W0 is None else W0.astype(dtype)
    W, (num_steps, converged, iterations) = _box(maxiter, tol, method, H32, C32, lower, upper, W0)
    G = W @ H32 - C32
    kkt = jnp.max(jnp.abs(W - project_box(W - G, lower, upper)), axis=-1)
    info = BoxQPInfo(row_objective(W, H32, C32), kkt, num_steps, converged, iterations)
    return W.astype(C.dtype), info
