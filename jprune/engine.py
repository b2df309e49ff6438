"""The block-sequential pruning engine, one for every method.

For each decoder block, in order, and for each stage of the method's block program
(``methods.base``: a layer-function method prunes linears, a structured method channels):

1. run the block over the calibration activations and accumulate, per linear input ("tap"),
   the statistics the stage asks for (float32 Grams ``Xp Xp^T``, ``X Xp^T`` and ``X X^T``,
   input sums), streaming over calibration batches (``apply_block`` returns the taps: an
   explicit pure function, no hooks);
2. hand each unit to the method's ``solve`` and write its new parameters into the block
   (their shapes may shrink);
3. once every stage is done, recompute the block's outputs: they are the next block's inputs.

Two knobs decide which activations the statistics come from:

* ``sequential`` (default): block inputs come from the already-pruned model. Otherwise every
  block sees the dense model's inputs (FISTAPruner's parallel-block mode).
* ``intra_block`` (layer-function methods): linears are pruned in stages q,k,v -> o ->
  gate,up (fc1) -> down (fc2), each stage's inputs recomputed through the already-pruned
  upstream operators; the linear term then targets the dense block's outputs on the dense
  model's inputs (``W0 X``), so upstream errors are corrected rather than copied
  (FISTAPruner's intra-layer error correction). Without it, one pass captures every linear's
  input from the block as it was (the SparseGPT / Wanda protocol). Structured methods have
  their own stages (attention channels, then MLP channels) and refuse the knob.

Only one block's activations are alive at a time: ``(nsamples, seqlen, hidden)`` for the pruned
stream and, when a stage needs dense-model statistics or blocks see the dense inputs, the dense
stream. Later stages do not rerun what earlier ones fixed: once q, k, v are final each stream's
attention output is kept (attention is most of a block's forward cost), and once o is final
too, the residual entering the MLP replaces it, so the MLP stages and the output pass start
there. The dense model does not change, so its stream's next-block inputs come out of the last
stage's statistics pass rather than a pass of their own, and a tap's dense Gram gives way to
its readers' output energies where those are cheaper (``_prefers_energies``). On smollm2-135m
with intra-block stages this took the engine's forward passes and Grams from 231 s to 180 s
(caching) and 164 s (energies), a run with a near-free solver (``bench/RESULTS.md``, issue 16).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jprune import memory
from jprune.blocks import BlockState, InMemoryBlocks, as_blocks
from jprune.config import check_engine_options
from jprune.converters.spec import linear_input
from jprune.errors import JpruneError
from jprune.methods import LayerProblem, Method
from jprune.methods.base import STATISTICS, UnitContext
from jprune.model import LINEAR_INPUTS, CausalLM, named_arrays
from jprune.sharding import mesh_size, pad_rows, replicate, shard_leading, to_host
from jprune.solvers import row_separable

# The linears that feed attention: once they are final, a block's attention output is too.
ATTENTION_LINEARS = frozenset(n for n, tap in LINEAR_INPUTS.items() if tap == "attn_in")
# Once these are final, so is the residual stream entering the MLP.
RESIDUAL_LINEARS = ATTENTION_LINEARS | {n for n, tap in LINEAR_INPUTS.items() if tap == "o_in"}
# The statistics that are read from the dense model's stream.
DENSE_STATISTICS = frozenset({"cross", "dense"})


@dataclass(frozen=True)
class EngineOptions:
    sequential: bool = True
    intra_block: bool = False
    batch_size: int = 8  # calibration windows per forward pass
    mesh: Mesh | None = None  # data-parallel calibration and row-sharded layer problems
    offload: bool = False  # keep block activations in host memory between forward passes
    # Reproducible mode when > 0: Grams summed window by window in a fixed order, and each
    # layer solved as this many equal row blocks, so that the pruned weights are bit-identical
    # on every mesh whose size divides it (see ``canonical_gram`` and ``_solve_in_row_blocks``).
    row_blocks: int = 0


# ---------------------------------------------------------------- statistics


@functools.partial(jax.jit, static_argnums=0)
def embed_tokens_fn(graphdef, state, ids):
    return nnx.merge(graphdef, state).embed_tokens(ids)


def _forward(graphdef, state, x, cached=None):
    """The block's (output, taps), resumed from what ``cached`` holds of ``x``'s pass: its
    attention output (``{"attention": ...}``) or the residual entering the MLP
    (``{"residual": ...}``; the taps then hold only the MLP's inputs)."""
    block = nnx.merge(graphdef, state)
    if cached and "residual" in cached:
        return block.finish_mlp(cached["residual"])
    if cached and "attention" in cached:
        return block.finish(x, cached["attention"])
    return block(x)


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _batch_statistics(
    graphdef,
    requests: tuple[tuple[str, tuple[str, ...]], ...],
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
    _, current = _forward(graphdef, state, x, cached)
    dense_out, dense = (
        _forward(graphdef, dense_state, x_dense, dense_cached)
        if with_dense or dense_outputs
        else (None, None)
    )
    weights = _flat_params(dense_state) if with_dense else {}
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

    Only ``||W0 X||^2`` of each reader is ever read from the dense Gram
    (``reconstruction_error``); as output energies it costs ``sum d_out`` instead of ``d_in``
    multiply-adds per token and input (``down``: 576 x 1536 against 1536^2 on smollm2).
    """
    return sum(w.shape[0] for w in readers.values()) < d_in


def _energy(x: jax.Array, weight: jax.Array, reproducible: bool) -> jax.Array:
    """``||W x||^2`` summed over the tokens of (windows, seqlen, d_in) activations, float32."""
    y = x @ weight.astype(x.dtype).T
    per_window = jnp.sum(jnp.square(y).astype(jnp.float32), axis=tuple(range(1, y.ndim)))
    return _pairwise_sum(per_window) if reproducible else jnp.sum(per_window)


class Activations:
    """One stream of block activations (nsamples, seqlen, hidden), read in calibration batches.

    Kept on the default device, or in host memory when offloading or sharding (each batch is
    then placed on the mesh, split along its windows, just before its forward pass).
    """

    def __init__(self, batches: Sequence[jax.Array], options: EngineOptions):
        self.on_host = options.offload or options.mesh is not None
        self.options = options
        self.batches = [to_host(b) if self.on_host else jnp.asarray(b) for b in batches]

    def __iter__(self):
        for batch in self.batches:
            yield shard_leading(batch, self.options.mesh) if self.on_host else batch

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(b.shape)) * b.dtype.itemsize for b in self.batches)


def _requests(statistics: Mapping[str, frozenset[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    unknown = set().union(*statistics.values()) - STATISTICS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    return tuple((tap, tuple(sorted(wanted))) for tap, wanted in sorted(statistics.items()))


def stream_statistics(
    graphdef,
    statistics: Mapping[str, frozenset[str]],
    state,
    dense_state,
    x: Activations,
    x_dense: Activations | None,
    cached: Mapping[str, Activations] | None = None,
    dense_cached: Mapping[str, Activations] | None = None,
    *,
    dense_outputs: bool = False,
):
    """Sum the per-batch statistics over all calibration windows (float32).

    ``statistics``: tap -> the statistics wanted; ``x_dense`` is read only when one of them
    needs the dense stream, or with ``dense_outputs``. ``cached`` / ``dense_cached``: what the
    engine keeps of each stream's pass (``_forward``), if anything. With ``dense_outputs``
    returns ``(statistics, the dense stream's block outputs)``: the dense model does not
    change, so its next-block inputs come out of this pass instead of a pass of their own.
    """
    requests = _requests(statistics)
    with_dense = any(DENSE_STATISTICS & set(wanted) for _, wanted in requests)
    total = None
    absent = [None] * len(x.batches)
    dense = x_dense if with_dense or dense_outputs else None
    outputs = []
    for batch, xd, kept, kept_dense in zip(
        x, absent if dense is None else dense, _zip_cache(cached, x), _zip_cache(dense_cached, x),
        strict=True,
    ):  # fmt: skip
        stats, dense_out = _batch_statistics(
            graphdef,
            requests,
            with_dense,
            x.options.row_blocks > 0,
            dense_outputs,
            state,
            dense_state,
            batch,
            xd,
            kept,
            kept_dense,
        )
        outputs.append(dense_out)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    if dense_outputs:
        return total, Activations(outputs, x.options)
    return total


def _zip_cache(cached: Mapping[str, Activations] | None, x: Activations) -> list:
    """Per batch of ``x``, the cached arrays of that batch (a dict, or None)."""
    if not cached:
        return [None] * len(x.batches)
    return [
        dict(zip(cached, batches, strict=True)) for batches in zip(*cached.values(), strict=True)
    ]


def _batches(x: jax.Array, batch_size: int) -> list[jax.Array]:
    return [x[s : s + batch_size] for s in range(0, x.shape[0], batch_size)]


def accumulate_grams(graphdef, taps, state, dense_state, x, x_dense, batch_size, row_blocks=0):
    """Grams (and with ``x_dense`` the cross and dense Grams) of whole (nsamples, seqlen,
    hidden) arrays on the default device: tap -> statistic -> array."""
    options = EngineOptions(batch_size=batch_size, row_blocks=row_blocks)
    wanted = frozenset({"gram"} if x_dense is None else {"gram", "cross", "dense"})
    dense = None if x_dense is None else Activations(_batches(x_dense, batch_size), options)
    return stream_statistics(
        graphdef,
        dict.fromkeys(taps, wanted),
        state,
        dense_state,
        Activations(_batches(x, batch_size), options),
        dense,
    )


def block_outputs(graphdef, state, x, batch_size):
    """Block outputs for a whole (nsamples, seqlen, hidden) array, ``batch_size`` windows a pass."""
    return jnp.concatenate([_block_outputs(graphdef, state, b) for b in _batches(x, batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _block_outputs(graphdef, state, x, cached=None):
    return _forward(graphdef, state, x, cached)[0]


@functools.partial(jax.jit, static_argnums=0)
def _attend(graphdef, state, x, cached=None):
    return nnx.merge(graphdef, state).attend(x)


@functools.partial(jax.jit, static_argnums=0)
def _after_attention(graphdef, state, x, cached=None):
    block = nnx.merge(graphdef, state)
    attention = cached["attention"] if cached else block.attend(x)
    return block.after_attention(x, attention)


def _block_pass(fn, graphdef, state, x: Activations, cached: Mapping[str, Activations] | None):
    """``fn(graphdef, state, batch, cached batch)`` over a stream (see ``_forward``)."""
    fn = functools.partial(fn, graphdef, state)
    return Activations(
        [fn(batch, kept) for batch, kept in zip(x, _zip_cache(cached, x), strict=True)],
        x.options,
    )


def _advance_cache(graphdef, state, x: Activations, cached: dict, changed: set[str]) -> dict:
    """What to keep of a stream's pass now that the linears in ``changed`` are final.

    Once q, k, v are, the attention output; once o is too, the residual entering the MLP
    (which replaces it: same size, and everything after it starts there). Each later pass then
    reruns only what a linear still to be pruned can change.
    """
    if "residual" not in cached and RESIDUAL_LINEARS <= changed:
        return {"residual": _block_pass(_after_attention, graphdef, state, x, cached)}
    if not cached and ATTENTION_LINEARS <= changed:
        return {"attention": _block_pass(_attend, graphdef, state, x, None)}
    return cached


# ---------------------------------------------------------------- layer accounting


@jax.jit
def reconstruction_error(W, W0, gram, cross, dense_gram, reference=None):
    """``||W Xp - W0 X||^2`` and ``||W0 X||^2`` from the Grams (``cross = X Xp^T``); the
    second from ``dense_gram`` unless given as ``reference``."""
    W, W0 = W.astype(jnp.float32), W0.astype(jnp.float32)
    if reference is None:
        reference = jnp.sum((W0 @ dense_gram) * W0)
    if cross is None:
        delta = W - W0
        return jnp.sum((delta @ gram) * delta), reference
    error = jnp.sum((W @ gram) * W) - 2 * jnp.sum((W0 @ cross) * W) + reference
    return jnp.maximum(error, 0.0), reference


def plain(value: Any) -> Any:
    """Method info -> JSON-ready values. Scalars stay as they are; a per-row array becomes
    ``{"mean": ..., "worst": ...}`` (worst: the largest value, or ``false`` if any row is),
    so one bad row is not averaged away."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return plain(value._asdict())
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = to_host(value)
        if array.size == 1:
            return array.item()
        if array.dtype == bool:
            return {"mean": float(array.mean()), "worst": bool(array.all())}
        numbers = array.astype(np.float64)
        return {"mean": float(numbers.mean()), "worst": float(numbers.max())}
    return value


# ---------------------------------------------------------------- solving on the mesh


def _solve_layer(layer_method, problem: LayerProblem, pattern, method_options, options):
    """Run a layer function with rows sharded over the mesh and the Grams replicated."""
    mesh = options.mesh
    if options.row_blocks and row_separable(pattern):
        return _solve_in_row_blocks(layer_method, problem, pattern, method_options, options)
    rows = problem.weight.shape[0]
    if mesh is not None:
        weight = to_host(problem.weight)
        if row_separable(pattern):
            weight = shard_leading(pad_rows(weight, mesh), mesh)
        elif options.row_blocks:
            # A shared budget couples the rows: the reproducible mode runs the whole layer on
            # every device, the program one device runs, instead of summing across devices.
            weight = replicate(weight, mesh)
        else:
            weight = shard_leading(weight, mesh)  # replicated unless the rows divide
        problem = _replicate_grams(problem._replace(weight=weight), mesh)
    result = layer_method(problem, pattern, method_options)
    new_weight = jax.block_until_ready(result.weight)
    if mesh is not None:
        new_weight = jnp.asarray(to_host(new_weight)[:rows])
    return new_weight, result.info


def _replicate_grams(problem: LayerProblem, mesh: Mesh | None) -> LayerProblem:
    cross = problem.cross_gram
    return problem._replace(
        gram=replicate(problem.gram, mesh),
        cross_gram=None if cross is None else replicate(cross, mesh),
    )


def _solve_in_row_blocks(layer_method, problem, pattern, method_options, options):
    """Solve the layer as ``options.row_blocks`` equal blocks of rows (zero rows pad the last).

    XLA picks its GEMM kernel, and with it the rounding, by the operands' shapes: the same rows
    multiplied as part of 64 rows or of 8 can differ in the last bit, and a pruning method's
    discrete choices (masks, best-of rounds) amplify that. Here every device always holds one
    block: a mesh of n devices takes the blocks n at a time, one device one at a time, so each
    device runs the same program on the same shapes whatever n is. The info is one entry per
    call (each call covers n blocks).
    """
    devices = mesh_size(options.mesh)
    if options.row_blocks % devices:
        raise JpruneError(
            f"{options.row_blocks} row blocks do not split evenly over {devices} devices: "
            "choose a row-block count the mesh size divides"
        )
    weight = to_host(problem.weight)
    rows = weight.shape[0]
    extra = -rows % options.row_blocks
    weight = np.concatenate([weight, np.zeros((extra, weight.shape[1]), weight.dtype)])
    chunk = weight.shape[0] // options.row_blocks * devices
    problem = _replicate_grams(problem, options.mesh)
    pieces, infos = [], []
    for start in range(0, weight.shape[0], chunk):
        part = shard_leading(weight[start : start + chunk], options.mesh)
        result = layer_method(problem._replace(weight=part), pattern, method_options)
        pieces.append(to_host(jax.block_until_ready(result.weight)))
        infos.append(result.info)
    return jnp.asarray(np.concatenate(pieces)[:rows]), {"row_blocks": infos}


def layer_memory_bytes(d_out: int, d_in: int, num_grams: int, activation_bytes: int) -> int:
    """What must fit at once for one layer problem (the documented bound, float32):
    the weight and its pruned copy plus solver state (~4 more (d_out, d_in) arrays), the
    layer's Grams, and the calibration activations of one block (one or two streams, and with
    intra-block stages their cached attention outputs)."""
    return 4 * (6 * d_out * d_in + num_grams * d_in * d_in) + activation_bytes


def _nbytes(shape) -> int:
    return int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize


def memory_bound(shapes: Mapping[str, Any], spec, stream_bytes: int, streams: int) -> int:
    """The most a pruning run holds at once besides the runtime itself (the README's bound):

    * what surrounds the blocks (embeddings, final norm, head) as stored, plus a float32
      copy of its largest matrix (the head's product casts it);
    * one block three times in float32 (the dense and pruned parameters and a cast copy);
    * the Grams of one block's linear inputs, three per input (``gram``, ``cross``, ``dense``);
    * solver state of its largest linear (``layer_memory_bytes``' six copies);
    * the calibration streams (one or two), their cached attention outputs and the next
      block's inputs while they are computed.

    Independent of the number of blocks: only the largest block counts.
    """
    outer = {n: s for n, s in shapes.items() if not n.startswith("layers.")}
    total = sum(_nbytes(s) for s in outer.values())
    total += 4 * max((int(np.prod(s.shape)) for s in outer.values()), default=0)
    per_block: dict[str, int] = {}
    largest = 0
    inputs: dict[str, dict[str, int]] = {}
    for name, s in shapes.items():
        if name.startswith("layers."):
            block = name.split(".")[1]
            per_block[block] = per_block.get(block, 0) + int(np.prod(s.shape))
            if name.endswith(".weight") and len(s.shape) == 2:
                largest = max(largest, int(np.prod(s.shape)))
                role = name.removeprefix(f"layers.{block}.").removesuffix(".weight")
                if role.split(".")[-1] in LINEAR_INPUTS:
                    inputs.setdefault(block, {})[linear_input(role)] = s.shape[1]
    total += 3 * 4 * max(per_block.values(), default=0)
    grams = max((sum(d * d for d in taps.values()) for taps in inputs.values()), default=0)
    total += 3 * 4 * grams + 6 * 4 * largest
    return total + (2 * streams + 2) * stream_bytes


def _device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------- the engine


class PruneOutcome(NamedTuple):
    model: Any  # the pruned CausalLM (in-memory runs; None when blocks stream to disk)
    spec: Any  # the pruned model's spec (structured methods narrow it)
    records: list[dict[str, Any]]  # one per pruned unit, the same shape for every method
    config_updates: dict[str, Any]  # config.json changes the export needs
    extra_files: dict[str, str]  # files written beside the checkpoint (remote modeling code)
    memory: dict[str, Any]  # the bound (bytes) and, per block, measured peak RSS and device peak


def _flat_params(state) -> dict[str, jax.Array]:
    return {".".join(str(k) for k in path): var[...] for path, var in nnx.to_flat_state(state)}


def _set_param(state, name: str, value: jax.Array) -> None:
    node = state
    for key in name.split("."):
        node = node[int(key) if key.isdigit() else key]  # list entries (experts) have int keys
    node.set_value(value)


def _record(result, stats, seconds, name, block, held) -> dict[str, Any]:
    """The per-unit record every method gets (``channels`` is null unless structured)."""
    tap = stats[linear_input(result.linear)]
    energy = tap.get("energy", {}).get(result.linear)
    cross = tap.get("cross") if "dense" in tap or energy is not None else None
    error, reference = reconstruction_error(
        result.weight, result.weight0, tap["gram"], cross, tap.get("dense", tap["gram"]), energy
    )
    d_out, d_in = result.weight0.shape
    if result.channels is None:
        sparsity = float(jnp.mean(result.weight == 0))
    else:
        sparsity = float(1 - result.channels["after"] / result.channels["before"])
    grams = len(DENSE_STATISTICS.union({"gram"}) & set(tap))
    return {
        "name": name,
        "block": block,
        "role": result.role,
        "shape": [d_out, d_in],
        "sparsity": sparsity,
        "channels": result.channels,
        "relative_error": float(error / jnp.maximum(reference, 1e-30)),
        "seconds": seconds,
        "memory": {
            "bound_bytes": layer_memory_bytes(d_out, d_in, grams, held),
            "device_peak_bytes": _device_peak_bytes(),
        },
        "info": plain(result.info),
    }


class _Job(NamedTuple):
    """What every unit of a run shares."""

    program: Any
    spec: Any
    target: Any
    method_options: Any
    num_tokens: int
    hf_names: Callable[[str], str] | None
    solve_rows: Callable[..., Any]
    mesh: Mesh | None
    layer_targets: Mapping[str, Any] | None = None  # "layers.3.q" -> its own pattern


def _prune_stage(job: _Job, index, stage, state, stats, held, changed) -> list[dict[str, Any]]:
    """Solve a stage's units in order, writing each one's parameters into ``state``."""
    # The statistics are dispatched asynchronously: wait for them here, so a unit's seconds
    # are its solve alone, not the block's forward passes and Grams.
    jax.block_until_ready(stats)
    records = []
    for unit in stage.units:
        target = (job.layer_targets or {}).get(f"layers.{index}.{unit}", job.target)
        context = UnitContext(
            job.spec, index, _flat_params(state), stats, target, job.method_options,
            job.num_tokens, job.spec.num_layers, job.hf_names or str, job.solve_rows,
        )  # fmt: skip
        started = time.perf_counter()
        result = job.program.solve(unit, context)
        jax.block_until_ready(result.updates)
        seconds = time.perf_counter() - started
        for name, value in result.updates.items():
            _set_param(state, name, replicate(value, job.mesh))
            changed.add(name.split(".")[0])
        name = f"layers.{index}.{result.linear}"
        shown = job.hf_names(name) if job.hf_names else name
        records.append(_record(result, stats, seconds, shown, index, held))
    return records


def _block_memory(index: int) -> dict[str, Any]:
    return {
        "block": index,
        "peak_rss_bytes": memory.peak(),
        "device_peak_bytes": _device_peak_bytes(),
    }


def _initial_streams(blocks, calibration, options: EngineOptions, use_dense: bool):
    """The calibration streams entering the first block to prune, and where to start."""
    resumed = blocks.resume()
    if resumed is not None:
        streams = {k: Activations(v, options) for k, v in resumed.streams.items()}
        x_dense = streams.get("x_dense")
        x = streams["x"] if options.sequential else x_dense
        return resumed.next_block, x, x_dense, resumed.records, dict(resumed.shapes)
    mesh, size = options.mesh, options.batch_size
    windows = [calibration[s : s + size] for s in range(0, calibration.shape[0], size)]
    embed_graph, embed_state = nnx.split(blocks.shell)
    embed_state = jax.tree.map(lambda a: replicate(a, mesh), embed_state)
    x = Activations(
        [embed_tokens_fn(embed_graph, embed_state, shard_leading(w, mesh)) for w in windows],
        options,
    )
    return 0, x, (x if use_dense else None), [], {}


def prune_model(
    model,
    calibration: np.ndarray,
    method: Method,
    target,
    method_options=None,
    options: EngineOptions = EngineOptions(),
    *,
    hf_config: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    hf_names: Callable[[str], str] | None = None,
    layer_targets: Mapping[str, Any] | None = None,
) -> PruneOutcome:
    """Prune ``model`` with ``method`` at ``target`` (a Pattern, or ``structured.Channels``).

    ``model`` is a loaded ``CausalLM`` (changed in place; structured methods return a new,
    smaller one) or a ``blocks.ModelBlocks`` (a checkpoint streamed a block at a time, each
    finished block handed to its ``store`` and dropped). ``calibration`` is (nsamples, seqlen)
    token ids. ``progress(stage, block, num_blocks)`` is called as work advances (the CLI draws
    a bar from it). ``hf_names`` maps canonical layer names (``layers.0.q``) to the names shown
    in the report. ``layer_targets``: canonical linear name (``layers.3.q``) -> the pattern it
    gets instead of ``target`` (a layer-wise allocation, ``jprune.allocation``).
    """
    blocks = as_blocks(model)
    program = method.program
    method_options = method.options() if method_options is None else method_options
    check_engine_options(
        method, options.intra_block, options.batch_size, options.row_blocks, mesh_size(options.mesh)
    )
    spec, mesh = blocks.spec, options.mesh
    program.check(spec, parameter_shapes(blocks), target, method_options, hf_config or {})
    stages = program.stages(spec, method_options, options.intra_block)
    wants_dense = any(DENSE_STATISTICS & set(w) for st in stages for w in st.statistics.values())
    use_dense = wants_dense or not options.sequential
    start, x, x_dense, records, shapes = _initial_streams(blocks, calibration, options, use_dense)
    streams = 2 if use_dense else 1

    def solve_rows(layer, problem, pattern, layer_options):
        return _solve_layer(layer, problem, pattern, layer_options, options)

    job = _Job(
        program, spec, target, method_options, int(calibration.size), hf_names, solve_rows, mesh,
        layer_targets,
    )  # fmt: skip
    block_memory = []
    for index in range(start, spec.num_layers):
        memory.reset_peak()
        block = blocks.load(index)
        graphdef, live_state = nnx.split(block)
        # split returns the block's own Variables, which nnx.update below overwrites: keep two
        # separate containers (sharing the immutable arrays) for the dense and pruned weights.
        dense_state = jax.tree.map(lambda a: replicate(a, mesh), live_state)
        state = jax.tree.map(lambda a: replicate(a, mesh), live_state)
        # Parallel-block mode: this block sees the dense model's input.
        x_in = x if options.sequential else x_dense
        cached: dict[str, Activations] = {}
        dense_cached: dict[str, Activations] = {}
        changed: set[str] = set()
        next_dense = None
        for number, stage in enumerate(stages, 1):
            # The dense stream's next inputs come out of the last stage's pass.
            last_dense = use_dense and number == len(stages)
            if progress is not None:
                label = ",".join(getattr(u, "name", str(u)) for u in stage.units)
                progress(f"block {index}: {label}", index, spec.num_layers)
            cached = _advance_cache(graphdef, state, x_in, cached, changed)
            if x_dense is not None:
                # Caching follows the pruned linears: the dense stream's passes have the same
                # structure, so a stage reruns the same part of the block on both streams.
                dense_cached = _advance_cache(graphdef, dense_state, x_dense, dense_cached, changed)
            stats = stream_statistics(
                graphdef, stage.statistics, state, dense_state, x_in, x_dense,
                cached, dense_cached, dense_outputs=last_dense,
            )  # fmt: skip
            if last_dense:
                stats, next_dense = stats
            kept = [a.nbytes for a in (*cached.values(), *dense_cached.values())]
            held = streams * x.nbytes + sum(kept) + (0 if next_dense is None else x.nbytes)
            records += _prune_stage(job, index, stage, state, stats, held, changed)
        nnx.update(block, jax.tree.map(lambda a: jnp.asarray(to_host(a)), state))
        if use_dense:
            x_dense = next_dense
        if options.sequential:
            x = _block_pass(_block_outputs, graphdef, state, x_in, cached)
        else:
            x = x_dense
        shapes |= {f"layers.{index}.{k}": list(v.shape) for k, v in _flat_params(state).items()}
        kept = {"x": x} if options.sequential else {}
        kept |= {"x_dense": x_dense} if use_dense else {}
        block_state = BlockState(
            index + 1, {k: v.batches for k, v in kept.items()}, records, shapes
        )
        blocks.store(index, block, block_state)
        del block, state, dense_state, live_state, cached, dense_cached, stats, next_dense
        block_memory.append(_block_memory(index))
    if progress is not None:
        progress("done", spec.num_layers, spec.num_layers)
    new_spec, config_updates, extra_files = program.finish(
        spec, shapes, hf_config or {}, method_options
    )
    pruned = None
    if isinstance(blocks, InMemoryBlocks):
        pruned = blocks.model
        if new_spec != spec:
            pruned = CausalLM(new_spec, named_arrays(pruned))
    bound = memory_bound(parameter_shapes(blocks), spec, x.nbytes, streams)
    usage = {"bound_bytes": bound, "blocks": block_memory}
    return PruneOutcome(pruned, new_spec, records, config_updates, extra_files, usage)


def parameter_shapes(blocks) -> dict[str, Any]:
    """Canonical parameter name -> array or shape struct (anything with ``.shape``)."""
    if isinstance(blocks, InMemoryBlocks):
        return named_arrays(blocks.model)
    return blocks.checkpoint.shapes


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Whole-model figures: achieved sparsity over all pruned weights, summed relative error."""
    total = sum(int(np.prod(r["shape"])) for r in records)
    zeros = sum(r["sparsity"] * int(np.prod(r["shape"])) for r in records)
    return {
        "sparsity": zeros / total if total else 0.0,
        "relative_error_sum": float(sum(r["relative_error"] for r in records)),
        "solver_seconds": float(sum(r["seconds"] for r in records)),
    }
