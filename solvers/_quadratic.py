"""The shared row-separable quadratic ``f(W) = 1/2 sum_i w_i H w_i^T - sum_i c_i . w_i``.

``H`` is symmetric PSD and shared by all rows, so the gradient of every row is one GEMM
``W @ H - C``. Computation runs in float32, or float64 when an input is float64, whatever the
storage dtype of ``W`` / ``C`` (bfloat16 weights accumulate in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float32, promoted to float64 when any floating input is float64 (and x64 is on)."""
    dtypes = [a.dtype for a in arrays if a is not None and jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.result_type(jnp.float32, *dtypes)


def gradient(W: jax.Array, H: jax.Array, C: jax.Array) -> jax.Array:
    return W @ H - C


def row_objective(W: jax.Array, H: jax.Array, C: jax.Array) -> jax.Array:
    """``1/2 w_i H w_i^T - c_i . w_i`` for every row."""
    return jnp.sum(W * (0.5 * (W @ H) - C), axis=-1)


def lipschitz(H: jax.Array, *, num_iters: int = 100) -> jax.Array:
    """Largest eigenvalue of the PSD ``H`` by power iteration, rounded up by 1%.

    Power iteration approaches ``lambda_max`` from below; the margin keeps the 1/L step of
    accelerated methods stable. It costs ``num_iters`` matvecs, negligible next to one
    ``W @ H`` GEMM, where a dense eigensolver would cost O(d^3).
    """
    H = jax.lax.stop_gradient(H)
    v = jax.random.normal(jax.random.key(0), (H.shape[-1],), H.dtype)

    def power_step(_, v):
        u = H @ v
        return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(H.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, power_step, v / jnp.linalg.norm(v))
    top = v @ (H @ v)
    return jnp.maximum(1.01 * top, jnp.finfo(H.dtype).tiny)


def extreme_eigenvalues(H: jax.Array, *, num_iters: int = 40) -> tuple[jax.Array, jax.Array]:
    """Estimates of the smallest and largest eigenvalues of the PSD ``H`` by Lanczos.

    ``num_iters`` steps with full reorthogonalization (twice, for float32) build a small
    tridiagonal matrix whose extreme eigenvalues approach ``H``'s from inside the spectrum:
    the largest within a fraction of a percent after a few dozen steps, the smallest to the
    right order of magnitude, which is what a penalty parameter needs. Cost: ``num_iters``
    matvecs and O(num_iters^2 d), far below one ``W @ H`` GEMM.
    """
    H = jax.lax.stop_gradient(H)
    d = H.shape[-1]
    k = min(num_iters, d)
    start = jax.random.normal(jax.random.key(0), (d,), H.dtype)
    tiny = jnp.finfo(H.dtype).tiny

    def lanczos_step(j, carry):
        Q, alpha, beta, q = carry
        Q = Q.at[j].set(q)
        w = H @ q
        alpha = alpha.at[j].set(q @ w)
        for _ in range(2):  # rows of Q past j are still zero, so they project out nothing
            w = w - Q.T @ (Q @ w)
        norm = jnp.linalg.norm(w)
        beta = beta.at[j].set(norm)
        return Q, alpha, beta, w / jnp.maximum(norm, tiny)

    init = (jnp.zeros((k, d), H.dtype), jnp.zeros(k, H.dtype), jnp.zeros(k, H.dtype))
    _, alpha, beta, _ = jax.lax.fori_loop(
        0, k, lanczos_step, (*init, start / jnp.linalg.norm(start))
    )
    tridiagonal = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    ritz = jnp.linalg.eigvalsh(tridiagonal)
    return jnp.maximum(ritz[0], 0.0), ritz[-1]


def per_row(x: jax.Array | float, m: int, dtype: jnp.dtype) -> jax.Array:
    """Broadcast a scalar or (m,) knob such as ``lam`` to one value per row."""
    return jnp.broadcast_to(jnp.asarray(x, dtype), (m,))
