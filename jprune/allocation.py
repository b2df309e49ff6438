"""Layer-wise sparsity allocation: how one global budget of zeros is shared among the linears.

The budget is the number of zeros the uniform pattern asks of every decoder linear together
(``num_pruned`` summed over layers), so every allocation prunes exactly as many weights as
uniform does; each layer then gets an integer count, carried by an exact-count pattern
(``Unstructured(s, scope, count=c)``: per row, rows differ by at most one zero).

* ``uniform``: every layer at the target (today's patterns, untouched).
* ``owl`` (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): per block, the outlier
  ratio ``D`` = share of Wanda scores ``|W_ij| ||X_j||`` (over all the block's linears) above
  ``M`` times their mean; ratios are mapped linearly onto ``[0, 2 lambda]``, centred on the
  target (mean over blocks, weighted by their sizes: the paper's plain mean when blocks are
  equal), and a block's sparsity is the target minus that deviation (more outliers, fewer
  zeros).
* ``optimal``: each layer's relative reconstruction error ``e_l(c)`` is estimated from its
  dense Gram at ``points`` counts ``c`` spread over ``target +- spread``; the counts minimising
  ``sum_l e_l(c_l)`` subject to ``sum_l c_l = budget`` are found on the lower convex envelope of
  each layer's measured points (``optimal_counts``): a continuous knapsack, solved exactly by
  taking segments in order of slope, with a Lagrangian lower bound as certificate.

Relative errors (``||dW X||^2 / ||W0 X||^2``) are scale free, so layers deep in the residual
stream, whose activations are larger, do not outweigh early ones. ``weight="equal"`` sums them
as they are: a unit of relative error means the same loss of a layer's output signal anywhere.
``weight="residual"`` (the default) weighs each by its sublayer's mean per-token squared
update of the residual stream relative to the stream (``update_share``): a layer's relative
error becomes, to first order, the relative error its sublayer writes into the normalised
stream the rest of the model reads, so a sublayer that rewrites much of the stream counts for
more than one that nudges it. Measured at 70% with wanda (bench/RESULTS.md, "Allocation"): equal weights put the
zeros where relative errors are flat and lost to uniform on stories-mini; residual weights
beat uniform and OWL there and on smollm2-135m.

Allocations from the dense model need one pass over its blocks before pruning (``measure``):
one block and its calibration activations in memory at a time, as in the engine. The result
is kept in the run's journal, so ``--resume`` reuses it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jprune import walk
from jprune.converters.spec import block_linear_names, linear_input
from jprune.errors import JpruneError
from jprune.methods.wanda import wanda_scores
from jprune.solvers import NM, Unstructured, keep_mask, num_pruned

JOURNAL_KEY = "allocation"


def check_allocation(settings, method, target) -> None:
    """Refuse, before any work, an allocation the method or pattern cannot take."""
    if settings.method == "uniform":
        return
    if method.structured:
        raise JpruneError(
            f"--allocation {settings.method} is for unstructured methods; {method.name} removes "
            "channels (wanda-sp has its own option allocation)"
        )
    if isinstance(target, NM):
        raise JpruneError(
            f"--allocation {settings.method} needs --sparsity: the N:M pattern {target} keeps "
            f"{target.n} of every {target.m} inputs in every layer, so it stays uniform"
        )
    if settings.method == "optimal" and settings.points % 2 == 0:
        raise JpruneError(
            f"allocation points must be odd (the target in the middle), got {settings.points}"
        )


# ---------------------------------------------------------------- pure allocation rules


def apportion(targets: Sequence[float], budget: int, sizes: Sequence[int]) -> np.ndarray:
    """Integer counts summing to ``budget``, each within one of its (rescaled) real target.

    The targets are scaled to sum to ``budget``; each count is its target's floor, and the
    remainder goes one each to the largest fractional parts (lowest index first on ties).
    """
    real = np.asarray(targets, np.float64)
    real = real * (budget / real.sum()) if real.sum() > 0 else real
    counts = np.floor(real).astype(np.int64)
    extra = budget - int(counts.sum())
    order = np.argsort(-(real - counts), kind="stable")
    counts[order[:extra]] += 1
    if np.any(counts < 0) or np.any(counts > np.asarray(sizes)):
        raise JpruneError("the allocation asks a layer for more zeros than it has weights")
    return counts


def owl_sparsities(
    ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float
) -> np.ndarray:
    """OWL's block sparsities from the blocks' outlier ratios (any common scale).

    ``deviation = 2 lam (D - min D) / (max D - min D)``, centred to zero mean (weighted by
    block sizes); ``sparsity = target - deviation``. Equal ratios give the target everywhere.
    """
    ratios = np.asarray(ratios, np.float64)
    sizes = np.asarray(sizes, np.float64)
    span = ratios.max() - ratios.min()
    if span == 0:
        return np.full(len(ratios), target)
    deviation = (ratios - ratios.min()) / span * 2 * lam
    deviation -= np.sum(deviation * sizes) / np.sum(sizes)
    sparsities = target - deviation
    if np.any(sparsities <= 0) or np.any(sparsities >= 1):
        raise JpruneError(
            f"owl_lambda {lam} takes a block's sparsity outside (0, 1) at target {target}"
        )
    return sparsities


def outlier_ratio(scores: Sequence[jax.Array], m: float) -> float:
    """Share of all ``scores`` (a block's Wanda scores, every linear) above ``m`` x their mean."""
    total = sum(s.size for s in scores)
    mean = sum(float(jnp.sum(s)) for s in scores) / total
    return sum(int(jnp.sum(s > m * mean)) for s in scores) / total


class Certificate(NamedTuple):
    """The continuous knapsack's optimum and its Lagrangian certificate."""

    objective: float  # summed (envelope-interpolated) relative error of the chosen counts
    lower_bound: float  # the Lagrangian dual at ``multiplier``: no allocation does better
    multiplier: float  # error per pruned weight at the margin
    uniform: float  # the same sum with every layer at the target

    @property
    def gap(self) -> float:
        return self.objective - self.lower_bound


def _lower_envelope(counts: np.ndarray, errors: np.ndarray) -> list[int]:
    """Indices of the lower convex envelope's vertices of points sorted by count."""
    hull: list[int] = []
    for i in range(len(counts)):
        if hull and counts[hull[-1]] == counts[i]:
            if errors[i] >= errors[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord from a to i: not a vertex of the lower envelope.
            cross = (errors[b] - errors[a]) * (counts[i] - counts[a]) - (errors[i] - errors[a]) * (
                counts[b] - counts[a]
            )
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def envelope_value(counts: np.ndarray, errors: np.ndarray, c: float) -> float:
    """The lower convex envelope of the points ``(counts, errors)`` at ``c``."""
    hull = _lower_envelope(counts, errors)
    return float(np.interp(c, counts[hull], errors[hull]))


def optimal_counts(
    counts: np.ndarray, errors: np.ndarray, budget: int, middle: int
) -> tuple[np.ndarray, Certificate]:
    """Per-layer zero counts minimising the summed error at exactly ``budget`` zeros.

    ``counts`` / ``errors``: (layers, points), each row increasing in count; layer ``l``'s error
    between its points is the lower convex envelope of them (a convex piecewise-linear
    ``f_l``). The problem ``min sum_l f_l(c_l)  s.t.  sum_l c_l = budget,  c_l in [first, last]``
    is a continuous knapsack: starting every layer at its first point, taking envelope segments
    in increasing order of slope (error per zero) is optimal, and only the last segment taken is
    partial. Counts are integers, so is the partial take. Certificate: with ``nu`` that last
    slope, ``D(nu) = nu * budget + sum_l min_j (e_lj - nu c_lj)`` is a lower bound on every
    allocation of the measured points (weak duality) and equals the objective at the optimum.
    ``middle``: the column of the uniform allocation (for the certificate's comparison).
    """
    counts = np.asarray(counts, np.int64)
    errors = np.asarray(errors, np.float64)
    chosen = counts[:, 0].copy()
    need = budget - int(chosen.sum())
    if need < 0 or budget > int(counts[:, -1].sum()):
        raise JpruneError(
            f"budget {budget} is outside what the measured counts span "
            f"[{int(counts[:, 0].sum())}, {int(counts[:, -1].sum())}]"
        )
    segments = []  # (slope, layer, start count, length)
    hulls = []
    for layer in range(len(counts)):
        hull = _lower_envelope(counts[layer], errors[layer])
        hulls.append(hull)
        for a, b in zip(hull, hull[1:], strict=False):
            length = int(counts[layer, b] - counts[layer, a])
            slope = (errors[layer, b] - errors[layer, a]) / length
            segments.append((slope, layer, length))
    segments.sort(key=lambda s: (s[0], s[1]))  # stable in the layer on ties
    multiplier = segments[0][0] if segments else 0.0
    for slope, layer, length in segments:
        if need == 0:
            break
        take = min(length, need)
        chosen[layer] += take
        need -= take
        multiplier = slope
    objective = sum(envelope_value(counts[l], errors[l], chosen[l]) for l in range(len(counts)))
    dual = multiplier * budget + float(np.sum(np.min(errors - multiplier * counts, axis=1)))
    uniform = float(errors[:, middle].sum())
    return chosen, Certificate(float(objective), dual, float(multiplier), uniform)


# ---------------------------------------------------------------- per-layer measurements


def _obs_saliency(weight: jax.Array, gram: jax.Array, damp: float = 0.01) -> jax.Array:
    """OBS's error for removing each weight alone, ``w_ij^2 / [H^-1]_jj`` (SparseGPT's damping)."""
    diag = jnp.diagonal(gram)
    dead = diag == 0
    h = gram + jnp.diag(dead.astype(gram.dtype))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    inverse_diag = jnp.diagonal(jnp.linalg.inv(h))
    return jnp.where(dead[None, :], 0.0, weight**2 / inverse_diag[None, :])


def layer_errors(
    weight: jax.Array, gram: jax.Array, patterns: Sequence[Unstructured], estimate: str
) -> np.ndarray:
    """Estimated relative error ``||dW X||^2 / ||W X||^2`` of the layer at each pattern.

    ``mask``: the exact error of zeroing the lowest Wanda scores without any update (an upper
    bound for every method that also reconstructs). ``obs``: the sum of OBS single-weight
    errors ``w^2 / [H^-1]_jj`` over the weights of lowest such error (the estimate SparseGPT's
    mask is chosen by: the error after each weight's optimal compensation).
    """
    return np.asarray(_layer_errors(weight, gram, tuple(patterns), estimate), np.float64)


@functools.partial(jax.jit, static_argnames="estimate")
def _layer_errors(weight, gram, patterns, estimate):
    weight = weight.astype(jnp.float32)
    reference = jnp.maximum(jnp.sum((weight @ gram) * weight), 1e-30)
    out = []
    if estimate == "mask":
        scores = wanda_scores(weight, gram)
        for pattern in patterns:
            delta = jnp.where(keep_mask(scores, pattern), 0.0, weight)
            out.append(jnp.sum((delta @ gram) * delta))
    else:
        saliency = _obs_saliency(weight, gram)
        for pattern in patterns:
            out.append(jnp.sum(jnp.where(keep_mask(saliency, pattern), 0.0, saliency)))
    return jnp.stack(out) / reference


def grid_patterns(
    target: Unstructured, shape: tuple[int, int], spread: float, points: int
) -> list[Unstructured]:
    """The patterns an ``optimal`` allocation measures a layer at: ``points`` sparsities evenly
    over ``target +- spread`` (clipped to [0, 1)), each with the uniform rule's exact count, so
    the middle one is uniform's own count."""
    size = shape[0] * shape[1]
    out = []
    for offset in np.linspace(-spread, spread, points):
        sparsity = min(max(target.sparsity + float(offset), 0.0), 1.0 - 1.0 / shape[1])
        count = num_pruned(Unstructured(sparsity, target.scope), shape)
        out.append(Unstructured(count / size, target.scope, count))
    return out


class LayerMeasure(NamedTuple):
    """What the dense pass records about one linear."""

    name: str  # canonical, "layers.3.q"
    block: int
    shape: tuple[int, int]
    counts: tuple[int, ...]  # optimal: the measured zero counts
    errors: tuple[float, ...]  # optimal: the estimated relative error at each
    weight: float = 1.0  # optimal: what a unit of this layer's relative error costs


@jax.jit
def _update_share_sums(before, after):
    """Per batch: the sum over tokens of ``||after - before||^2 / ||before||^2``, and the count."""
    before = before.astype(jnp.float32)
    change = jnp.sum((after.astype(jnp.float32) - before) ** 2, axis=-1)
    stream = jnp.maximum(jnp.sum(before**2, axis=-1), 1e-30)
    return jnp.sum(change / stream), change.size


def update_share(before, after) -> float:
    """Mean over calibration tokens of a sublayer's squared update of the residual stream
    relative to the stream it updates: ``||after_t - before_t||^2 / ||before_t||^2``.

    Per token, because the next sublayer normalises each token's stream (RMSNorm / LayerNorm):
    what reaches it of an error ``e`` written into the stream is ``e / ||stream_t||``, and a
    sublayer's output error is its layers' relative error times its update's size. Massive
    activations (a few tokens with streams far larger than the rest) would dominate a ratio of
    sums; a mean of ratios weighs every token alike."""
    total, count = 0.0, 0
    for a, b in zip(before, after, strict=True):
        batch_total, batch_count = _update_share_sums(a, b)
        total, count = total + float(batch_total), count + int(batch_count)
    return total / count


def measure(
    blocks,
    calibration: np.ndarray,
    target: Unstructured,
    settings,
    options,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[LayerMeasure], list[float]]:
    """One pass over the dense model: per linear its error curve (``optimal``) and its
    sublayer's share of the residual stream (``optimal`` with residual weights), per block its
    outlier ratio (``owl``). One block is alive at a time, with its input and output streams
    (and, for the shares, the stream entering its MLP: three streams of calibration
    activations at the peak). ``options``: the run's ``engine.EngineOptions``."""
    spec = blocks.spec
    roles = block_linear_names(spec)  # every expert's linears in a mixture of experts
    wanted = dict.fromkeys({linear_input(r) for r in roles}, frozenset({"gram"}))
    layers: list[LayerMeasure] = []
    ratios: list[float] = []

    def visit(index: int, weights: walk.BlockWeights, x: walk.Stream) -> walk.Stream:
        if progress is not None:
            progress(f"allocation: block {index}", index, spec.num_layers)
        params = weights.arrays
        stats = walk.statistics(weights, weights, wanted, x, None)
        x_next = walk.outputs(weights, x)
        shares = (1.0, 1.0)
        if settings.method == "optimal" and settings.weight == "residual":
            residual = walk.residual(weights, x)
            shares = (update_share(x, residual), update_share(residual, x_next))
            del residual
        scores = []
        for role in roles:
            weight = params[f"{role}.weight"].astype(jnp.float32)
            gram = stats[linear_input(role)]["gram"]
            shape = tuple(weight.shape)
            counts, errors = (), ()
            if settings.method == "optimal":
                patterns = grid_patterns(target, shape, settings.spread, settings.points)
                counts = tuple(p.count for p in patterns)
                errors = tuple(layer_errors(weight, gram, patterns, settings.estimate).tolist())
            elif settings.method == "owl":
                scores.append(wanda_scores(weight, gram))
            # the attention sublayer's linears (q, k, v, o) against the MLP's (every expert's)
            share = shares[0] if role in walk.RESIDUAL_LINEARS else shares[1]
            layers.append(
                LayerMeasure(f"layers.{index}.{role}", index, shape, counts, errors, share)
            )
        if scores:
            ratios.append(outlier_ratio(scores, settings.outlier_m))
        return x_next

    x = walk.embed(blocks.shell, calibration, options.batch_size, options.placement)
    walk.walk(blocks, x, visit)
    return layers, ratios


# ---------------------------------------------------------------- the allocation of a run


class Allocation(NamedTuple):
    patterns: dict[str, Unstructured] | None  # canonical layer name -> its pattern; None: uniform
    report: dict[str, Any]  # what report.json records


def plan(
    layers: Sequence[LayerMeasure], ratios: Sequence[float], target: Unstructured, settings
) -> dict[str, Any]:
    """The per-layer counts (JSON-ready) from the dense pass's measurements."""
    shapes = [lm.shape for lm in layers]
    sizes = [a * b for a, b in shapes]
    budget = sum(num_pruned(target, s) for s in shapes)
    out: dict[str, Any] = {"method": settings.method, "budget": budget}
    if settings.method == "owl":
        block_sizes = np.zeros(len(ratios))
        for lm, n in zip(layers, sizes, strict=True):
            block_sizes[lm.block] += n
        block_sparsity = owl_sparsities(ratios, block_sizes, target.sparsity, settings.owl_lambda)
        real = [block_sparsity[lm.block] * n for lm, n in zip(layers, sizes, strict=True)]
        counts = apportion(real, budget, sizes)
        out["outlier_ratio"] = [float(r) for r in ratios]
        out["block_sparsity"] = [float(s) for s in block_sparsity]
    else:
        grid_counts = np.asarray([lm.counts for lm in layers])
        weights = np.asarray([lm.weight for lm in layers])
        grid_errors = np.asarray([lm.errors for lm in layers]) * weights[:, None]
        counts, certificate = optimal_counts(
            grid_counts, grid_errors, budget, grid_counts.shape[1] // 2
        )
        out["certificate"] = {**certificate._asdict(), "gap": certificate.gap}
        out["measured"] = {
            lm.name: {
                "counts": list(lm.counts),
                "relative_errors": list(lm.errors),
                "weight": lm.weight,
            }
            for lm in layers
        }
    out["layers"] = {
        lm.name: {"pruned": int(c), "size": n, "sparsity": int(c) / n}
        for lm, c, n in zip(layers, counts, sizes, strict=True)
    }
    out["sparsity"] = int(np.sum(counts)) / sum(sizes)
    return out


def patterns_of(report: Mapping[str, Any], target: Unstructured) -> dict[str, Unstructured]:
    return {
        name: Unstructured(layer["sparsity"], target.scope, layer["pruned"])
        for name, layer in report["layers"].items()
    }


def allocate(
    blocks, calibration, target, settings, options, journal=None, progress=None
) -> Allocation:
    """The run's per-layer patterns: from the journal when resuming, else from a dense pass
    (then remembered in the journal). ``uniform`` needs no pass and returns no patterns."""
    if settings.method == "uniform":
        return Allocation(None, {"method": "uniform"})
    report = None if journal is None else journal.recall(JOURNAL_KEY)
    if report is None:
        layers, ratios = measure(blocks, calibration, target, settings, options, progress)
        report = plan(layers, ratios, target, settings)
        if journal is not None:
            journal.remember(JOURNAL_KEY, report)
    return Allocation(patterns_of(report, target), report)
