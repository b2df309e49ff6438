"""SparseGPT (Frantar & Alistarh 2023): greedy OBS pruning with lazy batch updates.

Approximately solves ``min_W ||W X - W0 X||_F^2`` over ``W`` obeying the sparsity pattern, one
input column at a time. With ``H = 2 X X^T / n`` damped by ``percdamp * mean(diag H)`` and
``U`` the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``), column ``i`` is set to its
masked value ``q`` and the error ``err = (w - q) / U_ii`` is spread over the later columns,
``W[:, i:] -= err U[i, i:]`` (the OBS update in the order that makes ``U``'s rows the
successive inverse Hessians). Columns are swept in blocks of ``blocksize``; inside a block the
update is applied column by column, the rest of the matrix gets one GEMM per block (the lazy
batch update). ``obs_loss = sum_i err_i^2 / 2`` is the OBS estimate of the error added.

The mask is adaptive: it is chosen from ``w^2 / U_jj^2`` of the weights *as updated so far*.

* ``NM(n, m)``: at the first column of every group of ``m`` inputs, each row keeps its ``n``
  highest scores of the group (as published).
* ``Unstructured(s, scope="matrix")``: at the start of each block, one threshold over the whole
  block, so rows are not uniform (as published). The published code prunes
  ``floor(s * block size)`` entries of every block, plus one from its ``<=`` threshold; here the
  block of columns ``[i1, i2)`` prunes ``floor(s * d_out * i2) - floor(s * d_out * i1)``:
  proportional to its width, summing to the exact matrix target, and equal to the published
  count whenever ``s * d_out * blocksize`` is an integer (e.g. 50% of 128 columns).
* ``Unstructured(s, scope="row")``: every row prunes exactly ``floor(s * d_in)``. Before the
  sweep, each row shares its budget among the blocks by ranking its initial scores over the
  whole row (the blocks get what Wanda-style row comparison would give them); at the start of
  each block the row then prunes that many of its lowest *current* scores in the block. On
  random and correlated inputs (d_in 100-512) this cut the reconstruction error by 1-17%
  against a width-proportional share per block, for one row-wise selection.

Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column, as published.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import pairwise

import jax
import jax.numpy as jnp
from jax import lax

from jprune.errors import JpruneError
from jprune.options import option
from jprune.solvers import NM, Pattern, check_pattern_fits, keep_mask, topk_mask

from .base import LayerProblem, LayerResult, register_layer_method

# The published code turns TF32 off; the lazy update and the inverse need full float32.
_HIGHEST = lax.Precision.HIGHEST


def inverse_hessian_factor(
    gram: jax.Array, num_tokens: jax.Array | int, percdamp: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``U^T U = H^-1``), and the dead inputs."""
    d_in = gram.shape[0]
    hessian = 2.0 * gram.astype(jnp.float32) / num_tokens
    dead = jnp.diagonal(hessian) == 0
    # A dead input's row and column of H are zero too, so a unit diagonal makes H invertible
    # without coupling it to anything.
    hessian = hessian + jnp.diag(dead.astype(jnp.float32))
    damp = percdamp * jnp.mean(jnp.diagonal(hessian))
    hessian = hessian + damp * jnp.eye(d_in, dtype=jnp.float32)
    inverse = jax.scipy.linalg.cho_solve(
        (jnp.linalg.cholesky(hessian), True), jnp.eye(d_in, dtype=jnp.float32)
    )
    # The lazy update relies on exact zeros below the diagonal.
    return jnp.triu(jnp.linalg.cholesky(inverse).T), dead


def block_budgets(scores: jax.Array, pattern: Pattern, blocksize: int) -> jax.Array:
    """Entries each block prunes: (num_blocks, d_out) per row, or (num_blocks, 1) per matrix."""
    d_out, d_in = scores.shape
    bounds = list(pairwise([*range(0, d_in, blocksize), d_in]))
    if isinstance(pattern, NM):
        return jnp.zeros((len(bounds), 1), jnp.int32)
    if pattern.scope == "row":
        pruned = ~keep_mask(scores, pattern)
        counts = [pruned[:, start:end].sum(axis=1) for start, end in bounds]
        return jnp.stack(counts).astype(jnp.int32)
    # Same float expression as ``keep_mask`` at the last column, so the totals agree exactly;
    # an exact count is spread over the blocks in proportion to their widths.
    if pattern.count is None:
        cumulative = [0] + [math.floor(pattern.sparsity * (d_out * end)) for _, end in bounds]
        return jnp.asarray([[b - a] for a, b in pairwise(cumulative)], jnp.int32)
    return jnp.diff(_proportional_share(pattern.count, bounds, d_in), prepend=0)[:, None]


def _proportional_share(count: jax.Array | int, bounds, d_in: int) -> jax.Array:
    """``count * end // d_in`` for every block's end column, exactly, in int32.

    The count may be traced and ``count * end`` overflows int32 on large layers; with
    ``count = q d_in + r`` it is ``q end + r end // d_in``, and ``r end < d_in^2`` fits.
    """
    q, r = jnp.divmod(jnp.asarray(count, jnp.int32), d_in)
    ends = jnp.asarray([end for _, end in bounds], jnp.int32)
    return q * ends + r * ends // d_in


def _column_step(i, weights, errors, loss, hinv_block, prune_column):
    """OBS step for column ``i`` of a block: zero the pruned entries, compensate the later columns."""
    w = weights[:, i]
    q = jnp.where(prune_column, 0.0, w)
    err = (w - q) / hinv_block[i, i]
    # Row i of the upper factor is zero left of i, so the full-width update leaves done columns alone.
    weights = weights - err[:, None] * hinv_block[i][None, :]
    weights = weights.at[:, i].set(q)
    return weights, errors.at[:, i].set(err), loss + 0.5 * err**2


def _sweep_block(weights, hinv_block, budget, pattern):
    """Prune one block in place; return its final weights, the OBS errors and per-row losses."""
    d_out, width = weights.shape
    diag = jnp.diagonal(hinv_block)
    init = (weights, jnp.zeros_like(weights), jnp.zeros((d_out,), jnp.float32))

    if isinstance(pattern, NM):

        def group(g, carry):
            start = g * pattern.m
            cols = lax.dynamic_slice_in_dim(carry[0], start, pattern.m, axis=1)
            scale = lax.dynamic_slice_in_dim(diag, start, pattern.m)
            prune = ~keep_mask((cols / scale) ** 2, pattern)
            for j in range(pattern.m):
                carry = _column_step(start + j, *carry, hinv_block, prune[:, j])
            return carry

        return lax.fori_loop(0, width // pattern.m, group, init)

    # One comparison group per row, or the whole block: ``budget`` holds a count per group.
    groups = (weights / diag) ** 2
    if pattern.scope == "matrix":
        groups = groups.reshape(1, -1)
    prune = ~topk_mask(groups, groups.shape[1] - budget[:, None]).reshape(d_out, width)

    def column(i, carry):
        return _column_step(i, *carry, hinv_block, prune[:, i])

    return lax.fori_loop(0, width, column, init)


def _prune_block(weights, losses, hinv, start, width, budget, pattern):
    """Sweep the block of ``width`` columns at ``start``, then lazily update the columns after it."""
    block = lax.dynamic_slice_in_dim(weights, start, width, axis=1)
    hinv_block = lax.dynamic_slice(hinv, (start, start), (width, width))
    block, errors, block_loss = _sweep_block(block, hinv_block, budget, pattern)
    # Rows [start, start + width) of the upper factor vanish left of ``start``: a full-width GEMM
    # (static shape, so blocks can be scanned) changes only this block, overwritten next, and
    # the columns still to come.
    hinv_rows = lax.dynamic_slice_in_dim(hinv, start, width, axis=0)
    weights = weights - jnp.matmul(errors, hinv_rows, precision=_HIGHEST)
    weights = lax.dynamic_update_slice_in_dim(weights, block, start, axis=1)
    return weights, losses + block_loss


@jax.jit(static_argnames="blocksize")
def sparsegpt_prune(
    weight: jax.Array,
    gram: jax.Array,
    num_tokens: jax.Array | int,
    percdamp: jax.Array | float,
    *,
    pattern: Pattern,
    blocksize: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SparseGPT on one layer: (pruned float32 weight, per-row OBS loss, dead-input mask)."""
    d_out, d_in = weight.shape
    hinv, dead = inverse_hessian_factor(gram, num_tokens, percdamp)
    weights = jnp.where(dead[None, :], 0.0, weight.astype(jnp.float32))
    losses = jnp.zeros((d_out,), jnp.float32)
    budgets = block_budgets((weights / jnp.diagonal(hinv)) ** 2, pattern, blocksize)
    num_full = d_in // blocksize

    # Full blocks share one shape, so they are scanned and compiled once whatever d_in is.
    def full_block(carry, xs):
        start, budget = xs
        return _prune_block(*carry, hinv, start, blocksize, budget, pattern), None

    if num_full:
        starts = jnp.arange(num_full, dtype=jnp.int32) * blocksize
        (weights, losses), _ = lax.scan(
            full_block,
            (weights, losses),
            (starts, budgets[:num_full]),
        )
    if d_in % blocksize:
        weights, losses = _prune_block(
            weights, losses, hinv, num_full * blocksize, d_in % blocksize, budgets[-1], pattern
        )
    return weights, losses, dead


@dataclasses.dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = option(128, "columns per lazy batch update (a multiple of M for N:M)", low=1)
    percdamp: float = option(0.01, "dampening of H, relative to mean(diag H)", low=0.0)


def check_blocksize(options: SparseGPTOptions, pattern: Pattern) -> None:
    if isinstance(pattern, NM) and options.blocksize % pattern.m:
        raise JpruneError(
            f"method 'sparsegpt' option 'blocksize' must be a multiple of M={pattern.m} for "
            f"{pattern}, got {options.blocksize}"
        )


@register_layer_method(
    "sparsegpt",
    options=SparseGPTOptions,
    validate=lambda options, pattern: check_blocksize(options, pattern),
    summary="OBS with lazy batch updates, adaptive 128-column masks (Frantar & Alistarh 2023)",
)
def sparsegpt(problem: LayerProblem, pattern: Pattern, options: SparseGPTOptions) -> LayerResult:
    """SparseGPT with the published defaults (128-column blocks, 1% dampening).

    ``info``: ``dead_inputs`` (inputs never active in calibration), ``obs_loss`` (OBS estimate
    of the added error, ``sum err^2 / 2`` over all columns, in units of ``H = 2 X X^T / n``).
    """
    weight = problem.weight
    check_pattern_fits(pattern, weight.shape)
    check_blocksize(options, pattern)
    if problem.num_tokens <= 0:
        raise JpruneError(f"layer {problem.name!r} has no calibration tokens")
    pruned, losses, dead = sparsegpt_prune(
        weight,
        problem.gram,
        problem.num_tokens,
        options.percdamp,
        pattern=pattern,
        blocksize=options.blocksize,
    )
    info = {"dead_inputs": int(dead.sum()), "obs_loss": float(losses.sum())}
    return LayerResult(pruned.astype(weight.dtype), info)
