"""FASP (arXiv 2501.09412): coupled channels by column score, least-squares restoration.

With ``G = X X^T`` the Gram of the later matrix's inputs, a channel's score is
``S_j = sum_i |W2_ij| ||X_j||`` of the later matrix (summed over the columns that read it),
the lowest are removed, and ``W2`` is restored on the kept columns ``K`` (pruned ``P``):
``W2' = W2[:, K] + W2[:, P] G_PK (G_KK + lam I)^-1`` (``channels.restore``).

Option ``correction`` (default 0, the paper's target) makes the restoration fit
``W2 (X + correction (X_dense - X))`` (``methods.corrected_gram``, the same target fista's
``correction`` sets): part of the upstream pruning error is undone, from the engine's dense
stream.
"""

from __future__ import annotations

import dataclasses

from jprune.options import option

from .base import corrected_gram
from .channels import (
    ChannelOptions,
    ChannelProblem,
    Restoration,
    channel_scores,
    keep_top,
    register_channel_method,
    restore,
    target_shift,
)


@dataclasses.dataclass(frozen=True)
class FaspOptions(ChannelOptions):
    damp: float = option(0.01, "restoration ridge, relative to mean(diag G)", low=0.0)
    correction: float = option(
        0.0,
        "fraction of upstream error the restoration undoes: target W2 (X + c (X_dense - X))",
        low=0.0,
        high=1.0,
    )


def select_by_column_score(problem: ChannelProblem, options: FaspOptions):
    """Keep the channels with the highest column scores in each group."""
    return keep_top(channel_scores(problem), problem.groups, problem.removed), {}


def _correction_statistics(spec, coupling, options: FaspOptions) -> frozenset[str]:
    # The corrected target reads the dense stream's cross Gram.
    return frozenset({"cross"}) if options.correction > 0 else frozenset()


def _correction_shift(W2, stats, options: FaspOptions):
    target = corrected_gram(stats["gram"], stats.get("cross"), options.correction)
    return target_shift(W2, stats["gram"], target)


def _least_squares(problem: ChannelProblem, keep_cols, context):
    W2, damp = problem.consumer_weight, context.options.damp
    return restore(W2, problem.gram, keep_cols, damp, problem.shift), {}


LEAST_SQUARES = Restoration(_correction_statistics, _correction_shift, _least_squares)

register_channel_method(
    "fasp",
    "coupled channels, column score, least-squares restoration",
    FaspOptions,
    select_by_column_score,
    LEAST_SQUARES,
)
