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


def per_row(x: jax.Array | float, m: int, dtype: jnp.dtype) -> jax.Array:
    """Broadcast a scalar or (m,) knob such as ``lam`` to one value per row."""
    return jnp.broadcast_to(jnp.asarray(x, dtype), (m,))
