"""Wanda-sp / FLAP, the structured baseline: channels by their Wanda scores, bias compensation.

A channel's score is the Wanda scores ``|W_ij| ||X_j||`` summed over its weights in all the
coupled matrices: the later matrix's columns that read it and the earlier matrices' rows that
write it, each on its own inputs. There is no weight update, but a bias of the later matrix
absorbs the pruned channels' mean output, ``b += W2[:, P] mean(X_P)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .channels import (
    ChannelOptions,
    ChannelProblem,
    Restoration,
    channel_scores,
    consumer_bias,
    keep_top,
    register_channel_method,
)


@dataclasses.dataclass(frozen=True)
class WandaSPOptions(ChannelOptions):
    """Wanda-sp has only the options every channel method has (no restoration to tune)."""


@jax.jit
def row_scores(W1, gram):
    """Wanda score of each row of an earlier linear: ``sum_j |W1_rj| ||X_j||``."""
    return jnp.abs(W1) @ jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))


def select_by_wanda_score(problem: ChannelProblem, options: WandaSPOptions):
    """Keep the channels with the highest Wanda scores, consumer columns and producer rows."""
    scores = channel_scores(problem)
    producer_gram = problem.grams[problem.coupling.producer_tap]
    for producer in problem.coupling.producers:
        scores = scores + row_scores(problem.weights[producer], producer_gram)
    return keep_top(scores, problem.groups, problem.removed), {}


def _mean_statistics(spec, coupling, options) -> frozenset[str]:
    # Only a consumer with a bias can absorb the pruned channels' mean output.
    return frozenset({"mean"}) if consumer_bias(spec, coupling) else frozenset()


def _own_output(W2, stats, options) -> None:
    return None  # no correcting target: nothing is refitted


def _compensate_bias(problem: ChannelProblem, keep_cols, context):
    W2 = problem.consumer_weight
    stats, params = context.stats[problem.coupling.tap], context.params
    pruned = jnp.where(keep_cols, W2, 0)
    if "mean" not in stats:
        return pruned, {}
    # The pruned channels' mean output moves into the bias (FLAP's compensation).
    bias = f"{problem.coupling.consumer}.bias"
    moved = jnp.where(keep_cols, 0, W2) @ (stats["mean"] / context.num_tokens)
    return pruned, {bias: params[bias] + moved.astype(params[bias].dtype)}


BIAS_COMPENSATION = Restoration(_mean_statistics, _own_output, _compensate_bias)

register_channel_method(
    "wanda-sp",
    "column score, FLAP-style bias compensation (baseline)",
    WandaSPOptions,
    select_by_wanda_score,
    BIAS_COMPENSATION,
    producer_gram=True,
)
