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
  window by window in order in the reproducible mode (``each_window``, ``_in_window_order``);
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
from jax.sharding import PartitionSpec as P

from jprune.converters.spec import linear_input
from jprune.methods.base import STATISTICS
from jprune.model import LINEAR_INPUTS, embed_apply, flat_arrays
from jprune.sharding import AXIS, mesh_size, replicate, shard_leading, to_host

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
    # The reproducible mode: every pass runs one window at a time (``each_window``), so a
    # window's activations do not depend on the batch size or the mesh.
    window_by_window: bool = False

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


def each_window(fn, placement: Placement, state, x, *rest):
    """``fn(state, x, *rest)`` on a batch whose leading axis is its windows (and so is that
    of ``rest`` and of ``fn``'s outputs).

    With ``placement.window_by_window``, ``fn`` runs on one window at a time (``lax.map``) on
    each device's own windows (``shard_map``), and its outputs are stacked along the windows.
    XLA picks a GEMM's kernel, and with it the rounding, by the operands' shapes: a window
    multiplied as one of 8 windows or of 3 rounds differently. Window by window, every window
    meets the same program on the same shapes whatever the batch size and the mesh. When the
    windows do not split evenly over the mesh, every device maps all of them (the same answer).
    """
    if not placement.window_by_window:
        return fn(state, x, *rest)
    mesh = placement.mesh
    if mesh is None:
        return jax.lax.map(functools.partial(_one_window, fn, state), (x, *rest))
    split = P(AXIS) if x.shape[0] % mesh_size(mesh) == 0 else P()
    mapped = jax.shard_map(
        lambda state, *windows: jax.lax.map(functools.partial(_one_window, fn, state), windows),
        mesh=mesh,
        in_specs=(P(), *(split,) * (1 + len(rest))),
        out_specs=split,
    )
    return mapped(state, x, *rest)


def _compiled_as(placement: Placement) -> Placement:
    """The part of a placement a pass's program depends on, as its static argument: only the
    reproducible mode's window-by-window program reads the mesh (data-parallel batches carry
    their sharding in the arrays), and no program reads ``offload``. Keying on less lets
    evaluation (offloaded) and pruning share one compilation per block structure."""
    return placement._replace(offload=False) if placement.window_by_window else ON_DEVICE


def _one_window(fn, state, window):
    """``fn`` on one window (the leading axis kept at length 1), its outputs unbatched."""
    batched = jax.tree.map(lambda a: a[None], window)
    return jax.tree.map(lambda a: a[0], fn(state, *batched))


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


def _outputs(graphdef, state, x, cached):
    return forward(graphdef, state, x, cached)[0]


def _attention(graphdef, state, x, cached):
    return nnx.merge(graphdef, state).attend(x)


def _residual(graphdef, state, x, cached):
    block = nnx.merge(graphdef, state)
    attention = cached["attention"] if cached else block.attend(x)
    return block.after_attention(x, attention)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pass_batch(fn, graphdef, placement: Placement, state, x, cached=None):
    """One batch through ``fn(graphdef, state, x, cached)`` (window by window where the
    placement asks)."""
    return each_window(functools.partial(fn, graphdef), placement, state, x, cached)


def _each_batch(fn, weights: BlockWeights, x: Stream, cache: Cache | None) -> Stream:
    """``fn(graphdef, state, batch, cached batch)`` over a stream."""
    program = _compiled_as(x.placement)
    run = functools.partial(_pass_batch, fn, weights.graphdef, program, weights.state)
    batches = [run(batch, kept) for batch, kept in zip(x, cached_batches(cache, x), strict=True)]
    return Stream(batches, x.placement)


def outputs(weights: BlockWeights, x: Stream, cache: Cache | None = None) -> Stream:
    """The block's outputs: the next block's inputs."""
    return _each_batch(_outputs, weights, x, cache)


def attention(weights: BlockWeights, x: Stream) -> Stream:
    """The block's attention output (o's input)."""
    return _each_batch(_attention, weights, x, None)


def residual(weights: BlockWeights, x: Stream, cache: Cache | None = None) -> Stream:
    """The residual stream entering the block's MLP."""
    return _each_batch(_residual, weights, x, cache)


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


# The reproducible mode's Grams add up products over this many tokens at a time.
GRAM_CHUNK = 128


def _gram(a: jax.Array, b: jax.Array, in_order: bool = False) -> jax.Array:
    """``A^T B`` over (windows, seqlen, d) activations; ``in_order``: as products over
    ``GRAM_CHUNK`` tokens at a time, added in order.

    A Gram is a GEMM with a small output and a long contraction (the tokens), the shape for
    which a CPU backend may split the contraction over its threads and add the partial sums:
    its rounding then depends on how many threads a device has (1 host device or 8 on one
    machine give different bits). Products over 128 tokens are too short to be split.
    """
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if not in_order:
        return a.T @ b
    extra = -a.shape[0] % GRAM_CHUNK  # zero rows add exact zeros
    a, b = (jnp.pad(m, ((0, extra), (0, 0))).reshape(-1, GRAM_CHUNK, m.shape[1]) for m in (a, b))
    first = a[0].T @ b[0]  # (a zero start would need marking as per-device in a shard_map)
    return jax.lax.scan(lambda acc, pair: (acc + pair[0].T @ pair[1], None), first, (a[1:], b[1:]))[
        0
    ]


def _in_window_order(per_window, total=None):
    """Per-window statistics (leading axis: the windows) added to ``total`` (zeros when None)
    one window at a time, in the windows' order.

    A sum over a batch, or a data-parallel sum and its all-reduce, rounds by how the windows
    are grouped, which the batch size and the mesh decide. Added one by one in order, the
    windows are summed the same way whatever the grouping.
    """
    if total is None:
        total = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), per_window)
    return jax.lax.scan(
        lambda acc, window: (jax.tree.map(jnp.add, acc, window), None), total, per_window
    )[0]


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


def _energy(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``||W x||^2`` summed over the tokens of (windows, seqlen, d_in) activations, float32."""
    y = x @ weight.astype(x.dtype).T
    per_window = jnp.sum(jnp.square(y).astype(jnp.float32), axis=tuple(range(1, y.ndim)))
    return jnp.sum(per_window)


Requests = tuple[tuple[str, tuple[str, ...]], ...]


def requests_of(statistics: Mapping[str, frozenset[str]]) -> Requests:
    """tap -> wanted statistics as a hashable, ordered static argument (unknown names refused)."""
    unknown = set().union(*statistics.values()) - STATISTICS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    return tuple((tap, tuple(sorted(wanted))) for tap, wanted in sorted(statistics.items()))


def _tap_statistics(requests: Requests, weights, current, dense, in_order: bool):
    """Per requested tap, its statistics (see ``methods.base.STATISTICS``) from the taps of
    the stream being pruned (``current``) and of the dense stream (``dense``); ``in_order``:
    Grams summed over token chunks in order (``_gram``)."""
    out = {}
    for tap, wanted in requests:
        xp = current[tap]
        stats = {}
        if "gram" in wanted:
            stats["gram"] = _gram(xp, xp, in_order)
        if "cross" in wanted:
            stats["cross"] = _gram(dense[tap], xp, in_order)
        if "dense" in wanted:
            readers = _linears_reading(tap, weights)
            if _prefers_energies(readers, xp.shape[-1]):
                stats["energy"] = {role: _energy(dense[tap], w) for role, w in readers.items()}
            else:
                stats["dense"] = _gram(dense[tap], dense[tap], in_order)
        if "mean" in wanted:  # a sum here; the consumer divides by the token count
            stats["mean"] = jnp.sum(xp.reshape(-1, xp.shape[-1]), axis=0)
        out[tap] = stats
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _batch_statistics(
    graphdef,
    requests: Requests,
    with_dense: bool,
    dense_outputs: bool,
    placement: Placement,
    state,
    dense_state,
    x,
    x_dense,
    cached=None,
    dense_cached=None,
    total=None,
):
    """The statistics of one batch, and with ``dense_outputs`` the dense stream's block
    outputs (else None). Window by window (the reproducible mode), the windows' statistics
    are added to ``total`` in order."""

    def batch(states, x, x_dense, cached, dense_cached):
        state, dense_state = states
        _, current = forward(graphdef, state, x, cached)
        dense_out, dense = (
            forward(graphdef, dense_state, x_dense, dense_cached)
            if with_dense or dense_outputs
            else (None, None)
        )
        weights = flat_arrays(dense_state) if with_dense else {}
        stats = _tap_statistics(requests, weights, current, dense, placement.window_by_window)
        if placement.window_by_window:  # one window's sums, given the window axis it lacks
            stats = jax.tree.map(lambda a: a[None], stats)
        return stats, (dense_out if dense_outputs else None)

    stats, dense_out = each_window(
        batch, placement, (state, dense_state), x, x_dense, cached, dense_cached
    )
    if placement.window_by_window:
        stats = _in_window_order(stats, total)
    return stats, dense_out


def statistics(
    weights: BlockWeights,
    dense_weights: BlockWeights,
    wanted: Mapping[str, frozenset[str]],
    x: Stream,
    x_dense: Stream | None,
    cache: Cache | None = None,
    dense_cache: Cache | None = None,
    *,
    dense_outputs: bool = False,
):
    """Sum the per-batch statistics over all calibration windows (float32).

    ``wanted``: tap -> the statistics wanted; ``x_dense`` is read only when one of them needs
    the dense stream, or with ``dense_outputs``. ``cache`` / ``dense_cache``: what each
    stream's earlier pass left (``forward``). Where the stream's placement runs window by
    window (the reproducible mode), the windows' statistics are summed one window at a time
    in order (``_in_window_order``). With ``dense_outputs`` returns ``(statistics, the dense
    stream's block outputs)``: the dense model does not change, so its next-block inputs come
    out of this pass instead of a pass of their own.
    """
    requests = requests_of(wanted)
    with_dense = any(DENSE_STATISTICS & set(names) for _, names in requests)
    dense = x_dense if with_dense or dense_outputs else None
    in_order = x.placement.window_by_window
    total = None
    next_dense = []
    for batch, batch_dense, kept, kept_dense in zip(
        x, [None] * len(x) if dense is None else dense, cached_batches(cache, x),
        cached_batches(dense_cache, x), strict=True,
    ):  # fmt: skip
        stats, dense_out = _batch_statistics(
            weights.graphdef, requests, with_dense, dense_outputs, _compiled_as(x.placement),
            weights.state, dense_weights.state, batch, batch_dense, kept, kept_dense,
            total if in_order else None,
        )  # fmt: skip
        next_dense.append(dense_out)
        if in_order or total is None:
            total = stats
        else:
            total = jax.tree.map(jnp.add, total, stats)
    if dense_outputs:
        return total, Stream(next_dense, x.placement)
    return total


def accumulate_grams(
    graphdef, taps, state, dense_state, x, x_dense, batch_size: int, reproducible: bool = False
) -> dict[str, dict[str, Any]]:
    """Grams (and with ``x_dense`` the cross and dense Grams) of whole (windows, seqlen,
    hidden) arrays on the default device: tap -> statistic -> array. ``reproducible``: window
    by window, in order (the reproducible mode)."""
    wanted = frozenset({"gram"} if x_dense is None else {"gram", "cross", "dense"})
    placement = Placement(window_by_window=reproducible)
    dense = None if x_dense is None else Stream(split_windows(x_dense, batch_size), placement)
    return statistics(
        BlockWeights(graphdef, state),
        BlockWeights(graphdef, dense_state),
        dict.fromkeys(taps, wanted),
        Stream(split_windows(x, batch_size), placement),
        dense,
    )
