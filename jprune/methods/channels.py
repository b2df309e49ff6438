"""Structured pruning of coupled channels: the target, the coupling rules, and the block program
the channel methods (``fasp``, ``spap``, ``wanda-sp``) share.

A channel couples a row of the earlier linears with a column of the later one,
``Y = W2 act(W1 X)``: the MLP's gate/up rows (fc1) with down's columns (fc2), and attention's v
rows with o's columns. Removing both shrinks the matrices; q and k are never touched. With
grouped-query attention, v channel ``c`` of kv head ``g`` feeds o's column ``c`` of every query
head that reads ``g``; every kv head keeps the same number of channels, so a layer has one
value-head width.

A channel method is two pieces of data given to ``ChannelProgram``: a selection rule
(``Select``: from one coupling's weights and Grams, a ``ChannelProblem``, the channels kept),
and a restoration (``Restoration``: how the later matrix is repaired once they are chosen, and
the statistics that needs). With ``G = X X^T`` the Gram of the later matrix's inputs
(calibration, pruned upstream), kept columns ``K`` and pruned ``P``, the least-squares repair is
``restore``: ``W2' = W2[:, K] + W2[:, P] G_PK (G_KK + lam I)^-1``.

Per block, the attention channels go first (``attention=true``), then the MLP's, each stage's
statistics taken from the block as the previous stage left it, on the inputs of the
already-pruned model. Each layer removes its own fraction of channels (``layer_sparsities``);
widths that differ from layer to layer are exported by ``converters.widths``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jprune.converters.widths import PER_LAYER_WIDTH_TYPES, pruned_widths, width_config
from jprune.errors import JpruneError
from jprune.options import option
from jprune.solvers import refit_columns, topk_mask

from .base import Method, Stage, UnitContext, UnitResult, register


class Coupling(NamedTuple):
    name: str  # "attention" | "mlp"
    producers: tuple[str, ...]  # linears whose output rows are the channels
    consumer: str  # the linear whose input columns they are
    tap: str  # the consumer's input
    producer_tap: str  # the producers' input


class Channels(NamedTuple):
    """The structured target: the fraction of each coupling's channels removed."""

    sparsity: float

    def __str__(self) -> str:
        return f"structured {self.sparsity:g}"


ALLOCATIONS = ("uniform", "ramp")


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    """The options of every channel method: which couplings, and each layer's ratio."""

    attention: bool = option(False, "also prune v/o channels (LLaMA exports only)")
    allocation: str = option(
        "uniform", "per-layer ratios: uniform, or ramp (less early, more late)", choices=ALLOCATIONS
    )
    ramp: float = option(0.1, "ramp half-width: ratios go from s - ramp to s + ramp", low=0.0)
    layer_sparsity: tuple[float, ...] | None = option(
        None, "explicit per-layer ratios, one per block", low=0.0, high=1.0, high_open=True
    )


# ---------------------------------------------------------------- couplings and widths


def couplings(spec, attention: bool) -> list[Coupling]:
    mlp = Coupling(
        "mlp", ("gate", "up") if spec.gated_mlp else ("up",), "down", "down_in", "mlp_in"
    )
    return ([Coupling("attention", ("v",), "o", "o_in", "attn_in")] if attention else []) + [mlp]


def layer_sparsities(sparsity: float, num_layers: int, options: ChannelOptions) -> list[float]:
    """Per-layer ratios: uniform, a linear ramp with the same mean, or the explicit list."""
    if options.layer_sparsity is not None:
        if len(options.layer_sparsity) != num_layers:
            raise JpruneError(
                f"option layer_sparsity lists {len(options.layer_sparsity)} ratios for {num_layers} layers"
            )
        return list(options.layer_sparsity)
    if options.allocation == "uniform" or num_layers == 1:
        return [sparsity] * num_layers
    offsets = np.linspace(-options.ramp, options.ramp, num_layers)
    return [float(np.clip(sparsity + o, 0.0, 1.0)) for o in offsets]


def num_removed(ratio: float, width: int) -> int:
    """Channels removed from ``width`` at ``ratio`` (nearest count, halves round up)."""
    return math.floor(ratio * width + 0.5)


def channel_groups(spec, coupling: Coupling, rows: int) -> tuple[int, int]:
    """(groups, channels per group) of ``rows`` producer rows: kv heads x value width, or one
    group for the MLP."""
    if coupling.name == "attention":
        return spec.num_kv_heads, rows // spec.num_kv_heads
    return 1, rows


def column_channels(spec, coupling: Coupling, groups: int, width: int) -> np.ndarray:
    """Channel index of each consumer column (o's column (h, c) reads kv head h // group)."""
    if coupling.name == "mlp":
        return np.arange(width)
    head = np.arange(spec.num_heads) // (spec.num_heads // groups)
    return (head[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def consumer_bias(spec, coupling: Coupling) -> bool:
    return spec.o_bias if coupling.consumer == "o" else spec.mlp_bias


def _heads(spec, coupling: Coupling) -> int:
    return spec.num_heads if coupling.name == "attention" else 1


def check_target(spec, arrays, sparsity: float, options: ChannelOptions, family_config):
    """Refuse, before any work, ratios that leave no channel and widths that cannot be exported."""
    if not 0 <= sparsity < 1:
        raise JpruneError(f"structured sparsity must be in [0, 1), got {sparsity}")
    if spec.num_experts:
        raise JpruneError(
            f"structured pruning of {spec.family}'s experts is not implemented (their channels "
            "are not coupled across experts yet): use an unstructured or N:M method"
        )
    ratios = layer_sparsities(sparsity, spec.num_layers, options)
    per_layer_widths = options.attention or len(set(ratios)) > 1
    if per_layer_widths and family_config.get("model_type") not in PER_LAYER_WIDTH_TYPES:
        raise JpruneError(
            f"{spec.family} has no exportable coupled v/o pair or per-layer widths: attention=true "
            "and non-uniform allocation are implemented for LLaMA only (MLP-only uniform pruning "
            "works for every family)"
        )
    for i, ratio in enumerate(ratios):
        for coupling in couplings(spec, options.attention):
            _check_coupling(spec, arrays, i, ratio, coupling)


def _check_coupling(spec, arrays, layer: int, ratio: float, coupling: Coupling) -> None:
    """The coupled pair's shapes agree, and ``ratio`` leaves a channel in every group."""
    groups, width = channel_groups(
        spec, coupling, arrays[f"layers.{layer}.{coupling.producers[0]}.weight"].shape[0]
    )
    producer_rows = {arrays[f"layers.{layer}.{p}.weight"].shape[0] for p in coupling.producers}
    consumer_cols = arrays[f"layers.{layer}.{coupling.consumer}.weight"].shape[1]
    if producer_rows != {groups * width} or consumer_cols != _heads(spec, coupling) * width:
        raise JpruneError(
            f"layer {layer}: {'/'.join(coupling.producers)} rows and {coupling.consumer} "
            "columns are not a coupled pair"
        )
    if not 0 <= ratio < 1 or width - num_removed(ratio, width) < 1:
        unit = "per kv head " if coupling.name == "attention" else ""
        raise JpruneError(
            f"sparsity {ratio} leaves no {coupling.name} channel {unit}in layer {layer} "
            f"({width} channels {unit}before pruning)"
        )


# ---------------------------------------------------------------- the selection contract


class ChannelProblem(NamedTuple):
    """One coupling of one block, as a selection rule sees it."""

    coupling: Coupling
    weights: Mapping[str, jax.Array]  # role -> float32 weight, producers and consumer
    grams: Mapping[str, jax.Array]  # tap -> Gram of the inputs the pruned model feeds it
    groups: int  # kv heads (attention) or 1 (MLP): each keeps the same number of channels
    width: int  # channels per group
    removed: int  # channels removed from each group
    columns: jax.Array  # the channel each consumer column reads (``column_channels``)
    shift: jax.Array | None  # how the target moves the restoration (``target_shift``)

    @property
    def consumer_weight(self) -> jax.Array:
        return self.weights[self.coupling.consumer]

    @property
    def gram(self) -> jax.Array:
        """The Gram of the consumer's inputs."""
        return self.grams[self.coupling.tap]


# (problem, options) -> (kept channels: bool (groups * width,), what the record shows of it)
Select = Callable[[ChannelProblem, Any], tuple[jax.Array, dict[str, Any]]]


class Restoration(NamedTuple):
    """How a channel method repairs the consumer once the kept channels are chosen."""

    # (spec, coupling, options) -> the consumer input's statistics it needs besides the Gram
    statistics: Callable[[Any, Coupling, Any], frozenset[str]]
    # (consumer weight, the consumer input's statistics, options) -> ``target_shift``
    shift: Callable[[jax.Array, Mapping[str, jax.Array], Any], jax.Array | None]
    # (problem, kept consumer columns, context) -> the consumer's new weight at full width
    # (pruned columns zero) and any other parameter it changes (a bias)
    apply: Callable[
        [ChannelProblem, jax.Array, UnitContext], tuple[jax.Array, dict[str, jax.Array]]
    ]


@jax.jit
def column_scores(W2, gram):
    """FASP / Wanda column score ``sum_i |W2_ij| ||X_j||``."""
    return jnp.sum(jnp.abs(W2), axis=0) * jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))


def channel_scores(problem: ChannelProblem) -> jax.Array:
    """Each channel's column score, summed over the consumer columns that read it."""
    return jax.ops.segment_sum(
        column_scores(problem.consumer_weight, problem.gram),
        problem.columns,
        num_segments=problem.groups * problem.width,
    )


def keep_top(scores, groups: int, removed: int) -> jax.Array:
    """The highest ``scores`` of each group, all but ``removed`` of them."""
    per_group = scores.reshape(groups, -1)
    return topk_mask(per_group, per_group.shape[1] - removed).reshape(-1)


# ---------------------------------------------------------------- least-squares restoration


def ridge_weight(gram, damp):
    """The restoration's ridge ``lam``: ``damp`` times the mean input energy."""
    return damp * jnp.mean(jnp.diagonal(gram))


def damped_gram(gram, damp):
    return gram + ridge_weight(gram, damp) * jnp.eye(gram.shape[0], dtype=gram.dtype)


def target_shift(W2, gram, target_gram):
    """``S = W2 (Xt - X) X^T``: how an error-correcting target ``Y = W2 Xt`` moves the
    restoration's linear term ``Y X^T = W2 G + S`` (``Xt``: ``methods.corrected_gram``).
    ``None`` when the target is the layer's own output (``target_gram is gram``)."""
    if target_gram is gram:
        return None
    return W2 @ (target_gram - gram)


def shifted(linear, shift):
    """The linear term ``linear`` moved by ``shift`` (``None``: the layer's own output)."""
    return linear if shift is None else linear + shift


@functools.partial(jax.jit, static_argnames=("damp",))
def restore(W2, gram, keep, damp: float, shift=None):
    """``W2 + (W2[:, P] G_PK + S_K) (G_KK + lam I)^-1`` on the kept columns (pruned are 0).

    The minimizer of ``||V X_K - Y||^2 + lam ||V - W2_K||^2`` (``shift``: ``target_shift``).
    Written as a correction of ``W2`` so a channel whose column is zero, or an empty ``P``
    with no shift, leaves ``W2`` bit-exact.
    """
    linear = shifted(jnp.where(keep, 0, W2) @ gram, shift)
    correction = refit_columns(damped_gram(gram, damp), linear, keep)
    return jnp.where(keep, W2 + correction, 0)


# ---------------------------------------------------------------- the block program


@dataclasses.dataclass(frozen=True)
class ChannelProgram:
    """A block program (``methods.base``): per block, the attention channels (if asked), then
    the MLP's, each chosen by ``select`` from the Grams of the block as the previous stage left
    it, and repaired by ``restoration``."""

    select: Select
    restoration: Restoration
    # The selection also scores the producers' rows, on the Gram of their inputs.
    producer_gram: bool = False

    def stages(self, spec, options: ChannelOptions, intra_block: bool) -> list[Stage]:
        stages = []
        for coupling in couplings(spec, options.attention):
            extra = self.restoration.statistics(spec, coupling, options)
            wanted = {coupling.tap: frozenset({"gram"}) | extra}
            if self.producer_gram:
                wanted[coupling.producer_tap] = frozenset({"gram"})
            stages.append(Stage((coupling,), wanted))
        return stages

    def check(self, spec, arrays, target: Channels, options, hf_config) -> None:
        check_target(spec, arrays, target.sparsity, options, hf_config)

    def solve(self, coupling: Coupling, context: UnitContext) -> UnitResult:
        """Choose and remove one coupling's channels in the block."""
        problem = self.problem(coupling, context)
        keep, info = self.select(problem, context.options)
        keep_cols = keep[problem.columns]
        new_W2, updates = self.restoration.apply(problem, keep_cols, context)
        updates = updates | narrowed(coupling, context.params, keep, new_W2[:, keep_cols])
        kept = np.flatnonzero(np.asarray(keep))
        before = problem.groups * problem.width
        channels = {"before": before, "after": int(kept.size), "kept": kept.tolist()}
        return UnitResult(
            updates,
            coupling.name,
            coupling.consumer,
            new_W2,
            problem.consumer_weight,
            info,
            channels=channels,
        )

    def problem(self, coupling: Coupling, context: UnitContext) -> ChannelProblem:
        """The coupling's weights (float32) and Grams in the block, and its layer's count."""
        params, options = context.params, context.options
        weights = {
            role: jnp.asarray(params[f"{role}.weight"], jnp.float32)
            for role in (*coupling.producers, coupling.consumer)
        }
        groups, width = channel_groups(
            context.spec, coupling, params[f"{coupling.producers[0]}.weight"].shape[0]
        )
        ratios = layer_sparsities(context.target.sparsity, context.num_blocks, options)
        columns = column_channels(context.spec, coupling, groups, width)
        return ChannelProblem(
            coupling,
            weights,
            grams={tap: s["gram"] for tap, s in context.stats.items()},
            groups=groups,
            width=width,
            removed=num_removed(ratios[context.block], width),
            columns=jnp.asarray(columns),
            shift=self.restoration.shift(
                weights[coupling.consumer], context.stats[coupling.tap], options
            ),
        )

    def finish(self, spec, shapes, hf_config, options):
        """The pruned model's spec (its widest MLP) and the config changes of the export."""
        widths, v_heads = pruned_widths(spec, shapes)
        new_spec = dataclasses.replace(spec, intermediate_size=max(widths))
        updates, files = width_config(spec, hf_config, widths, v_heads)
        return new_spec, updates, files


def narrowed(coupling: Coupling, params, keep, consumer_weight) -> dict[str, jax.Array]:
    """The coupling's parameters without the removed channels: ``consumer_weight`` (its kept
    columns) in the consumer's dtype, and the producers' kept rows."""
    dtype = params[f"{coupling.consumer}.weight"].dtype
    out = {f"{coupling.consumer}.weight": consumer_weight.astype(dtype)}
    for producer in coupling.producers:
        for kind in ("weight", "bias"):
            if f"{producer}.{kind}" in params:
                out[f"{producer}.{kind}"] = params[f"{producer}.{kind}"][keep]
    return out


def register_channel_method(
    name: str,
    summary: str,
    options: type,
    select: Select,
    restoration: Restoration,
    *,
    producer_gram: bool = False,
) -> Method:
    """Register a structured method: ``select`` and ``restoration`` in a ``ChannelProgram``."""
    program = ChannelProgram(select, restoration, producer_gram)
    return register(Method(name, summary, options, program, structured=True))
