"""Prototype a pruning method: an options dataclass and a layer function over ``jprune.solvers``.

The method below keeps Wanda's mask and then solves the masked least squares of each row with a
small ridge toward the dense weights (``box_qp`` with pruned entries fixed at 0). Registered, it
is a method like the others: ``jprune prune`` runs it through the one engine (calibration,
mesh, reproducible mode, export, report), and the method contract tests check it.

Run from the repository root::

    .venv/bin/python examples/custom_method.py prune --method wanda-ridge --sparsity 0.5 \\
        --model ../shared/assets/models/stories260K \\
        --calib ../shared/assets/text/tinystories_calib.txt --nsamples 32 --seqlen 256 \\
        --option ridge=0.01 --eval ../shared/assets/text/tinystories_eval.txt

(``--help-options`` lists its options; the script is ``jprune`` with the method registered.)
"""

from __future__ import annotations

import dataclasses
import sys

import jax.numpy as jnp

from jprune.methods import LayerProblem, LayerResult, register_layer_method, result_counts
from jprune.methods.wanda import wanda_scores
from jprune.options import option
from jprune.solvers import Pattern, box_qp, keep_mask


@dataclasses.dataclass(frozen=True)
class WandaRidgeOptions:
    ridge: float = option(0.01, "pull toward the dense weights, relative to mean(diag H)", low=0.0)
    maxiter: int = option(200, "CG iterations of the masked least squares", low=1)


@register_layer_method(
    "wanda-ridge",
    options=WandaRidgeOptions,
    summary="Wanda's mask, then masked least squares with a ridge toward the dense weights",
)
def wanda_ridge(problem: LayerProblem, pattern: Pattern, options: WandaRidgeOptions) -> LayerResult:
    """``min_W ||W Xp - W0 X||^2 + r ||W - W0||^2`` on Wanda's mask, per calibration token."""
    weight = problem.weight.astype(jnp.float32)
    keep = keep_mask(wanda_scores(weight, problem.gram), pattern)
    H = problem.gram / problem.num_tokens
    r = options.ridge * jnp.mean(jnp.diagonal(H))
    C = weight @ (problem.target_gram / problem.num_tokens) + r * weight
    H = H + r * jnp.eye(H.shape[0], dtype=H.dtype)
    fixed = jnp.where(keep, jnp.inf, 0.0)  # pruned entries are pinned to 0, kept ones free
    W, info = box_qp(
        H, C, -fixed, fixed, W0=jnp.where(keep, weight, 0.0), maxiter=options.maxiter, tol=1e-6
    )
    return LayerResult(
        W.astype(problem.weight.dtype), {"kkt": info.kkt, "result": result_counts(info.result)}
    )


if __name__ == "__main__":
    from jprune.cli import main

    sys.exit(main())
