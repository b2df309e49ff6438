"""Perplexity: exp of the mean next-token negative log-likelihood over all evaluation windows."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jprune.errors import JpruneError


class Perplexity(NamedTuple):
    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    """Summed next-token NLL of each window, float32."""
    logits = nnx.merge(graphdef, state)(ids)[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = ids[:, 1:]
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -picked.sum(axis=-1)


def perplexity(
    model,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on (count, seqlen) token windows.

    Windows are evaluated ``batch_size`` at a time; the last partial batch is padded with
    copies of a real window (results discarded) so one compiled function serves every batch.
    ``progress(n)`` is called with the number of windows done after each batch.
    """
    count, seqlen = windows.shape
    if seqlen > model.spec.max_position_embeddings:
        raise JpruneError(
            f"seqlen {seqlen} exceeds the model's max_position_embeddings {model.spec.max_position_embeddings}"
        )
    if batch_size < 1:
        raise JpruneError(f"batch size must be positive, got {batch_size}")
    batch_size = min(batch_size, count)
    graphdef, state = nnx.split(model)
    total = 0.0
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        nll = np.asarray(_window_nll(graphdef, state, jnp.asarray(batch)), dtype=np.float64)
        total += float(nll[:real].sum())
        if progress is not None:
            progress(real)
    tokens = count * (seqlen - 1)
    mean = total / tokens
    return Perplexity(math.exp(mean), mean, tokens, count, seqlen)
