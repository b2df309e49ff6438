"""``jprune.prune``: an HF checkpoint in, a pruned HF checkpoint and its report out.

``resolve`` checks a ``PruneConfig`` without touching the model (method, options, target,
engine knobs, output directory), so bad input fails in a second with nothing written;
``prune`` then loads, calibrates, prunes, evaluates and writes. The checkpoint and
``report.json`` (which embeds the resolved configuration) are written into a staging directory
that is renamed into place only when all of it succeeded.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from typing import Any

import jax

from jprune.config import PruneConfig, Run, check_engine_options, resolve
from jprune.converters.hf import hf_name_map, load_model, save_model
from jprune.data import calibration_windows, eval_windows, load_tokenizer, read_text, tokenize
from jprune.engine import EngineOptions, prune_model, summarize
from jprune.errors import JpruneError
from jprune.evaluate import perplexity
from jprune.model import named_arrays, parameter_count
from jprune.sharding import make_mesh, mesh_size
from jprune.solvers import NM

ProgressFn = Callable[[str, int, int], None]

__all__ = ["JpruneError", "PruneConfig", "Run", "prune", "resolve"]


def _layer_hf_name(spec) -> Callable[[str], str]:
    names = hf_name_map(spec)
    return lambda canonical: names[f"{canonical}.weight"].removesuffix(".weight")


def prune(config: PruneConfig | Run, progress: ProgressFn | None = None) -> dict[str, Any]:
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
    """
    run = config if isinstance(config, Run) else resolve(config)
    with jax.default_matmul_precision(run.config.engine.matmul_precision):
        return _prune(run, progress)


def _engine_options(run: Run) -> EngineOptions:
    settings = run.config.engine
    engine = EngineOptions(
        sequential=settings.sequential,
        intra_block=settings.intra_block,
        batch_size=settings.batch_size,
        mesh=make_mesh(settings.mesh),
        offload=settings.offload,
        row_blocks=settings.row_blocks,
    )
    check_engine_options(
        run.method, engine.intra_block, engine.batch_size, engine.row_blocks, mesh_size(engine.mesh)
    )
    return engine


def _load(run: Run):
    """The model, its config, the calibration windows and the evaluation windows per text."""
    config = run.config
    net, hf_config = load_model(config.model.path, dtype=config.model.dtype)
    calib = config.calibration
    if calib.seqlen > net.spec.max_position_embeddings:
        raise JpruneError(
            f"seqlen {calib.seqlen} exceeds the model's max_position_embeddings "
            f"{net.spec.max_position_embeddings}"
        )
    run.method.program.check(net.spec, named_arrays(net), run.target, run.method_options, hf_config)
    tokenizer = load_tokenizer(config.model.path)
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
    return net, hf_config, calibration, evaluations


def _perplexities(net, evaluations, batch_size, label, progress) -> dict[str, float]:
    result = {}
    for name, windows in evaluations.items():
        if progress is not None:
            progress(f"eval {label} on {name}", 0, net.spec.num_layers)
        result[name] = perplexity(net, windows, batch_size=batch_size).perplexity
    return result


def _machine(engine: EngineOptions) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "devices": jax.device_count(),
        "mesh_devices": mesh_size(engine.mesh),
        "processes": jax.process_count(),
    }


def _prune(run: Run, progress: ProgressFn | None) -> dict[str, Any]:
    started = time.perf_counter()
    config, method, target = run.config, run.method, run.target
    engine = _engine_options(run)
    net, hf_config, calibration, evaluations = _load(run)
    batch = engine.batch_size
    before = dict.fromkeys(evaluations)
    if config.evaluation.dense:
        before = _perplexities(net, evaluations, batch, "dense", progress)
    prune_started = time.perf_counter()
    parameters_before = parameter_count(net)
    outcome = prune_model(
        net, calibration, method, target, run.method_options, engine,
        hf_config=hf_config, progress=progress, hf_names=_layer_hf_name(net.spec),
    )  # fmt: skip
    prune_seconds = time.perf_counter() - prune_started
    after = _perplexities(outcome.model, evaluations, batch, "pruned", progress)
    eval_len = config.evaluation.seqlen or config.calibration.seqlen
    report = {
        "model": config.model.path,
        "method": method.name,
        "pattern": str(target),
        "target_sparsity": target.sparsity,
        "scope": None if method.structured or isinstance(target, NM) else target.scope,
        "config": config.to_dict(),
        "perplexity": {
            name: {"before": before[name], "after": after[name], "seqlen": eval_len}
            for name in evaluations
        },
        "summary": summarize(outcome.records),
        "parameters": parameter_count(outcome.model),
        "parameters_before": parameters_before,
        "prune_seconds": prune_seconds,
        "machine": _machine(engine),
        "layers": outcome.records,
        "wall_seconds": time.perf_counter() - started,
    }
    if config.output.out is not None and jax.process_index() == 0:
        save_model(
            outcome.model,
            hf_config,
            config.output.out,
            source=config.model.path,
            force=config.output.force,
            config_updates=outcome.config_updates,
            extra_files={
                **outcome.extra_files,
                "report.json": json.dumps(report, indent=2) + "\n",
            },
        )
    return report
