"""The walk over a model's decoder blocks: activations streaming through them, one at a time.

Every pass over a model's blocks goes through this module: the pruning engine
(``jprune.engine``), the allocation's dense pass (``jprune.allocation``) and the perplexity
evaluation (``jprune.evaluate``) are its clients. It owns

* ``Stream``: one stream of block activations, ``(windows, seqlen, hidden)`` split in batches,
  on the default device or in host memory (``Placement``);
* the embedding (``embed``) and the block passes over a stream: the block's outputs
  (``outputs``), its attention output (``attention``), the residual entering its MLP
  (``residual``), each able to resume from what a ``Cache`` holds of an earlier pass;
* the per-tap statistics a pruning stage asks for (``statistics``: Grams, cross and dense
  Grams or their readers' output energies, input sums), summed over a stream in float32, in a
  fixed order in the reproducible mode (``canonical_gram``);
* ``walk``: load each block in turn, place it, and hand it with the stream to a visitor.

A block is handled as a pure function of its parameters (``BlockWeights``: the module's graph
and its state), so each pass is one jit-compiled program per block structure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jprune.converters.spec import linear_input
from jprune.methods.base import STATISTICS
from jprune.model import LINEAR_INPUTS, embed_apply, flat_arrays
from jprune.sharding import replicate, shard_leading, to_host

# The linears that feed attention: once they are final, a block's attention output is too.
ATTENTION_LINEARS = frozenset(n for n, tap in LINEAR_INPUTS.items() if tap == "attn_in")
# Once these are final, so is the residual stream entering the MLP.
RESIDUAL_LINEARS = ATTENTION_LINEARS | {n for n, tap in LINEAR_INPUTS.items() if tap == "o_in"}
# The statistics that are read from the dense model's stream.
DENSE_STATISTICS = frozenset({"cross", "dense"})


# ---------------------------------------------------------------- streams


class Placement(NamedTuple):
    """Where a stream's batches live and run."""

    mesh: Mesh | None = None  # batches are split over the mesh along their windows
    offload: bool = False  # keep batches in host memory between passes

    @property
    def on_host(self) -> bool:
        # A sharded stream is kept on the host and placed on the mesh batch by batch.
        return self.offload or self.mesh is not None


ON_DEVICE = Placement()


class Stream:
    """One stream of block activations (windows, seqlen, hidden), read in batches.

    Kept on the default device, or in host memory when offloading or sharding (each batch is
    then placed on the mesh, split along its windows, just before its pass).
    """

    def __init__(self, batches: Sequence[jax.Array], placement: Placement = ON_DEVICE):
        self.placement = placement
        on_host = placement.on_host
        self.batches = [to_host(b) if on_host else jnp.asarray(b) for b in batches]

    def __iter__(self) -> Iterator[jax.Array]:
        for batch in self.batches:
            yield shard_leading(batch, self.placement.mesh) if self.placement.on_host else batch

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(b.shape)) * b.dtype.itemsize for b in self.batches)


def _stream_children(stream: Stream):
    return stream.batches, stream.placement


def _stream_from_children(placement: Placement, batches) -> Stream:
    stream = object.__new__(Stream)  # the batches are already where the placement keeps them
    stream.placement, stream.batches = placement, list(batches)
    return stream


# A pytree of its batches: ``jax.block_until_ready`` waits for a stream (or a cache of them).
jax.tree_util.register_pytree_node(Stream, _stream_children, _stream_from_children)


# What a stream's earlier pass left to resume from: {"attention": Stream} (the attention
# output) or {"residual": Stream} (the residual entering the MLP), or empty.
Cache = Mapping[str, Stream]


def cached_batches(cache: Cache | None, x: Stream) -> list[dict[str, jax.Array] | None]:
    """Per batch of ``x``, the cached arrays of that batch (a dict, or None)."""
    if not cache:
        return [None] * len(x)
    return [dict(zip(cache, batches, strict=True)) for batches in zip(*cache.values(), strict=True)]


def split_windows(windows, batch_size: int) -> list:
    """(count, ...) rows in consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [windows[s : s + batch_size] for s in range(0, windows.shape[0], batch_size)]


# ---------------------------------------------------------------- blocks and passes


class BlockWeights(NamedTuple):
    """A block as a pure function: its module's graph and its parameters (placed)."""

    graphdef: nnx.GraphDef
    state: nnx.State

    @property
    def arrays(self) -> dict[str, jax.Array]:
        """The block's parameters by name within the block (``down.weight``)."""
        return flat_arrays(self.state)


def place_block(block: nnx.Module, mesh: Mesh | None) -> BlockWeights:
    """The block's weights, replicated on the mesh.

    ``nnx.split`` returns the module's own Variables, which ``nnx.update`` overwrites: the copy
    made here is a separate container (sharing the immutable arrays), so one loaded block can
    serve as both the dense and the pruned weights.
    """
    graphdef, state = nnx.split(block)
    return BlockWeights(graphdef, jax.tree.map(lambda a: replicate(a, mesh), state))


def embed(shell: nnx.Module, windows: np.ndarray, batch_size: int, placement: Placement) -> Stream:
    """The stream entering the first block: token ids (count, seqlen), ``batch_size`` a pass."""
    graphdef, state = nnx.split(shell)
    state = jax.tree.map(lambda a: replicate(a, placement.mesh), state)
    return Stream(
        [
            embed_apply(graphdef, state, shard_leading(batch, placement.mesh))
            for batch in split_windows(windows, batch_size)
        ],
        placement,
    )


def forward(graphdef, state, x, cached=None):
    """The block's (output, taps), resumed from what ``cached`` holds of ``x``'s pass: its
    attention output (``{"attention": ...}``) or the residual entering the MLP
    (``{"residual": ...}``; the taps then hold only the MLP's inputs)."""
    block = nnx.merge(graphdef, state)
    if cached and "residual" in cached:
        return block.finish_mlp(cached["residual"])
    if cached and "attention" in cached:
        return block.finish(x, cached["attention"])
    return block(x)


@functools.partial(jax.jit, static_argnums=0)
def _outputs_batch(graphdef, state, x, cached=None):
    return forward(graphdef, state, x, cached)[0]


@functools.partial(jax.jit, static_argnums=0)
def _attention_batch(graphdef, state, x, cached=None):
    return nnx.merge(graphdef, state).attend(x)


@functools.partial(jax.jit, static_argnums=0)
def _residual_batch(graphdef, state, x, cached=None):
    block = nnx.merge(graphdef, state)
    attention = cached["attention"] if cached else block.attend(x)
    return block.after_attention(x, attention)


def _each_batch(fn, weights: BlockWeights, x: Stream, cache: Cache | None) -> Stream:
    """``fn(graphdef, state, batch, cached batch)`` over a stream."""
    fn = functools.partial(fn, weights.graphdef, weights.state)
    batches = [fn(batch, kept) for batch, kept in zip(x, cached_batches(cache, x), strict=True)]
    return Stream(batches, x.placement)


def outputs(weights: BlockWeights, x: Stream, cache: Cache | None = None) -> Stream:
    """The block's outputs: the next block's inputs."""
    return _each_batch(_outputs_batch, weights, x, cache)


def attention(weights: BlockWeights, x: Stream) -> Stream:
    """The block's attention output (o's input)."""
    return _each_batch(_attention_batch, weights, x, None)


def residual(weights: BlockWeights, x: Stream, cache: Cache | None = None) -> Stream:
    """The residual stream entering the block's MLP."""
    return _each_batch(_residual_batch, weights, x, cache)


def advance_cache(weights: BlockWeights, x: Stream, cache: Cache, final: set[str]) -> Cache:
    """What to keep of a stream's pass now that the linears in ``final`` are final.

    Once q, k, v are, the attention output; once o is too, the residual entering the MLP
    (which replaces it: same size, and everything after it starts there). Each later pass then
    reruns only what a linear still to be pruned can change.
    """
    if "residual" not in cache and RESIDUAL_LINEARS <= final:
        return {"residual": residual(weights, x, cache)}
    if not cache and ATTENTION_LINEARS <= final:
        return {"attention": attention(weights, x)}
    return cache


def walk(
    blocks,
    x: Stream,
    visit: Callable[[int, BlockWeights, Stream], Stream],
    progress: Callable[[int], None] | None = None,
) -> Stream:
    """Load each block of ``blocks`` (a ``blocks.ModelBlocks``) in order, place it on ``x``'s
    mesh, and let ``visit(index, weights, x)`` return the next block's inputs; one block is
    alive at a time. ``progress(index)`` after each block."""
    for index in range(blocks.spec.num_layers):
        weights = place_block(blocks.load(index), x.placement.mesh)
        x = visit(index, weights, x)
        del weights
        if progress is not None:
            progress(index)
    return x


# ---------------------------------------------------------------- statistics


def _pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading axis as a fixed binary tree (neighbours first, an odd last one
    carried up): the additions do not depend on how the axis is split over devices."""
    while x.shape[0] > 1:
        even = x.shape[0] - x.shape[0] % 2
        x = jnp.concatenate([x[0:even:2] + x[1:even:2], x[even:]])
    return x[0]


def canonical_gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A^T B`` over (windows, seqlen, d) activations, rounded the same on every mesh.

    A data-parallel ``A^T B`` is each device's partial product plus an all-reduce, so its
    rounding depends on how many devices share the windows. Here every window's Gram is one
    product of fixed shape and the windows are summed by ``_pairwise_sum``.
    """
    return _pairwise_sum(jnp.einsum("wti,wtj->wij", a, b))


def _gram(a: jax.Array, b: jax.Array, reproducible: bool) -> jax.Array:
    if reproducible:
        return canonical_gram(a, b)
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def _linears_reading(tap: str, weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """role -> weight of every linear of the block whose input is ``tap``."""
    roles = (name.removesuffix(".weight") for name in weights if name.endswith(".weight"))
    return {
        role: weights[f"{role}.weight"]
        for role in roles
        if role.split(".")[-1] in LINEAR_INPUTS and linear_input(role) == tap
    }


def _prefers_energies(readers: Mapping[str, jax.Array], d_in: int) -> bool:
    """Whether the dense Gram of a tap is better replaced by its readers' output energies.

    Only ``||W0 X||^2`` of each reader is ever read from the dense Gram (the record's
    reconstruction error); as output energies it costs ``sum d_out`` instead of ``d_in``
    multiply-adds per token and input (``down``: 576 x 1536 against 1536^2 on smollm2).
    """
    return sum(w.shape[0] for w in readers.values()) < d_in


def _energy(x: jax.Array, weight: jax.Array, reproducible: bool) -> jax.Array:
    """``||W x||^2`` summed over the tokens of (windows, seqlen, d_in) activations, float32."""
    y = x @ weight.astype(x.dtype).T
    per_window = jnp.sum(jnp.square(y).astype(jnp.float32), axis=tuple(range(1, y.ndim)))
    return _pairwise_sum(per_window) if reproducible else jnp.sum(per_window)


Requests = tuple[tuple[str, tuple[str, ...]], ...]


def requests_of(statistics: Mapping[str, frozenset[str]]) -> Requests:
    """tap -> wanted statistics as a hashable, ordered static argument (unknown names refused)."""
    unknown = set().union(*statistics.values()) - STATISTICS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    return tuple((tap, tuple(sorted(wanted))) for tap, wanted in sorted(statistics.items()))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _batch_statistics(
    graphdef,
    requests: Requests,
    with_dense: bool,
    reproducible: bool,
    dense_outputs: bool,
    state,
    dense_state,
    x,
    x_dense,
    cached=None,
    dense_cached=None,
):
    """Per requested tap, its statistics for one batch (see ``methods.base.STATISTICS``), and
    with ``dense_outputs`` the dense stream's block outputs (else None)."""
    _, current = forward(graphdef, state, x, cached)
    dense_out, dense = (
        forward(graphdef, dense_state, x_dense, dense_cached)
        if with_dense or dense_outputs
        else (None, None)
    )
    weights = flat_arrays(dense_state) if with_dense else {}
    out = {}
    for tap, wanted in requests:
        xp = current[tap]
        stats = {}
        if "gram" in wanted:
            stats["gram"] = _gram(xp, xp, reproducible)
        if "cross" in wanted:
            stats["cross"] = _gram(dense[tap], xp, reproducible)
        if "dense" in wanted:
            readers = _linears_reading(tap, weights)
            if _prefers_energies(readers, xp.shape[-1]):
                stats["energy"] = {
                    role: _energy(dense[tap], w, reproducible) for role, w in readers.items()
                }
            else:
                stats["dense"] = _gram(dense[tap], dense[tap], reproducible)
        if "mean" in wanted:  # a sum here; the consumer divides by the token count
            stats["mean"] = jnp.sum(xp.reshape(-1, xp.shape[-1]), axis=0)
        out[tap] = stats
    return out, (dense_out if dense_outputs else None)


def statistics(
    weights: BlockWeights,
    dense_weights: BlockWeights,
    wanted: Mapping[str, frozenset[str]],
    x: Stream,
    x_dense: Stream | None,
    cache: Cache | None = None,
    dense_cache: Cache | None = None,
    *,
    reproducible: bool = False,
    dense_outputs: bool = False,
):
    """Sum the per-batch statistics over all calibration windows (float32).

    ``wanted``: tap -> the statistics wanted; ``x_dense`` is read only when one of them needs
    the dense stream, or with ``dense_outputs``. ``cache`` / ``dense_cache``: what each
    stream's earlier pass left (``forward``). ``reproducible``: Grams summed window by window
    in a fixed order (``canonical_gram``). With ``dense_outputs`` returns ``(statistics, the
    dense stream's block outputs)``: the dense model does not change, so its next-block inputs
    come out of this pass instead of a pass of their own.
    """
    requests = requests_of(wanted)
    with_dense = any(DENSE_STATISTICS & set(names) for _, names in requests)
    dense = x_dense if with_dense or dense_outputs else None
    total = None
    next_dense = []
    for batch, batch_dense, kept, kept_dense in zip(
        x, [None] * len(x) if dense is None else dense, cached_batches(cache, x),
        cached_batches(dense_cache, x), strict=True,
    ):  # fmt: skip
        stats, dense_out = _batch_statistics(
            weights.graphdef, requests, with_dense, reproducible, dense_outputs,
            weights.state, dense_weights.state, batch, batch_dense, kept, kept_dense,
        )  # fmt: skip
        next_dense.append(dense_out)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    if dense_outputs:
        return total, Stream(next_dense, x.placement)
    return total


def accumulate_grams(
    graphdef, taps, state, dense_state, x, x_dense, batch_size: int, reproducible: bool = False
) -> dict[str, dict[str, Any]]:
    """Grams (and with ``x_dense`` the cross and dense Grams) of whole (windows, seqlen,
    hidden) arrays on the default device: tap -> statistic -> array."""
    wanted = frozenset({"gram"} if x_dense is None else {"gram", "cross", "dense"})
    dense = None if x_dense is None else Stream(split_windows(x_dense, batch_size))
    return statistics(
        BlockWeights(graphdef, state),
        BlockWeights(graphdef, dense_state),
        dict.fromkeys(taps, wanted),
        Stream(split_windows(x, batch_size)),
        dense,
        reproducible=reproducible,
    )
