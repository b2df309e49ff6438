"""Perplexity: exp of the mean next-token negative log-likelihood over all evaluation windows.

The windows go through the model block by block in groups whose activations fit a byte budget
(``group_batches``), so the memory an evaluation holds (``evaluation_bytes``) does not grow
with the text; each group reads the blocks again.
"""

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


# Window activations an evaluation holds at once by default (a group's block inputs and
# outputs, float32): each further group reads every block's weights again. The CLI's
# --eval-memory default (config.EvaluationConfig.memory_mib) is the same, in MiB.
ACTIVATION_BYTES = 1 << 30


def group_batches(spec, windows_shape, batch_size: int, activation_bytes: int) -> int:
    """Batches of windows that go through the blocks together: as many as fit
    ``activation_bytes`` (their activations twice, float32: a block's inputs and outputs), at
    least one, at most all."""
    count, seqlen = windows_shape
    batch_size = min(batch_size, count)
    per_batch = 2 * batch_size * seqlen * spec.hidden_size * 4
    return max(1, min(-(-count // batch_size), activation_bytes // per_batch))


def evaluation_bytes(
    spec, windows_shape, batch_size: int = 8, activation_bytes: int = ACTIVATION_BYTES
) -> int:
    """What evaluating (count, seqlen) windows holds besides one block's weights: the
    activations of one group of windows (``group_batches``; float32, and the next block's while
    it runs) and two chunks of logits (the chunk and its exponentials)."""
    count, seqlen = windows_shape
    batch_size = min(batch_size, count)
    windows = group_batches(spec, windows_shape, batch_size, activation_bytes) * batch_size
    return 2 * windows * seqlen * spec.hidden_size * 4 + 2 * LOGITS_CHUNK_BYTES


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


def _last_block_outputs(blocks, ids: np.ndarray, batch_size: int, on_block) -> walk.Stream:
    """The last block's outputs for (windows, seqlen) ids, kept in host memory. The embedded
    stream goes to the walk unnamed: no reference to it outlives block 0, so a block's inputs
    and its outputs are the only activations alive."""
    return walk.walk(
        blocks,
        walk.embed(blocks.shell, ids, batch_size, walk.Placement(offload=True)),
        lambda index, weights, x: walk.outputs(weights, x),
        on_block,
    )


def perplexity(
    model,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    activation_bytes: int = ACTIVATION_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on (count, seqlen) token windows.

    ``model``: a loaded ``CausalLM``, a ``converters.hf.Checkpoint`` (read a block at a time),
    or a ``blocks.ModelBlocks``. The model is run block by block, as the reference
    implementations do for big models, over groups of windows: each group's activations
    (float32, host memory) go through every block before the next group starts, so only one
    block's weights, one group's activations (at most ``activation_bytes`` of them, but at
    least one batch: ``evaluation_bytes``) and ``LOGITS_CHUNK_BYTES`` of the head's logits
    exist at once. Every group reads the blocks again (from disk for a ``Checkpoint``).
    Windows go ``batch_size`` at a time through each block, and the NLL is summed batch by
    batch in window order, so the result does not depend on the grouping.
    ``progress(done, total)`` is called after each block of each group with the number of
    block passes done and to do.
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
    if activation_bytes < 1:
        raise JpruneError(f"the activation budget must be positive, got {activation_bytes} bytes")
    batch_size = min(batch_size, count)
    ids = _padded(np.asarray(windows), batch_size)
    per_group = group_batches(spec, windows.shape, batch_size, activation_bytes)
    starts = range(0, len(ids), per_group)
    passes = len(starts) * spec.num_layers
    done = 0

    def on_block(index: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, passes)

    vocab = spec.vocab_size
    chunk = max(1, min(LOGITS_CHUNK_BYTES // (4 * vocab), batch_size * (seqlen - 1)))
    total = 0.0
    for start in starts:
        group = ids[start : start + per_group]
        x = _last_block_outputs(blocks, np.concatenate(group), batch_size, on_block)
        for number, (batch_ids, batch_x) in enumerate(zip(group, x.batches, strict=True), start):
            real = min(batch_size, count - number * batch_size)
            total += _summed_nll(blocks.shell, batch_x[:real], batch_ids[:real], chunk)
        del x
    tokens = count * (seqlen - 1)
    mean = total / tokens
    return Perplexity(math.exp(mean), mean, tokens, count, seqlen)
