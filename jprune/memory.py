"""Resident memory of this process, as Linux reports it (``/proc/self/status``).

``reset_peak`` restarts the kernel's peak-RSS counter (``VmHWM``) so that a later ``peak``
is the peak since then: the engine measures each block's peak this way. Where the counter
cannot be reset (not Linux, or not permitted) ``peak`` is the process's lifetime peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_earlier_peak = 0  # the highest peak seen before the last reset


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Restart the peak-RSS counter; ``False`` where that is not possible."""
    global _earlier_peak
    _earlier_peak = max(_earlier_peak, peak())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> int:
    """Peak resident bytes since the last ``reset_peak`` (or since the process started)."""
    found = _status_bytes("VmHWM")
    if found is not None:
        return found
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current() -> int:
    found = _status_bytes("VmRSS")
    return peak() if found is None else found


def lifetime_peak() -> int:
    """Peak resident bytes since the process started, across ``reset_peak`` calls."""
    return max(_earlier_peak, peak())


# ---------------------------------------------------------------- the stated bounds


def device_peak_bytes() -> int | None:
    """The default device's peak allocation, where the backend reports one (not on CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def layer_memory_bytes(d_out: int, d_in: int, num_grams: int, activation_bytes: int) -> int:
    """What must fit at once for one layer problem (the documented bound, float32):
    the weight and its pruned copy plus solver state (~4 more (d_out, d_in) arrays), the
    layer's Grams, and the calibration activations of one block (one or two streams, and with
    intra-block stages their cached attention outputs)."""
    return 4 * (6 * d_out * d_in + num_grams * d_in * d_in) + activation_bytes


def _nbytes(shape) -> int:
    import numpy as np

    return int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize


def memory_bound(shapes, stream_bytes: int, streams: int, reconstruction: bool = False) -> int:
    """The most a pruning run holds at once besides the runtime itself (the README's bound):

    * what surrounds the blocks (embeddings, final norm, head) as stored, plus a float32
      copy of its largest matrix (the head's product casts it);
    * one block three times in float32 (the dense and pruned parameters and a cast copy);
    * the Grams of one block's linear inputs, three per input (``gram``, ``cross``, ``dense``);
    * solver state of its largest linear (``layer_memory_bytes``' six copies);
    * the calibration streams (one or two), their cached attention outputs and the next
      block's inputs while they are computed.

    With ``reconstruction`` (the block-reconstruction stage, ``jprune.reconstruct``), one block's
    stage on top: six float32 copies of the block (the iterate, the best one, the gradient,
    Adam's two moments, the step's new iterate) and three streams (the block's inputs and
    targets gathered by window, and the target stream they come from).

    ``shapes``: canonical parameter name -> anything with ``.shape`` and ``.dtype``.
    Independent of the number of blocks: only the largest block counts.
    """
    import numpy as np

    from jprune.converters.spec import LINEAR_INPUTS, linear_input

    outer = {n: s for n, s in shapes.items() if not n.startswith("layers.")}
    total = sum(_nbytes(s) for s in outer.values())
    total += 4 * max((int(np.prod(s.shape)) for s in outer.values()), default=0)
    per_block: dict[str, int] = {}
    largest = 0
    inputs: dict[str, dict[str, int]] = {}
    for name, s in shapes.items():
        if name.startswith("layers."):
            block = name.split(".")[1]
            per_block[block] = per_block.get(block, 0) + int(np.prod(s.shape))
            if name.endswith(".weight") and len(s.shape) == 2:
                largest = max(largest, int(np.prod(s.shape)))
                role = name.removeprefix(f"layers.{block}.").removesuffix(".weight")
                if role.split(".")[-1] in LINEAR_INPUTS:
                    inputs.setdefault(block, {})[linear_input(role)] = s.shape[1]
    total += 3 * 4 * max(per_block.values(), default=0)
    grams = max((sum(d * d for d in taps.values()) for taps in inputs.values()), default=0)
    total += 3 * 4 * grams + 6 * 4 * largest
    if reconstruction:
        total += 6 * 4 * max(per_block.values(), default=0) + 3 * stream_bytes
    return total + (2 * streams + 2) * stream_bytes
