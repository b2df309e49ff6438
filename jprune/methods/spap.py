"""SPAP (arXiv 2505.03373): MLP channels by penalty continuation and swaps, then FASP's refit.

The MLP's channels solve ``min_{W,s} 1/2 ||W X - W2 X||^2  s.t.  W diag(s) = 0, 1^T s = k,
s binary`` by penalty continuation (``solvers.select_columns``: alternating ridge W steps and
capped-simplex s steps). The continuation's selection and the column score's are compared by
the restoration objective (the error the restored ``W2`` leaves, plus its ridge); the better
one is improved by exact best-improvement single swaps (``swap_columns``) until no swap lowers
that objective by ``swap_rtol`` of ``||W2 X||^2``, then restored as FASP does. So spap ends in a
single-swap local minimum of the layer problem, up to that tolerance, that is never worse than
FASP's selection under the same restoration. Attention channels, outside the SPAP model, are
chosen and restored as FASP does. Option ``correction`` moves the selection's target with the
restoration's (``fasp``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jprune.options import option
from jprune.solvers import select_columns
from jprune.solvers import swap_columns as solver_swap_columns

from .channels import (
    ChannelProblem,
    column_scores,
    damped_gram,
    keep_top,
    register_channel_method,
    restore,
    ridge_weight,
    shifted,
)
from .fasp import LEAST_SQUARES, FaspOptions, select_by_column_score


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


@functools.partial(jax.jit, static_argnames=("damp",))
def restoration_objective(W2, gram, keep, damp: float, shift=None) -> jax.Array:
    """``min_D ||(W2_K + D) X_K - Y||^2 + lam ||D||^2 - ||Y - W2 X||^2``, as ``restore`` attains.

    With ``D`` extended by ``-W2`` on the pruned columns, ``(W2 + D) X - Y = D X - E`` with
    ``E = Y - W2 X``; ``||E||^2`` does not depend on the selection and is left out.
    """
    delta = restore(W2, gram, keep, damp, shift) - W2  # D on the kept columns, -W2 on the pruned
    lam = ridge_weight(gram, damp)
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
    M = damped_gram(gram, damp)
    lam = ridge_weight(gram, damp)
    return solver_swap_columns(
        M,
        shifted(W2 @ M, shift),
        keep,
        k,
        column_cost=lam * jnp.sum(W2 * W2, axis=0),
        min_decrease=rtol * jnp.sum((W2 @ gram) * W2),
        max_swaps=max_swaps,
    )


def _continuation(problem: ChannelProblem, options: SpapOptions):
    """The penalty continuation's kept columns and its info."""
    damped = damped_gram(problem.gram, options.damp)
    pruned, _, info = select_columns(
        damped,
        shifted(problem.consumer_weight @ damped, problem.shift),
        problem.removed,
        swaps=0,  # the swaps after it search the restoration's own (ridge) objective
        num_stages=options.num_stages,
        growth=options.growth,
        rho0=options.rho0,
        step=options.continuation_step,
    )
    return ~pruned, info


def _swapped_from_the_better(problem: ChannelProblem, starts, options: SpapOptions):
    """Single swaps from whichever of ``starts`` has the lower restoration objective: the kept
    columns, the start's name, the objectives (the starts' and ``swapped``) and the swaps' info."""
    W2, gram, shift = problem.consumer_weight, problem.gram, problem.shift

    def objective(keep) -> float:
        return float(restoration_objective(W2, gram, keep, options.damp, shift))

    objectives = {name: objective(keep) for name, keep in starts.items()}
    start = min(objectives, key=objectives.get)
    swapped, swap_info = swap_columns(
        W2,
        gram,
        starts[start],
        problem.removed,
        options.damp,
        options.max_swaps,
        rtol=options.swap_rtol,
        shift=shift,
    )
    objectives["swapped"] = objective(swapped)
    # Swaps are scored by update formulas; the exact objective has the last word, so
    # rounding can never make the result worse than its start.
    keep = swapped if objectives["swapped"] <= objectives[start] else starts[start]
    return keep, start, objectives, swap_info


def select_by_continuation(problem: ChannelProblem, options: SpapOptions):
    """The MLP's channels: the better of the continuation's and the column score's selections
    on the restoration objective, improved by single swaps; attention's as FASP chooses them."""
    if problem.coupling.name != "mlp":
        return select_by_column_score(problem, options)
    if problem.removed == 0:
        return jnp.ones(problem.groups * problem.width, bool), {}
    continuation, info = _continuation(problem, options)
    # The continuation ends in a local minimizer of the mixed-integer model; the column
    # score's selection is a second start. The one with the lower restoration objective
    # is improved by single swaps, so spap never does worse on it than the column score.
    scores = column_scores(problem.consumer_weight, problem.gram)
    score = keep_top(scores, problem.groups, problem.removed)
    starts = {"continuation": continuation, "score": score}
    keep, start, objectives, swap_info = _swapped_from_the_better(problem, starts, options)
    return keep, {
        "stages": info.stages,
        "settled": info.settled,
        "continuation_won": start == "continuation",
        "swaps": swap_info.swaps,
        "local_minimum": swap_info.local_minimum,
        "objective": objectives,
    }


register_channel_method(
    "spap",
    "channel selection by penalty continuation and swaps, exact refit",
    SpapOptions,
    select_by_continuation,
    LEAST_SQUARES,
)
