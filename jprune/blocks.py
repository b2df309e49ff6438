"""Where a run's decoder blocks come from and where the finished ones go.

The engine and the evaluator walk a model one decoder block at a time through a ``ModelBlocks``:

* ``shell``: a ``CausalLM`` holding what surrounds the blocks (embeddings, final norm, head),
  the only weights alive for the whole run;
* ``load(i)``: block ``i`` as a ``Block`` module;
* ``store(i, block, state)``: block ``i`` is final (``state`` is the engine's ``BlockState``
  after it: what a resumed run needs to continue from there); returns the seconds it took,
  by part;
* ``resume()``: the ``BlockState`` to continue from, or ``None`` to start at block 0.

``InMemoryBlocks`` wraps a loaded ``CausalLM`` (pruned in place). ``CheckpointBlocks`` reads an
HF checkpoint lazily (``converters.hf.Checkpoint``) and, when pruning, writes each finished
block into the staging directory and drops it, so a run holds one block at a time whatever
the depth of the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jprune.converters.hf import BlockShards, Checkpoint
from jprune.model import Block, CausalLM, flat_arrays
from jprune.sharding import to_host


class BlockState(NamedTuple):
    """The engine's state between blocks: enough to continue a run at ``next_block``."""

    next_block: int
    streams: dict[str, list[np.ndarray]]  # "x" / "x_dense" -> calibration batches (host)
    records: list[dict[str, Any]]
    shapes: dict[str, list[int]]  # canonical parameter name -> shape, of finished blocks
    # the stage's record of each finished block (a tuple: a NamedTuple default is shared)
    reconstruction: Sequence[dict[str, Any]] = ()


def block_arrays(block: Block, index: int) -> dict[str, np.ndarray]:
    """Block ``index``'s parameters on the host, by canonical name (``layers.{index}.q.weight``)."""
    return {name: to_host(a) for name, a in flat_arrays(block, f"layers.{index}.").items()}


class InMemoryBlocks:
    """A loaded model: blocks are its own modules, changed in place."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.spec = model.spec
        self.shell = model

    def load(self, index: int) -> Block:
        return self.model.layers[index]

    def store(self, index: int, block: Block, state: BlockState) -> dict[str, float]:
        del index, block, state  # the block is the model's own module, already updated
        return {}

    def resume(self) -> BlockState | None:
        return None


class CheckpointBlocks:
    """An HF checkpoint read a block at a time; finished blocks go to ``shards`` (if any).

    ``journal`` (a ``staging.Staging``) records the engine state after every block so that
    ``--resume`` continues from the last finished one; ``after_block(index)`` is called once
    block ``index`` is written and journaled (``stop.Signals`` stops a run there).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        shards: BlockShards | None = None,
        journal: Any = None,
        after_block: Callable[[int], None] | None = None,
    ):
        self.checkpoint = checkpoint
        self.spec = checkpoint.spec
        self.shell = CausalLM(checkpoint.spec, checkpoint.outer(), with_blocks=False)
        self.shards = shards
        self.journal = journal
        self.after_block = after_block

    def load(self, index: int) -> Block:
        return Block(self.checkpoint.block(index), index, self.spec)

    def store(self, index: int, block: Block, state: BlockState) -> dict[str, float]:
        """Write the block's shard and journal the engine state; the seconds of each."""
        started = time.perf_counter()
        if self.shards is not None:
            self.shards.write_block(index, block_arrays(block, index))
        written = time.perf_counter()
        if self.journal is not None:
            self.journal.save(state)
        seconds = {"write": written - started, "journal": time.perf_counter() - written}
        if self.after_block is not None:
            self.after_block(index)
        return seconds

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
