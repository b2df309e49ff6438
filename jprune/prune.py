"""``jprune.prune``: an HF checkpoint in, a pruned HF checkpoint and its report out.

``resolve`` checks a ``PruneConfig`` without touching the model (method, options, target,
engine knobs, output directory), so bad input fails in a second with nothing written;
``prune`` then loads, calibrates, prunes, evaluates and writes. The checkpoint and
``report.json`` (which embeds the resolved configuration) are written into a staging directory
that is renamed into place only when all of it succeeded.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jprune import memory
from jprune.allocation import allocate
from jprune.blocks import CheckpointBlocks
from jprune.config import PruneConfig
from jprune.converters.hf import (
    BlockShards,
    Checkpoint,
    dtype_name,
    export_config,
    fused_groups,
    hf_name_map,
    write_metadata,
)
from jprune.data import (
    calibration_windows,
    eval_windows,
    load_hf_tokenizer,
    load_tokenizer,
    read_text,
    tokenize,
)
from jprune.engine import EngineOptions, prune_model
from jprune.errors import JpruneError, WriteError, writing
from jprune.evaluate import evaluation_bytes, perplexity
from jprune.plan import Plan, resolve
from jprune.reconstruct import Objective, Reconstruction, relative_output_error
from jprune.records import summarize
from jprune.sharding import make_mesh, mesh_size
from jprune.solvers import NM
from jprune.staging import Staging, fingerprint
from jprune.stop import Interrupted, Signals

ProgressFn = Callable[[str, int, int], None]

__all__ = ["JpruneError", "Plan", "PruneConfig", "prune", "resolve"]


def _layer_hf_name(spec) -> Callable[[str], str]:
    """Canonical layer -> the HF name shown for it (``qkv_proj[q]`` inside a fused tensor)."""
    names = hf_name_map(spec)
    fused = fused_groups(names)

    def shown(canonical: str) -> str:
        theirs = names[f"{canonical}.weight"]
        role = f"[{canonical.rsplit('.', 1)[-1]}]" if theirs in fused else ""
        return theirs.removesuffix(".weight") + role

    return shown


def prune(
    config: PruneConfig | Plan,
    progress: ProgressFn | None = None,
    *,
    objective: Objective = relative_output_error,
) -> dict[str, Any]:
    """Prune as ``config`` says and return the report; write it to ``config.output.out``.

    ``engine.mesh`` spreads calibration batches and layer rows over devices (``"auto"``: all
    of them); ``engine.offload`` keeps block activations in host memory. With several
    processes (``jax.distributed``) only process 0 writes the output.
    ``engine.matmul_precision`` is JAX's matmul precision for the whole run: ``"float32"``
    (default) keeps every GEMM of the Grams and solvers in true float32;
    ``"tensorfloat32"`` lets GPUs use TF32 tensor cores (several times faster there, about
    1e-3 relative error per product); CPUs compute float32 either way. ``engine.row_blocks=N``
    (N > 0) is the reproducible mode: Grams are summed window by window in a fixed order and
    each layer is solved as N equal row blocks, so the pruned weights are bit-identical on
    every mesh whose size divides N.

    ``objective``: the block-reconstruction stage's objective (``config.reconstruction``; a
    pure function of one window's block outputs and targets, see ``jprune.reconstruct``).
    """
    run = config if isinstance(config, Plan) else resolve(config)
    with jax.default_matmul_precision(run.config.engine.matmul_precision):
        return _prune(run, progress, objective)


def _engine_options(run: Plan, objective: Objective) -> EngineOptions:
    """The engine's options, on the devices the run has (they check themselves)."""
    settings = run.config.engine
    return EngineOptions(
        sequential=settings.sequential,
        intra_block=settings.intra_block,
        batch_size=settings.batch_size,
        mesh=make_mesh(settings.mesh),
        offload=settings.offload,
        row_blocks=settings.row_blocks,
        reconstruction=Reconstruction(run.config.reconstruction, objective),
    )


def _check_model(run: Plan, checkpoint: Checkpoint) -> None:
    """Refuse what the model cannot take, from the config and tensor headers alone."""
    seqlen = run.config.calibration.seqlen
    limit = checkpoint.spec.max_position_embeddings
    if seqlen > limit:
        raise JpruneError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    run.method.program.check(
        checkpoint.spec, checkpoint.shapes, run.target, run.method_options, checkpoint.config
    )


def _texts(run: Plan):
    """The calibration windows and the evaluation windows per text."""
    config = run.config
    tokenizer = load_tokenizer(config.model.path)
    calib = config.calibration
    calibration = calibration_windows(
        tokenize(tokenizer, read_text(calib.text, split="train")),
        calib.nsamples,
        calib.seqlen,
        calib.seed,
        source=f"text {calib.text!r}",
    )
    eval_len = config.evaluation.seqlen or calib.seqlen
    evaluations = {
        t: eval_windows(tokenize(tokenizer, read_text(t)), eval_len, source=f"text {t!r}")
        for t in config.evaluation.texts
    }
    return calibration, evaluations


def _perplexities(model, evaluations, run: Plan, label, progress) -> dict[str, float]:
    result = {}
    for name, windows in evaluations.items():

        def advance(done: int, total: int, name=name) -> None:  # blocks x groups of windows
            if progress is not None:
                progress(f"eval {label} on {name}", done, total)

        result[name] = perplexity(
            model, windows, progress=advance, **_evaluation_options(run)
        ).perplexity
    return result


def _evaluation_options(run: Plan) -> dict[str, int]:
    """``evaluate.perplexity``'s batch size and activation budget for this run."""
    return {
        "batch_size": run.config.engine.batch_size,
        "activation_bytes": run.config.evaluation.memory_mib * 2**20,
    }


def _zero_shot(path, run: Plan, manager, label, progress):
    """lm-eval accuracies of the checkpoint at ``path`` (loaded whole), or None without tasks."""
    from jprune.zeroshot import evaluate_tasks, task_spec

    spec = task_spec(run.config.evaluation)
    if spec is None:
        return None
    from jprune.converters.hf import load_model

    if progress is not None:
        progress(f"zero-shot {label}", 0, 1)
    model, _ = load_model(path, run.config.model.dtype)
    result = evaluate_tasks(
        model,
        load_hf_tokenizer(path),
        spec,
        batch_size=run.config.engine.batch_size,
        manager=manager,
    )
    return result.as_dict()


def _check_tasks(run: Plan):
    """lm-eval's task manager with every task and dataset found, before any model work; the
    zero-shot evaluation runs in one process (it is refused on several)."""
    from jprune.zeroshot import check_tasks, task_spec

    spec = task_spec(run.config.evaluation)
    if spec is None:
        return None
    if jax.process_count() > 1:
        raise JpruneError(
            "evaluation.tasks (--tasks) runs in one process: evaluate the pruned checkpoint "
            "with jprune eval --tasks after a multi-host run"
        )
    return check_tasks(spec)


def _machine(engine: EngineOptions) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "devices": jax.device_count(),
        "mesh_devices": mesh_size(engine.mesh),
        "processes": jax.process_count(),
    }


def _barrier(name: str) -> None:
    """Every process waits here (multi-host runs: process 0 writes what the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _open_staging(run: Plan, writer: bool) -> Staging:
    """The staging directory: checked (stale, resume) before any work; a temporary one when
    the run writes no output (blocks still go to disk, so memory stays bounded)."""
    output = run.config.output
    if output.out is None and jax.process_count() > 1:
        raise JpruneError("a multi-host run needs an output directory: its processes share it")
    if output.out is None:
        path = Path(tempfile.mkdtemp(prefix="jprune-run-")) if writer else None
        return Staging(path, writer=writer, journal=False)
    identity = fingerprint(run.config.to_dict())
    return Staging.open(
        output.out, identity, resume=output.resume, force=output.force, writer=writer
    )


def _write_checkpoint(staging: Staging, checkpoint: Checkpoint, outcome, source: str) -> None:
    """Everything but the blocks (already written): the rest of the tensors, the shard index,
    config.json (with the method's changes), tokenizer and generation config."""
    shards = BlockShards(staging.path, outcome.spec)
    shards.write_outer(checkpoint)
    shards.write_index()
    outer = {name: checkpoint.shapes[name] for name in checkpoint.outer_names()}
    config = export_config(checkpoint.config, dtype_name(outer), outcome.config_updates)
    with writing(staging.path):  # config, tokenizer and generation files: a few KiB
        write_metadata(staging.path, config, source, outcome.extra_files)


def _memory_report(outcome, baseline: int, evaluations, options) -> dict[str, Any]:
    """Measured peaks against the stated bound: peak RSS <= baseline + the larger bound."""
    eval_bound = max(
        (evaluation_bytes(outcome.spec, w.shape, **options) for w in evaluations.values()),
        default=0,
    )
    return {
        "peak_rss_bytes": memory.lifetime_peak(),
        "baseline_rss_bytes": baseline,
        "bound_bytes": outcome.memory["bound_bytes"],
        "eval_bound_bytes": eval_bound,
        "blocks": outcome.memory["blocks"],
    }


def _prune(run: Plan, progress: ProgressFn | None, objective: Objective) -> dict[str, Any]:
    started = time.perf_counter()
    config = run.config
    engine = _engine_options(run, objective)
    checkpoint = Checkpoint(config.model.path, config.model.dtype)  # headers only
    _check_model(run, checkpoint)
    calibration, evaluations = _texts(run)
    tasks = _check_tasks(run)
    baseline = memory.current()  # the runtime and tokenizer, before any weights
    writer = jax.process_index() == 0
    staging = _open_staging(run, writer)
    _barrier("jprune: staging checked")  # by every process, before process 0 changes it
    try:
        staging.create()
        with Signals(enabled=jax.process_count() == 1) as stop:
            return _prune_into(
                run,
                progress,
                engine,
                checkpoint,
                staging,
                (calibration, evaluations, tasks),
                started,
                baseline,
                stop,
            )
    except BaseException as failure:
        done = staging.progress().get("blocks_done", 0) if writer and staging.journal else 0
        if writer and not done:  # a failure before any block finished leaves nothing to resume
            shutil.rmtree(staging.path, ignore_errors=True)
        kept = (
            f"{done} of {checkpoint.spec.num_layers} blocks are kept in {str(staging.path)!r}: "
            "the same command with --resume continues"
        )
        if isinstance(failure, Interrupted):
            hint = f"{kept} the run" if done else "nothing to resume"
            hint += "" if done or staging.journal else " (the run has no --out)"
            raise Interrupted(failure.signum, f"{failure.where}; {hint}") from None
        if isinstance(failure, WriteError) and done:
            raise WriteError(f"{failure}; {kept} once the cause is fixed") from None
        raise
    finally:
        if config.output.out is None and writer:
            shutil.rmtree(staging.path, ignore_errors=True)
        staging.close()


def _dense_evaluations(run: Plan, checkpoint, staging: Staging, texts, progress):
    """The dense model's perplexities and zero-shot accuracies (``None`` where not asked), from
    the journal when a resumed run already has them."""
    config = run.config
    _, evaluations, tasks = texts
    before = staging.recall("perplexity_before") or dict.fromkeys(evaluations)
    if config.evaluation.dense and any(before.get(t) is None for t in evaluations):
        before = _perplexities(checkpoint, evaluations, run, "dense", progress)
        staging.remember("perplexity_before", before)
    zero_shot_before = None
    if tasks is not None and config.evaluation.dense:
        # a resumed run reuses the dense accuracies only when they were for the same tasks
        evaluation = config.to_dict()["evaluation"]
        recalled = staging.recall("zero_shot_before") or {}
        if recalled.get("evaluation") == evaluation:
            zero_shot_before = recalled["result"]
        else:
            zero_shot_before = _zero_shot(config.model.path, run, tasks, "dense", progress)
            staging.remember(
                "zero_shot_before", {"evaluation": evaluation, "result": zero_shot_before}
            )
    return before, zero_shot_before


def _reconstruction_report(engine: EngineOptions, outcome) -> dict[str, Any] | None:
    """The stage's objective, its held-out windows and each block's record (None: off)."""
    if not engine.reconstructs:
        return None
    holdout = engine.reconstruction.settings.holdout
    return engine.reconstruction.describe() | {
        "held_out_windows": f"the last {holdout} calibration windows",
        "blocks": outcome.reconstruction,
    }


def _prune_into(run, progress, engine, checkpoint, staging, texts, started, baseline, stop):
    config, method, target = run.config, run.method, run.target
    calibration, evaluations, tasks = texts
    writer = staging.writer
    num_blocks = checkpoint.spec.num_layers
    before, zero_shot_before = _dense_evaluations(run, checkpoint, staging, texts, progress)
    stop.check("after the dense model's evaluation, before any block")
    prune_started = time.perf_counter()
    blocks = CheckpointBlocks(
        checkpoint,
        BlockShards(staging.path, checkpoint.spec) if writer else None,
        staging,
        after_block=lambda index: stop.check(f"after block {index + 1} of {num_blocks}"),
    )
    allocation_started = time.perf_counter()
    allocation = allocate(blocks, calibration, target, config.allocation, engine, staging, progress)
    allocation_seconds = time.perf_counter() - allocation_started
    stop.check("after the allocation pass, before any block")
    outcome = prune_model(
        blocks, calibration, method, target, run.method_options, engine,
        hf_config=checkpoint.config, progress=progress, hf_names=_layer_hf_name(checkpoint.spec),
        layer_targets=allocation.patterns, checked=True,
    )  # fmt: skip
    prune_seconds = time.perf_counter() - prune_started
    del blocks  # and with it the embeddings and head: the writer reads them again, one at a time
    gc.collect()  # a module graph holds reference cycles
    if writer:
        _write_checkpoint(staging, checkpoint, outcome, config.model.path)
    _barrier("jprune: checkpoint written")
    pruned = Checkpoint(staging.path)
    after = _perplexities(pruned, evaluations, run, "pruned", progress)
    zero_shot_after = _zero_shot(staging.path, run, tasks, "pruned", progress)
    eval_len = config.evaluation.seqlen or config.calibration.seqlen
    report = {
        "model": config.model.path,
        "method": method.name,
        "pattern": str(target),
        "target_sparsity": target.sparsity,
        "scope": None if method.structured or isinstance(target, NM) else target.scope,
        "config": config.to_dict(),
        "perplexity": {
            name: {"before": before.get(name), "after": after[name], "seqlen": eval_len}
            for name in evaluations
        },
        "summary": summarize(outcome.records),
        "allocation": allocation.report | {"seconds": allocation_seconds},
        "reconstruction": _reconstruction_report(engine, outcome),
        "zero_shot": None
        if tasks is None
        else {"before": zero_shot_before, "after": zero_shot_after},
        "parameters": pruned.parameter_count,
        "parameters_before": checkpoint.parameter_count,
        "prune_seconds": prune_seconds,
        "resumed_from_block": staging.resumed_from,
        "machine": _machine(engine),
        "layers": outcome.records,
    }
    report["memory"] = _memory_report(outcome, baseline, evaluations, _evaluation_options(run))
    report["wall_seconds"] = time.perf_counter() - started
    _barrier("jprune: evaluated")  # the other processes read the staging directory until here
    if config.output.out is not None and writer:
        text = json.dumps(report, indent=2) + "\n"
        with writing(staging.path / "report.json", len(text)):
            (staging.path / "report.json").write_text(text)
        staging.commit(config.output.out)
    return report
