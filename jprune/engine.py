"""The block-sequential pruning engine.

For each decoder block, in order:

1. run the block over the calibration activations and accumulate, per linear input ("tap"),
   float32 Gram matrices streaming over calibration batches (``apply_block`` returns the taps:
   an explicit pure function, no hooks);
2. hand each linear's ``LayerProblem`` to the method and write the new weight into the block;
3. recompute the block's outputs: they are the next block's inputs.

Two knobs decide which activations a layer problem is built from:

* ``sequential`` (default): block inputs come from the already-pruned model. Otherwise every
  block sees the dense model's inputs (FISTAPruner's parallel-block mode).
* ``intra_block``: linears are pruned in stages q,k,v -> o -> gate,up (fc1) -> down (fc2), each
  stage's inputs recomputed through the already-pruned upstream operators; the linear term then
  targets the dense block's outputs on the dense model's inputs (``W0 X``), so upstream errors
  are corrected rather than copied (FISTAPruner's intra-layer error correction). Without it, one
  pass captures every linear's input from the block as it was (the SparseGPT / Wanda protocol).

Only one block's activations are alive at a time: ``(nsamples, seqlen, hidden)`` for the pruned
stream and, when needed, the dense stream. With ``intra_block``, each stream's attention output
is kept too once q, k, v are pruned: attention is most of a block's forward cost and no later
stage changes it, so the o, MLP and output passes start from it instead of rerunning attention.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jprune.errors import JpruneError
from jprune.methods import LayerProblem, get_method
from jprune.model import LINEAR_INPUTS, block_linear_names
from jprune.sharding import mesh_size, pad_rows, replicate, shard_leading, to_host
from jprune.solvers import Pattern, check_pattern_fits, row_separable

# The linears that feed attention: once they are final, a block's attention output is too.
ATTENTION_LINEARS = frozenset(n for n, tap in LINEAR_INPUTS.items() if tap == "attn_in")


@dataclass(frozen=True)
class EngineOptions:
    sequential: bool = True
    intra_block: bool = False
    batch_size: int = 8  # calibration windows per forward pass
    method_options: dict[str, Any] = field(default_factory=dict)
    mesh: Mesh | None = None  # data-parallel calibration and row-sharded layer problems
    offload: bool = False  # keep block activations in host memory between forward passes
    # Reproducible mode when > 0: Grams summed window by window in a fixed order, and each
    # layer solved as this many equal row blocks, so that the pruned weights are bit-identical
    # on every mesh whose size divides it (see ``canonical_gram`` and ``_solve_in_row_blocks``).
    row_blocks: int = 0


def block_stages(spec, intra_block: bool) -> list[tuple[str, ...]]:
    """Groups of linears pruned together; each group's inputs are captured after the previous."""
    names = block_linear_names(spec)
    if not intra_block:
        return [names]
    mlp_in = tuple(n for n in names if LINEAR_INPUTS[n] == "mlp_in")
    return [("q", "k", "v"), ("o",), mlp_in, ("down",)]


# ---------------------------------------------------------------- Gram accumulation


@functools.partial(jax.jit, static_argnums=0)
def embed_tokens_fn(graphdef, state, ids):
    return nnx.merge(graphdef, state).embed_tokens(ids)


def _forward(graphdef, state, x, attention=None):
    """The block's (output, taps), from its cached attention output when one is given."""
    block = nnx.merge(graphdef, state)
    return block(x) if attention is None else block.finish(x, attention)


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _batch_grams(
    graphdef,
    taps: tuple[str, ...],
    with_dense: bool,
    reproducible: bool,
    state,
    dense_state,
    x,
    x_dense,
    attention=None,
    dense_attention=None,
):
    """Per tap: ``Xp Xp^T`` and, with a dense stream, ``X Xp^T`` and ``X X^T`` for one batch."""
    _, current = _forward(graphdef, state, x, attention)
    out = {}
    dense = _forward(graphdef, dense_state, x_dense, dense_attention)[1] if with_dense else None
    for tap in taps:
        xp = current[tap]
        grams = {"gram": _gram(xp, xp, reproducible)}
        if with_dense:
            xd = dense[tap]
            grams |= {"cross": _gram(xd, xp, reproducible), "dense": _gram(xd, xd, reproducible)}
        out[tap] = grams
    return out


class Activations:
    """One stream of block activations (nsamples, seqlen, hidden), read in calibration batches.

    Kept on the default device, or in host memory when offloading or sharding (each batch is
    then placed on the mesh, split along its windows, just before its forward pass).
    """

    def __init__(self, batches: Sequence[jax.Array], options: EngineOptions):
        self.on_host = options.offload or options.mesh is not None
        self.options = options
        self.batches = [to_host(b) if self.on_host else b for b in batches]

    def __iter__(self):
        for batch in self.batches:
            yield shard_leading(batch, self.options.mesh) if self.on_host else batch

    def map(self, fn, *others: Activations) -> Activations:
        """``fn`` over this stream's batches, zipped with the batches of ``others``."""
        return Activations(
            [fn(*batches) for batches in zip(self, *others, strict=True)], self.options
        )

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(b.shape)) * b.dtype.itemsize for b in self.batches)


def stream_grams(
    graphdef,
    taps,
    state,
    dense_state,
    x: Activations,
    x_dense: Activations | None,
    attention: Activations | None = None,
    dense_attention: Activations | None = None,
):
    """Sum the per-batch Grams over all calibration windows (float32).

    ``attention`` / ``dense_attention``: the streams' cached attention outputs, if any.
    """
    total = None
    with_dense = x_dense is not None
    absent = [None] * len(x.batches)
    others = [absent if s is None else s for s in (x_dense, attention, dense_attention)]
    batches = zip(x, *others, strict=True)
    for batch, xd, att, att_dense in batches:
        grams = _batch_grams(
            graphdef,
            tuple(taps),
            with_dense,
            x.options.row_blocks > 0,
            state,
            dense_state,
            batch,
            xd,
            att,
            att_dense,
        )
        total = grams if total is None else jax.tree.map(jnp.add, total, grams)
    return total


def _batches(x: jax.Array, batch_size: int) -> list[jax.Array]:
    return [x[s : s + batch_size] for s in range(0, x.shape[0], batch_size)]


def accumulate_grams(graphdef, taps, state, dense_state, x, x_dense, batch_size, row_blocks=0):
    """``stream_grams`` over whole (nsamples, seqlen, hidden) arrays on the default device."""
    options = EngineOptions(batch_size=batch_size, row_blocks=row_blocks)
    dense = None if x_dense is None else Activations(_batches(x_dense, batch_size), options)
    return stream_grams(
        graphdef, taps, state, dense_state, Activations(_batches(x, batch_size), options), dense
    )


def block_outputs(graphdef, state, x, batch_size):
    """Block outputs for a whole (nsamples, seqlen, hidden) array, ``batch_size`` windows a pass."""
    return jnp.concatenate([_block_outputs(graphdef, state, b) for b in _batches(x, batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _block_outputs(graphdef, state, x, attention=None):
    return _forward(graphdef, state, x, attention)[0]


@functools.partial(jax.jit, static_argnums=0)
def _attend(graphdef, state, x):
    return nnx.merge(graphdef, state).attend(x)


def _block_pass(fn, graphdef, state, x: Activations, attention: Activations | None):
    """``fn(graphdef, state, batch[, attention batch])`` over a stream."""
    fn = functools.partial(fn, graphdef, state)
    return x.map(fn) if attention is None else x.map(fn, attention)


# ---------------------------------------------------------------- layer accounting


@jax.jit
def reconstruction_error(W, W0, gram, cross, dense_gram):
    """``||W Xp - W0 X||^2`` and ``||W0 X||^2`` from the Grams (``cross = X Xp^T``)."""
    W, W0 = W.astype(jnp.float32), W0.astype(jnp.float32)
    reference = jnp.sum((W0 @ dense_gram) * W0)
    if cross is None:
        delta = W - W0
        return jnp.sum((delta @ gram) * delta), reference
    error = jnp.sum((W @ gram) * W) - 2 * jnp.sum((W0 @ cross) * W) + reference
    return jnp.maximum(error, 0.0), reference


def plain(value: Any) -> Any:
    """Method info -> JSON-ready numbers: scalars as is, per-row arrays as their mean."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return plain(value._asdict())
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype == bool:
            return bool(array.all()) if array.size > 1 else bool(array)
        if array.size == 1:
            return array.item()
        return float(array.astype(np.float64).mean())
    return value


# ---------------------------------------------------------------- the engine


def _get_linear_weight(state, name):
    return state[name]["weight"][...]


def _set_linear_weight(state, name, weight):
    state[name]["weight"][...] = weight


def _solve_layer(layer_method, problem: LayerProblem, pattern: Pattern, options: EngineOptions):
    """Run the method with rows sharded over the mesh and the Grams replicated."""
    mesh = options.mesh
    if options.row_blocks and row_separable(pattern):
        return _solve_in_row_blocks(layer_method, problem, pattern, options)
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
    result = layer_method(problem, pattern, **options.method_options)
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


def _solve_in_row_blocks(layer_method, problem, pattern, options):
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
        result = layer_method(problem._replace(weight=part), pattern, **options.method_options)
        pieces.append(to_host(jax.block_until_ready(result.weight)))
        infos.append(result.info)
    return jnp.asarray(np.concatenate(pieces)[:rows]), {"row_blocks": infos}


def layer_memory_bytes(d_out: int, d_in: int, num_grams: int, activation_bytes: int) -> int:
    """What must fit at once for one layer problem (the documented bound, float32):
    the weight and its pruned copy plus solver state (~4 more (d_out, d_in) arrays), the
    layer's Grams, and the calibration activations of one block (one or two streams, and with
    intra-block stages their cached attention outputs)."""
    return 4 * (6 * d_out * d_in + num_grams * d_in * d_in) + activation_bytes


def _device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def prune_blocks(
    model,
    calibration: np.ndarray,
    method: str,
    pattern: Pattern,
    options: EngineOptions = EngineOptions(),
    progress: Callable[[str, int, int], None] | None = None,
    hf_names: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """Prune every decoder linear of ``model`` in place; return one record per linear.

    ``calibration`` is (nsamples, seqlen) token ids. ``progress(stage, block, num_blocks)`` is
    called as work advances (the CLI draws a bar from it). ``hf_names`` maps canonical layer
    names (``layers.0.q``) to the names shown in the report.
    """
    layer_method = get_method(method)
    spec = model.spec
    mesh = options.mesh
    for role in block_linear_names(spec):
        check_pattern_fits(pattern, getattr(model.layers[0], role).weight[...].shape)
    size = options.batch_size
    windows = [calibration[s : s + size] for s in range(0, calibration.shape[0], size)]
    embed_graph, embed_state = nnx.split(model)
    embed_state = jax.tree.map(lambda a: replicate(a, mesh), embed_state)
    x = Activations(
        [embed_tokens_fn(embed_graph, embed_state, shard_leading(w, mesh)) for w in windows],
        options,
    )
    use_dense = options.intra_block or not options.sequential
    x_dense = x if use_dense else None
    num_tokens = int(calibration.size)
    records = []
    for index, block in enumerate(model.layers):
        graphdef, live_state = nnx.split(block)
        # split returns the block's own Variables, which nnx.update below overwrites: keep two
        # separate containers (sharing the immutable arrays) for the dense and pruned weights.
        dense_state = jax.tree.map(lambda a: replicate(a, mesh), live_state)
        state = jax.tree.map(lambda a: replicate(a, mesh), live_state)
        # Parallel-block mode: this block sees the dense model's input.
        x_in = x if options.sequential else x_dense
        streams = 2 if options.intra_block or not options.sequential else 1
        attention = dense_attention = None
        pruned = set()
        for stage in block_stages(spec, options.intra_block):
            if progress is not None:
                progress(f"block {index}: {','.join(stage)}", index, spec.num_layers)
            if options.intra_block and attention is None and ATTENTION_LINEARS <= pruned:
                attention = _block_pass(_attend, graphdef, state, x_in, None)
                dense_attention = _block_pass(_attend, graphdef, dense_state, x_dense, None)
            pruned.update(stage)
            taps = sorted({LINEAR_INPUTS[n] for n in stage})
            grams = stream_grams(
                graphdef,
                taps,
                state,
                dense_state,
                x_in,
                x_dense if options.intra_block else None,
                attention,
                dense_attention,
            )
            cached = (a.nbytes for a in (attention, dense_attention) if a is not None)
            held = streams * x.nbytes + sum(cached)
            for role in stage:
                tap = grams[LINEAR_INPUTS[role]]
                weight0 = _get_linear_weight(dense_state, role)
                name = f"layers.{index}.{role}"
                problem = LayerProblem(
                    weight=weight0.astype(jnp.float32),
                    gram=tap["gram"],
                    cross_gram=tap.get("cross"),
                    num_tokens=num_tokens,
                    name=name,
                )
                started = time.perf_counter()
                new_weight, info = _solve_layer(layer_method, problem, pattern, options)
                seconds = time.perf_counter() - started
                error, reference = reconstruction_error(
                    new_weight,
                    weight0,
                    tap["gram"],
                    tap.get("cross"),
                    tap.get("dense", tap["gram"]),
                )
                _set_linear_weight(state, role, replicate(new_weight.astype(weight0.dtype), mesh))
                d_out, d_in = weight0.shape
                records.append(
                    {
                        "name": hf_names(name) if hf_names else name,
                        "block": index,
                        "role": role,
                        "shape": [d_out, d_in],
                        "sparsity": float(jnp.mean(new_weight == 0)),
                        "relative_error": float(error / jnp.maximum(reference, 1e-30)),
                        "seconds": seconds,
                        "memory": {
                            "bound_bytes": layer_memory_bytes(d_out, d_in, len(tap), held),
                            "device_peak_bytes": _device_peak_bytes(),
                        },
                        "info": plain(info),
                    }
                )
        nnx.update(block, jax.tree.map(lambda a: jnp.asarray(to_host(a)), state))
        if use_dense:
            x_dense = _block_pass(_block_outputs, graphdef, dense_state, x_dense, dense_attention)
        if options.sequential:
            x = _block_pass(_block_outputs, graphdef, state, x_in, attention)
        else:
            x = x_dense
    if progress is not None:
        progress("done", spec.num_layers, spec.num_layers)
    return records


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Whole-model figures: achieved sparsity over all pruned weights, summed relative error."""
    total = sum(int(np.prod(r["shape"])) for r in records)
    zeros = sum(r["sparsity"] * int(np.prod(r["shape"])) for r in records)
    return {
        "sparsity": zeros / total if total else 0.0,
        "relative_error_sum": float(sum(r["relative_error"] for r in records)),
        "solver_seconds": float(sum(r["seconds"] for r in records)),
    }
