"""OPTIMA (Fang et al., arXiv 2512.13886): exact reconstruction under any selector's mask.

With the mask ``M`` chosen by a selector (magnitude, Wanda, SparseGPT, FISTA), solve

    min_W ||W Xp - W0 X||_F^2   s.t.  W_ij = 0 for (i, j) not in M,

i.e. per row the QP ``min_w 1/2 w H w^T - c . w`` with ``H = Xp Xp^T``, ``c = W0 X Xp^T``,
pruned entries fixed at 0 (``lower = upper = 0``) and kept ones free. The published solver runs a
general QP method (raPDHG, tolerance 1e-2) on every row; with fixed/free bounds the problem is
one linear system per row on its support, so ``box_qp``'s masked CG solves it to a tight
tolerance in O(sqrt(cond)) GEMMs shared by all rows. As published, the result is kept only when
it does not increase the layer error; otherwise the selector's weights are returned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jprune.options import option
from jprune.solvers import Pattern, box_qp, check_pattern_fits, keep_mask

from .base import METHODS, LayerProblem, LayerResult, register_layer_method, result_counts

SELECTORS = ("magnitude", "wanda", "sparsegpt", "fista")


def layer_quadratic(
    problem: LayerProblem, percdamp: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(H, C, H_undamped)`` of the layer objective, per calibration token.

    The Grams are sums over tokens; dividing by their count keeps ``lam``, tolerances and
    float32 round-off independent of how much calibration data there is. ``percdamp`` adds
    ``percdamp * mean(diag H)`` to the diagonal of the first ``H`` only (a ridge term).
    """
    scale = 1.0 / max(problem.num_tokens, 1)
    gram = problem.gram.astype(jnp.float32) * scale
    C = problem.weight.astype(jnp.float32) @ (problem.target_gram.astype(jnp.float32) * scale)
    damp = percdamp * jnp.mean(jnp.diagonal(gram))
    return gram + damp * jnp.eye(gram.shape[0], dtype=gram.dtype), C, gram


def row_errors(W: jax.Array, H: jax.Array, C: jax.Array) -> jax.Array:
    """Each row's ``1/2 ||w_i Xp - w0_i X||^2`` per token, up to the constant ``1/2 ||w0_i X||^2``."""
    return jnp.sum(W * (0.5 * (W @ H) - C), axis=-1)


def layer_error(W: jax.Array, H: jax.Array, C: jax.Array) -> jax.Array:
    """``1/2 ||W Xp - W0 X||^2`` per token, up to the constant ``1/2 ||W0 X||^2``."""
    return jnp.sum(row_errors(W, H, C))


def refit(H, C, keep, start, *, maxiter, tol):
    """Exact least squares of every row on its kept entries (the rest fixed at 0)."""
    lower = jnp.where(keep, -jnp.inf, 0.0)
    upper = jnp.where(keep, jnp.inf, 0.0)
    return box_qp(
        H, C, lower, upper, W0=jnp.where(keep, start, 0.0), maxiter=maxiter, tol=tol, method="cg"
    )


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def _reconstruct(weight, selected, H, C, H_error, *, pattern, maxiter, tol):
    # Exactly the pattern's count is free: the selector's nonzeros first, ties (a kept weight
    # that happens to be 0) broken by ``keep_mask``'s rule, so the refit can make them nonzero.
    keep = keep_mask(jnp.abs(selected), pattern)
    W, info = refit(H, C, keep, weight, maxiter=maxiter, tol=tol)
    error_qp = layer_error(W, H_error, C)
    error_selector = layer_error(selected, H_error, C)
    better = error_qp <= error_selector
    return jnp.where(better, W, selected), info, better, error_qp, error_selector


@dataclasses.dataclass(frozen=True)
class OptimaOptions:
    mask_from: str = option("wanda", "the method whose mask is reconstructed", choices=SELECTORS)
    tol: float = option(
        1e-6, "CG relative residual per row (1e-2: the published solver's)", low=0.0, low_open=True
    )
    maxiter: int | None = option(32, "CG iterations at most (None: 4 d_in)", low=1)
    percdamp: float = option(
        0.0, "ridge on H, relative to mean(diag H) (0: the exact objective)", low=0.0
    )


@register_layer_method(
    "optima",
    options=OptimaOptions,
    summary="exact masked least squares (box QP, masked CG) on any selector's mask",
)
def optima(problem: LayerProblem, pattern: Pattern, options: OptimaOptions) -> LayerResult:
    """Reconstruct the layer exactly on the mask of ``mask_from`` (``SELECTORS``).

    ``tol`` is CG's relative residual per row (default 1e-6: the float32 optimum; ``tol=1e-2``
    emulates the published solver's loose stopping rule), at most ``maxiter`` steps (default 32;
    ``None``: ``4 * d_in``). On smollm2-135m's blocks 15 and 29, 32 steps leave at most 0.7% of
    the reconstruction's gain over the selector untaken (64: 0.2%; ``bench/RESULTS.md``,
    issue 16) at a fraction of the steps to convergence.
    ``percdamp`` adds a ridge ``percdamp * mean(diag H)`` (0: the exact published objective).

    ``info``: ``selector``, ``kkt`` (max projected-gradient residual, per token), ``iterations``,
    ``converged`` (fraction of rows), ``kept_selector`` (the QP did not lower the error, so the
    selector's weights were kept), ``error_decrease`` (``||W Xp - W0 X||^2`` per token of
    the selector's weights minus that of the result).
    """
    mask_from, tol, maxiter, percdamp = (
        options.mask_from,
        options.tol,
        options.maxiter,
        options.percdamp,
    )
    check_pattern_fits(pattern, problem.weight.shape)
    selected = METHODS[mask_from](problem, pattern).weight.astype(jnp.float32)
    H, C, H_error = layer_quadratic(problem, percdamp)
    steps = 4 * problem.weight.shape[1] if maxiter is None else maxiter
    W, info, better, error_qp, error_selector = _reconstruct(
        problem.weight.astype(jnp.float32),
        selected,
        H,
        C,
        H_error,
        pattern=pattern,
        maxiter=steps,
        tol=tol,
    )
    stats = {
        "selector": mask_from,
        "kkt": float(info.kkt.max()),
        "iterations": int(info.iterations),
        "converged": float(info.converged.mean()),
        "result": result_counts(info.result),
        "kept_selector": not bool(better),
        "error_decrease": float(2.0 * (error_selector - error_qp)),
    }
    return LayerResult(W.astype(problem.weight.dtype), stats)
