"""Penalty continuation: a schedule around a solver for combinatorial pruning decisions.

    min_{W, z}  f(W) + rho_k P(W, z)   for an increasing schedule rho_0 < rho_1 < ...

Each stage takes one exact step on ``W`` (the smooth part, here a ridge least squares with the
shared Gram, so one Cholesky for all rows) and one proximal step on the decision ``z``; the
schedule stops once the decision is settled, then the kept entries are refit exactly. This is
the penalty decomposition of Lu & Zhang ("Sparse Approximation via Penalty Decomposition
Methods", SIAM J. Optim. 2013), and the [inferred] SPAP algorithm of METHODS.md.

Two instances:

* :func:`select_columns` (SPAP, arXiv 2505.03373): prune exactly ``k`` input columns,
  ``W diag(s) = 0``, ``1^T s = k``, ``s`` binary. Relax ``s`` to the capped simplex, penalize
  ``rho sum_j s_j H_jj ||W_:j||^2`` (the output energy of column ``j``, so the choice does not
  depend on input scaling); the ``s`` step is a projected gradient step whose length grows with
  ``rho``, so ``s`` turns binary along the schedule.
* :func:`sparse_least_squares`: ``min f(W)`` s.t. ``W`` fits a sparsity pattern (l0 per row /
  matrix or N:M), penalty ``rho/2 ||(W - Z) diag(H)^1/2||^2`` with ``Z`` the projection of ``W``
  onto the pattern in that metric (the exact proximal step of the constraint); the metric makes
  the decision invariant to input scaling, like Wanda's ``|W_ij| ||X_j||`` score.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ._box_qp import box_qp
from ._info import finite_rows, result_codes
from ._loop import run_loop
from ._quadratic import compute_dtype, row_objective
from ._sparsity import Pattern, check_pattern_fits, keep_mask, row_separable, topk_mask


class ContinuationState(NamedTuple):
    W: jax.Array
    z: Any  # the relaxed decision, a pytree
    iteration: jax.Array  # () int32, the stage
    converged: jax.Array  # () bool, decision settled


class ContinuationInfo(NamedTuple):
    stages: jax.Array  # () stages run
    settled: jax.Array  # () bool: the relaxed decision was binary and stable at the end
    objective: jax.Array  # (m,) f(W) of the refit
    # (m,) int32 Result: CONVERGED if settled, MAX_ITERATIONS if the schedule ran out first,
    # NONFINITE for a row whose W or objective is not finite.
    result: jax.Array
    swaps: jax.Array | int = 0  # () single swaps made after the schedule (select_columns)
    local_minimum: jax.Array | bool = False  # () no single swap improves the final selection


class SwapInfo(NamedTuple):
    swaps: jax.Array  # () int32, swaps made
    local_minimum: jax.Array  # () bool: no single swap lowers the objective

    # A property, not a field: it is ``local_minimum`` as a code, and callers unpack the info
    # as a pair.
    @property
    def result(self) -> jax.Array:
        """() int32 Result: CONVERGED at a single-swap local minimum, else MAX_ITERATIONS."""
        return result_codes(self.local_minimum, True)


class _SwapState(NamedTuple):
    kept: jax.Array  # (d - k,) int32 column indices
    pruned: jax.Array  # (k,) int32
    swaps: jax.Array  # () int32
    done: jax.Array  # () bool: no improving swap left


@functools.partial(jax.jit, static_argnames=("k", "max_swaps"))
def swap_columns(
    H: jax.Array,
    C: jax.Array,
    keep: jax.Array,
    k: int,
    *,
    column_cost: jax.Array | None = None,
    min_decrease: jax.Array | float = 0.0,
    max_swaps: int = 1000,
) -> tuple[jax.Array, SwapInfo]:
    """Best-improvement single-swap search over which ``k`` input columns are pruned.

    The objective of a kept set ``K`` is ``g(K) = sum_{j in K} cost_j - tr(C_K H_KK^-1 C_K^T)``:
    with ``cost = 0`` it is twice the value ``f`` reaches after the exact refit on ``K``
    (``refit_columns``); a ``column_cost`` expresses e.g. a ridge toward the dense weights.
    Every swap (a pruned column ``p`` back in, a kept column ``j`` out) is scored exactly at
    once: adding ``p`` borders ``H_KK^-1`` (Schur complement ``s_p = H_pp - H_pK U_p`` with
    ``U = H_KK^-1 H_KP``, residual ``e_p = C_p - A H_Kp`` with ``A = C_K H_KK^-1``, gain
    ``||e_p||^2 / s_p``), and removing ``j`` from ``K + p`` costs the OBS amount
    ``||A'_j||^2 / (H^-1)'_jj`` with ``A'_j = A_j - e_p U_jp / s_p`` and ``(H^-1)'_jj =
    (H_KK^-1)_jj + U_jp^2 / s_p``: one Cholesky and a few GEMMs against the ``(|K|, k)`` block
    per step. The best swap is made while it lowers ``g`` by more than ``min_decrease``, at
    most ``max_swaps`` times, so the result is never worse than the start ``keep`` (which must
    prune exactly ``k`` columns) and, unless ``max_swaps`` ran out, no single swap improves it.
    ``H`` must be positive definite. Returns the kept mask and a :class:`SwapInfo`.
    """
    d = keep.shape[0]
    if k == 0:
        return keep, SwapInfo(jnp.zeros((), jnp.int32), jnp.ones((), bool))
    cost = jnp.zeros(d, H.dtype) if column_cost is None else column_cost
    order = jnp.argsort(~keep, stable=True).astype(jnp.int32)  # kept first, in index order
    init = _SwapState(order[: d - k], order[d - k :], jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def step(state: _SwapState) -> _SwapState:
        K, P = state.kept, state.pruned
        Q = jsl.cho_solve(jsl.cho_factor(H[K][:, K]), jnp.eye(d - k, dtype=H.dtype))
        A = C[:, K] @ Q
        H_KP = H[K][:, P]
        U = Q @ H_KP
        schur = jnp.diagonal(H)[P] - jnp.sum(H_KP * U, axis=0)
        E = C[:, P] - A @ H_KP
        e2 = jnp.sum(E * E, axis=0)
        removal = (
            jnp.sum(A * A, axis=0)[:, None] - 2 * U * (A.T @ E) / schur + U**2 * e2 / schur**2
        ) / (jnp.diagonal(Q)[:, None] + U**2 / schur)
        change = (cost[P][None, :] - cost[K][:, None]) - e2 / schur + removal
        best = jnp.argmin(change)
        j, p = best // k, best % k
        improves = change.reshape(-1)[best] < -min_decrease
        K_new = K.at[j].set(jnp.where(improves, P[p], K[j]))
        P_new = P.at[p].set(jnp.where(improves, K[j], P[p]))
        return _SwapState(K_new, P_new, state.swaps + improves, ~improves)

    def more(state: _SwapState) -> jax.Array:
        return ~state.done & (state.swaps < max_swaps)

    final = jax.lax.while_loop(more, step, init)
    kept = jnp.zeros(d, bool).at[final.kept].set(True)
    return kept, SwapInfo(final.swaps, final.done)


def penalty_continuation(
    w_step: Callable[[jax.Array, Any, jax.Array], jax.Array],
    z_step: Callable[[jax.Array, Any, jax.Array], Any],
    settled: Callable[[jax.Array, Any, Any], jax.Array],
    W: jax.Array,
    z: Any,
    rhos: jax.Array,
) -> ContinuationState:
    """Run ``W = w_step(W, z, rho); z_new = z_step(W, z, rho)`` over ``rhos`` until settled.

    ``w_step`` minimizes the smooth objective plus ``rho P(W, z)`` over ``W``; ``z_step`` is a
    proximal step of ``rho P(W, .)`` on the decision; ``settled(W, z, z_new)`` ends the
    schedule.
    """

    def stage(s: ContinuationState) -> ContinuationState:
        rho = rhos[s.iteration]
        W = w_step(s.W, s.z, rho)
        z = z_step(W, s.z, rho)
        return ContinuationState(W, z, s.iteration + 1, settled(W, s.z, z))

    init = ContinuationState(W, z, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    return run_loop(stage, init, maxiter=rhos.shape[0])


def _outcome(W, out_dtype, H, C, state: ContinuationState, **swaps):
    """``W`` in ``out_dtype`` and its :class:`ContinuationInfo` (``swaps``: its swap fields)."""
    objective = row_objective(W, H, C)
    W = W.astype(out_dtype)
    result = result_codes(state.converged, finite_rows(W, objective))
    return W, ContinuationInfo(state.iteration, state.converged, objective, result, **swaps)


def _ridge(H: jax.Array, B: jax.Array, diag: jax.Array) -> jax.Array:
    """All rows of ``W (H + diag(diag)) = B`` with one Cholesky factorization."""
    factor = jsl.cho_factor(H + jnp.diag(diag))
    return jsl.cho_solve(factor, B.T).T


def _schedule(H: jax.Array, rho0: float, growth: float, num_stages: int) -> jax.Array:
    base = rho0 * jnp.mean(jnp.diagonal(H))
    return base * growth ** jnp.arange(num_stages, dtype=H.dtype)


def project_capped_simplex(v: jax.Array, k: int, *, num_iters: int = 60) -> jax.Array:
    """Euclidean projection onto ``{s : 0 <= s <= 1, sum(s) = k}`` (bisection on the shift)."""
    lo, hi = jnp.min(v) - 1.0, jnp.max(v)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_big = jnp.sum(jnp.clip(v - mid, 0, 1)) > k
        return jnp.where(too_big, mid, lo), jnp.where(too_big, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_iters, bisect, (lo, hi))
    return jnp.clip(v - 0.5 * (lo + hi), 0, 1)


def refit_columns(H: jax.Array, C: jax.Array, keep: jax.Array) -> jax.Array:
    """Exact least squares on the kept columns (shared by all rows); pruned columns are 0."""
    both = keep[:, None] & keep[None, :]
    H_kept = jnp.where(both, H, jnp.eye(H.shape[0], dtype=H.dtype))
    return _ridge(H_kept, jnp.where(keep, C, 0), jnp.zeros(H.shape[0], H.dtype))


@functools.partial(
    jax.jit, static_argnames=("k", "num_stages", "growth", "rho0", "step", "swaps", "swap_rtol")
)
def select_columns(
    H: jax.Array,
    C: jax.Array,
    k: int,
    *,
    num_stages: int = 100,
    growth: float = 1.2,
    rho0: float = 1e-3,
    step: float = 0.01,
    swaps: int = 1000,
    swap_rtol: float = 1e-7,
) -> tuple[jax.Array, jax.Array, ContinuationInfo]:
    """Choose exactly ``k`` input columns to prune (SPAP) and refit the rows on the rest.

    Minimizes ``f(W)`` s.t. ``W[:, j] = 0`` for the ``k`` pruned columns. ``rho0`` is relative
    to the mean of ``diag(H)``; ``step`` is the first ``s`` step relative to the mean column
    energy, growing like ``rho``. The continuation is local; its selection is then improved by
    at most ``swaps`` exact best-improvement single swaps (:func:`swap_columns`, each lowering
    the refit objective by more than ``swap_rtol |f|``), so the answer is a single-swap local
    minimum unless ``swaps`` runs out (``swaps=0``: the continuation alone). ``H`` must be
    positive definite. Returns ``pruned`` (bool, d) with exactly ``k`` True, the refit ``W``
    in ``C``'s dtype and a :class:`ContinuationInfo`. Ties prune the lower index.
    """
    d = H.shape[0]
    if not 0 <= k <= d:
        raise ValueError(f"cannot prune {k} of {d} columns")
    dtype = compute_dtype(H, C)
    H, C32 = H.astype(dtype), C.astype(dtype)
    energy_weight = jnp.diagonal(H)
    rhos = _schedule(H, rho0, growth, num_stages)

    def w_step(W, s, rho):
        return _ridge(H, C32, 2 * rho * s * energy_weight)

    def s_step(W, s, rho):
        energy = energy_weight * jnp.sum(W * W, axis=0)
        normalized = energy / jnp.maximum(jnp.mean(energy), jnp.finfo(dtype).tiny)
        return project_capped_simplex(s - step * (rho / rhos[0]) * normalized, k)

    def settled(W, s_old, s_new):
        binary = jnp.all((s_new == 0) | (s_new == 1))
        return binary & jnp.all(s_old == s_new)

    s0 = jnp.full((d,), k / d, dtype)
    state = penalty_continuation(w_step, s_step, settled, C32 @ jnp.zeros_like(H), s0, rhos)
    pruned = topk_mask(state.z, k)
    W = refit_columns(H, C32, ~pruned)
    made, local_minimum = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
    if swaps:
        start = jnp.sum(row_objective(W, H, C32))
        kept, (made, local_minimum) = swap_columns(
            H, C32, ~pruned, k, min_decrease=2 * swap_rtol * jnp.abs(start), max_swaps=swaps
        )
        swapped = refit_columns(H, C32, kept)
        # The update formulas rank the swaps; the exact objective has the last word.
        better = jnp.sum(row_objective(swapped, H, C32)) <= start
        pruned = jnp.where(better, ~kept, pruned)
        W = jnp.where(better, swapped, W)
    W, info = _outcome(W, C.dtype, H, C32, state, swaps=made, local_minimum=local_minimum)
    return pruned, W, info


@functools.partial(
    jax.jit,
    static_argnames=("num_stages", "growth", "rho0", "maxiter", "tol", "pursuit"),
)
def sparse_least_squares(
    H: jax.Array,
    C: jax.Array,
    pattern: Pattern,
    *,
    W0: jax.Array | None = None,
    num_stages: int = 100,
    growth: float = 1.2,
    rho0: float = 1e-3,
    maxiter: int = 1000,
    tol: float = 1e-6,
    pursuit: int = 20,
) -> tuple[jax.Array, jax.Array, ContinuationInfo]:
    """Minimize ``f(W)`` s.t. ``W`` fits ``pattern`` (l0 per row / matrix, or N:M).

    Starts from ``W0`` (default: the unconstrained least-squares solution), runs the penalty
    schedule, then refits each row on its support with the masked CG (``box_qp``, ``maxiter``
    and ``tol``). The refit of the schedule's support competes with the refit of the starting
    projection (the score ``|w_ij| sqrt(H_jj)`` on ``W0``, Wanda's on a dense start), and
    ``pursuit`` steps of hard thresholding pursuit (Foucart, SIAM J. Numer. Anal. 2011; here
    a Jacobi-scaled gradient step ``-g_j / H_jj``, projection, exact refit) move the better
    support; each
    row keeps its best answer (the whole matrix for a matrix budget), so the result is never
    worse than the start's refit. Returns the kept ``mask`` (exact pattern counts), ``W`` in
    ``C``'s dtype and a :class:`ContinuationInfo`.
    """
    check_pattern_fits(pattern, C.shape)
    dtype = compute_dtype(H, C, W0)
    H, C32 = H.astype(dtype), C.astype(dtype)
    rhos = _schedule(H, rho0, growth, num_stages)
    d = H.shape[0]

    metric = jnp.diagonal(H)

    def w_step(W, Z, rho):
        return _ridge(H, C32 + rho * metric * Z, rho * metric)

    def z_step(W, Z, rho):
        return jnp.where(keep_mask(jnp.abs(W) * jnp.sqrt(metric), pattern), W, 0)

    def settled(W, Z_old, Z_new):
        # Same support, and W has (nearly) left the pruned entries: the penalty has done its work.
        outside = jnp.linalg.norm(W - Z_new)
        return jnp.all((Z_old != 0) == (Z_new != 0)) & (outside <= tol * jnp.linalg.norm(W))

    if W0 is None:
        W0 = _ridge(H, C32, jnp.full((d,), 1e-6 * jnp.mean(jnp.diagonal(H)), dtype))
    W0 = W0.astype(dtype)
    Z0 = z_step(W0, None, None)
    state = penalty_continuation(w_step, z_step, settled, W0, Z0, rhos)
    per_row = row_separable(pattern)

    def objectives(W):
        rows = row_objective(W, H, C32)
        return rows if per_row else jnp.broadcast_to(jnp.sum(rows), rows.shape)

    def keep_better(best, candidate):
        better = (objectives(candidate[0]) < objectives(best[0]))[:, None]
        return tuple(jnp.where(better, new, old) for new, old in zip(candidate, best, strict=True))

    def refit_on(mask, start):
        bound = jnp.where(mask, jnp.inf, 0)
        W, _ = box_qp(H, C32, -bound, bound, W0=start, maxiter=maxiter, tol=tol, method="cg")
        return W, mask

    schedule_mask = keep_mask(jnp.abs(state.W) * jnp.sqrt(metric), pattern)
    start_mask = keep_mask(jnp.abs(W0) * jnp.sqrt(metric), pattern)
    best = keep_better(refit_on(start_mask, Z0), refit_on(schedule_mask, state.z))

    def pursue(best, _):
        # After an exact refit the kept entries have zero gradient, and a pruned entry's
        # Newton step alone, -g_j / H_jj, is worth g_j^2 / (2 H_jj): ranking |v_j| sqrt(H_jj)
        # weighs what entering gains against what leaving costs.
        W = best[0]
        V = W - (W @ H - C32) / jnp.maximum(metric, jnp.finfo(dtype).tiny)
        mask = keep_mask(jnp.abs(V) * jnp.sqrt(metric), pattern)
        return keep_better(best, refit_on(mask, jnp.where(mask, V, 0))), None

    (W, mask), _ = jax.lax.scan(pursue, best, None, length=pursuit)
    W, info = _outcome(W, C.dtype, H, C32, state)
    return mask, W, info
