"""Contract tests over a registry of every solver: same checks for each.

eager == jit, vmap over independent problems == a Python loop, no retrace on a second call,
float32 and float64 in -> same dtype out, bfloat16 W/C with float32 accumulation, and one int32
``Result`` code per row: CONVERGED with enough iterations, MAX_ITERATIONS when capped, NONFINITE
for a nan/inf in ``H`` or ``C``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_solvers_reference import make_problem

from jprune.solvers import (
    NM,
    Result,
    Unstructured,
    box_qp,
    fista,
    l0_admm,
    lam_search,
    lasso_admm,
    result_codes,
    select_columns,
    sparse_least_squares,
    swap_columns,
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
    def wrapped(H, C, *iters):
        _, W, info = solve(H, C, *iters)
        return W, info

    return wrapped


# Each entry maps (H, C, iters) -> (W, info); knobs and masks are fixed per entry, ``iters`` is
# the iteration cap (``maxiter``; ``num_stages`` for the continuations) with a per-entry default.
SOLVERS = {
    "fista": lambda H, C, iters=60: fista(H, C, 0.05, maxiter=iters),
    "fista_masked": lambda H, C, iters=60: fista(H, C, 0.05, mask=_keep, maxiter=iters),
    "lasso_admm": lambda H, C, iters=60: lasso_admm(H, C, 0.05, maxiter=iters),
    "lasso_admm_masked": lambda H, C, iters=60: lasso_admm(H, C, 0.05, mask=_keep, maxiter=iters),
    "box_qp_apg": lambda H, C, iters=60: box_qp(H, C, -0.3, 0.3, maxiter=iters, method="apg"),
    "box_qp_cg": lambda H, C, iters=60: box_qp(H, C, *_bounds(C), maxiter=iters, method="cg"),
    "box_qp_auto": lambda H, C, iters=60: box_qp(H, C, *_bounds(C), maxiter=iters),
    "lam_search": lambda H, C, iters=30: lam_search(
        H, C, Unstructured(0.5), num_bisect=4, maxiter=iters
    ),
    "lam_search_admm": lambda H, C, iters=30: lam_search(
        H, C, Unstructured(0.5), num_bisect=4, maxiter=iters, solver="admm"
    ),
    "l0_admm": lambda H, C, iters=60: l0_admm(H, C, Unstructured(0.5), maxiter=iters),
    "l0_admm_nm": lambda H, C, iters=60: l0_admm(H, C, NM(2, 4), maxiter=iters),
    "select_columns": _drop_decision(
        lambda H, C, iters=8: select_columns(H, C, 4, num_stages=iters)
    ),
    "sparse_least_squares": _drop_decision(
        lambda H, C, iters=8: sparse_least_squares(H, C, NM(2, 4), num_stages=iters, maxiter=60)
    ),
}


def _problem(seed, dtype=jnp.float32, cond="ill"):
    _, _, H, C = make_problem(M, D, cond=cond, seed=seed)
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


def test_result_codes_nonfinite_wins():
    converged = jnp.array([True, False, True, False])
    finite = jnp.array([True, True, False, False])
    codes = result_codes(converged, finite)
    assert codes.dtype == jnp.int32
    np.testing.assert_array_equal(codes, [0, 1, 2, 2])
    assert [Result.CONVERGED, Result.MAX_ITERATIONS, Result.NONFINITE] == [0, 1, 2]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_result_is_one_int32_code_per_row(name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        _, info = SOLVERS[name](*_problem(0, dtype))
        assert info.result.dtype == jnp.int32 and info.result.shape == (M,)
        assert set(np.asarray(info.result).tolist()) <= set(Result)


@pytest.mark.parametrize("name", SOLVERS)
def test_result_converged_with_enough_iterations(name):
    _, info = SOLVERS[name](*_problem(0, cond="well"), 200)
    np.testing.assert_array_equal(info.result, Result.CONVERGED)


@pytest.mark.parametrize("name", SOLVERS)
def test_result_max_iterations_when_capped(name):
    _, info = SOLVERS[name](*_problem(0, cond="well"), 1)
    np.testing.assert_array_equal(info.result, Result.MAX_ITERATIONS)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("bad", ["nan_in_H", "inf_in_C"])
def test_result_nonfinite_on_nonfinite_input(name, bad):
    H, C = _problem(0, cond="well")
    if bad == "nan_in_H":
        H, rows = H.at[3, 5].set(jnp.nan), slice(None)  # every row's gradient meets it
    else:
        C, rows = C.at[1, 2].set(jnp.inf), 1
    W, info = SOLVERS[name](H, C)
    result = np.asarray(info.result)
    assert np.all(result[rows] == Result.NONFINITE)
    # NONFINITE marks exactly the rows whose answer or objective is not finite.
    finite = np.isfinite(np.asarray(W)).all(-1) & np.isfinite(np.asarray(info.objective))
    np.testing.assert_array_equal(result == Result.NONFINITE, ~finite)


@pytest.mark.parametrize("name", SOLVERS)
def test_result_is_traced_under_jit_and_vmap(name):
    H, C = _problem(0, cond="well")
    H, C = jnp.stack([H, H.at[3, 5].set(jnp.nan)]), jnp.stack([C, C])
    _, info = jax.jit(jax.vmap(lambda H, C: SOLVERS[name](H, C, 200)))(H, C)
    np.testing.assert_array_equal(info.result[0], Result.CONVERGED)
    np.testing.assert_array_equal(info.result[1], Result.NONFINITE)


def test_swap_result_is_local_minimum_as_a_code():
    H, C = _problem(0, cond="well")
    start = jnp.arange(D) >= 4
    for max_swaps, expected in [(0, Result.MAX_ITERATIONS), (100, Result.CONVERGED)]:
        _, info = swap_columns(H, C, start, 4, max_swaps=max_swaps)
        assert info.result.dtype == jnp.int32 and info.result.shape == ()
        assert int(info.result) == expected and bool(info.local_minimum) == (max_swaps > 0)
