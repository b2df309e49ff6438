"""Contract tests over a registry of every solver: same checks for each.

eager == jit, vmap over independent problems == a Python loop, no retrace on a second call,
float32 and float64 in -> same dtype out, bfloat16 W/C with float32 accumulation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_solvers_reference import make_problem

from jprune.solvers import (
    NM,
    Unstructured,
    box_qp,
    fista,
    lam_search,
    lasso_admm,
    select_columns,
    sparse_least_squares,
)

M, D = 4, 16
_keep = np.random.default_rng(0).random((M, D)) < 0.5


def _bounds(C):
    # Bounds as arrays of the problem's dtype: a NumPy float64 constant would be cast
    # differently inside and outside jax.enable_x64.
    bound = jnp.where(_keep, jnp.inf, 0.0).astype(jnp.promote_types(C.dtype, jnp.float32))
    return -bound, bound


def _drop_decision(solve):
    @functools.wraps(solve)
    def wrapped(H, C):
        _, W, info = solve(H, C)
        return W, info

    return wrapped


# Each entry maps (H, C) -> (W, info); knobs and masks are fixed per entry.
SOLVERS = {
    "fista": lambda H, C: fista(H, C, 0.05, maxiter=60),
    "fista_masked": lambda H, C: fista(H, C, 0.05, mask=_keep, maxiter=60),
    "lasso_admm": lambda H, C: lasso_admm(H, C, 0.05, maxiter=60),
    "lasso_admm_masked": lambda H, C: lasso_admm(H, C, 0.05, mask=_keep, maxiter=60),
    "box_qp_apg": lambda H, C: box_qp(H, C, -0.3, 0.3, maxiter=60, method="apg"),
    "box_qp_cg": lambda H, C: box_qp(H, C, *_bounds(C), maxiter=60, method="cg"),
    "box_qp_auto": lambda H, C: box_qp(H, C, *_bounds(C), maxiter=60),
    "lam_search": lambda H, C: lam_search(H, C, Unstructured(0.5), num_bisect=4, maxiter=30),
    "lam_search_admm": lambda H, C: lam_search(
        H, C, Unstructured(0.5), num_bisect=4, maxiter=30, solver="admm"
    ),
    "select_columns": _drop_decision(lambda H, C: select_columns(H, C, 4, num_stages=8)),
    "sparse_least_squares": _drop_decision(
        lambda H, C: sparse_least_squares(H, C, NM(2, 4), num_stages=8, maxiter=60)
    ),
}


def _problem(seed, dtype=jnp.float32):
    _, _, H, C = make_problem(M, D, cond="ill", seed=seed)
    return jnp.asarray(H, dtype), jnp.asarray(C, dtype)


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol)


@pytest.mark.parametrize("name", SOLVERS)
def test_eager_equals_jit(name):
    solve = SOLVERS[name]
    H, C = _problem(0)
    with jax.disable_jit():
        W_eager, _ = solve(H, C)
    W_jit, info = jax.jit(solve)(H, C)
    _close(W_eager, W_jit, 1e-4 * float(jnp.abs(W_jit).max()))
    assert np.all(np.isfinite(np.asarray(info.objective)))


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_equals_loop(name):
    solve = SOLVERS[name]
    problems = [_problem(seed) for seed in range(3)]
    H = jnp.stack([p[0] for p in problems])
    C = jnp.stack([p[1] for p in problems])
    W_batch, info_batch = jax.vmap(solve)(H, C)
    for i, (Hi, Ci) in enumerate(problems):
        W, info = solve(Hi, Ci)
        _close(W_batch[i], W, 1e-4 * float(jnp.abs(W).max()))
        _close(info_batch.objective[i], info.objective, 1e-4 * float(jnp.abs(info.objective).max()))


@pytest.mark.parametrize("name", SOLVERS)
def test_second_call_does_not_retrace(name):
    solve = SOLVERS[name]
    traces = []

    @jax.jit
    def counted(H, C):
        traces.append(None)
        return solve(H, C)

    for seed in range(2):
        jax.block_until_ready(counted(*_problem(seed)))
    assert len(traces) == 1


@pytest.mark.parametrize("name", SOLVERS)
def test_float32_and_float64_agree_and_keep_dtype(name):
    solve = SOLVERS[name]
    W32, info32 = solve(*_problem(1, jnp.float32))
    with jax.enable_x64(True):
        W64, info64 = solve(*_problem(1, jnp.float64))
        assert W64.dtype == jnp.float64 and info64.objective.dtype == jnp.float64
        W64 = np.asarray(W64)
    assert W32.dtype == jnp.float32 and info32.objective.dtype == jnp.float32
    mismatch = np.mean(np.abs(np.asarray(W32) - W64) > 1e-2 * np.abs(W64).max())
    assert mismatch < 0.1  # identical up to rounding, except a rare flipped pruning decision


@pytest.mark.parametrize("name", SOLVERS)
def test_bfloat16_weights_accumulate_in_float32(name):
    solve = SOLVERS[name]
    H, C = _problem(2)
    W_bf16, info = solve(H, C.astype(jnp.bfloat16))
    assert W_bf16.dtype == jnp.bfloat16
    assert info.objective.dtype == jnp.float32
    W_ref, _ = solve(H, C.astype(jnp.bfloat16).astype(jnp.float32))
    # Same float32 computation, only the output is rounded to bfloat16.
    _close(W_bf16, W_ref.astype(jnp.bfloat16), 1e-6)
