"""Sparsity patterns as typed values, and the pure projections onto them.

A pattern says which entries of a (d_out, d_in) weight matrix may stay nonzero:

* ``Unstructured(sparsity, scope="row")``: every row keeps ``d_in - floor(sparsity * d_in)``
  entries (the Wanda / SparseGPT per-output comparison group).
* ``Unstructured(sparsity, scope="matrix")``: the matrix keeps ``size - floor(sparsity * size)``.
* ``Unstructured(sparsity, scope, count=c)``: exactly ``c`` zeros in the matrix (a layer-wise
  allocation's integer budget; ``sparsity`` is then ``c / size``, for display). Per row, each
  row prunes ``c // d_out`` and the first ``c % d_out`` rows one more, so rows differ by at
  most one; per matrix, ``c`` over the whole matrix.
* ``NM(n, m)``: at most ``n`` nonzeros in every ``m`` consecutive inputs of a row (2:4 keeps 2 of 4).

Counts are exact. Ties are broken deterministically: among equal scores the entry with the
lower flat index is kept, so a projection never depends on the backend's sort.

Patterns are pytrees, passed to jitted functions as ordinary arguments. What shapes the program
is static (aux data): the pattern's kind, its scope, N:M's ``n`` and ``m``, a uniform rule's
sparsity. An exact count (with its display sparsity) is a leaf: a layer-wise allocation gives
every layer its own count, and one compiled program then serves all the layers of a shape
instead of one per count. Functions that need a count inside a program take it as an array
(``pruned_per_row``, ``pruned_in_matrix``); ``num_pruned`` is the Python-side count.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Unstructured(NamedTuple):
    sparsity: float
    scope: Literal["row", "matrix"] = "row"
    count: int | None = None  # exact zeros in the matrix (None: from ``sparsity``)

    def __str__(self) -> str:
        exact = "" if self.count is None else f" ({self.count} zeros)"
        return f"{self.sparsity:g} unstructured per {self.scope}{exact}"


def _flatten_unstructured(pattern: Unstructured):
    # A uniform rule's sparsity fixes its counts when the program is traced: static, as before.
    # An exact count (and the sparsity it is shown as) is data, so every count of a shape shares
    # one program; the aux's ``None`` marks it.
    if pattern.count is None:
        return (), (pattern.scope, pattern.sparsity)
    return (pattern.sparsity, pattern.count), (pattern.scope, None)


def _unflatten_unstructured(aux, leaves) -> Unstructured:
    scope, sparsity = aux
    if sparsity is not None:
        return Unstructured(sparsity, scope)
    return Unstructured(leaves[0], scope, leaves[1])


jax.tree_util.register_pytree_node(Unstructured, _flatten_unstructured, _unflatten_unstructured)


def pruned_per_row(pattern: Unstructured, shape: tuple[int, int]) -> np.ndarray | jax.Array:
    """Zeros each row of a (d_out, d_in) matrix gets under a per-row ``pattern``, (d_out,).

    A NumPy constant for a uniform rule; a jax array for an exact count, which may be traced.
    """
    d_out, d_in = shape
    if pattern.count is None:
        return np.full(d_out, math.floor(pattern.sparsity * d_in), np.int64)
    base, extra = jnp.divmod(jnp.asarray(pattern.count, jnp.int32), d_out)
    return base + (jnp.arange(d_out) < extra).astype(jnp.int32)


def pruned_in_matrix(pattern: Unstructured, shape: tuple[int, int]) -> int | jax.Array:
    """Zeros of a (d_out, d_in) matrix under an unstructured ``pattern`` (either scope): a Python
    int for a uniform rule, the pattern's count (possibly traced) for an exact count."""
    if pattern.count is not None:  # per row too: the rows' shares sum to the count
        return pattern.count
    if pattern.scope == "row":
        return shape[0] * math.floor(pattern.sparsity * shape[1])
    return math.floor(pattern.sparsity * (shape[0] * shape[1]))


class NM(NamedTuple):
    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# n and m shape the program (group reshapes, unrolled comparisons): all of an N:M is static.
jax.tree_util.register_pytree_node(NM, lambda p: ((), tuple(p)), lambda aux, _: NM(*aux))


Pattern = Unstructured | NM


def parse_pattern(
    sparsity: float | None = None, nm: str | None = None, scope: str = "row"
) -> Pattern:
    """Build a pattern from CLI-style inputs: a sparsity in (0, 1) or an ``"N:M"`` string."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of a sparsity or an N:M pattern")
    if nm is not None:
        try:
            n_str, m_str = nm.split(":")
            n, m = int(n_str), int(m_str)
        except ValueError:
            raise ValueError(f"pattern {nm!r} is not of the form N:M (e.g. 2:4)") from None
        if not 0 < n < m:
            raise ValueError(f"pattern {nm!r} needs 0 < N < M")
        return NM(n, m)
    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside (0, 1)")
    if scope not in ("row", "matrix"):
        raise ValueError(f"sparsity scope {scope!r} is not 'row' or 'matrix'")
    return Unstructured(float(sparsity), scope)  # type: ignore[arg-type]


def row_separable(pattern: Pattern) -> bool:
    """Every row is its own problem (per-row and N:M budgets); a per-matrix budget couples them."""
    return not (isinstance(pattern, Unstructured) and pattern.scope == "matrix")


def rows_pattern(pattern: Pattern, shape: tuple[int, int], start: int, stop: int) -> Pattern:
    """The pattern of rows ``[start, stop)`` of a (d_out, d_in) matrix, solved on their own.

    A row-separable pattern's rows are independent problems, but an exact count is shared out
    by row index: the block gets the sum of its rows' shares, which the same rule (a prefix of
    rows one higher) gives back to exactly those rows. Rows at or past ``d_out`` (zero padding)
    get the lowest share. Uniform rules and N:M are the same for any rows.
    """
    if not isinstance(pattern, Unstructured) or pattern.count is None:
        return pattern
    if pattern.scope == "matrix":
        raise ValueError("a per-matrix count couples the rows: it cannot be split by rows")
    d_out, d_in = shape
    check_pattern_fits(pattern, shape)
    base, extra = divmod(int(pattern.count), d_out)
    rows = np.arange(start, stop)
    count = int(np.sum(base + (rows < extra)))
    return Unstructured(count / ((stop - start) * d_in), "row", count)


def check_pattern_fits(pattern: Pattern, shape: tuple[int, int]) -> None:
    """Refuse a pattern that cannot be applied exactly to a matrix of this shape.

    An exact count is checked where it is a Python or NumPy integer; inside a compiled program
    it is traced, and the caller outside checked it.
    """
    if isinstance(pattern, NM):
        if shape[1] % pattern.m:
            raise ValueError(
                f"N:M pattern {pattern} needs M={pattern.m} to divide the input width {shape[1]}"
            )
        return
    count, size = pattern.count, shape[0] * shape[1]
    if isinstance(count, (int, np.integer)) and not 0 <= count <= size:
        raise ValueError(f"cannot prune {count} of {size} weights")


def num_pruned(pattern: Pattern, shape: tuple[int, int]) -> int:
    """Exact number of zeros the pattern asks of a (d_out, d_in) matrix (concrete patterns)."""
    d_out, d_in = shape
    check_pattern_fits(pattern, shape)
    if isinstance(pattern, NM):
        return d_out * (d_in // pattern.m) * (pattern.m - pattern.n)
    return int(pruned_in_matrix(pattern, shape))


def _order_keys(scores: jax.Array) -> jax.Array:
    """Unsigned integers ordered as the float ``scores`` are (``-0.0`` counts as ``0.0``)."""
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)
    unsigned = jnp.dtype(f"uint{8 * scores.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(scores, unsigned)
    sign = jnp.asarray(1 << (8 * unsigned.itemsize - 1), unsigned)
    # IEEE floats order as sign-magnitude integers: flip negatives, lift non-negatives.
    return jnp.where(bits >= sign, ~bits, bits | sign)


def topk_mask(scores: jax.Array, k: int | jax.Array) -> jax.Array:
    """Boolean mask keeping the ``k`` largest scores of every row (last axis).

    ``k`` is an int or an array broadcasting against ``scores.shape[:-1] + (1,)`` (a count
    per row). Among scores equal to the row's k-th largest, the lowest indices are kept.
    The k-th largest value is found bit by bit on the scores' order-preserving integer keys:
    one compare-and-count pass per bit, no sort. On CPU, XLA's sort and ``lax.top_k`` cost
    15-30 GEMMs of the same matrix, and the pursuit, lam searches and l0-ADMM project many
    times per layer; a pass costs about 1/40 of a GEMM.

    The passes stop early once every row's current prefix ``t`` has exactly ``k`` keys at or
    above it: that set is then the answer (a tie straddling the k-th place would put at least
    ``k + 1`` keys at or above any ``t`` that keeps it): 26 of the 32 passes on Gaussian rows of
    1536. Rows with such a tie run all of them.
    """
    keys = _order_keys(scores)
    nbits = 8 * keys.dtype.itemsize
    per_row = keys.shape[:-1] + (1,)
    k_rows = jnp.broadcast_to(jnp.asarray(k), per_row)
    count_all = jnp.full(per_row, keys.shape[-1], jnp.int32)

    def unresolved(state):
        bit, _, count = state
        return (bit < nbits) & jnp.any(count != k_rows)

    def next_bit(state):
        bit, threshold, count = state
        candidate = threshold | (jnp.asarray(1, keys.dtype) << (nbits - 1 - bit).astype(keys.dtype))
        count_above = jnp.sum(keys >= candidate, axis=-1, keepdims=True, dtype=jnp.int32)
        enough = count_above >= k_rows
        return (
            bit + 1,
            jnp.where(enough, candidate, threshold),
            jnp.where(enough, count_above, count),
        )

    # The largest key t with at least k keys >= t is the row's k-th largest; ``count`` holds
    # how many keys are >= the current prefix.
    start = jnp.zeros(per_row, keys.dtype)
    _, threshold, count = jax.lax.while_loop(
        unresolved, next_bit, (jnp.zeros((), jnp.int32), start, count_all)
    )

    def by_index(_):
        # A tie at the k-th place: the lowest indices among the tied keys fill the room left.
        # (The cumsum costs about 20 passes on CPU, so it runs only when some row needs it.)
        above = keys > threshold
        tied = keys == threshold
        room = k_rows - jnp.sum(above, axis=-1, keepdims=True)
        return above | (tied & (jnp.cumsum(tied, axis=-1) <= room))

    exact = count == k_rows
    return jax.lax.cond(jnp.all(exact), lambda _: keys >= threshold, by_index, None)


# Up to this group size an N:M projection ranks each group by pairwise comparisons
# (m^2 per group, elementwise); larger groups go through ``topk_mask``.
PAIRWISE_GROUP = 16


def _nm_keep(groups: jax.Array, n: int) -> jax.Array:
    """Keep the ``n`` largest of every group (last axis) of size ``m <= PAIRWISE_GROUP``."""
    mine, other = groups[..., :, None], groups[..., None, :]
    index = jnp.arange(groups.shape[-1])
    earlier = index[None, :] < index[:, None]
    beaten_by = (other > mine) | ((other == mine) & earlier)
    return jnp.sum(beaten_by, axis=-1) < n


# Compiled once per (shape, pattern structure): called eagerly (a prototype's layer function),
# the top-k search's loop and branch would otherwise be traced and compiled on every call.
@jax.jit
def keep_mask(scores: jax.Array, pattern: Pattern) -> jax.Array:
    """Boolean mask of the entries to keep: the highest ``scores`` allowed by ``pattern``.

    This is the one dispatch point on pattern types; every selector (magnitude, Wanda,
    SparseGPT, FISTA's final rounding) goes through it.
    """
    d_out, d_in = scores.shape
    scores = scores.astype(jnp.float32)
    if isinstance(pattern, NM):
        check_pattern_fits(pattern, scores.shape)
        groups = scores.reshape(d_out, d_in // pattern.m, pattern.m)
        if pattern.m <= PAIRWISE_GROUP:
            return _nm_keep(groups, pattern.n).reshape(d_out, d_in)
        return topk_mask(groups, pattern.n).reshape(d_out, d_in)
    if pattern.scope == "row":
        if pattern.count is None:  # one count for every row: a Python int, as before
            return topk_mask(scores, d_in - math.floor(pattern.sparsity * d_in))
        keep = d_in - pruned_per_row(pattern, scores.shape)
        return topk_mask(scores, keep[:, None])
    keep = scores.size - pruned_in_matrix(pattern, scores.shape)
    return topk_mask(scores.reshape(1, -1), keep).reshape(d_out, d_in)


def project_topk(W: jax.Array, k: int, *, scope: Literal["row", "matrix"] = "row") -> jax.Array:
    """Euclidean projection onto ``k`` nonzeros per row (or per matrix): keep the largest |W|."""
    scores = jnp.abs(W).astype(jnp.float32)
    if scope == "row":
        return jnp.where(topk_mask(scores, k), W, 0)
    mask = topk_mask(scores.reshape(1, -1), k).reshape(W.shape)
    return jnp.where(mask, W, 0)


def project_nm(W: jax.Array, n: int, m: int) -> jax.Array:
    """Euclidean projection onto N:M sparsity along the input (last) axis."""
    return jnp.where(keep_mask(jnp.abs(W), NM(n, m)), W, 0)


def project_pattern(W: jax.Array, pattern: Pattern) -> jax.Array:
    """Euclidean projection of ``W`` onto ``pattern``: keep the allowed largest magnitudes."""
    return jnp.where(keep_mask(jnp.abs(W), pattern), W, 0)


def prox_l1(W: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Soft thresholding, the proximal map of ``threshold * ||W||_1`` (threshold per row or scalar)."""
    return jnp.sign(W) * jnp.maximum(jnp.abs(W) - threshold, 0)


def project_box(W: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    """Projection onto ``lower <= W <= upper`` elementwise."""
    return jnp.clip(W, lower, upper)
