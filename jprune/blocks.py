"""Where a run's decoder blocks come from and where the finished ones go.

The engine and the evaluator walk a model one decoder block at a time through a ``ModelBlocks``:

* ``shell``: a ``CausalLM`` holding what surrounds the blocks (embeddings, final norm, head),
  the only weights alive for the whole run;
* ``load(i)``: block ``i`` as a ``Block`` module;
* ``store(i, block, state)``: block ``i`` is final (``state`` is the engine's ``BlockState``
  after it: what a resumed run needs to continue from there);
* ``resume()``: the ``BlockState`` to continue from, or ``None`` to start at block 0.

``InMemoryBlocks`` wraps a loaded ``CausalLM`` (pruned in place). ``CheckpointBlocks`` reads an
HF checkpoint lazily (``converters.hf.Checkpoint``) and, when pruning, writes each finished
block into the staging directory and drops it, so a run holds one block at a time whatever
the depth of the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jprune.converters.hf import BlockShards, Checkpoint
from jprune.model import Block, CausalLM
from jprune.sharding import to_host


class BlockState(NamedTuple):
    """The engine's state between blocks: enough to continue a run at ``next_block``."""

    next_block: int
    streams: dict[str, list[np.ndarray]]  # "x" / "x_dense" -> calibration batches (host)
    records: list[dict[str, Any]]
    shapes: dict[str, list[int]]  # canonical parameter name -> shape, of finished blocks


def block_arrays(block: Block, index: int) -> dict[str, np.ndarray]:
    """Block ``index``'s parameters on the host, by canonical name (``layers.{index}.q.weight``)."""
    flat = nnx.to_flat_state(nnx.state(block, nnx.Param))
    return {
        f"layers.{index}." + ".".join(str(k) for k in path): to_host(var[...]) for path, var in flat
    }


class InMemoryBlocks:
    """A loaded model: blocks are its own modules, changed in place."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.spec = model.spec
        self.shell = model

    def load(self, index: int) -> Block:
        return self.model.layers[index]

    def store(self, index: int, block: Block, state: BlockState) -> None:
        del index, block, state  # the block is the model's own module, already updated

    def resume(self) -> BlockState | None:
        return None


class CheckpointBlocks:
    """An HF checkpoint read a block at a time; finished blocks go to ``shards`` (if any).

    ``journal`` (a ``staging.Staging``) records the engine state after every block so that
    ``--resume`` continues from the last finished one.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        shards: BlockShards | None = None,
        journal: Any = None,
    ):
        self.checkpoint = checkpoint
        self.spec = checkpoint.spec
        self.shell = CausalLM(checkpoint.spec, checkpoint.outer(), with_blocks=False)
        self.shards = shards
        self.journal = journal

    def load(self, index: int) -> Block:
        return Block(self.checkpoint.block(index), index, self.spec)

    def store(self, index: int, block: Block, state: BlockState) -> None:
        if self.shards is not None:
            self.shards.write_block(index, block_arrays(block, index))
        if self.journal is not None:
            self.journal.save(state)

    def resume(self) -> BlockState | None:
        return None if self.journal is None else self.journal.load()


def as_blocks(model: Any):
    """A ``ModelBlocks`` for a ``CausalLM``, a ``Checkpoint``, or one already."""
    if isinstance(model, CausalLM):
        return InMemoryBlocks(model)
    if isinstance(model, Checkpoint):
        return CheckpointBlocks(model)
    return model


def shapes_of(arrays: Mapping[str, Any]) -> dict[str, list[int]]:
    return {name: list(jax.numpy.shape(a)) for name, a in arrays.items()}
