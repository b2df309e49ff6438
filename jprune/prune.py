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


def _prune(run: Run, progress: ProgressFn | None) -> dict[str, Any]:
    started = time.perf_counter()
    config, method = run.config, run.method
    engine_config = config.engine
    engine = EngineOptions(
        sequential=engine_config.sequential,
        intra_block=engine_config.intra_block,
        batch_size=engine_config.batch_size,
        mesh=make_mesh(engine_config.mesh),
        offload=engine_config.offload,
        row_blocks=engine_config.row_blocks,
    )
    check_engine_options(
        method, engine.intra_block, engine.batch_size, engine.row_blocks, mesh_size(engine.mesh)
    )
    net, hf_config = load_model(config.model.path, dtype=config.model.dtype)
    spec = net.spec
    calib = config.calibration
    if calib.seqlen > spec.max_position_embeddings:
        raise JpruneError(
            f"seqlen {calib.seqlen} exceeds the model's max_position_embeddings {spec.max_position_embeddings}"
        )
    method.program.check(spec, named_arrays(net), run.target, run.method_options, hf_config)
    tokenizer = load_tokenizer(config.model.path)
    calibration = calibration_windows(
        tokenize(tokenizer, read_text(calib.text, split="train")),
        calib.nsamples,
        calib.seqlen,
        calib.seed,
        source=f"text {calib.text!r}",
    )
    evaluation = config.evaluation
    eval_len = evaluation.seqlen or calib.seqlen
    evaluations = {
        t: eval_windows(tokenize(tokenizer, read_text(t)), eval_len, source=f"text {t!r}")
        for t in evaluation.texts
    }

    def report_progress(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    batch_size = engine.batch_size
    before = dict.fromkeys(evaluations)
    for name, windows in evaluations.items() if evaluation.dense else ():
        report_progress(f"eval dense on {name}", 0, spec.num_layers)
        before[name] = perplexity(net, windows, batch_size=batch_size).perplexity

    prune_started = time.perf_counter()
    parameters_before = parameter_count(net)
    outcome = prune_model(
        net,
        calibration,
        method,
        run.target,
        run.method_options,
        engine,
        hf_config=hf_config,
        progress=progress,
        hf_names=_layer_hf_name(spec),
    )
    net = outcome.model
    prune_seconds = time.perf_counter() - prune_started

    after = {}
    for name, windows in evaluations.items():
        report_progress(f"eval pruned on {name}", spec.num_layers, spec.num_layers)
        after[name] = perplexity(net, windows, batch_size=batch_size).perplexity

    target = run.target
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
        "parameters": parameter_count(net),
        "parameters_before": parameters_before,
        "prune_seconds": prune_seconds,
        "machine": {
            "platform": platform.platform(),
            "jax_backend": jax.default_backend(),
            "devices": jax.device_count(),
            "mesh_devices": mesh_size(engine.mesh),
            "processes": jax.process_count(),
        },
        "layers": outcome.records,
    }
    report["wall_seconds"] = time.perf_counter() - started
    out = config.output.out
    if out is not None and jax.process_index() == 0:
        save_model(
            net,
            hf_config,
            out,
            source=config.model.path,
            force=config.output.force,
            config_updates=outcome.config_updates,
            extra_files={
                **outcome.extra_files,
                "report.json": json.dumps(report, indent=2) + "\n",
            },
        )
    return report
