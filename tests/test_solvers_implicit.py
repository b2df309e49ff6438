"""Implicit gradients of fista / box_qp solutions match central finite differences (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_solvers_reference import make_problem

from jprune.solvers import box_qp, fista, lasso_admm

M, D = 3, 8


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _data(seed):
    _, _, H, C = make_problem(M, D, cond="well", seed=seed)
    rng = np.random.default_rng(seed + 7)
    R = rng.standard_normal((M, D))
    dH = rng.standard_normal((D, D))
    return H, C, R, dH + dH.T, rng.standard_normal((M, D))


def _check(loss, args, directions, eps=1e-6):
    grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    for i, (g, v) in enumerate(zip(grads, directions, strict=True)):
        if v is None:
            continue
        plus = list(args)
        minus = list(args)
        plus[i] = args[i] + eps * v
        minus[i] = args[i] - eps * v
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(g * v)), float(fd), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solve", [fista, lasso_admm], ids=["fista", "admm"])
def test_lasso_gradients_match_finite_differences(x64, solve):
    H, C, R, dH, dC = _data(0)
    lam = jnp.asarray([0.05, 0.1, 0.2]) * float(np.abs(C).max())

    def loss(H, C, lam):
        W, _ = solve(H, C, lam, maxiter=100_000, tol=1e-13)
        return jnp.sum(W * R)

    args = (jnp.asarray(H), jnp.asarray(C), lam)
    assert 0 < int((fista(*args, maxiter=100_000)[0] != 0).sum()) < M * D  # support is partial
    _check(loss, args, (jnp.asarray(dH), jnp.asarray(dC), jnp.asarray([0.3, -0.5, 1.0])))


def test_fista_scalar_lam_gradient(x64):
    H, C, R, _, _ = _data(1)

    def loss(lam):
        W, _ = fista(jnp.asarray(H), jnp.asarray(C), lam, maxiter=100_000, tol=1e-13)
        return jnp.sum(W * R)

    _check(loss, (jnp.asarray(0.1 * float(np.abs(C).max())),), (jnp.asarray(1.0),))


@pytest.mark.parametrize("method", ["apg", "cg"])
def test_box_qp_gradients_match_finite_differences(x64, method):
    H, C, R, dH, dC = _data(2)
    rng = np.random.default_rng(3)
    if method == "cg":
        keep = rng.random((M, D)) < 0.5
        lower = jnp.asarray(np.where(keep, -np.inf, 0.1 * rng.standard_normal((M, D))))
        upper = jnp.where(keep, jnp.inf, lower)
    else:
        lower = jnp.asarray(-rng.uniform(0.05, 0.4, (M, D)))
        upper = jnp.asarray(rng.uniform(0.05, 0.4, (M, D)))

    def loss(H, C, lower, upper):
        W, _ = box_qp(H, C, lower, upper, maxiter=200_000, tol=1e-13, method=method)
        return jnp.sum(W * R)

    args = (jnp.asarray(H), jnp.asarray(C), lower, upper)
    W, _ = box_qp(*args, maxiter=200_000, tol=1e-13, method=method)
    at_bound = (W == lower) | (W == upper)
    assert 0 < int(at_bound.sum()) < M * D
    finite = jnp.isfinite(lower)
    d_bound = jnp.where(finite, jnp.asarray(rng.standard_normal((M, D))), 0)
    if method == "cg":
        # An equality is one bound: move lower and upper together.
        grads = jax.grad(loss, argnums=(2, 3))(*args)
        fd = (
            loss(*args[:2], lower + 1e-6 * d_bound, upper + 1e-6 * d_bound)
            - loss(*args[:2], lower - 1e-6 * d_bound, upper - 1e-6 * d_bound)
        ) / 2e-6
        np.testing.assert_allclose(
            float(jnp.sum((grads[0] + grads[1]) * d_bound)), float(fd), rtol=1e-5
        )
        _check(loss, args, (jnp.asarray(dH), jnp.asarray(dC), None, None))
    else:
        _check(loss, args, (jnp.asarray(dH), jnp.asarray(dC), d_bound, -d_bound))
