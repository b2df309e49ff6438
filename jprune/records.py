"""What a pruning run records about each unit it pruned, and the whole-model summary.

Every method gets the same per-unit record (``unit_record``): its name, block and role, shape,
achieved sparsity (or channels before and after), the layer-wise reconstruction error relative
to the dense output, solve seconds, memory, and the method's own info as plain JSON values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jprune.converters.spec import linear_input
from jprune.memory import device_peak_bytes, layer_memory_bytes
from jprune.sharding import to_host

# The Grams a tap's statistics may hold (the gram of the pruned inputs, the cross and the
# dense Grams); their count is the layer's share of the memory bound.
GRAMS = frozenset({"gram", "cross", "dense"})


@jax.jit
def reconstruction_error(W, W0, gram, cross, dense_gram, reference=None):
    """``||W Xp - W0 X||^2`` and ``||W0 X||^2`` from the Grams (``cross = X Xp^T``); the
    second from ``dense_gram`` unless given as ``reference``."""
    W, W0 = W.astype(jnp.float32), W0.astype(jnp.float32)
    if reference is None:
        reference = jnp.sum((W0 @ dense_gram) * W0)
    if cross is None:
        delta = W - W0
        return jnp.sum((delta @ gram) * delta), reference
    error = jnp.sum((W @ gram) * W) - 2 * jnp.sum((W0 @ cross) * W) + reference
    return jnp.maximum(error, 0.0), reference


def plain(value: Any) -> Any:
    """Method info -> JSON-ready values. Scalars stay as they are; a per-row array becomes
    ``{"mean": ..., "worst": ...}`` (worst: the largest value, or ``false`` if any row is),
    so one bad row is not averaged away."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return plain(value._asdict())
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = to_host(value)
        if array.size == 1:
            return array.item()
        if array.dtype == bool:
            return {"mean": float(array.mean()), "worst": bool(array.all())}
        numbers = array.astype(np.float64)
        return {"mean": float(numbers.mean()), "worst": float(numbers.max())}
    return value


def unit_record(result, stats, seconds: float, name: str, block: int, held: int) -> dict[str, Any]:
    """The record of one pruned unit (a ``methods.UnitResult``) from its tap's statistics;
    ``held``: the bytes of calibration activations alive while it was solved. ``channels`` is
    null unless the method is structured."""
    tap = stats[linear_input(result.linear)]
    energy = tap.get("energy", {}).get(result.linear)
    cross = tap.get("cross") if "dense" in tap or energy is not None else None
    error, reference = reconstruction_error(
        result.weight, result.weight0, tap["gram"], cross, tap.get("dense", tap["gram"]), energy
    )
    d_out, d_in = result.weight0.shape
    if result.channels is None:
        sparsity = float(jnp.mean(result.weight == 0))
    else:
        sparsity = float(1 - result.channels["after"] / result.channels["before"])
    return {
        "name": name,
        "block": block,
        "role": result.role,
        "shape": [d_out, d_in],
        "sparsity": sparsity,
        "channels": result.channels,
        "relative_error": float(error / jnp.maximum(reference, 1e-30)),
        "seconds": seconds,
        "memory": {
            "bound_bytes": layer_memory_bytes(d_out, d_in, len(GRAMS & set(tap)), held),
            "device_peak_bytes": device_peak_bytes(),
        },
        "info": plain(result.info),
    }


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Whole-model figures: achieved sparsity over all pruned weights, summed relative error."""
    total = sum(int(np.prod(r["shape"])) for r in records)
    zeros = sum(r["sparsity"] * int(np.prod(r["shape"])) for r in records)
    return {
        "sparsity": zeros / total if total else 0.0,
        "relative_error_sum": float(sum(r["relative_error"] for r in records)),
        "solver_seconds": float(sum(r["seconds"] for r in records)),
    }
