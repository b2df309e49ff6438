"""A run's configuration resolved once, at the boundary, into the plan the engine trusts.

``resolve`` turns a ``config.PruneConfig`` into a ``Plan``: the method found in the registry,
its options parsed and checked, the target parsed, every rule that needs no model checked by
the module it protects (the method's own option validation and engine compatibility,
``allocation.check_allocation``, the zero-shot task spec), and the output directory checked.
It reads no file but the recipe's. What needs the model (does the target fit each layer?) is
checked once by ``jprune.prune`` from the checkpoint's headers, before any work; the engine
options check themselves when built (``engine.EngineOptions``), once the mesh is known.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from jprune.config import PruneConfig
from jprune.errors import JpruneError
from jprune.options import as_dict


class Plan(NamedTuple):
    """A checked run: the resolved configuration and the typed values it stands for."""

    config: PruneConfig  # method options complete, intra_block decided
    method: Any  # methods.Method
    target: Any  # a solvers Pattern, or Channels
    method_options: Any  # the method's options dataclass


def parse_target(method, target) -> Any:
    """The target section -> a solvers ``Pattern`` (unstructured, N:M) or ``Channels``."""
    from jprune.methods import Channels
    from jprune.solvers import parse_pattern

    if method.structured:
        if target.sparsity is None or target.pattern is not None:
            raise JpruneError(
                f"{method.name} is structured: give --sparsity, the fraction of channels removed"
            )
        if target.scope != "row":
            raise JpruneError(f"{method.name} is structured: --scope is for unstructured methods")
        if not 0 <= target.sparsity < 1:
            raise JpruneError(f"structured sparsity must be in [0, 1), got {target.sparsity}")
        return Channels(target.sparsity)
    try:
        return parse_pattern(sparsity=target.sparsity, nm=target.pattern, scope=target.scope)
    except ValueError as err:
        raise JpruneError(str(err)) from None


def _check_evaluation(evaluation) -> None:
    if not evaluation.tasks:
        for key in ("include_path", "num_fewshot", "limit"):
            if getattr(evaluation, key) is not None:
                raise JpruneError(f"evaluation.{key} is for evaluation.tasks (--tasks)")
        return
    from jprune.zeroshot import require_lm_eval, task_spec

    task_spec(evaluation).check()
    require_lm_eval()


def _resolve_reconstruction(config: PruneConfig, method_options):
    """The reconstruction section with its target's correction decided (the method's own
    ``correction`` option where it has one), refused when its held-out split leaves no window
    to fit."""
    from jprune.reconstruct import check_holdout

    section = config.reconstruction
    check_holdout(section, config.calibration.nsamples)
    if section.correction is not None:
        return section
    return dataclasses.replace(section, correction=float(getattr(method_options, "correction", 0)))


def resolve(config: PruneConfig) -> Plan:
    """Check everything that can be checked without the model; fill the method's defaults."""
    for value, what in (
        (config.model.path, "model"),
        (config.calibration.text, "calibration text"),
    ):
        if not value:
            raise JpruneError(f"no {what} given")
    from jprune.allocation import check_allocation
    from jprune.methods import get_method

    method = get_method(config.target.method)
    options = method.parse_options(config.target.options)
    target = parse_target(method, config.target)
    if method.validate is not None:
        method.validate(options, target)
    engine = config.engine
    if (
        engine.mesh is not None
        and engine.mesh != "auto"
        and not (isinstance(engine.mesh, int) and engine.mesh >= 1)
    ):
        raise JpruneError(f"mesh must be a device count >= 1 or 'auto', got {engine.mesh!r}")
    check_allocation(config.allocation, method, target)
    intra_block = method.intra_block if engine.intra_block is None else engine.intra_block
    method.check_engine(intra_block)
    reconstruction = _resolve_reconstruction(config, options)
    _check_evaluation(config.evaluation)
    out = config.output.out
    if out is not None and Path(out).exists() and not config.output.force:
        raise JpruneError(f"output {out!r} already exists (use --force to replace it)")
    # The values are checked: the sections are rebuilt as they are, not parsed again.
    resolved = dataclasses.replace(
        config,
        target=dataclasses.replace(config.target, options=as_dict(options)),
        engine=dataclasses.replace(config.engine, intra_block=intra_block),
        reconstruction=reconstruction,
    )
    return Plan(resolved, method, target, options)
