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
