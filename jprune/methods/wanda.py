"""Wanda (Sun et al. 2023): prune by ``|W_ij| * ||X_j||_2``, no weight update.

``||X_j||_2`` is the norm of input feature ``j`` over the calibration tokens, i.e.
``sqrt(gram_jj)``; any common scale of the Gram (sum or mean over tokens) leaves the mask
unchanged. Scores are compared within each output row (the paper's choice and the default
pattern), over the whole matrix for ``Unstructured(scope="matrix")``, and within each group of
``m`` consecutive inputs of a row for ``NM(n, m)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jprune.solvers import Pattern, check_pattern_fits

from .base import LayerProblem, LayerResult, NoOptions, register_layer_method
from .magnitude import masked_by_score


def wanda_scores(weight: jax.Array, gram: jax.Array) -> jax.Array:
    """``|W_ij| * ||X_j||_2`` from the Gram ``X X^T`` (float32)."""
    norms = jnp.sqrt(jnp.diagonal(gram).astype(jnp.float32))
    return jnp.abs(weight).astype(jnp.float32) * norms[None, :]


@register_layer_method("wanda", summary="keep the largest |W_ij| ||X_j|| (Sun et al. 2023)")
def wanda(problem: LayerProblem, pattern: Pattern, options: NoOptions) -> LayerResult:
    """Keep the highest Wanda scores of each comparison group of ``pattern``."""
    weight = problem.weight
    check_pattern_fits(pattern, weight.shape)  # not in the program: its count is traced
    scores = wanda_scores(weight, problem.gram)
    return LayerResult(masked_by_score(weight, scores, pattern), {})
