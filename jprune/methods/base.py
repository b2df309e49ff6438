"""The contract between the block engine and a pruning method, and the method registry.

A method is a ``Method`` record: its name, its options dataclass (``jprune.options``), and a
*block program* that tells the engine what to do inside each decoder block:

* ``stages(spec, options, intra_block)``: the units it prunes, in groups (``Stage``); each
  stage's statistics are gathered after the previous stage changed the block, and name, per
  linear input ("tap"), which statistics it needs (``STATISTICS``);
* ``solve(unit, context)``: the unit's new parameters (shapes may shrink: structured methods
  remove channels) and what to record about it (``UnitResult``);
* ``check(spec, shapes, target, options, hf_config)``: refuse, before any work, a target the
  model cannot take (``shapes``: canonical parameter name -> anything with a ``.shape``);
* ``finish(spec, shapes, hf_config, options)``: from the final parameter shapes, the pruned
  model's spec and the config changes (and extra files) the export needs.

The engine owns everything else (the block loop, the calibration streams, Gram accumulation,
placement on the mesh, the reproducible mode, memory accounting, progress, the per-layer
record). Most methods prune one linear at a time from its Grams: they register a layer function
``(LayerProblem, pattern, options) -> LayerResult`` with ``register_layer_method`` and get
``LinearProgram``.

Notation (torch layout): ``W0`` is (d_out, d_in); ``X`` (d_in, n) are the inputs the *dense*
model feeds the layer, ``Xp`` the inputs the already-pruned model feeds it.

* ``gram = Xp Xp^T`` (d_in, d_in), float32, summed (not averaged) over calibration tokens.
* ``cross_gram = X Xp^T``, or ``None`` when the two inputs coincide (then it equals ``gram``).

The layer-wise reconstruction objective every method is measured by is
``||W Xp - W0 X||_F^2 = tr(W G W^T) - 2 tr(W0 C W^T) + tr(W0 H_dense W0^T)``; the engine
computes it for the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jprune.converters.spec import block_linear_names, linear_input
from jprune.errors import JpruneError
from jprune.options import describe, option, parse_fields
from jprune.sharding import to_host
from jprune.solvers import Pattern, Result, check_pattern_fits

# What a stage may ask the engine for, per tap: ``Xp Xp^T``, ``X Xp^T`` (dense inputs against
# pruned ones), ``X X^T``, and the sum of the pruned inputs over tokens.
STATISTICS = frozenset({"gram", "cross", "dense", "mean"})


class LayerProblem(NamedTuple):
    weight: jax.Array  # (d_out, d_in) dense weight W0
    gram: jax.Array  # (d_in, d_in) Xp Xp^T of the inputs the pruned model feeds this layer
    cross_gram: jax.Array | None  # (d_in, d_in) X Xp^T, None when Xp == X
    num_tokens: int  # calibration tokens summed into the Grams
    name: str = ""  # e.g. "layers.3.mlp.down_proj", for reports and errors

    @property
    def target_gram(self) -> jax.Array:
        """``X Xp^T``: the Gram that multiplies ``W0`` in the linear term."""
        return self.gram if self.cross_gram is None else self.cross_gram


class LayerResult(NamedTuple):
    weight: jax.Array  # (d_out, d_in) pruned weight, dtype of the dense weight
    info: dict[str, Any]  # plain numbers or per-row arrays: iterations, certificate, ...


def corrected_gram(gram: jax.Array, cross: jax.Array | None, correction: float) -> jax.Array:
    """``Xt Xp^T`` for the error-correcting target ``Xt = Xp + correction (X - Xp)``.

    A layer asked to reproduce ``W0 Xt`` undoes ``correction`` of the upstream pruning error:
    1 is the dense target (``X Xp^T``), 0 the layer's own output on its pruned inputs
    (``Xp Xp^T``). ``cross = X Xp^T``; ``None`` (no dense stream) means ``X = Xp``. The two
    ends return the Grams themselves, so they stay bit-exact.
    """
    if cross is None or correction == 0.0:
        return gram
    if correction == 1.0:
        return cross
    return correction * cross + (1.0 - correction) * gram


def correction_option(note: str):
    """The ``correction`` option of the methods with an error-correcting target (default 0.25)."""
    return option(
        0.25,
        f"fraction of upstream error undone: target W0 (Xp + c (X - Xp)); {note}",
        low=0.0,
        high=1.0,
    )


def result_counts(codes) -> dict[str, int]:
    """Rows per solver outcome (``solvers.Result``: converged, iteration cap, non-finite)."""
    codes = to_host(codes).reshape(-1)  # rows may be sharded over processes
    return {outcome.name.lower(): int(np.sum(codes == outcome)) for outcome in Result}


class Stage(NamedTuple):
    units: tuple[Any, ...]  # what is pruned in this stage (linear roles, channel couplings)
    statistics: Mapping[str, frozenset[str]]  # tap -> the statistics it needs (STATISTICS)


class UnitContext(NamedTuple):
    """What the engine hands ``solve`` for one unit of one block."""

    spec: Any  # the model's ModelSpec
    block: int
    params: Mapping[str, jax.Array]  # the block's current parameters ("down.weight", ...)
    stats: Mapping[str, Mapping[str, jax.Array]]  # tap -> statistic -> array
    target: Any  # the method's parsed target (a Pattern, ``Channels``)
    options: Any  # the method's options dataclass
    num_tokens: int
    num_blocks: int
    name: Callable[[str], str]  # canonical layer name -> the name shown in reports
    # (layer function, problem, pattern, options) -> (weight, info), placed on the mesh
    solve_rows: Callable[..., tuple[jax.Array, Any]]


class UnitResult(NamedTuple):
    """A unit's new parameters and what the engine records about it.

    The record's error compares ``weight`` with ``weight0`` on tap ``tap`` (both full width:
    removed channels are zero columns of ``weight``).
    """

    updates: dict[str, jax.Array]  # block parameter name -> new array (shapes may shrink)
    role: str  # the record's role ("q", ..., "mlp", "attention")
    linear: str  # the linear measured for the record ("down", ...)
    weight: jax.Array
    weight0: jax.Array
    info: Any
    channels: dict[str, int] | None = None  # structured: channels before and after


class BlockProgram(Protocol):
    def stages(self, spec, options, intra_block: bool) -> list[Stage]: ...

    def solve(self, unit, context: UnitContext) -> UnitResult: ...

    def check(self, spec, arrays, target, options, hf_config) -> None: ...

    def finish(
        self, spec, shapes: Mapping[str, Sequence[int]], hf_config, options
    ) -> tuple[Any, dict[str, Any], dict[str, str]]: ...


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help
    options: type  # frozen dataclass of the method's options (jprune.options fields)
    program: BlockProgram
    structured: bool = False  # removes channels (the target is a fraction of channels)
    intra_block: bool = False  # the engine's intra_block default (the published protocol)
    layer: Callable[..., LayerResult] | None = None  # the layer function of a LinearProgram
    # (options, target) -> None: refuse option values the target cannot take, before any work
    validate: Callable[[Any, Any], None] | None = None

    def parse_options(self, raw: Mapping[str, Any]):
        """``--option`` values (text or typed) -> the options dataclass, checked."""
        owners = {
            f.name: f"method {m.name!r}"
            for m in METHODS.values()
            if m.name != self.name
            for f in dataclasses.fields(m.options)
        }
        return parse_fields(self.options, raw, f"method {self.name!r}", owners)

    def check_engine(self, intra_block: bool) -> None:
        """Refuse, by name, an engine setting this method cannot honour."""
        if intra_block and self.structured:
            raise JpruneError(
                f"{self.name} prunes attention then MLP channels in stages of its own; "
                "--intra-block is for unstructured methods (its error correction is "
                "--option correction)"
            )

    def describe_options(self) -> str:
        lines = describe(self.options)
        head = f"{self.name}: {self.summary}"
        return "\n".join([head, *lines] if lines else [head, "  (no options)"])

    def __call__(
        self, problem: LayerProblem, pattern: Pattern, options=None, **overrides
    ) -> LayerResult:
        """Prune one layer (layer-function methods): ``options`` or the defaults with
        ``overrides`` (checked like ``--option`` values)."""
        if self.layer is None:
            raise JpruneError(f"method {self.name!r} prunes channels of whole blocks, not a layer")
        if options is None:
            options = self.parse_options(overrides)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        return self.layer(problem, pattern, options)


UNROUTED_FALLBACK = "no calibration token routed to this expert: identity Gram (magnitude)"


def unrouted_expert_problem(problem: LayerProblem) -> LayerProblem:
    """An expert no calibration token was routed to has all-zero Grams: nothing says which
    weights matter, and the solvers' damping is relative to a zero diagonal. It is pruned from
    the identity Gram instead, which makes every method keep the largest |W| (the report names
    the fallback); experts with a few routed tokens keep their own Grams and the methods'
    damping."""
    identity = jnp.eye(problem.gram.shape[0], dtype=problem.gram.dtype)
    return problem._replace(gram=identity, cross_gram=None, num_tokens=max(problem.num_tokens, 1))


class LinearProgram:
    """Each linear is pruned on its own from its Grams by a layer function.

    Stages: one (every linear from the block as it was: the SparseGPT / Wanda protocol) or,
    with ``intra_block``, q,k,v -> o -> gate,up -> down, each from the already-pruned upstream
    operators, with the dense stream's cross and dense Grams for a target that corrects
    upstream error (FISTAPruner's intra-layer error correction).
    """

    def __init__(self, layer: Callable[..., LayerResult]):
        self.layer = layer

    def stages(self, spec, options, intra_block: bool) -> list[Stage]:
        names = block_linear_names(spec)
        wanted = frozenset({"gram", "cross", "dense"} if intra_block else {"gram"})
        if not intra_block:
            groups = [names]
        else:
            mlp_in = tuple(n for n in names if linear_input(n).endswith("mlp_in"))
            down = tuple(n for n in names if linear_input(n).endswith("down_in"))
            groups = [("q", "k", "v"), ("o",), mlp_in, down]
        return [
            Stage(group, {tap: wanted for tap in sorted({linear_input(n) for n in group})})
            for group in groups
        ]

    def solve(self, role: str, context: UnitContext) -> UnitResult:
        stats = context.stats[linear_input(role)]
        weight0 = context.params[f"{role}.weight"]
        problem = LayerProblem(
            weight=weight0.astype("float32"),
            gram=stats["gram"],
            cross_gram=stats.get("cross"),
            num_tokens=context.num_tokens,
            name=f"layers.{context.block}.{role}",
        )
        unrouted = role.startswith("experts.") and float(jnp.trace(stats["gram"])) == 0.0
        if unrouted:
            problem = unrouted_expert_problem(problem)
        weight, info = context.solve_rows(self.layer, problem, context.target, context.options)
        if unrouted:
            info = {**info, "fallback": UNROUTED_FALLBACK}
        return UnitResult(
            {f"{role}.weight": weight.astype(weight0.dtype)}, role, role, weight, weight0, info
        )

    def check(self, spec, arrays, target, options, hf_config) -> None:
        for role in block_linear_names(spec):
            for i in range(spec.num_layers):
                shape = arrays[f"layers.{i}.{role}.weight"].shape
                try:
                    check_pattern_fits(target, shape)
                except ValueError as err:
                    raise JpruneError(f"{err} of {role} in block {i}") from None

    def finish(self, spec, shapes, hf_config, options):
        return spec, {}, {}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its name (the CLI's ``--method``)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if not dataclasses.is_dataclass(method.options):
        raise TypeError(f"method {method.name!r}: options must be a dataclass")
    METHODS[method.name] = method
    return method


def register_layer_method(
    name: str,
    *,
    options: type = NoOptions,
    intra_block: bool = False,
    summary: str = "",
    validate: Callable[[Any, Any], None] | None = None,
) -> Callable[[Callable[..., LayerResult]], Method]:
    """Decorator: register ``fn(problem, pattern, options) -> LayerResult`` as method ``name``."""

    def add(fn: Callable[..., LayerResult]) -> Method:
        line = summary or (fn.__doc__ or name).strip().splitlines()[0]
        return register(
            Method(
                name=name,
                summary=line,
                options=options,
                program=LinearProgram(fn),
                intra_block=intra_block,
                layer=fn,
                validate=validate,
            )
        )

    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise JpruneError(f"unknown method {name!r}; known methods: {known}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "STATISTICS",
    "BlockProgram",
    "LayerProblem",
    "LayerResult",
    "LinearProgram",
    "Method",
    "NoOptions",
    "Pattern",
    "Stage",
    "UnitContext",
    "UnitResult",
    "corrected_gram",
    "get_method",
    "register",
    "register_layer_method",
    "result_counts",
]
