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
from typing import Any

from jprune.errors import JpruneError
from jprune.options import Flag, as_dict, option, parse_fields

DTYPES = ("float32", "float16", "bfloat16")
MATMUL_PRECISIONS = ("float32", "tensorfloat32")
SCOPES = ("row", "matrix")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model to prune."""

    path: str = option(
        "",
        "Hugging Face model directory to prune",
        required=True,
        flag=Flag("--model", metavar="DIR"),
    )
    dtype: str | None = option(
        None, "cast the weights on load", choices=(None, *DTYPES), unset="keep the stored dtype"
    )


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """What to prune and how much: the method, its options and the sparsity or N:M pattern."""

    method: str = option(
        "",
        "pruning method: one of those listed below, whose options --help-options lists",
        required=True,
    )
    sparsity: float | None = option(
        None,
        "fraction of weights set to zero, in (0, 1); for structured methods the fraction of "
        "channels removed",
        required=True,
        exclusive="amount",
        flag=Flag(metavar="S"),
    )
    pattern: str | None = option(
        None,
        "semi-structured N:M pattern: keep N of every M consecutive inputs (e.g. 2:4, 4:8)",
        required=True,
        exclusive="amount",
        flag=Flag(metavar="N:M"),
    )
    scope: str = option(
        "row",
        "with --sparsity: an exact count of zeros per output row, or per matrix (layer)",
        choices=SCOPES,
    )
    options: Mapping[str, Any] = option(
        None,
        "a method option, checked against the method's typed options before anything is "
        "loaded, e.g. --option blocksize=64; repeat for several (--help-options lists them)",
        unset="the method's defaults",
        flag=Flag("--option", metavar="KEY=VALUE"),
        factory=dict,
    )


ALLOCATIONS = ("uniform", "owl", "optimal")
ERROR_ESTIMATES = ("obs", "mask")
ERROR_WEIGHTS = ("equal", "residual")


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    """How the global budget of zeros is shared among the linears (jprune.allocation), for an
    unstructured --sparsity: N:M patterns and structured methods refuse a non-uniform one."""

    method: str = option(
        "uniform",
        "uniform (every layer at --sparsity), owl (outlier-weighted, Yin et al. 2023: blocks "
        "with more Wanda-score outliers keep more weights) or optimal (per-layer sparsities "
        "minimising the summed estimated relative error, solved exactly with a certificate); "
        "the global count of zeros is the uniform one in every case",
        choices=ALLOCATIONS,
        flag=Flag("--allocation"),
    )
    outlier_m: float = option(
        5.0,
        "owl: a score is an outlier above M times its block's mean score",
        low=0,
        low_open=True,
        flag=Flag(metavar="M"),
    )
    owl_lambda: float = option(
        0.08,
        "owl: block sparsities spread within +-LAMBDA around --sparsity",
        low=0,
        high=0.5,
        flag=Flag(metavar="LAMBDA"),
    )
    spread: float = option(
        0.1,
        "optimal: each layer's error is measured at sparsities within +-S of --sparsity",
        low=0,
        high=0.5,
        low_open=True,
        flag=Flag("--allocation-spread", metavar="S"),
    )
    points: int = option(
        5,
        "optimal: sparsities measured per layer, odd (--sparsity in the middle)",
        low=3,
        flag=Flag("--allocation-points", metavar="K"),
    )
    estimate: str = option(
        "obs",
        "optimal: the layer error estimate, obs (sum of OBS single-weight errors "
        "w^2/[H^-1]_jj) or mask (the exact error of the Wanda mask with no update)",
        choices=ERROR_ESTIMATES,
        flag=Flag("--allocation-estimate"),
    )
    weight: str = option(
        "residual",
        "optimal: how the layers' relative errors are summed: residual (each weighted by its "
        "sublayer's mean per-token squared update of the residual stream relative to the "
        "stream, measured on the dense model: an error where the sublayer writes much of the "
        "stream costs more) or equal (unweighted)",
        choices=ERROR_WEIGHTS,
        flag=Flag("--allocation-weight"),
    )


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """The calibration windows: random windows of a tokenized text."""

    text: str = option(
        "", "calibration text file", required=True, flag=Flag("--calib", metavar="FILE")
    )
    nsamples: int = option(128, "calibration windows", low=1)
    seqlen: int = option(512, "tokens per calibration window", low=1)
    seed: int = option(0, "seed of the calibration window starts", low=0)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the blocks are walked: their inputs, batches, devices and precision."""

    sequential: bool = option(
        True,
        "feed every block the dense model's inputs instead of the pruned model's "
        "(FISTAPruner's parallel mode)",
        flag=Flag("--parallel-blocks", inverted=True),
    )
    intra_block: bool | None = option(
        None,
        "prune q,k,v -> o -> gate,up -> down in stages, each seeing the pruned upstream "
        "outputs, targeting the dense outputs (structured methods refuse it)",
        unset="the method's own protocol; on for fista",
    )
    batch_size: int = option(8, "calibration / evaluation windows per forward pass", low=1)
    mesh: int | str | None = option(
        None,
        "devices to spread the work over: N (the first N devices) or 'auto' (all); "
        "calibration batches are split across them and each layer's rows are sharded",
        unset="one device",
    )
    offload: bool = option(
        False,
        "keep block activations in host memory between forward passes (for models whose "
        "calibration activations do not fit on the accelerator)",
    )
    row_blocks: int = option(
        0,
        "reproducible mode: run the blocks one window at a time, sum the Grams window by "
        "window in order and solve each layer as N equal row blocks, so the pruned weights "
        "are bit-identical on every --mesh whose size divides N (e.g. 8 for 1, 2, 4 or 8 "
        "devices) and for every --batch-size, on the same machine and backend; slower; "
        "structured methods get the ordered Grams and solve each layer whole; 0: off",
        low=0,
        flag=Flag(metavar="N"),
    )
    matmul_precision: str = option(
        "float32",
        "precision of every matrix product: float32 keeps Grams and solvers in true float32; "
        "tensorfloat32 lets GPUs use TF32 tensor cores (faster, ~1e-3 relative error per "
        "product; CPUs compute float32 either way)",
        choices=MATMUL_PRECISIONS,
    )


RECONSTRUCTION_OPTIMIZERS = ("adam", "adamw", "lion", "sgd")
RECONSTRUCTION_SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction (jprune.reconstruct): after a block's layer solves, fit its kept
    weights to the block's target outputs by gradient descent, the masks fixed."""

    enabled: bool = option(
        False,
        "after each block's layer solves, fit the block's kept weights to its target outputs "
        "(the other --reconstruct-* flags tune it)",
        flag=Flag("--reconstruct"),
    )
    steps: int = option(
        16,
        "optimizer steps per block (each on --reconstruct-windows calibration windows); 0 "
        "measures the held-out objective and changes nothing",
        low=0,
        flag=Flag("--reconstruct-steps", metavar="K"),
    )
    learning_rate: float = option(
        1e-3,
        "the optimizer's peak learning rate (chosen on tuning text: bench/RESULTS.md, "
        "'Block reconstruction')",
        low=0,
        flag=Flag("--reconstruct-lr", metavar="LR"),
    )
    optimizer: str = option(
        "adam",
        "the optax optimizer (adamw: decoupled weight decay 1e-4; sgd: momentum 0.9)",
        choices=RECONSTRUCTION_OPTIMIZERS,
        flag=Flag("--reconstruct-optimizer"),
    )
    schedule: str = option(
        "cosine",
        "the learning rate's decay over the steps, after a linear warmup",
        choices=RECONSTRUCTION_SCHEDULES,
        flag=Flag("--reconstruct-schedule"),
    )
    warmup: float = option(
        0.1,
        "fraction of the steps the learning rate ramps up over",
        low=0,
        high=1,
        high_open=True,
        flag=Flag("--reconstruct-warmup", metavar="F"),
    )
    windows: int = option(
        4,
        "calibration windows per step",
        low=1,
        flag=Flag("--reconstruct-windows", metavar="N"),
    )
    holdout: int = option(
        4,
        "calibration windows held out from the fit: the block's error on them picks the best "
        "iterate, and a block no iterate improves keeps its layer solves' weights",
        low=1,
        flag=Flag("--reconstruct-holdout", metavar="N"),
    )
    eval_every: int = option(
        8,
        "steps between measurements on the held-out windows",
        low=1,
        flag=Flag("--reconstruct-eval-every", metavar="K"),
    )
    correction: float | None = option(
        None,
        "the target is the dense block's output on Xp + C (X - Xp) (Xp: the pruned model's "
        "block inputs, X: the dense model's)",
        low=0,
        high=1,
        unset="the method's correction option where it has one (fista, l0-admm), else 0",
        flag=Flag("--reconstruct-correction", metavar="C"),
    )
    train_biases: bool = option(
        False,
        "also train the linears' biases (where the model has them)",
        flag=Flag("--reconstruct-biases"),
    )
    train_norms: bool = option(
        False,
        "also train the block's norm parameters",
        flag=Flag("--reconstruct-norms"),
    )
    seed: int = option(
        0, "seed of the order the windows are visited in", low=0,
        flag=Flag("--reconstruct-seed", metavar="N"),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Perplexity and zero-shot accuracy of the model before and after pruning."""

    texts: tuple[str, ...] = option(
        (),
        "text to report perplexity on before and after; repeat for several",
        unset="none",
        flag=Flag("--eval", metavar="FILE", repeat=True),
    )
    seqlen: int | None = option(
        None,
        "window length for --eval",
        low=1,
        unset="the calibration --seqlen",
        flag=Flag("--eval-seqlen"),
    )
    memory_mib: int = option(
        1024,
        "MiB of window activations (a block's inputs and outputs, float32) a perplexity "
        "evaluation holds: the windows go through the blocks in groups of as many batches as "
        "fit (at least one), and each group reads every block's weights again",
        low=1,
        flag=Flag("--eval-memory", metavar="MIB"),
    )
    dense: bool = option(
        True,
        "also evaluate the dense model before pruning (--no-eval-dense: the 'before' "
        "perplexities and accuracies are reported as null)",
        flag=Flag("--eval-dense"),
    )
    tasks: tuple[str, ...] = option(
        (),
        "lm-evaluation-harness tasks to report accuracy on (lm-eval's names, e.g. "
        "boolq,arc_easy, or tasks of --include-path); needs pip install 'jprune[eval]' and "
        "each task's dataset (downloaded, cached, or a local file)",
        unset="none",
        flag=Flag(metavar="NAME[,NAME...]"),
    )
    include_path: str | None = option(
        None,
        "--tasks: a folder of lm-eval task YAMLs, searched besides lm-eval's own",
        unset="lm-eval's own only",
        flag=Flag(metavar="DIR"),
    )
    num_fewshot: int | None = option(
        None,
        "--tasks: examples in each prompt",
        low=0,
        unset="each task's own, 0 for most",
        flag=Flag(metavar="K"),
    )
    limit: int | None = option(
        None,
        "--tasks: at most N documents per task",
        low=1,
        unset="all",
        flag=Flag(metavar="N"),
    )


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the pruned checkpoint and its report.json go."""

    out: str | None = option(
        None,
        "output directory for the pruned checkpoint and report.json (must not exist unless "
        "--force)",
        unset="nothing is written, the results are printed",
        flag=Flag(metavar="DIR"),
    )
    force: bool = option(
        False,
        "replace --out if it exists, and discard an interrupted run's staging directory "
        "(never a live run's: while a run holds --out's lock, .OUT.lock, a second is refused)",
    )
    resume: bool = option(
        False,
        "continue an interrupted run from the last block finished in --out's staging "
        "directory (.OUT.partial); refused if the model, calibration or settings differ. "
        "SIGINT and SIGTERM stop a run at the end of its current block, ready for this",
    )


SECTIONS = {
    "model": ModelConfig,
    "target": TargetConfig,
    "allocation": AllocationConfig,
    "calibration": CalibrationConfig,
    "engine": EngineConfig,
    "reconstruction": ReconstructionConfig,
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
    reconstruction: ReconstructionConfig = ReconstructionConfig()
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
        reconstruction: Mapping[str, Any] | None = None,
        **engine: Any,
    ) -> PruneConfig:
        """A configuration from flat keywords (``engine``: the ``EngineConfig`` fields;
        ``allocation``: the ``AllocationConfig`` fields, e.g. ``{"method": "owl"}``;
        ``reconstruction``: the ``ReconstructionConfig`` fields, e.g. ``{"steps": 64}``)."""
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
                "reconstruction": dict(reconstruction or {}),
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
