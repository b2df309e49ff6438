"""Magnitude pruning: keep the largest ``|W_ij|`` the pattern allows, no weight update.

The comparison group follows the pattern: each output row (``Unstructured(scope="row")``), the
whole matrix (``scope="matrix"``), or each group of ``m`` consecutive inputs of a row (``NM``).
Counts and tie-breaking are those of ``jprune.solvers.keep_mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jprune.solvers import Pattern, check_pattern_fits, keep_mask

from .base import LayerProblem, LayerResult, NoOptions, register_layer_method


@jax.jit
def masked_by_score(weight: jax.Array, scores: jax.Array, pattern: Pattern) -> jax.Array:
    """``weight`` with every entry outside the top-``scores`` selection of ``pattern`` zeroed."""
    return jnp.where(keep_mask(scores, pattern), weight, jnp.zeros_like(weight))


@register_layer_method("magnitude", summary="keep the largest |W_ij| of each comparison group")
def magnitude(problem: LayerProblem, pattern: Pattern, options: NoOptions) -> LayerResult:
    """Zero the smallest ``|W0_ij|`` of each comparison group of ``pattern``."""
    weight = problem.weight
    check_pattern_fits(pattern, weight.shape)  # not in the program: its count is traced
    return LayerResult(masked_by_score(weight, jnp.abs(weight), pattern), {})
