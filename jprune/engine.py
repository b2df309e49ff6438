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
its readers' output energies where those are cheaper (``walk``). On smollm2-135m
with intra-block stages this took the engine's forward passes and Grams from 231 s to 180 s
(caching) and 164 s (energies), a run with a near-free solver (``bench/RESULTS.md``, issue 16).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jprune import memory, walk
from jprune.blocks import BlockState, InMemoryBlocks, as_blocks
from jprune.converters.spec import block_linear_names, linear_input
from jprune.errors import JpruneError
from jprune.mesh_solve import Devices, solve_layer
from jprune.methods import Method
from jprune.methods.base import UnitContext
from jprune.model import CausalLM, flat_arrays, named_arrays
from jprune.reconstruct import Reconstruction, check_holdout, reconstruct
from jprune.records import unit_record
from jprune.sharding import mesh_size, replicate, to_host


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine walks and solves; checked once, when built (the mesh is known then)."""

    sequential: bool = True
    intra_block: bool = False
    batch_size: int = 8  # calibration windows per forward pass
    mesh: Mesh | None = None  # data-parallel calibration and row-sharded layer problems
    offload: bool = False  # keep block activations in host memory between forward passes
    # Reproducible mode when > 0: the block passes run window by window and the statistics are
    # summed window by window in order, and each layer is solved as this many equal row
    # blocks, so that the pruned weights are bit-identical on every mesh whose size divides it
    # and for every batch size (``walk.each_window``, ``mesh_solve``).
    row_blocks: int = 0
    # The block-reconstruction stage after each block's layer solves (``jprune.reconstruct``).
    reconstruction: Reconstruction | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise JpruneError(f"batch size must be at least 1, got {self.batch_size}")
        if self.row_blocks < 0:
            raise JpruneError(
                f"row_blocks must be 0 (off) or a positive count, got {self.row_blocks}"
            )
        devices = mesh_size(self.mesh)
        if self.row_blocks % devices:
            raise JpruneError(
                f"row_blocks {self.row_blocks} does not split over the {devices}-device mesh: "
                "choose a count the mesh size divides"
            )

    @property
    def reconstructs(self) -> bool:
        return self.reconstruction is not None and self.reconstruction.enabled

    @property
    def placement(self) -> walk.Placement:
        return walk.Placement(self.mesh, self.offload, window_by_window=self.row_blocks > 0)

    @property
    def devices(self) -> Devices:
        return Devices(self.mesh, self.row_blocks)


class PruneOutcome(NamedTuple):
    model: Any  # the pruned CausalLM (in-memory runs; None when blocks stream to disk)
    spec: Any  # the pruned model's spec (structured methods narrow it)
    records: list[dict[str, Any]]  # one per pruned unit, the same shape for every method
    config_updates: dict[str, Any]  # config.json changes the export needs
    extra_files: dict[str, str]  # files written beside the checkpoint (remote modeling code)
    memory: dict[str, Any]  # the bound (bytes) and, per block, measured peak RSS and device peak
    reconstruction: list[dict[str, Any]]  # the block-reconstruction stage's record per block


class _Job(NamedTuple):
    """What every unit of a run shares."""

    program: Any
    spec: Any
    target: Any
    method_options: Any
    num_tokens: int
    hf_names: Callable[[str], str] | None
    options: EngineOptions
    layer_targets: Mapping[str, Any] | None = None  # "layers.3.q" -> its own pattern

    def solve_rows(self, layer, problem, pattern, layer_options):
        return solve_layer(layer, problem, pattern, layer_options, self.options.devices)


@dataclasses.dataclass
class _BlockWork:
    """One block while its stages run: its dense and pruned weights, the streams its
    statistics read, what each stream's earlier pass left (``walk.Cache``), and the linears
    already final."""

    index: int
    dense: walk.BlockWeights
    pruned: walk.BlockWeights
    x: walk.Stream  # the block's input stream: the pruned model's, or the dense one's
    x_dense: walk.Stream | None
    cache: walk.Cache = dataclasses.field(default_factory=dict)
    dense_cache: walk.Cache = dataclasses.field(default_factory=dict)
    final: set[str] = dataclasses.field(default_factory=set)
    next_dense: walk.Stream | None = None  # the dense stream's next inputs, from the last stage
    # Where the block's time went (report.json's per-block "seconds"); each part waits for
    # its results, so dispatched work is counted where it was asked for.
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, part: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = jax.block_until_ready(fn(*args, **kwargs))
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started
        return result

    def held_bytes(self, streams: int) -> int:
        """Calibration activations alive while a unit is solved (the record's bound)."""
        kept = sum(s.nbytes for s in (*self.cache.values(), *self.dense_cache.values()))
        following = 0 if self.next_dense is None else self.x.nbytes
        return streams * self.x.nbytes + kept + following


def _set_param(state, name: str, value: jax.Array) -> None:
    node = state
    for key in name.split("."):
        node = node[int(key) if key.isdigit() else key]  # list entries (experts) have int keys
    node.set_value(value)


def _non_finite(arrays: Mapping[str, Any]) -> list[str]:
    """The names among ``arrays`` (floating arrays) holding NaN or Inf: one device round trip."""
    flags = {
        name: jnp.logical_not(jnp.all(jnp.isfinite(a)))
        for name, a in arrays.items()
        if jnp.issubdtype(jnp.result_type(a), jnp.floating)
    }
    return [name for name, bad in jax.device_get(flags).items() if bad]


def _refuse_non_finite_statistics(job: _Job, index: int, stats) -> None:
    """Calibration statistics with NaN or Inf would make every solve of the block NaN: refuse
    them by block and by the linears whose inputs they describe."""
    flat = {
        f"{tap}/{kind}": value
        for tap, values in stats.items()
        for kind, value in values.items()
        if hasattr(value, "dtype")
    }
    bad = _non_finite(flat)
    if bad:
        tap, kind = bad[0].split("/")
        readers = [
            (job.hf_names or str)(f"layers.{index}.{role}")
            for role in block_linear_names(job.spec)
            if linear_input(role) == tap
        ]
        raise JpruneError(
            f"the calibration activations entering block {index} are not finite: the {kind} "
            f"of the inputs to {', '.join(readers) or tap} holds NaN or Inf (an overflow in the "
            "blocks before it, or a damaged model); nothing is written past the last finished "
            "block"
        )


def _solve_stage(job: _Job, work: _BlockWork, stage, stats, held: int) -> list[dict[str, Any]]:
    """Solve a stage's units in order, writing each one's parameters into the pruned block.
    The statistics are ready (``_BlockWork.timed`` waited for them): a unit's seconds are its
    solve alone, not the block's forward passes and Grams."""
    records = []
    for unit in stage.units:
        target = (job.layer_targets or {}).get(f"layers.{work.index}.{unit}", job.target)
        context = UnitContext(
            job.spec, work.index, work.pruned.arrays, stats, target, job.method_options,
            job.num_tokens, job.spec.num_layers, job.hf_names or str, job.solve_rows,
        )  # fmt: skip
        started = time.perf_counter()
        result = job.program.solve(unit, context)
        jax.block_until_ready(result.updates)
        seconds = time.perf_counter() - started
        bad = _non_finite(result.updates)
        if bad:
            shown = (job.hf_names or str)(f"layers.{work.index}.{result.linear}")
            raise JpruneError(
                f"the solve of {shown} (block {work.index}) returned NaN or Inf in {bad[0]}: "
                "its statistics were finite, so this is the solver's failure; please report "
                "it with the command"
            )
        for name, value in result.updates.items():
            _set_param(work.pruned.state, name, replicate(value, job.options.mesh))
            work.final.add(name.split(".")[0])
        name = f"layers.{work.index}.{result.linear}"
        shown = job.hf_names(name) if job.hf_names else name
        records.append(unit_record(result, stats, seconds, shown, work.index, held))
    return records


def _run_stages(job: _Job, work: _BlockWork, stages, use_dense: bool, progress) -> list:
    """Every stage of one block: statistics from the block as the previous stage left it,
    then the stage's solves. The dense stream's next inputs come out of the last stage's pass."""
    records = []
    for number, stage in enumerate(stages, 1):
        last_dense = use_dense and number == len(stages)
        if progress is not None:
            label = ",".join(getattr(u, "name", str(u)) for u in stage.units)
            progress(f"block {work.index}: {label}", work.index, job.spec.num_layers)
        work.cache = work.timed(
            "cache", walk.advance_cache, work.pruned, work.x, work.cache, work.final
        )
        if work.x_dense is not None:
            # Caching follows the pruned linears: the dense stream's passes have the same
            # structure, so a stage reruns the same part of the block on both streams.
            work.dense_cache = work.timed(
                "cache", walk.advance_cache, work.dense, work.x_dense, work.dense_cache, work.final
            )
        stats = work.timed(
            "statistics", walk.statistics, work.pruned, work.dense, stage.statistics, work.x,
            work.x_dense, work.cache, work.dense_cache, dense_outputs=last_dense,
        )  # fmt: skip
        if last_dense:
            stats, work.next_dense = stats
        _refuse_non_finite_statistics(job, work.index, stats)
        held = work.held_bytes(2 if use_dense else 1)
        records += work.timed("solve", _solve_stage, job, work, stage, stats, held)
    return records


class _Streams(NamedTuple):
    """The calibration streams entering a block: the pruned model's (``x``; with parallel
    blocks, unused) and the dense model's (``x_dense``, when some stage or mode needs it)."""

    x: walk.Stream | None
    x_dense: walk.Stream | None


def _initial_streams(blocks, calibration, options: EngineOptions, use_dense: bool):
    """The streams entering the first block to prune, where to start, and the ``BlockState``
    of the blocks already done (a resumed run; empty otherwise)."""
    resumed = blocks.resume()
    if resumed is not None:
        streams = {k: walk.Stream(v, options.placement) for k, v in resumed.streams.items()}
        x_dense = streams.get("x_dense")
        x = streams["x"] if options.sequential else x_dense
        return _Streams(x, x_dense), resumed
    x = walk.embed(blocks.shell, calibration, options.batch_size, options.placement)
    return _Streams(x, x if use_dense else None), BlockState(0, {}, [], {}, [])


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
    checked: bool = False,
) -> PruneOutcome:
    """Prune ``model`` with ``method`` at ``target`` (a Pattern, or ``methods.Channels``).

    ``model`` is a loaded ``CausalLM`` (changed in place; structured methods return a new,
    smaller one) or a ``blocks.ModelBlocks`` (a checkpoint streamed a block at a time, each
    finished block handed to its ``store`` and dropped). ``calibration`` is (nsamples, seqlen)
    token ids. ``progress(stage, block, num_blocks)`` is called as work advances (the CLI draws
    a bar from it). ``hf_names`` maps canonical layer names (``layers.0.q``) to the names shown
    in the report. ``layer_targets``: canonical linear name (``layers.3.q``) -> the pattern it
    gets instead of ``target`` (a layer-wise allocation, ``jprune.allocation``).

    ``checked``: the caller has already run ``method.program.check`` on this model and target
    and ``reconstruct.check_holdout`` on the calibration (``jprune.prune`` does, once, before
    any work); otherwise they run here. ``EngineOptions`` checks itself when built.
    """
    blocks = as_blocks(model)
    method_options = method.options() if method_options is None else method_options
    spec = blocks.spec
    if not checked:
        method.program.check(
            spec, parameter_shapes(blocks), target, method_options, hf_config or {}
        )
        if options.reconstructs:
            check_holdout(options.reconstruction.settings, int(calibration.shape[0]))
    stages = method.program.stages(spec, method_options, options.intra_block)
    wants_dense = any(
        walk.DENSE_STATISTICS & set(w) for st in stages for w in st.statistics.values()
    )
    corrects = options.reconstructs and options.reconstruction.correction > 0
    use_dense = wants_dense or corrects or not options.sequential
    streams, done = _initial_streams(blocks, calibration, options, use_dense)
    records, shapes, stage_records = (
        list(done.records),
        dict(done.shapes),
        list(done.reconstruction),
    )
    stream_bytes = (streams.x if streams.x is not None else streams.x_dense).nbytes
    job = _Job(
        method.program, spec, target, method_options, int(calibration.size), hf_names, options,
        layer_targets,
    )  # fmt: skip
    block_memory = []
    for index in range(done.next_block, spec.num_layers):
        streams, seconds = _prune_block(
            job, blocks, index, streams, stages, use_dense, (records, shapes, stage_records),
            progress,
        )  # fmt: skip
        block_memory.append(_block_memory(index, seconds))
    if progress is not None:
        progress("done", spec.num_layers, spec.num_layers)
    new_spec, config_updates, extra_files = method.program.finish(
        spec, shapes, hf_config or {}, method_options
    )
    pruned = None
    if isinstance(blocks, InMemoryBlocks):
        pruned = blocks.model
        if new_spec != spec:
            pruned = CausalLM(new_spec, named_arrays(pruned))
    bound = memory.memory_bound(
        parameter_shapes(blocks), stream_bytes, 2 if use_dense else 1, options.reconstructs
    )
    usage = {"bound_bytes": bound, "blocks": block_memory}
    return PruneOutcome(
        pruned, new_spec, records, config_updates, extra_files, usage, stage_records
    )


def _prune_block(job: _Job, blocks, index, streams, stages, use_dense, run_state, progress):
    """Prune block ``index`` from the streams entering it, hand it to ``blocks.store`` with the
    state a resumed run continues from, and return the streams entering the next block and
    where the block's time went. ``run_state``: the run's unit records, parameter shapes and
    reconstruction records, which grow in place."""
    records, shapes, stage_records = run_state
    options = job.options
    memory.reset_peak()
    started = time.perf_counter()
    block = blocks.load(index)
    x_in = streams.x if options.sequential else streams.x_dense
    work = _BlockWork(
        index, walk.place_block(block, options.mesh), walk.place_block(block, options.mesh),
        x_in, streams.x_dense,
    )  # fmt: skip
    work.seconds["load"] = time.perf_counter() - started
    records += _run_stages(job, work, stages, use_dense, progress)
    if options.reconstructs:
        if progress is not None:
            progress(f"block {index}: reconstruction", index, job.spec.num_layers)
        stage_records.append(_reconstruct(options, work, x_in))
    nnx.update(block, jax.tree.map(lambda a: jnp.asarray(to_host(a)), work.pruned.state))
    x_dense = work.next_dense if use_dense else None
    x = x_dense
    if options.sequential:
        x = work.timed("outputs", walk.outputs, work.pruned, x_in, work.cache)
    streams = _Streams(x, x_dense)
    shapes |= {
        k: list(v.shape) for k, v in flat_arrays(work.pruned.state, f"layers.{index}.").items()
    }
    kept = {"x": streams.x} if options.sequential else {}
    kept |= {"x_dense": streams.x_dense} if use_dense else {}
    after = BlockState(
        index + 1, {k: v.batches for k, v in kept.items()}, records, shapes, stage_records
    )
    return streams, work.seconds | blocks.store(index, block, after)


def _reconstruct(options: EngineOptions, work: _BlockWork, x_in: walk.Stream) -> dict[str, Any]:
    """Run the block-reconstruction stage on the block its layer solves left; its record."""
    weights, record = work.timed(
        "reconstruct", reconstruct, work.index, work.dense, work.pruned, x_in, work.x_dense,
        options.reconstruction, reproducible=options.row_blocks > 0,
    )  # fmt: skip
    if weights is not work.pruned:
        # The stage moved the weights: what the cache kept of the old block's pass is stale.
        work.pruned, work.cache = weights, {}
    return record


def _block_memory(index: int, seconds: Mapping[str, float]) -> dict[str, Any]:
    """A block's record: its measured peaks and where its time went (load: read and place
    the weights; cache: the attention / residual passes kept between stages; statistics: the
    forward passes and Grams; solve: the units' solves and records; outputs: the pass giving
    the next block's inputs; write / journal: the block's shard and the resume state)."""
    return {
        "block": index,
        "peak_rss_bytes": memory.peak(),
        "device_peak_bytes": memory.device_peak_bytes(),
        "seconds": dict(seconds),
    }


def parameter_shapes(blocks) -> dict[str, Any]:
    """Canonical parameter name -> array or shape struct (anything with ``.shape``)."""
    if isinstance(blocks, InMemoryBlocks):
        return named_arrays(blocks.model)
    return blocks.checkpoint.shapes
