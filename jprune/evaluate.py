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

from jprune import walk
from jprune.blocks import as_blocks
from jprune.errors import JpruneError


class Perplexity(NamedTuple):
    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int


# Logits of at most this many bytes (float32) exist at once: the head runs on token chunks.
LOGITS_CHUNK_BYTES = 1 << 26


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, targets: jax.Array):
    """Next-token NLL of (tokens, hidden) last-block outputs, float32."""
    logits = nnx.merge(graphdef, state).head(x)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def evaluation_bytes(spec, windows_shape) -> int:
    """What evaluating (count, seqlen) windows holds besides one block's weights: the
    activations of every window (float32, and the next block's while it runs) and two
    chunks of logits (the chunk and its exponentials)."""
    count, seqlen = windows_shape
    return 2 * count * seqlen * spec.hidden_size * 4 + 2 * LOGITS_CHUNK_BYTES


def _padded(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of ``batch_size`` windows; the last is padded with copies of a real window so
    one compiled function serves every batch (the copies' results are discarded)."""
    batches = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), axis=0)])
        batches.append(batch)
    return batches


def _summed_nll(shell, x: np.ndarray, ids: np.ndarray, chunk: int) -> float:
    """Summed next-token NLL of a batch from its last-block outputs, ``chunk`` tokens a call."""
    hidden = x[:, :-1].reshape(-1, x.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    count = hidden.shape[0]
    extra = -count % chunk
    hidden = np.concatenate([hidden, np.zeros((extra, hidden.shape[1]), hidden.dtype)])
    targets = np.concatenate([targets, np.zeros(extra, targets.dtype)])
    graphdef, state = nnx.split(shell)
    total = 0.0
    for start in range(0, count, chunk):
        nll = _token_nll(
            graphdef, state, hidden[start : start + chunk], targets[start : start + chunk]
        )
        real = min(chunk, count - start)
        total += float(np.asarray(nll, dtype=np.float64)[:real].sum())
    return total


def perplexity(
    model,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on (count, seqlen) token windows.

    ``model``: a loaded ``CausalLM``, a ``converters.hf.Checkpoint`` (read a block at a time),
    or a ``blocks.ModelBlocks``. The model is run block by block over all windows, as the
    reference implementations do for big models: only one block's weights and the (count,
    seqlen, hidden) activations (host memory) exist at once, and the head's logits are formed
    ``LOGITS_CHUNK_BYTES`` at a time. Windows go ``batch_size`` at a time through each block.
    ``progress(n)`` is called with the number of blocks done after each block.
    """
    blocks = as_blocks(model)
    spec = blocks.spec
    count, seqlen = windows.shape
    if seqlen > spec.max_position_embeddings:
        raise JpruneError(
            f"seqlen {seqlen} exceeds the model's max_position_embeddings {spec.max_position_embeddings}"
        )
    if batch_size < 1:
        raise JpruneError(f"batch size must be positive, got {batch_size}")
    batch_size = min(batch_size, count)

    def on_block(index: int) -> None:
        if progress is not None:
            progress(1)

    ids = _padded(np.asarray(windows), batch_size)
    # Activations of every window live in host memory; one batch at a time is on the device.
    x = walk.embed(blocks.shell, np.concatenate(ids), batch_size, walk.Placement(offload=True))
    x = walk.walk(blocks, x, lambda index, weights, x: walk.outputs(weights, x), on_block)
    vocab = spec.vocab_size
    chunk = max(1, min(LOGITS_CHUNK_BYTES // (4 * vocab), batch_size * (seqlen - 1)))
    total = 0.0
    for number, (batch_ids, batch_x) in enumerate(zip(ids, x.batches, strict=True)):
        real = min(batch_size, count - number * batch_size)
        total += _summed_nll(blocks.shell, batch_x[:real], batch_ids[:real], chunk)
    tokens = count * (seqlen - 1)
    mean = total / tokens
    return Perplexity(math.exp(mean), mean, tokens, count, seqlen)
