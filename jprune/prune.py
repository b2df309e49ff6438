"""``jprune.prune``: an HF checkpoint in, a pruned HF checkpoint and its report out.

Everything that can be checked before the expensive part is checked first (pattern, method,
output directory, calibration and evaluation texts), so bad input fails in a second with
nothing written. The checkpoint and ``report.json`` are written into a staging directory that
is renamed into place only when all of it succeeded.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jprune.converters.hf import hf_name_map, load_model, save_model
from jprune.data import calibration_windows, eval_windows, load_tokenizer, read_text, tokenize
from jprune.engine import EngineOptions, prune_blocks, summarize
from jprune.errors import JpruneError
from jprune.evaluate import perplexity
from jprune.methods import INTRA_BLOCK_METHODS, get_method
from jprune.model import named_arrays, parameter_count
from jprune.sharding import make_mesh, mesh_size
from jprune.solvers import NM, check_pattern_fits, parse_pattern
from jprune.structured import STRUCTURED_METHODS, check_target, parse_options, prune_structured

ProgressFn = Callable[[str, int, int], None]


def _pattern(sparsity: float | None, nm: str | None, scope: str):
    try:
        return parse_pattern(sparsity=sparsity, nm=nm, scope=scope)
    except ValueError as err:
        raise JpruneError(str(err)) from None


def _layer_hf_name(spec) -> Callable[[str], str]:
    names = hf_name_map(spec)
    return lambda canonical: names[f"{canonical}.weight"].removesuffix(".weight")


MATMUL_PRECISIONS = ("float32", "tensorfloat32")


def _check_row_blocks(row_blocks: int, device_mesh, structured: bool) -> None:
    if row_blocks < 0:
        raise JpruneError(f"row_blocks must be 0 (off) or a positive count, got {row_blocks}")
    if row_blocks and structured:
        raise JpruneError("row_blocks (the reproducible mode) applies to unstructured methods")
    if row_blocks % mesh_size(device_mesh):
        raise JpruneError(
            f"row_blocks {row_blocks} does not split over the {mesh_size(device_mesh)}-device "
            "mesh: choose a count the mesh size divides"
        )


def prune(
    model: str | os.PathLike,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    scope: str = "row",
    calib: str | os.PathLike,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    eval_texts: Sequence[str | os.PathLike] = (),
    eval_seqlen: int | None = None,
    force: bool = False,
    sequential: bool = True,
    intra_block: bool | None = None,
    batch_size: int = 8,
    method_options: dict[str, Any] | None = None,
    dtype: str | None = None,
    mesh: int | str | None = None,
    offload: bool = False,
    evaluate_dense: bool = True,
    progress: ProgressFn | None = None,
    matmul_precision: str = "float32",
    row_blocks: int = 0,
) -> dict[str, Any]:
    """Prune ``model`` (an HF directory) and return the report; write it to ``out`` if given.

    Give exactly one of ``sparsity`` (fraction of zeros, per row by default; ``scope="matrix"``
    for per layer) or ``pattern`` (``"2:4"``, ``"4:8"``). ``intra_block`` defaults to the
    method's published protocol (on for ``fista``). ``mesh`` spreads calibration batches and
    layer rows over devices (``"auto"``: all of them); ``offload`` keeps block activations in
    host memory. With several processes (``jax.distributed``) only process 0 writes ``out``.
    ``evaluate_dense=False`` skips the perplexities before pruning (reported as null).
    ``matmul_precision`` is JAX's matmul precision for the whole run: ``"float32"`` (default)
    keeps every GEMM of the Grams and solvers in true float32; ``"tensorfloat32"`` lets GPUs use
    TF32 tensor cores (several times faster there, about 1e-3 relative error per product);
    CPUs compute float32 either way. ``row_blocks=N`` (N > 0) is the reproducible mode: Grams
    are summed window by window in a fixed order and each layer is solved as N equal row
    blocks, so the pruned weights are bit-identical on every mesh whose size divides N.
    """
    if matmul_precision not in MATMUL_PRECISIONS:
        raise JpruneError(
            f"matmul precision {matmul_precision!r} is not one of {', '.join(MATMUL_PRECISIONS)}"
        )
    with jax.default_matmul_precision(matmul_precision):
        started = time.perf_counter()
        device_mesh = make_mesh(mesh)
        structured = method in STRUCTURED_METHODS
        _check_row_blocks(row_blocks, device_mesh, structured)
        if structured:
            if sparsity is None or pattern is not None:
                raise JpruneError(
                    f"{method} is structured: give --sparsity, the fraction of channels removed"
                )
            structured_options = parse_options(method_options or {})
            sparsity_pattern = f"structured {sparsity:g}"
        else:
            sparsity_pattern = _pattern(sparsity, pattern, scope)
            get_method(method)
        if out is not None and Path(out).exists() and not force:
            raise JpruneError(f"output {str(out)!r} already exists (use --force to replace it)")
        if intra_block is None:
            intra_block = method in INTRA_BLOCK_METHODS

        net, hf_config = load_model(model, dtype=dtype)
        spec = net.spec
        if structured:
            check_target(spec, named_arrays(net), sparsity, structured_options, hf_config)
        for role in ("q", "o", "up", "down") if not structured else ():
            try:
                check_pattern_fits(sparsity_pattern, getattr(net.layers[0], role).weight[...].shape)
            except ValueError as err:
                raise JpruneError(
                    f"{err} of {role} ({_layer_hf_name(spec)(f'layers.0.{role}')})"
                ) from None
        if seqlen > spec.max_position_embeddings:
            raise JpruneError(
                f"seqlen {seqlen} exceeds the model's max_position_embeddings {spec.max_position_embeddings}"
            )
        tokenizer = load_tokenizer(model)
        calibration = calibration_windows(
            tokenize(tokenizer, read_text(calib, split="train")),
            nsamples,
            seqlen,
            seed,
            source=f"text {str(calib)!r}",
        )
        eval_len = eval_seqlen or seqlen
        evaluations = {
            str(t): eval_windows(
                tokenize(tokenizer, read_text(t)), eval_len, source=f"text {str(t)!r}"
            )
            for t in eval_texts
        }

        def report_progress(stage: str, done: int, total: int) -> None:
            if progress is not None:
                progress(stage, done, total)

        before = dict.fromkeys(evaluations)
        for name, windows in evaluations.items() if evaluate_dense else ():
            report_progress(f"eval dense on {name}", 0, net.spec.num_layers)
            before[name] = perplexity(net, windows, batch_size=batch_size).perplexity

        options = EngineOptions(
            mesh=device_mesh,
            offload=offload,
            sequential=sequential,
            intra_block=intra_block,
            batch_size=batch_size,
            method_options=dict(method_options or {}),
            row_blocks=row_blocks,
        )
        prune_started = time.perf_counter()
        parameters_before = parameter_count(net)
        config_updates, extra_files = {}, {}
        if structured:
            net, records, config_updates, extra_files = prune_structured(
                net,
                hf_config,
                calibration,
                method,
                sparsity,
                structured_options,
                batch_size=batch_size,
                progress=progress,
                hf_names=_layer_hf_name(spec),
            )
        else:
            records = prune_blocks(
                net, calibration, method, sparsity_pattern, options, progress, _layer_hf_name(spec)
            )
        prune_seconds = time.perf_counter() - prune_started

        after = {}
        for name, windows in evaluations.items():
            report_progress(f"eval pruned on {name}", net.spec.num_layers, net.spec.num_layers)
            after[name] = perplexity(net, windows, batch_size=batch_size).perplexity

        report = {
            "model": str(model),
            "method": method,
            "pattern": str(sparsity_pattern),
            "target_sparsity": sparsity if structured else sparsity_pattern.sparsity,
            "settings": {
                "calib": str(calib),
                "nsamples": nsamples,
                "seqlen": seqlen,
                "seed": seed,
                "sequential": sequential,
                "intra_block": intra_block,
                "batch_size": batch_size,
                "scope": scope if not structured and not isinstance(sparsity_pattern, NM) else None,
                "method_options": dict(method_options or {}),
                "dtype": dtype,
                "matmul_precision": matmul_precision,
                "row_blocks": row_blocks,
            },
            "perplexity": {
                name: {"before": before[name], "after": after[name], "seqlen": eval_len}
                for name in evaluations
            },
            "summary": summarize(records),
            "parameters": parameter_count(net),
            "parameters_before": parameters_before,
            "prune_seconds": prune_seconds,
            "machine": {
                "platform": platform.platform(),
                "jax_backend": jax.default_backend(),
                "devices": jax.device_count(),
                "mesh_devices": mesh_size(device_mesh),
                "processes": jax.process_count(),
            },
            "layers": records,
        }
        report["wall_seconds"] = time.perf_counter() - started
        if out is not None and jax.process_index() == 0:
            save_model(
                net,
                hf_config,
                out,
                source=model,
                force=force,
                config_updates=config_updates,
                extra_files={**extra_files, "report.json": json.dumps(report, indent=2) + "\n"},
            )
        return report
