"""jprune.solvers against independent references: scikit-learn, SciPy, closed forms, enumeration.

Also holds the problem generator the other solver test modules import.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import lsq_linear
from sklearn.linear_model import Lasso

from jprune.solvers import (
    NM,
    Unstructured,
    box_qp,
    fista,
    keep_mask,
    l0_admm,
    lasso_admm,
    refit_columns,
    select_columns,
    sparse_least_squares,
    topk_mask,
)


def make_design(d, *, cond="well", seed=0, samples=4):
    """Design ``A`` (n, d) with ``n = samples * d``; "ill" has correlated, decaying features."""
    rng = np.random.default_rng(seed)
    n = samples * d
    Z = rng.standard_normal((n, d))
    if cond == "well":
        return Z / np.sqrt(n)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return Z @ (np.logspace(0, -2, d)[:, None] * Q) / np.sqrt(n)


def make_problem(m, d, *, cond="well", seed=0):
    """Float64 NumPy ``(A, Y, H, C)``: rows ``y_i`` of Y (m, n) fit by ``A w_i``; H = A^T A."""
    A = make_design(d, cond=cond, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    W_true = rng.standard_normal((m, d))
    Y = W_true @ A.T + 0.1 * rng.standard_normal((m, A.shape[0]))
    return A, Y, A.T @ A, Y @ A


def lasso_reference(A, Y, lam):
    """Row-wise sklearn Lasso: it minimizes ||y - Aw||^2 / (2n) + alpha ||w||_1, so alpha = lam/n."""
    n = A.shape[0]
    rows = []
    for y, l in zip(Y, np.broadcast_to(lam, (Y.shape[0],)), strict=True):
        model = Lasso(alpha=l / n, fit_intercept=False, tol=1e-14, max_iter=200_000)
        rows.append(model.fit(A, y).coef_)
    return np.array(rows)


def support_solve(H, C, keep):
    """Exact least squares of every row on its kept entries (NumPy)."""
    W = np.zeros_like(C)
    for i, k in enumerate(keep):
        W[i, k] = np.linalg.solve(H[np.ix_(k, k)], C[i, k])
    return W


def objective(W, H, C):
    return np.sum(0.5 * (W @ H) * W - C * W, axis=-1)


PRECISION = {"float64": (jnp.float64, 1e-6), "float32": (jnp.float32, 2e-3)}


def as_jax(dtype, *arrays):
    return [jnp.asarray(a, dtype) for a in arrays]


LASSO_SOLVERS = {"fista": fista, "admm": lasso_admm}


@pytest.mark.parametrize("solver", LASSO_SOLVERS)
@pytest.mark.parametrize("cond", ["well", "ill"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_lasso_solvers_match_sklearn_lasso(solver, cond, precision):
    dtype, rtol = PRECISION[precision]
    A, Y, H, C = make_problem(6, 24, cond=cond)
    lam = np.linspace(0.02, 0.2, 6) * np.abs(C).max()
    expected = lasso_reference(A, Y, lam)
    with jax.enable_x64(precision == "float64"):
        W, info = LASSO_SOLVERS[solver](*as_jax(dtype, H, C, lam), maxiter=50_000, tol=1e-9)
        assert W.dtype == dtype
        assert bool(info.converged.all()) or precision == "float32"
        W = np.asarray(W, np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(W, expected, atol=rtol * scale * (100 if cond == "ill" else 1))
    sk_obj = objective(expected, H, C) + lam * np.abs(expected).sum(-1)
    np.testing.assert_allclose(np.asarray(info.objective), sk_obj, rtol=10 * rtol)
    # Certificates near zero at the solution, relative to the size of the linear term.
    c_scale = np.abs(C).max()
    assert np.all(np.abs(np.asarray(info.gap)) <= 10 * rtol * c_scale * np.abs(W).sum(-1).max())
    assert np.all(np.asarray(info.kkt) <= 10 * rtol * c_scale)


@pytest.mark.parametrize("solver", LASSO_SOLVERS)
def test_lasso_mask_matches_sklearn_on_the_kept_columns(solver):
    A, Y, H, C = make_problem(4, 16, cond="ill", seed=3)
    rng = np.random.default_rng(7)
    mask = rng.random(C.shape) < 0.6
    lam = 0.05 * np.abs(C).max()
    expected = np.zeros_like(C)
    for i, keep in enumerate(mask):
        expected[i, keep] = lasso_reference(A[:, keep], Y[i : i + 1], lam)[0]
    with jax.enable_x64(True):
        W, info = LASSO_SOLVERS[solver](
            *as_jax(jnp.float64, H, C), lam, mask=mask, maxiter=50_000, tol=1e-10
        )
        W, kkt = np.asarray(W), np.asarray(info.kkt)
    np.testing.assert_allclose(W, expected, atol=1e-6)
    assert np.all(W[~mask] == 0)
    assert kkt.max() < 1e-7


@pytest.mark.parametrize("solver", LASSO_SOLVERS)
def test_lasso_closed_form_on_diagonal_H(solver):
    """Diagonal H decouples every entry: w_ij = soft(c_ij, lam_i) / H_jj."""
    rng = np.random.default_rng(0)
    h = rng.uniform(0.5, 3.0, 12)
    C = rng.standard_normal((5, 12))
    lam = rng.uniform(0.1, 1.0, 5)
    expected = np.sign(C) * np.maximum(np.abs(C) - lam[:, None], 0) / h
    W, info = LASSO_SOLVERS[solver](
        jnp.diag(jnp.asarray(h, jnp.float32)), jnp.asarray(C, jnp.float32), lam, tol=1e-7
    )
    np.testing.assert_allclose(np.asarray(W), expected, atol=1e-5)
    assert bool(info.converged.all())


@pytest.mark.parametrize("method", ["auto", "apg"])
@pytest.mark.parametrize("cond", ["well", "ill"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_box_qp_matches_scipy_lsq_linear(method, cond, precision):
    dtype, rtol = PRECISION[precision]
    A, Y, H, C = make_problem(5, 20, cond=cond, seed=1)
    rng = np.random.default_rng(2)
    lower = -rng.uniform(0.05, 0.5, C.shape)
    upper = rng.uniform(0.05, 0.5, C.shape)
    expected = np.array(
        [
            lsq_linear(A, y, bounds=(lo, up), tol=1e-14).x
            for y, lo, up in zip(Y, lower, upper, strict=True)
        ]
    )
    with jax.enable_x64(precision == "float64"):
        W, info = box_qp(
            *as_jax(dtype, H, C, lower, upper), maxiter=100_000, tol=1e-10, method=method
        )
        W = np.asarray(W, np.float64)
    np.testing.assert_allclose(W, expected, atol=rtol * (100 if cond == "ill" else 1))
    assert np.all((W >= lower - 1e-7) & (W <= upper + 1e-7))
    assert np.all(np.asarray(info.kkt) <= 10 * rtol * np.abs(C).max())


@pytest.mark.parametrize("method", ["auto", "cg", "apg"])
@pytest.mark.parametrize("cond", ["well", "ill"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_box_qp_fixed_mask_is_the_exact_support_solve(method, cond, precision):
    """The OPTIMA case: pruned entries fixed at 0 (lower == upper), kept entries free."""
    dtype, rtol = PRECISION[precision]
    _, _, H, C = make_problem(6, 32, cond=cond, seed=4)
    keep = np.random.default_rng(5).random(C.shape) < 0.5
    expected = support_solve(H, C, keep)
    bound = np.where(keep, np.inf, 0.0)
    with jax.enable_x64(precision == "float64"):
        W, info = box_qp(
            *as_jax(dtype, H, C, -bound, bound), maxiter=200_000, tol=1e-12, method=method
        )
        W = np.asarray(W, np.float64)
    scale = np.abs(expected).max()
    ill = cond == "ill" and precision == "float32"
    np.testing.assert_allclose(W, expected, atol=rtol * scale * (1000 if ill else 10))
    assert np.all(W[~keep] == 0)
    np.testing.assert_allclose(
        np.asarray(info.objective), objective(expected, H, C), rtol=10 * rtol
    )


def _column_problem(seed, d=10, m=4):
    A = make_design(d, cond="ill", seed=seed)
    W0 = np.random.default_rng(seed).standard_normal((m, d))
    H = A.T @ A
    return H, W0 @ H, W0


def test_select_columns_against_exhaustive_search():
    """Exactly k columns pruned, exact refit, and an error between the enumerated optimum and
    the one-shot energy score (FASP/Wanda-style ``H_jj ||W0_:j||^2`` plus the same refit):
    the continuation alone, and the continuation finished by single swaps (the default)."""
    k = 4
    alone, ours, baseline = [], [], []
    with jax.enable_x64(True):
        for seed in range(6):
            H, C, W0 = _column_problem(seed)
            base = objective(W0, H, C).sum()

            def error(keep, H=H, C=C, base=base):
                refit = refit_columns(jnp.asarray(H), jnp.asarray(C), jnp.asarray(keep))
                return objective(np.asarray(refit), H, C).sum() - base

            best = min(
                error(~np.isin(np.arange(H.shape[0]), p))
                for p in itertools.combinations(range(H.shape[0]), k)
            )
            for swaps, record in ((0, alone), (1000, ours)):
                pruned, W, info = select_columns(jnp.asarray(H), jnp.asarray(C), k, swaps=swaps)
                pruned, W = np.asarray(pruned), np.asarray(W)
                assert pruned.sum() == k and np.all(W[:, pruned] == 0) and bool(info.settled)
                np.testing.assert_allclose(
                    W, support_solve(H, C, np.tile(~pruned, (4, 1))), atol=1e-9
                )
                record.append((objective(W, H, C).sum() - base) / best)
            assert bool(info.local_minimum) and int(info.swaps) >= 0
            score = np.diag(H) * np.sum(W0**2, axis=0)
            baseline.append(error(~np.isin(np.arange(H.shape[0]), np.argsort(score)[:k])) / best)
    alone, ours, baseline = np.array(alone), np.array(ours), np.array(baseline)
    assert np.all(alone >= 1 - 1e-9) and np.all(ours >= 1 - 1e-9)
    # How close the continuation alone gets, recorded (seeds 0-5): [1, 2.16, 1, 1.19, 4.19,
    # 1.02]; the one-shot energy score: [1, 2.16, 2.16, 1.19, 2.22, 1.74]. The swaps reach the
    # enumerated optimum on all six. Guard: optimum on >= 5, never worse than alone.
    assert np.sum(alone < 1 + 1e-9) >= 2 and alone.max() < 5, alone
    assert np.sum(ours < 1 + 1e-9) >= 5 and np.all(ours <= alone + 1e-9), (ours, alone)
    assert ours.mean() < baseline.mean(), (ours, baseline)


def _enumerated_optimum(H, C, pattern):
    """Per row, the least objective over every support of 4 of the 8 inputs the pattern allows
    (2:4: two in each half)."""
    supports = [
        np.isin(np.arange(8), s)
        for s in itertools.combinations(range(8), 4)
        if isinstance(pattern, Unstructured) or (sum(j < 4 for j in s) == 2)
    ]
    rows = C.shape[0]
    return np.min(
        [objective(support_solve(H, C, np.tile(s, (rows, 1))), H, C) for s in supports], axis=0
    )


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_sparse_least_squares_against_exhaustive_search(pattern):
    """Exact counts, exact refit, and an error between the row optimum and Wanda + refit."""
    ours, baseline = [], []
    with jax.enable_x64(True):
        for seed in range(4):
            H, C, W0 = _column_problem(seed, d=8, m=3)
            base = objective(W0, H, C)
            best = _enumerated_optimum(H, C, pattern)
            mask, W, info = sparse_least_squares(jnp.asarray(H), jnp.asarray(C), pattern)
            mask, W = np.asarray(mask), np.asarray(W)
            assert np.all(mask.sum(-1) == 4) and np.all(W[~mask] == 0)
            np.testing.assert_allclose(W, support_solve(H, C, mask), atol=1e-8)
            ours.append((objective(W, H, C) - base) / (best - base))
            wanda = np.asarray(keep_mask(jnp.asarray(np.abs(W0) * np.sqrt(np.diag(H))), pattern))
            wanda_W = support_solve(H, C, wanda)
            baseline.append((objective(wanda_W, H, C) - base) / (best - base))
    ours, baseline = np.concatenate(ours), np.concatenate(baseline)
    assert np.all(ours >= 1 - 1e-9)
    # Penalty decomposition is local; on these correlated problems (built so that the
    # one-shot score misleads) it lands within a few x of the row optimum. The refit of the
    # score's start competes and the pursuit moves the better support, so no row is worse than
    # Wanda + refit; recorded (unstructured, 2:4): the pursuit takes one 2:4 row from 10.96x to
    # 2.17x the optimal error, the schedule one unstructured row from 1.62x to 1.42x.
    assert np.all(ours <= baseline + 1e-9), (ours, baseline)
    assert ours.max() < 15 and ours.mean() < baseline.mean(), (ours, baseline)


def _reference_keep(scores, k):
    """NumPy: per row, the ``k`` largest by a stable descending sort (ties: lower index)."""
    keep = np.zeros(scores.shape, bool)
    counts = np.broadcast_to(k, scores.shape[:1])
    for i, (row, count) in enumerate(zip(scores, counts, strict=True)):
        order = np.argsort(-row.astype(np.float64), kind="stable")
        keep[i, order[:count]] = True
    return keep


def test_projections_match_a_stable_sort_with_ties_signed_zeros_and_infinities():
    """``topk_mask`` / ``keep_mask`` select exactly what a stable descending sort does."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((6, 32)) * 2) / 2  # many exact ties
    scores[0, :12] = 0.0
    scores[1, ::3] = -0.0
    scores[2, :4] = [np.inf, -np.inf, np.inf, 0.0]
    scores = scores.astype(np.float32)
    for k in (0, 1, 7, 16, 31, 32):
        got = np.asarray(jax.jit(topk_mask, static_argnums=1)(jnp.asarray(scores), k))
        np.testing.assert_array_equal(got, _reference_keep(scores, k))
    per_row = rng.integers(0, 33, (6, 1))
    got = np.asarray(jax.jit(topk_mask)(jnp.asarray(scores), jnp.asarray(per_row)))
    np.testing.assert_array_equal(got, _reference_keep(scores, per_row[:, 0]))
    for n, m in ((2, 4), (3, 8), (5, 32)):  # pairwise ranking, and ``topk_mask`` for m > 16
        got = np.asarray(keep_mask(jnp.asarray(scores), NM(n, m)))
        groups = scores.reshape(-1, m)
        np.testing.assert_array_equal(got, _reference_keep(groups, n).reshape(scores.shape))
    got = np.asarray(keep_mask(jnp.asarray(scores), Unstructured(0.6, "matrix")))
    flat = scores.reshape(1, -1)
    expected = _reference_keep(flat, flat.size - int(0.6 * flat.size)).reshape(scores.shape)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4), Unstructured(0.5, "matrix")])
def test_l0_admm_diagonal_gram_closed_form(pattern):
    """A diagonal ``H`` decouples the inputs: the optimum keeps the entries of largest
    ``c_j^2 / H_jj`` (each one's error reduction) at ``c_j / H_jj``."""
    rng = np.random.default_rng(3)
    d, m = 12, 5
    h = rng.uniform(0.2, 5.0, d)
    C = rng.standard_normal((m, d))
    with jax.enable_x64(True):
        W, info = l0_admm(jnp.asarray(np.diag(h)), jnp.asarray(C), pattern, maxiter=200)
    keep = np.asarray(keep_mask(jnp.asarray(C**2 / h), pattern))
    np.testing.assert_allclose(np.asarray(W), np.where(keep, C / h, 0.0), atol=1e-10)
    assert np.all(np.asarray(info.result) == 0)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_l0_admm_against_exhaustive_search(pattern):
    """Exact counts, the exact least squares on the kept support, and an error between the
    enumerated row optimum and Wanda's support with the same refit."""
    ours, baseline = [], []
    with jax.enable_x64(True):
        for seed in range(4):
            H, C, W0 = _column_problem(seed, d=8, m=3)
            base = objective(W0, H, C)
            best = _enumerated_optimum(H, C, pattern)
            W, info = l0_admm(
                jnp.asarray(H), jnp.asarray(C), pattern, W0=jnp.asarray(W0), refit_maxiter=50
            )
            W = np.asarray(W)
            mask = W != 0
            assert np.all(mask.sum(-1) == 4)
            np.testing.assert_allclose(W, support_solve(H, C, mask), atol=1e-8)
            assert float(np.max(info.refit.kkt)) < 1e-8
            ours.append((objective(W, H, C) - base) / (best - base))
            wanda = np.asarray(keep_mask(jnp.asarray(np.abs(W0) * np.sqrt(np.diag(H))), pattern))
            baseline.append((objective(support_solve(H, C, wanda), H, C) - base) / (best - base))
    ours, baseline = np.concatenate(ours), np.concatenate(baseline)
    assert np.all(ours >= 1 - 1e-9)
    # ADMM on l0 is local; on these problems (built so that the one-shot score misleads),
    # recorded ratios to the row optimum, unstructured: mean 3.2 (Wanda + refit 4.3), 2:4:
    # mean 2.9 (Wanda 4.2), worst row 10.2 on both (Wanda 6.5 on that row: ADMM does not
    # keep the start's support when it is better, unlike fista, which compares them).
    assert ours.max() < 15 and ours.mean() < baseline.mean(), (ours, baseline)
