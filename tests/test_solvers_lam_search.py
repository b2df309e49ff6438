"""The lam search lands exactly on the requested nonzero count after the final projection."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_solvers_reference import make_problem

from jprune.solvers import NM, Unstructured, lam_search, num_pruned

PATTERNS = [
    Unstructured(0.5),
    Unstructured(0.7),
    Unstructured(0.5, "matrix"),
    Unstructured(0.6, "matrix"),
    NM(2, 4),
    NM(4, 8),
]


@pytest.mark.parametrize("solver", ["fista", "admm"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("cond", ["well", "ill"])
def test_lam_search_hits_the_exact_count(pattern, cond, solver):
    _, _, H, C = make_problem(6, 32, cond=cond, seed=5)
    H, C = jnp.asarray(H, jnp.float32), jnp.asarray(C, jnp.float32)
    W, info = lam_search(H, C, pattern, solver=solver)
    nonzero = np.asarray(W) != 0
    assert bool(np.all(info.feasible))
    assert nonzero.size - nonzero.sum() == num_pruned(pattern, W.shape)
    lam = np.asarray(info.lam)
    if isinstance(pattern, NM):
        groups = nonzero.reshape(6, -1, pattern.m).sum(-1)
        assert np.all(groups == pattern.n)
    elif pattern.scope == "row":
        assert np.all(nonzero.sum(-1) == 32 - int(pattern.sparsity * 32))
    else:
        assert np.all(lam == lam[0])  # one lam for the whole matrix
    # The search did shrink: the chosen lam leaves no more nonzeros than it needs to by much.
    assert np.all(lam > 0)
    assert nonzero.sum() <= np.asarray(info.nnz_lasso).sum()


def test_lam_search_refuses_an_unknown_solver():
    _, _, H, C = make_problem(2, 8, cond="well", seed=5)
    with pytest.raises(ValueError, match="unknown lasso solver 'cd'"):
        lam_search(jnp.asarray(H), jnp.asarray(C), NM(2, 4), solver="cd")
