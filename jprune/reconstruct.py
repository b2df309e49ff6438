"""Block reconstruction: a stage after a block's layer solves that fits the whole block.

Every method solves one linear at a time against that linear's own target; none sees what its
error does after the attention, the norms and the MLP. This stage does: with the masks fixed,
it moves the block's kept weights by gradient descent (an optax ``GradientTransformation``) to
bring the block's outputs on the calibration windows back to its target outputs, then the next
block receives the reconstructed block's outputs (block-wise fine-tuning, as in EBFT, Guo et
al. 2024). The block is a pure function of its parameters and its input, so the gradient is
one ``jax.grad``.

* **Target**: the dense block's outputs on ``Xp + correction (X - Xp)``, where ``Xp`` is the
  stream the block was pruned on and ``X`` the dense model's stream: the block-level form of
  the error-correcting target of fista and l0-admm (``correction`` 0: the dense block on the
  pruned model's inputs, what sparsegpt's and wanda's layer targets add up to).
* **Masks fixed**: every linear weight that is zero after the layer solves stays exactly zero
  (the update is masked and the iterate projected with ``where``), so per-row, per-matrix,
  N:M and channel counts are those the method chose. Biases and norm scales train when asked.
* **Held-out windows**: the last ``holdout`` calibration windows are never fitted. The block's
  objective on them is measured before the first step and every ``eval_every`` steps; the
  stage keeps the best iterate, and keeps the layer solves' block untouched (bit for bit) when
  no iterate beats it. 16,000 calibration tokens are few for millions of free weights: this is
  what stops the stage from fitting the calibration text at the cost of every other.
* **Meshes**: a mesh splits each step's windows over its devices and XLA reduces the gradients
  (data parallel). The reproducible mode runs the stage on the first device instead, so the
  stage gives the same weights on every mesh (the layer solves keep the mesh).

The objective is a pure function of one window's block outputs and targets, ``(seqlen, hidden)``
each, returning a scalar: ``relative_output_error`` by default; any other can be passed through
the public API (``jprune.prune(config, objective=...)``, ``examples/block_objective.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jprune.config import ReconstructionConfig
from jprune.errors import JpruneError
from jprune.model import LINEAR_INPUTS
from jprune.sharding import replicate, shard_leading, to_host
from jprune.walk import BlockWeights, Stream, outputs

Objective = Callable[[jax.Array, jax.Array], jax.Array]


def relative_output_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``||Y - T||^2 / ||T||^2`` of one window's block outputs ``Y`` and targets ``T``.

    Relative, so every block (whose residual stream grows with depth) weighs the same.
    """
    error = jnp.sum(jnp.square(outputs - targets))
    return error / jnp.maximum(jnp.sum(jnp.square(targets)), jnp.finfo(targets.dtype).tiny)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """The stage as the engine takes it: the configuration section (``correction`` resolved:
    ``plan.resolve`` fills the method's) and the objective, which a recipe cannot hold.
    Hashable: it is a static argument of the jitted step."""

    settings: ReconstructionConfig = ReconstructionConfig()
    objective: Objective = relative_output_error

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def correction(self) -> float:
        return self.settings.correction or 0.0

    def describe(self) -> dict[str, Any]:
        """What report.json says of the stage beside its configuration section."""
        fn = self.objective
        return {"objective": f"{fn.__module__}.{fn.__qualname__}"}


def check_holdout(settings: ReconstructionConfig, nsamples: int) -> None:
    """Refuse a held-out split that leaves no window to fit (before any model work)."""
    if settings.enabled and nsamples - settings.holdout < 1:
        raise JpruneError(
            f"reconstruction holds out {settings.holdout} of {nsamples} calibration windows "
            "and would fit none: lower --reconstruct-holdout or raise --nsamples"
        )


def _schedule(settings: ReconstructionConfig) -> optax.Schedule:
    rate, steps = settings.learning_rate, settings.steps
    warmup = int(settings.warmup * steps)
    if settings.schedule == "constant":
        main = optax.constant_schedule(rate)
    elif settings.schedule == "linear":
        main = optax.linear_schedule(rate, 0.0, max(steps - warmup, 1))
    else:
        main = optax.cosine_decay_schedule(rate, max(steps - warmup, 1))
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, rate, warmup), main], [warmup])


def optimizer(settings: ReconstructionConfig) -> optax.GradientTransformation:
    """The optax transformation the stage runs (built inside the jitted step: pure)."""
    schedule = _schedule(settings)
    if settings.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=1e-4)
    if settings.optimizer == "lion":
        return optax.lion(schedule)
    if settings.optimizer == "sgd":
        return optax.sgd(schedule, momentum=0.9)
    return optax.adam(schedule)


# ---------------------------------------------------------------- the block as a function


def _leaf_name(path) -> str:
    keys = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            keys.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            keys.append(str(key.idx))
    return ".".join(keys)


def _trainable(name: str, settings: ReconstructionConfig) -> bool:
    """Linear weights always; linear biases and norm parameters when asked."""
    owner, _, kind = name.rpartition(".")
    role = owner.split(".")[-1]
    if role in LINEAR_INPUTS:
        return kind == "weight" or (kind == "bias" and settings.train_biases)
    return role.endswith("norm") and settings.train_norms


class _Layout:
    """The block's parameter tree as named leaves: which train, which are fixed."""

    def __init__(self, weights: BlockWeights, settings: ReconstructionConfig):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(weights.state)
        self.names = tuple(_leaf_name(path) for path, _ in flat)
        self.leaves = [leaf for _, leaf in flat]
        self.trained = tuple(n for n in self.names if _trainable(n, settings))
        self.graphdef = weights.graphdef

    def split(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(trained leaves in float32, or wider, and the fixed leaves)."""
        arrays = dict(zip(self.names, self.leaves, strict=True))
        trained = {
            n: arrays[n].astype(jnp.promote_types(arrays[n].dtype, jnp.float32))
            for n in self.trained
        }
        fixed = {n: a for n, a in arrays.items() if n not in trained}
        return trained, fixed

    def weights(self, trained: Mapping[str, jax.Array], mesh: Mesh | None) -> BlockWeights:
        """The block with ``trained`` written back in each leaf's own dtype, on ``mesh``."""
        leaves = [
            replicate(trained[n].astype(leaf.dtype), mesh) if n in trained else leaf
            for n, leaf in zip(self.names, self.leaves, strict=True)
        ]
        return BlockWeights(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))


def _block_outputs(graphdef, treedef, names, trained, fixed, x):
    leaves = [trained[n] if n in trained else fixed[n] for n in names]
    block = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    return block(x)[0]


def _window_losses(statics, trained, fixed, x, y):
    """The objective of each window of a (windows, seqlen, hidden) batch."""
    graphdef, treedef, names, stage = statics
    out = _block_outputs(graphdef, treedef, names, trained, fixed, x)
    return jax.vmap(stage.objective)(out, y)


def _loss_and_gradient(statics, trained, fixed, x, y):
    """The mean objective over a batch of windows and its gradient in the trained leaves."""

    def mean_loss(params):
        return jnp.mean(_window_losses(statics, params, fixed, x, y))

    return jax.value_and_grad(mean_loss)(trained)


def _replicated(tree, mesh: Mesh | None):
    """``tree`` kept whole on every device: left to itself, the partitioner may split a
    step's outputs, and the next step's products would then be partitioned too."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(statics, mesh, trained, opt_state, fixed, masks, x, y):
    """One optimizer step on a batch of windows: (trained, optimizer state, batch loss)."""
    loss, grads = _loss_and_gradient(statics, trained, fixed, x, y)
    updates, opt_state = optimizer(statics[3].settings).update(grads, opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    # A pruned weight stays exactly zero (``where``, not a product: 0 * inf is nan).
    trained = {n: jnp.where(masks[n], p, 0.0) if n in masks else p for n, p in trained.items()}
    return _replicated((trained, opt_state), mesh) + (loss,)


def gradient(
    weights: BlockWeights,
    x: jax.Array,
    targets: jax.Array,
    stage: Reconstruction = Reconstruction(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage's loss on (windows, seqlen, hidden) inputs and targets, and its gradient in
    the leaves the stage trains (by name within the block, ``down.weight``), computed as a
    step computes them (for tests and for researchers inspecting the stage)."""
    layout = _Layout(weights, stage.settings)
    trained, fixed = layout.split()
    statics = (layout.graphdef, layout.treedef, layout.names, stage)
    return _loss_and_gradient(statics, trained, fixed, x, targets)


@functools.partial(jax.jit, static_argnums=0)
def _held_out_losses(statics, trained, fixed, x, y):
    return _window_losses(statics, trained, fixed, x, y)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(settings, mesh, trained):
    return _replicated(optimizer(settings).init(trained), mesh)


@jax.jit
def _mixed_input(x, x_dense, correction):
    return x + correction * (x_dense - x)


# ---------------------------------------------------------------- the stage


def _windows(stream: Stream) -> Any:
    """A stream's windows as one (windows, seqlen, hidden) array where the stream lives."""
    if stream.placement.on_host:
        return np.concatenate([to_host(b) for b in stream.batches])
    return jnp.concatenate(stream.batches)


def targets(dense: BlockWeights, x: Stream, x_dense: Stream | None, correction: float) -> Stream:
    """The dense block's outputs on ``x + correction (x_dense - x)``."""
    if x_dense is None or correction == 0.0 or x_dense is x:
        return outputs(dense, x)
    mixed = [
        _mixed_input(a, b, correction) for a, b in zip(x.batches, x_dense.batches, strict=True)
    ]
    return outputs(dense, Stream(mixed, x.placement))


def _held_out(statics, trained, fixed, x, y, batch: int, mesh) -> float:
    """The mean objective over the held-out windows, summed in a fixed order (float64)."""
    losses = [
        to_host(
            _held_out_losses(
                statics,
                trained,
                fixed,
                shard_leading(x[s : s + batch], mesh),
                shard_leading(y[s : s + batch], mesh),
            )
        )  # fmt: skip
        for s in range(0, x.shape[0], batch)
    ]
    return float(np.mean(np.concatenate(losses).astype(np.float64)))


def reconstruct(
    index: int,
    dense: BlockWeights,
    pruned: BlockWeights,
    x: Stream,
    x_dense: Stream | None,
    stage: Reconstruction,
    *,
    reproducible: bool = False,
) -> tuple[BlockWeights, dict[str, Any]]:
    """Fit block ``index``'s kept weights to its target outputs; return the block (the one
    given, untouched, when no iterate beats it on the held-out windows) and its record."""
    started = time.perf_counter()
    # The reproducible mode runs the stage on the first device alone: a mesh's program for
    # the same step rounds differently (on CPU, attention's backward in q and k), so only one
    # device's arithmetic gives the same weights on every mesh.
    home = jax.devices()[0] if reproducible and x.placement.mesh is not None else None
    mesh = None if reproducible else x.placement.mesh
    settings = stage.settings
    layout = _Layout(pruned, settings)
    trained, fixed = layout.split()
    if home is not None:
        trained, fixed = jax.device_put((trained, fixed), home)
    masks = {n: trained[n] != 0 for n in trained if n.endswith(".weight")}
    statics = (layout.graphdef, layout.treedef, layout.names, stage)
    inputs = _windows(x)
    wanted = _windows(targets(dense, x, x_dense, stage.correction))
    fit = inputs.shape[0] - settings.holdout
    held_x, held_y = inputs[fit:], wanted[fit:]
    batch = min(settings.windows, fit)

    def held_out(params) -> float:
        return _held_out(statics, params, fixed, held_x, held_y, batch, mesh)

    before = best_loss = held_out(trained)
    best, best_step = trained, 0
    opt_state = _init(settings, mesh, trained)
    order = np.random.default_rng([settings.seed, index])
    queue: list[int] = []
    train_losses = []
    for step in range(1, settings.steps + 1):
        if len(queue) < batch:  # a new pass over the fitted windows, in a new order
            queue += [int(w) for w in order.permutation(fit)]
        chosen, queue = np.asarray(queue[:batch]), queue[batch:]
        trained, opt_state, loss = _step(
            statics, mesh, trained, opt_state, fixed, masks,
            shard_leading(inputs[chosen], mesh), shard_leading(wanted[chosen], mesh),
        )  # fmt: skip
        train_losses.append(loss)
        if step % settings.eval_every == 0 or step == settings.steps:
            current = held_out(trained)
            if current < best_loss:
                best, best_loss, best_step = trained, current, step
    record = {
        "block": index,
        "held_out_before": before,
        "held_out_after": best_loss,
        "best_step": best_step,
        "fit_loss_first": float(train_losses[0]) if train_losses else None,
        "fit_loss_last": float(train_losses[-1]) if train_losses else None,
        "free_parameters": int(
            sum(int(masks[n].sum()) if n in masks else int(p.size) for n, p in trained.items())
        ),
        "seconds": time.perf_counter() - started,
    }
    if best_step == 0:
        return pruned, record
    return layout.weights(best, x.placement.mesh), record
