"""Structured pruning of coupled channels: FASP, SPAP and the Wanda-sp baseline.

A channel couples a row of the earlier linears with a column of the later one,
``Y = W2 act(W1 X)``: the MLP's gate/up rows (fc1) with down's columns (fc2), and attention's v
rows with o's columns. Removing both shrinks the matrices; q and k are never touched. With
grouped-query attention, v channel ``c`` of kv head ``g`` feeds o's column ``c`` of every query
head that reads ``g``; every kv head keeps the same number of channels, so a layer has one
value-head width.

With ``G = X X^T`` the Gram of the later matrix's inputs (calibration, pruned upstream), kept
columns ``K`` and pruned ``P``:

* ``wanda-sp`` (Wanda-sp / FLAP, the baseline): channel score = the Wanda scores
  ``|W_ij| ||X_j||`` summed over the channel's weights in all coupled matrices; no weight
  update, but a bias of the later matrix absorbs the pruned channels' mean output,
  ``b += W2[:, P] mean(X_P)``.
* ``fasp`` (arXiv 2501.09412): score ``S_j = sum_i |W2_ij| ||X_j||`` of the later matrix, then
  least-squares restoration ``W2' = W2[:, K] + W2[:, P] G_PK (G_KK + lam I)^-1``.
* ``spap`` (arXiv 2505.03373), MLP: ``min_{W,s} 1/2 ||W X - W2 X||^2  s.t.  W diag(s) = 0,
  1^T s = k, s binary`` by penalty continuation (``solvers.select_columns``: alternating ridge
  W steps and capped-simplex s steps). The continuation's selection and the column score's
  are compared by the restoration objective (the error the restored ``W2`` leaves, plus its
  ridge); the better one is improved by exact best-improvement single swaps
  (``swap_columns``) until no swap lowers that objective by ``swap_rtol`` of ``||W2 X||^2``,
  then restored as FASP does. So spap ends in a single-swap local minimum of the layer
  problem, up to that tolerance, that is never worse than FASP's selection under the same
  restoration. Attention channels, outside the SPAP model, are chosen and restored as FASP
  does.

The three are block programs of the one engine (``ChannelProgram``): per block, the attention
channels go first (``attention=true``), then the MLP's, each stage's statistics taken from the
block as the previous stage left it, on the inputs of the already-pruned model. Option
``correction`` (fasp, spap; default 0, the papers' target) makes the restoration, and spap's
selection, fit ``W2 (X + correction (X_dense - X))`` (``methods.corrected_gram``, the same
target fista's ``correction`` sets): part of the upstream pruning error is undone, from the
engine's dense stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jprune import converters
from jprune.errors import JpruneError
from jprune.methods.base import (
    Method,
    Stage,
    UnitContext,
    UnitResult,
    corrected_gram,
    register,
)
from jprune.options import option
from jprune.solvers import refit_columns, select_columns, topk_mask
from jprune.solvers import swap_columns as solver_swap_columns

REMOTE_MODULE = "modeling_jprune_llama"
# Shipped as a module of jprune.converters; its text is written beside remote-code exports.
_REMOTE_SOURCE = Path(converters.__file__).with_name("remote_llama.py")


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
class WandaSPOptions:
    attention: bool = option(False, "also prune v/o channels (LLaMA exports only)")
    allocation: str = option(
        "uniform", "per-layer ratios: uniform, or ramp (less early, more late)", choices=ALLOCATIONS
    )
    ramp: float = option(0.1, "ramp half-width: ratios go from s - ramp to s + ramp", low=0.0)
    layer_sparsity: tuple[float, ...] | None = option(
        None, "explicit per-layer ratios, one per block", low=0.0, high=1.0, high_open=True
    )


@dataclasses.dataclass(frozen=True)
class FaspOptions(WandaSPOptions):
    damp: float = option(0.01, "restoration ridge, relative to mean(diag G)", low=0.0)
    correction: float = option(
        0.0,
        "fraction of upstream error the restoration undoes: target W2 (X + c (X_dense - X))",
        low=0.0,
        high=1.0,
    )


@dataclasses.dataclass(frozen=True)
class SpapOptions(FaspOptions):
    # A faster schedule than the paper-like 1.2 over 100 stages: on smollm2-135m's down layers
    # growth 2 settles (or reaches the cap) in 18-25 stages where 1.2 took 65-100, with a
    # lower restoration objective on every layer tried. Growth 3 was faster still but lost
    # perplexity on the whole model, 1.5 gained a little for 20% more time (bench/RESULTS.md,
    # issue 16). The swaps finish either way.
    num_stages: int = option(30, "penalty continuation stages", low=1)
    growth: float = option(2.0, "penalty growth per stage", low=1.0, low_open=True)
    rho0: float = option(1e-3, "initial penalty", low=0.0, low_open=True)
    continuation_step: float = option(
        0.01, "step of the capped-simplex update of the selection", low=0.0, low_open=True
    )
    max_swaps: int = option(1000, "most single column swaps after the continuation", low=0)
    # Smaller gains are below what the calibration sample resolves (65k tokens on the shared
    # models): at 1e-6 the search traded channels for them and lost TinyStories perplexity to
    # fasp at 2 settings of 16, at 1e-4 at none, 3-10x sooner (bench/RESULTS.md).
    swap_rtol: float = option(
        1e-4, "a swap must lower the objective by this times ||W2 X||^2", low=0.0
    )


def couplings(spec, attention: bool) -> list[Coupling]:
    mlp = Coupling(
        "mlp", ("gate", "up") if spec.gated_mlp else ("up",), "down", "down_in", "mlp_in"
    )
    return ([Coupling("attention", ("v",), "o", "o_in", "attn_in")] if attention else []) + [mlp]


def layer_sparsities(sparsity: float, num_layers: int, options: WandaSPOptions) -> list[float]:
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


def check_target(spec, arrays, sparsity: float, options: WandaSPOptions, family_config):
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
    if per_layer_widths and family_config.get("model_type") not in ("llama", "jprune_llama"):
        raise JpruneError(
            f"{spec.family} has no exportable coupled v/o pair or per-layer widths: attention=true "
            "and non-uniform allocation are implemented for LLaMA only (MLP-only uniform pruning "
            "works for every family)"
        )
    for i, ratio in enumerate(ratios):
        for coupling in couplings(spec, options.attention):
            groups, width = _channel_groups(
                spec, coupling, arrays[f"layers.{i}.{coupling.producers[0]}.weight"].shape[0]
            )
            producer_rows = {arrays[f"layers.{i}.{p}.weight"].shape[0] for p in coupling.producers}
            consumer_cols = arrays[f"layers.{i}.{coupling.consumer}.weight"].shape[1]
            if producer_rows != {groups * width} or consumer_cols != _heads(spec, coupling) * width:
                raise JpruneError(
                    f"layer {i}: {'/'.join(coupling.producers)} rows and {coupling.consumer} "
                    "columns are not a coupled pair"
                )
            if not 0 <= ratio < 1 or width - num_removed(ratio, width) < 1:
                unit = "per kv head " if coupling.name == "attention" else ""
                raise JpruneError(
                    f"sparsity {ratio} leaves no {coupling.name} channel {unit}in layer {i} "
                    f"({width} channels {unit}before pruning)"
                )


def _channel_groups(spec, coupling: Coupling, rows: int) -> tuple[int, int]:
    """(groups, channels per group) of ``rows`` producer rows: kv heads x value width, or one
    group for the MLP."""
    if coupling.name == "attention":
        return spec.num_kv_heads, rows // spec.num_kv_heads
    return 1, rows


def _column_channels(spec, coupling: Coupling, groups: int, width: int) -> np.ndarray:
    """Channel index of each consumer column (o's column (h, c) reads kv head h // group)."""
    if coupling.name == "mlp":
        return np.arange(width)
    head = np.arange(spec.num_heads) // (spec.num_heads // groups)
    return (head[:, None] * width + np.arange(width)[None, :]).reshape(-1)


# ---------------------------------------------------------------- selection and restoration


@jax.jit
def _column_scores(W2, gram):
    """FASP / Wanda column score ``sum_i |W2_ij| ||X_j||``."""
    return jnp.sum(jnp.abs(W2), axis=0) * jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))


@jax.jit
def _row_scores(W1, gram):
    """Wanda score of each row of an earlier linear: ``sum_j |W1_rj| ||X_j||``."""
    return jnp.abs(W1) @ jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))


def _ridge_weight(gram, damp):
    """The restoration's ridge ``lam``: ``damp`` times the mean input energy."""
    return damp * jnp.mean(jnp.diagonal(gram))


def _damped(gram, damp):
    return gram + _ridge_weight(gram, damp) * jnp.eye(gram.shape[0], dtype=gram.dtype)


def target_shift(W2, gram, target_gram):
    """``S = W2 (Xt - X) X^T``: how an error-correcting target ``Y = W2 Xt`` moves the
    restoration's linear term ``Y X^T = W2 G + S`` (``Xt``: ``methods.corrected_gram``).
    ``None`` when the target is the layer's own output (``target_gram is gram``)."""
    if target_gram is gram:
        return None
    return W2 @ (target_gram - gram)


def _plus(a, shift):
    return a if shift is None else a + shift


@functools.partial(jax.jit, static_argnames=("damp",))
def restore(W2, gram, keep, damp: float, shift=None):
    """``W2 + (W2[:, P] G_PK + S_K) (G_KK + lam I)^-1`` on the kept columns (pruned are 0).

    The minimizer of ``||V X_K - Y||^2 + lam ||V - W2_K||^2`` (``shift``: ``target_shift``).
    Written as a correction of ``W2`` so a channel whose column is zero, or an empty ``P``
    with no shift, leaves ``W2`` bit-exact.
    """
    linear = _plus(jnp.where(keep, 0, W2) @ gram, shift)
    correction = refit_columns(_damped(gram, damp), linear, keep)
    return jnp.where(keep, W2 + correction, 0)


@functools.partial(jax.jit, static_argnames=("damp",))
def restoration_objective(W2, gram, keep, damp: float, shift=None) -> jax.Array:
    """``min_D ||(W2_K + D) X_K - Y||^2 + lam ||D||^2 - ||Y - W2 X||^2``, as ``restore`` attains.

    With ``D`` extended by ``-W2`` on the pruned columns, ``(W2 + D) X - Y = D X - E`` with
    ``E = Y - W2 X``; ``||E||^2`` does not depend on the selection and is left out.
    """
    delta = restore(W2, gram, keep, damp, shift) - W2  # D on the kept columns, -W2 on the pruned
    lam = _ridge_weight(gram, damp)
    value = jnp.sum((delta @ gram) * delta) + lam * jnp.sum(jnp.where(keep, delta, 0) ** 2)
    return value if shift is None else value - 2.0 * jnp.sum(delta * shift)


@functools.partial(jax.jit, static_argnames=("k", "damp", "max_swaps", "rtol"))
def swap_columns(
    W2, gram, keep, k: int, damp: float, max_swaps: int, rtol: float = 1e-6, shift=None
):
    """Best-improvement single swaps (``solvers.swap_columns``) on the restoration objective.

    With ``M = G + lam I`` and ``C = W2 M + S`` the restoration's value is
    ``F(K) = ||Y||^2 + lam sum_{j in K} ||W2_:j||^2 - tr(C_K M_KK^-1 C_K^T)``, equal to
    ``restoration_objective`` up to a constant: the solver's objective with the column cost
    ``lam ||W2_:j||^2``. Swaps are made while one lowers ``F`` by more than
    ``rtol ||W2 X||^2``, at most ``max_swaps`` times; ``keep`` must prune exactly ``k``.
    """
    M = _damped(gram, damp)
    lam = _ridge_weight(gram, damp)
    return solver_swap_columns(
        M,
        _plus(W2 @ M, shift),
        keep,
        k,
        column_cost=lam * jnp.sum(W2 * W2, axis=0),
        min_decrease=rtol * jnp.sum((W2 @ gram) * W2),
        max_swaps=max_swaps,
    )


def _keep_top(scores, groups: int, removed: int) -> jax.Array:
    per_group = scores.reshape(groups, -1)
    return topk_mask(per_group, per_group.shape[1] - removed).reshape(-1)


def _select(method, spec, coupling, weights, grams, groups, width, removed, options, shift):
    """Kept channels (bool, groups * width) and solver info; ``shift``: ``target_shift``."""
    W2 = weights[coupling.consumer]
    columns = jnp.asarray(_column_channels(spec, coupling, groups, width))
    n_channels = groups * width
    if method == "spap" and coupling.name == "mlp":
        if removed == 0:
            return jnp.ones(n_channels, bool), {}
        gram, damped = grams[coupling.tap], _damped(grams[coupling.tap], options.damp)
        pruned, _, info = select_columns(
            damped,
            _plus(W2 @ damped, shift),
            removed,
            swaps=0,  # the swaps below search the restoration's own (ridge) objective
            num_stages=options.num_stages,
            growth=options.growth,
            rho0=options.rho0,
            step=options.continuation_step,
        )
        # The continuation ends in a local minimizer of the mixed-integer model; the column
        # score's selection is a second start. The one with the lower restoration objective
        # is improved by single swaps, so spap never does worse on it than the column score.
        scores = _column_scores(W2, gram)
        starts = {"continuation": ~pruned, "score": _keep_top(scores, groups, removed)}
        objectives = {
            name: float(restoration_objective(W2, gram, keep, options.damp, shift))
            for name, keep in starts.items()
        }
        start = min(objectives, key=objectives.get)
        swapped, swap_info = swap_columns(
            W2,
            gram,
            starts[start],
            removed,
            options.damp,
            options.max_swaps,
            rtol=options.swap_rtol,
            shift=shift,
        )
        objectives["swapped"] = float(restoration_objective(W2, gram, swapped, options.damp, shift))
        # Swaps are scored by update formulas; the exact objective has the last word, so
        # rounding can never make the result worse than its start.
        keep = swapped if objectives["swapped"] <= objectives[start] else starts[start]
        return keep, {
            "stages": info.stages,
            "settled": info.settled,
            "continuation_won": start == "continuation",
            "swaps": swap_info.swaps,
            "local_minimum": swap_info.local_minimum,
            "objective": objectives,
        }
    scores = jax.ops.segment_sum(
        _column_scores(W2, grams[coupling.tap]), columns, num_segments=n_channels
    )
    if method == "wanda-sp":
        for producer in coupling.producers:
            scores = scores + _row_scores(weights[producer], grams[coupling.producer_tap])
    return _keep_top(scores, groups, removed), {}


def _heads(spec, coupling: Coupling) -> int:
    return spec.num_heads if coupling.name == "attention" else 1


# ---------------------------------------------------------------- the block program


class ChannelProgram:
    """A block program (``methods.base``): per block, the attention channels (if asked), then
    the MLP's, each chosen from the Grams of the block as the previous stage left it."""

    def __init__(self, method: str):
        self.method = method

    def stages(self, spec, options: WandaSPOptions, intra_block: bool) -> list[Stage]:
        stages = []
        for coupling in couplings(spec, options.attention):
            wanted = {coupling.tap: {"gram"}}
            if getattr(options, "correction", 0.0) > 0:
                wanted[coupling.tap].add("cross")
            if self.method == "wanda-sp":
                wanted.setdefault(coupling.producer_tap, set()).add("gram")
                if _consumer_bias(spec, coupling):
                    wanted[coupling.tap].add("mean")
            stages.append(Stage((coupling,), {t: frozenset(v) for t, v in wanted.items()}))
        return stages

    def check(self, spec, arrays, target: Channels, options, hf_config) -> None:
        check_target(spec, arrays, target.sparsity, options, hf_config)

    def solve(self, coupling: Coupling, context: UnitContext) -> UnitResult:
        """Choose and remove one coupling's channels in the block."""
        spec, params, options = context.spec, context.params, context.options
        stats = context.stats[coupling.tap]
        weights = {
            role: jnp.asarray(params[f"{role}.weight"], jnp.float32)
            for role in (*coupling.producers, coupling.consumer)
        }
        grams = {tap: s["gram"] for tap, s in context.stats.items()}
        W2, gram = weights[coupling.consumer], stats["gram"]
        target = corrected_gram(gram, stats.get("cross"), getattr(options, "correction", 0.0))
        shift = target_shift(W2, gram, target)
        groups, width = _channel_groups(
            spec, coupling, params[f"{coupling.producers[0]}.weight"].shape[0]
        )
        ratios = layer_sparsities(context.target.sparsity, context.num_blocks, options)
        removed = num_removed(ratios[context.block], width)
        keep, info = _select(
            self.method, spec, coupling, weights, grams, groups, width, removed, options, shift
        )
        keep_cols = keep[jnp.asarray(_column_channels(spec, coupling, groups, width))]
        updates = {}
        bias = f"{coupling.consumer}.bias"
        if self.method == "wanda-sp":
            new_W2 = jnp.where(keep_cols, W2, 0)
            if "mean" in stats:
                # The pruned channels' mean output moves into the bias (FLAP's compensation).
                moved = jnp.where(keep_cols, 0, W2) @ (stats["mean"] / context.num_tokens)
                updates[bias] = params[bias] + moved.astype(params[bias].dtype)
        else:
            new_W2 = restore(W2, gram, keep_cols, options.damp, shift)
        dtype = params[f"{coupling.consumer}.weight"].dtype
        updates[f"{coupling.consumer}.weight"] = new_W2[:, keep_cols].astype(dtype)
        for producer in coupling.producers:
            for kind in ("weight", "bias"):
                if f"{producer}.{kind}" in params:
                    updates[f"{producer}.{kind}"] = params[f"{producer}.{kind}"][keep]
        kept = np.flatnonzero(np.asarray(keep))
        channels = {"before": groups * width, "after": int(kept.size), "kept": kept.tolist()}
        return UnitResult(
            updates, coupling.name, coupling.consumer, new_W2, W2, info, channels=channels
        )

    def finish(self, spec, shapes, hf_config, options):
        """The pruned model's spec (its widest MLP) and the config changes of the export."""
        layers = range(spec.num_layers)
        widths = [shapes[f"layers.{i}.down.weight"][1] for i in layers]
        v_heads = [shapes[f"layers.{i}.v.weight"][0] // spec.num_kv_heads for i in layers]
        new_spec = dataclasses.replace(spec, intermediate_size=max(widths))
        updates, files = export_config(spec, hf_config, widths, v_heads)
        return new_spec, updates, files


def _consumer_bias(spec, coupling: Coupling) -> bool:
    return spec.o_bias if coupling.consumer == "o" else spec.mlp_bias


STRUCTURED = {
    "fasp": (FaspOptions, "coupled channels, column score, least-squares restoration"),
    "spap": (SpapOptions, "channel selection by penalty continuation and swaps, exact refit"),
    "wanda-sp": (WandaSPOptions, "column score, FLAP-style bias compensation (baseline)"),
}
for _name, (_options, _summary) in STRUCTURED.items():
    register(Method(_name, _summary, _options, ChannelProgram(_name), structured=True))
STRUCTURED_METHODS = tuple(STRUCTURED)


def export_config(
    spec, hf_config: Mapping[str, Any], widths: list[int], v_heads: list[int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Config changes (and files) that describe the pruned widths to transformers.

    One MLP width everywhere and untouched value heads: the stock config with a new
    ``intermediate_size`` / ``ffn_dim``. Otherwise the per-layer ``jprune_llama`` config and its
    modeling file, loaded through ``auto_map`` with ``trust_remote_code=True``.
    """
    stock = (
        len(set(widths)) == 1
        and set(v_heads) == {spec.head_dim}
        and "intermediate_sizes" not in hf_config
    )
    if stock:
        key = "ffn_dim" if spec.family == "opt" else "intermediate_size"
        return {key: widths[0]}, {}
    return (
        {
            "model_type": "jprune_llama",
            "architectures": ["JpruneLlamaForCausalLM"],
            "auto_map": {
                "AutoConfig": f"{REMOTE_MODULE}.JpruneLlamaConfig",
                "AutoModelForCausalLM": f"{REMOTE_MODULE}.JpruneLlamaForCausalLM",
            },
            "intermediate_size": max(widths),
            "intermediate_sizes": widths,
            "v_head_dims": v_heads,
        },
        {f"{REMOTE_MODULE}.py": _REMOTE_SOURCE.read_text()},
    )
