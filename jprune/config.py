"""A pruning run as typed data: what ``jprune prune`` does, checked before any model work.

``PruneConfig`` has one section per concern (model, target, calibration, engine, evaluation,
output). It is built from the command line, from a YAML or JSON recipe (``--config FILE``), or
in Python (``PruneConfig.of(...)``); ``resolve`` checks every value and fills the method's
defaults, and ``report.json`` embeds the resolved configuration, so
``jprune prune --config out/report.json --out other`` replays a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from jprune.errors import JpruneError
from jprune.options import as_dict, option, parse_fields

DTYPES = ("float32", "float16", "bfloat16")
MATMUL_PRECISIONS = ("float32", "tensorfloat32")
SCOPES = ("row", "matrix")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = option("", "Hugging Face model directory")
    dtype: str | None = option(None, "cast the weights on load", choices=(None, *DTYPES))


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    method: str = option("", "pruning method (jprune prune --help lists them)")
    sparsity: float | None = option(None, "fraction of weights (structured: channels) removed")
    pattern: str | None = option(None, "N:M pattern, e.g. 2:4")
    scope: str = option("row", "unstructured budget per output row or per matrix", choices=SCOPES)
    options: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "the method's options (key: value)"}
    )


ALLOCATIONS = ("uniform", "owl", "optimal")
ERROR_ESTIMATES = ("obs", "mask")
ERROR_WEIGHTS = ("equal", "residual")


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    """How the global budget of zeros is shared among the linears (``jprune.allocation``)."""

    method: str = option("uniform", "layer-wise sparsity allocation", choices=ALLOCATIONS)
    outlier_m: float = option(
        5.0, "owl: outliers are scores above M times the block mean", low=0, low_open=True
    )
    owl_lambda: float = option(
        0.08, "owl: block sparsities spread within +-lambda of the target", low=0, high=0.5
    )
    spread: float = option(
        0.1,
        "optimal: layer sparsities measured within +-spread of the target",
        low=0,
        high=0.5,
        low_open=True,
    )
    points: int = option(
        5, "optimal: sparsities measured per layer (odd, the target in the middle)", low=3
    )
    estimate: str = option(
        "obs",
        "optimal: layer error estimate, OBS (w^2/[H^-1]_jj) or the mask's own",
        choices=ERROR_ESTIMATES,
    )
    weight: str = option(
        "residual",
        "optimal: how layers' relative errors are weighed against each other, equally or by "
        "their sublayer's share of the residual stream",
        choices=ERROR_WEIGHTS,
    )


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    text: str = option("", "calibration text file")
    nsamples: int = option(128, "calibration windows", low=1)
    seqlen: int = option(512, "tokens per calibration window", low=1)
    seed: int = option(0, "seed of the calibration window starts", low=0)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    sequential: bool = option(True, "blocks see the pruned model's inputs (false: the dense's)")
    intra_block: bool | None = option(
        None, "stage-wise pruning inside a block (none: the method's)"
    )
    batch_size: int = option(8, "calibration / evaluation windows per forward pass", low=1)
    mesh: int | str | None = option(None, "devices: a count, 'auto', or none for one")
    offload: bool = option(False, "keep block activations in host memory")
    row_blocks: int = option(
        0, "reproducible mode: solve each layer as this many row blocks", low=0
    )
    matmul_precision: str = option("float32", "matrix product precision", choices=MATMUL_PRECISIONS)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    texts: tuple[str, ...] = option((), "texts to report perplexity on before and after")
    seqlen: int | None = option(None, "evaluation window length (none: the calibration's)", low=1)
    dense: bool = option(True, "also evaluate the dense model (false: reported as null)")
    tasks: tuple[str, ...] = option((), "lm-eval tasks to report accuracy on before and after")
    include_path: str | None = option(None, "a folder of lm-eval task YAMLs for tasks")
    num_fewshot: int | None = option(None, "tasks: examples per prompt (none: the task's)", low=0)
    limit: int | None = option(None, "tasks: at most this many documents per task", low=1)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    out: str | None = option(None, "directory of the pruned checkpoint and report.json")
    force: bool = option(False, "replace out if it exists (and discard a partial run of it)")
    resume: bool = option(False, "continue the interrupted run in out's staging directory")


SECTIONS = {
    "model": ModelConfig,
    "target": TargetConfig,
    "allocation": AllocationConfig,
    "calibration": CalibrationConfig,
    "engine": EngineConfig,
    "evaluation": EvaluationConfig,
    "output": OutputConfig,
}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    model: ModelConfig
    target: TargetConfig
    calibration: CalibrationConfig
    engine: EngineConfig = EngineConfig()
    allocation: AllocationConfig = AllocationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "configuration") -> PruneConfig:
        """Sections of plain values -> a checked configuration (unknown keys refused)."""
        if not isinstance(data, Mapping):
            raise JpruneError(f"{source} must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise JpruneError(
                f"{source} has no section {unknown[0]!r} (its sections: {', '.join(SECTIONS)})"
            )
        sections = {}
        for name, section in SECTIONS.items():
            raw = data.get(name) or {}
            if not isinstance(raw, Mapping):
                raise JpruneError(f"{source} section {name!r} must be a mapping of keys to values")
            if name == "target" and not isinstance(raw.get("options", {}), Mapping):
                raise JpruneError(f"{source} target options must be a mapping of keys to values")
            sections[name] = parse_fields(section, raw, f"{source}: {name}")
        return cls(**sections)

    @classmethod
    def of(
        cls,
        model: str | os.PathLike,
        method: str,
        *,
        calib: str | os.PathLike,
        sparsity: float | None = None,
        pattern: str | None = None,
        scope: str = "row",
        method_options: Mapping[str, Any] | None = None,
        nsamples: int = 128,
        seqlen: int = 512,
        seed: int = 0,
        dtype: str | None = None,
        eval_texts=(),
        eval_seqlen: int | None = None,
        evaluate_dense: bool = True,
        out: str | os.PathLike | None = None,
        force: bool = False,
        resume: bool = False,
        allocation: Mapping[str, Any] | None = None,
        **engine: Any,
    ) -> PruneConfig:
        """A configuration from flat keywords (``engine``: the ``EngineConfig`` fields;
        ``allocation``: the ``AllocationConfig`` fields, e.g. ``{"method": "owl"}``)."""
        return cls.from_dict(
            {
                "model": {"path": str(model), "dtype": dtype},
                "target": {
                    "method": method,
                    "sparsity": sparsity,
                    "pattern": pattern,
                    "scope": scope,
                    "options": dict(method_options or {}),
                },
                "calibration": {
                    "text": str(calib),
                    "nsamples": nsamples,
                    "seqlen": seqlen,
                    "seed": seed,
                },
                "engine": engine,
                "allocation": dict(allocation or {}),
                "evaluation": {
                    "texts": [str(t) for t in eval_texts],
                    "seqlen": eval_seqlen,
                    "dense": evaluate_dense,
                },
                "output": {
                    "out": None if out is None else str(out),
                    "force": force,
                    "resume": resume,
                },
            },
            "prune()",
        )

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)

    def replace(self, **sections: Mapping[str, Any]) -> PruneConfig:
        """A copy with some fields of some sections changed: ``replace(output={"out": d})``."""
        data = self.to_dict()
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        return PruneConfig.from_dict(data)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file (YAML or JSON) -> its sections. A ``report.json`` gives the configuration
    it embeds, so a finished run can be replayed."""
    path = Path(path)
    if not path.is_file():
        raise JpruneError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise JpruneError(f"config file {str(path)!r} is not valid JSON or YAML: {err}") from None
    except Exception as err:  # yaml.YAMLError and its subclasses
        raise JpruneError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if isinstance(data, Mapping) and "config" in data and "layers" in data:
        data = data["config"]
    if not isinstance(data, Mapping):
        raise JpruneError(f"config file {str(path)!r} must hold a mapping of sections")
    return dict(data)


def check_engine_options(method, intra_block: bool, batch_size: int, row_blocks: int, devices: int):
    """Refuse, by name, an engine setting the method cannot honour."""
    if intra_block and method.structured:
        raise JpruneError(
            f"{method.name} prunes attention then MLP channels in stages of its own; "
            "--intra-block is for unstructured methods (its error correction is --option correction)"
        )
    if row_blocks < 0:
        raise JpruneError(f"row_blocks must be 0 (off) or a positive count, got {row_blocks}")
    if batch_size < 1:
        raise JpruneError(f"batch size must be at least 1, got {batch_size}")
    if row_blocks % devices:
        raise JpruneError(
            f"row_blocks {row_blocks} does not split over the {devices}-device mesh: "
            "choose a count the mesh size divides"
        )


class Run(NamedTuple):
    """A checked run: the resolved configuration and the typed values it stands for."""

    config: PruneConfig  # method options complete, intra_block decided
    method: Any  # methods.Method
    target: Any  # a solvers Pattern, or methods.Channels
    method_options: Any  # the method's options dataclass


def _target(method, target) -> Any:
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


def resolve(config: PruneConfig) -> Run:
    """Check everything that can be checked without the model; fill the method's defaults."""
    for value, what in (
        (config.model.path, "model"),
        (config.calibration.text, "calibration text"),
    ):
        if not value:
            raise JpruneError(f"no {what} given")
    from jprune.methods import get_method

    method = get_method(config.target.method)
    options = method.parse_options(config.target.options)
    target = _target(method, config.target)
    if method.validate is not None:
        method.validate(options, target)
    engine = config.engine
    if (
        engine.mesh is not None
        and engine.mesh != "auto"
        and not (isinstance(engine.mesh, int) and engine.mesh >= 1)
    ):
        raise JpruneError(f"mesh must be a device count >= 1 or 'auto', got {engine.mesh!r}")
    from jprune.allocation import check_allocation

    check_allocation(config.allocation, method, target)
    intra_block = method.intra_block if engine.intra_block is None else engine.intra_block
    check_engine_options(method, intra_block, engine.batch_size, engine.row_blocks, 1)
    evaluation = config.evaluation
    if not evaluation.tasks:
        for key in ("include_path", "num_fewshot", "limit"):
            if getattr(evaluation, key) is not None:
                raise JpruneError(f"evaluation.{key} is for evaluation.tasks (--tasks)")
    else:
        from jprune.zeroshot import require_lm_eval, task_spec

        task_spec(config.evaluation).check()
        require_lm_eval()
    out = config.output.out
    if out is not None and Path(out).exists() and not config.output.force:
        raise JpruneError(f"output {out!r} already exists (use --force to replace it)")
    resolved = config.replace(
        target={"options": as_dict(options)}, engine={"intra_block": intra_block}
    )
    return Run(resolved, method, target, options)
