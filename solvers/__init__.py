"""jprune.solvers: pure, jit-compiled, row-batched solvers for layer-wise pruning problems.

Every problem has rows ``w_i`` of ``W`` (m, d) sharing one PSD ``H`` (d, d):
``f(W) = 1/2 sum_i w_i H w_i^T - sum_i c_i . w_i``; a step for all rows is one GEMM ``W @ H``.
Every solver returns its answer with an info whose ``result`` holds :class:`Result` codes
(converged / hit the iteration cap / non-finite) as a traced int32 array.
"""

from ._admm import lasso_admm
from ._box_qp import BoxQPInfo, box_qp
from ._continuation import (
    ContinuationInfo,
    SwapInfo,
    penalty_continuation,
    project_capped_simplex,
    refit_columns,
    select_columns,
    sparse_least_squares,
    swap_columns,
)
from ._fista import LassoInfo, fista
from ._info import Result, SolverInfo, result_codes
from ._l0_admm import L0ADMMInfo, l0_admm, unit_scale
from ._lam_search import LamSearchInfo, lam_search
from ._quadratic import lipschitz
from ._sparsity import (
    NM,
    Pattern,
    Unstructured,
    check_pattern_fits,
    keep_mask,
    num_pruned,
    parse_pattern,
    project_box,
    project_nm,
    project_pattern,
    project_topk,
    prox_l1,
    row_separable,
    rows_pattern,
    topk_mask,
)

__all__ = [
    "NM",
    "BoxQPInfo",
    "L0ADMMInfo",
    "ContinuationInfo",
    "LamSearchInfo",
    "LassoInfo",
    "Result",
    "SolverInfo",
    "box_qp",
    "fista",
    "l0_admm",
    "lam_search",
    "lasso_admm",
    "lipschitz",
    "penalty_continuation",
    "project_capped_simplex",
    "refit_columns",
    "select_columns",
    "swap_columns",
    "SwapInfo",
    "sparse_least_squares",
    "Pattern",
    "Unstructured",
    "check_pattern_fits",
    "keep_mask",
    "num_pruned",
    "parse_pattern",
    "project_box",
    "project_nm",
    "project_pattern",
    "project_topk",
    "prox_l1",
    "result_codes",
    "row_separable",
    "rows_pattern",
    "topk_mask",
    "unit_scale",
]
