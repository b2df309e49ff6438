"""l0-ADMM: the layer reconstruction under the sparsity pattern itself, solved by ADMM.

Per linear layer (intra-block stages, as fista: ``Xp`` sees the pruned upstream operators),

    min_W  ||W Xp - W0 Xt||_F^2   s.t.  W fits the pattern,   Xt = Xp + correction (X - Xp)

by ``solvers.l0_admm``: ADMM between the exact least squares and the projection onto the
pattern, with a growing penalty, in unit-input coordinates (so the projection ranks weights
by ``|w_ij| ||X_j||``), one eigendecomposition of the layer's Gram for every penalty, then a
masked-CG refit of the support. It starts from the dense weights, so the first support is
Wanda's; the iterations move it by the exact objective. The l0 formulation with ADMM and a
penalty schedule is ALPS's (Meng et al., arXiv 2406.07831); the eigendecomposition that makes
every iteration two GEMMs whatever the penalty, the error-correcting target and the intra-block
statistics are jprune's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jprune.options import option
from jprune.solvers import Pattern, check_pattern_fits, l0_admm, num_pruned

from .base import (
    LayerProblem,
    LayerResult,
    corrected_gram,
    correction_option,
    register_layer_method,
    result_counts,
)
from .optima import layer_error, layer_quadratic


@dataclasses.dataclass(frozen=True)
class L0AdmmOptions:
    correction: float = correction_option("as fista's")
    iterations: int = option(30, "ADMM iterations (penalty rho0 * growth^k)", low=1)
    rho0: float = option(
        0.03, "first penalty, relative to one input's energy", low=0.0, low_open=True
    )
    growth: float = option(1.2, "penalty growth per iteration", low=1.0)
    tol: float = option(
        1e-3, "a row stops once its support is stable and ||V - Z|| <= tol ||Z||", low=0.0
    )
    refit_iters: int = option(30, "masked CG steps that refit the final support", low=0)
    refit_tol: float = option(1e-6, "CG relative residual of the refit", low=0.0, low_open=True)


@register_layer_method(
    "l0-admm",
    options=L0AdmmOptions,
    intra_block=True,
    summary="ADMM on the l0-constrained reconstruction (one eigendecomposition per layer)",
)
def l0_admm_method(problem: LayerProblem, pattern: Pattern, options: L0AdmmOptions) -> LayerResult:
    """Prune one linear by ``solvers.l0_admm`` from the dense weights.

    ``info``: ``error`` (``1/2 ||W Xp - W0 Xt||^2`` per token, up to a constant),
    ``iterations`` (ADMM iterations run), ``settled`` (fraction of rows whose support settled
    before the cap), ``support_changes`` (entries moved by the last iteration),
    ``refit_kkt`` (the refit's largest residual), ``result`` (rows per outcome).
    """
    check_pattern_fits(pattern, problem.weight.shape)
    if num_pruned(pattern, problem.weight.shape) == 0:
        return LayerResult(problem.weight, {"nothing_pruned": True})
    o = options
    target = problem._replace(
        cross_gram=corrected_gram(problem.gram, problem.cross_gram, o.correction)
    )
    H, C, _ = layer_quadratic(target)
    W, info = l0_admm(
        H,
        C,
        pattern,
        W0=problem.weight.astype(jnp.float32),
        maxiter=o.iterations,
        rho0=o.rho0,
        growth=o.growth,
        tol=o.tol,
        refit_maxiter=o.refit_iters,
        refit_tol=o.refit_tol,
    )
    stats = {
        "error": float(layer_error(W, H, C)),
        "iterations": int(info.iterations),
        "settled": float(jnp.mean(info.num_steps < o.iterations)),
        "support_changes": int(jnp.sum(info.support_changes)),
        "refit_kkt": float(jnp.max(info.refit.kkt)),
        "result": result_counts(info.result),
    }
    return LayerResult(W.astype(problem.weight.dtype), stats)
