"""What every bench script shares: the machine description, wall-clock timing of JAX calls, and
the ``## Section`` of ``bench/RESULTS.md`` a script owns.

The scripts run as ``python bench/X.py``, so this directory is on ``sys.path`` and they import
it as ``from common import ...``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ASSETS = ROOT.parent / "shared" / "assets"
RESULTS_MD = BENCH / "RESULTS.md"
README_MD = ROOT / "README.md"
MATMUL_PRECISIONS = ("default", "tensorfloat32", "float32")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):  # not Linux, or an ARM cpuinfo without model names
        return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """``CPU, cores, OS; jax version (backend[, device kind])`` of this process's first device."""
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    device = backend if kind.lower() == backend else f"{backend}, {kind}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}; "
        f"jax {jax.__version__} ({device})"
    )


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (NaN where the OS keeps none): timings here are
    wall clock, so a busy machine shows in them."""
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan,) * 3


def load_text() -> str:
    return ", ".join(f"{v:.1f}" for v in load_average())


# ---------------------------------------------------------------- timing


class Timing(NamedTuple):
    first: float  # the first call, jit compilation included
    best: float  # the minimum over the warm calls (inf with none): the least disturbed by load
    out: Any  # the last call's output


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn``, waiting for its arrays (JAX dispatches asynchronously)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def timed(fn: Callable[..., Any], *args, repeats: int = 3) -> Timing:
    """``fn(*args)`` once, then ``repeats`` more times; every call waits for its arrays."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return Timing(first, best, out)


def add_matmul_precision(parser) -> None:
    parser.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="default",
        help="jax_default_matmul_precision (on GPUs 'default' lets float32 GEMMs use TF32)",
    )


def add_calibration(parser) -> None:
    """``--model``, ``--calib``, ``--nsamples``, ``--seqlen``: issue 16's smollm2-135m protocol
    (32 x 512 windows of wikitext2_valid.txt) by default."""
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint folder")
    parser.add_argument(
        "--calib",
        type=Path,
        default=ASSETS / "text" / "wikitext2_valid.txt",
        help="calibration text (default: wikitext2_valid.txt)",
    )
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")


def use_matmul_precision(precision: str) -> None:
    if precision != "default":
        jax.config.update("jax_default_matmul_precision", precision)


# ---------------------------------------------------------------- child processes

SAMPLE_SECONDS = 0.02


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process ended
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, now (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _rss(current)
        todo += _children(current)
    return total


def measure(command: list[str]) -> dict:
    """Run ``command``; its process tree's peak RSS sampled every ``SAMPLE_SECONDS`` (the
    engine restarts the kernel's peak counter per block, so ``ru_maxrss`` can understate a
    run's lifetime peak), its ``ru_maxrss``, wall seconds and stdout. A failure exits with
    its stderr. Both streams go to files, so a chatty child cannot fill a pipe and stall."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "command": command,
        "seconds": seconds,
        "sampled_peak_rss_bytes": peak,
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,
        "stdout": stdout,
    }


# ---------------------------------------------------------------- checkpoints


def identical(a: Path, b: Path) -> bool:
    """Whether two HF checkpoints hold the same tensors, bit for bit (names, dtypes, bytes)."""
    from jprune.converters.hf import read_tensors

    left, right = read_tensors(a), read_tensors(b)
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype
        and np.array_equal(left[k].view(np.uint8), right[k].view(np.uint8))
        for k in left
    )


# ---------------------------------------------------------------- RESULTS.md


def _split(text: str, heading: str) -> tuple[list[str], list[str] | None, list[str]]:
    """The lines before the ``heading`` line, its section's body (None if absent) and the lines
    from the next ``## `` heading on. ``### `` subsections belong to the section."""
    lines = text.splitlines()
    if heading not in lines:
        return lines, None, []
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[:start], lines[start + 1 : end], lines[end:]


def read_section(path: Path, heading: str) -> str:
    """The body of the ``heading`` section of ``path`` (without the heading); "" if absent."""
    body = _split(path.read_text(), heading)[1] if path.exists() else None
    return "\n".join(body or [])


def write_section(path: Path, text: str) -> None:
    """Replace the section ``text`` opens with (its first line, a ``## `` heading) or append it;
    the other sections stay as they are, one blank line apart."""
    heading = text.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with a '## ' heading, not {heading!r}")
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    before, _, after = _split(current, heading)
    parts = ["\n".join(before).strip("\n"), text.strip("\n"), "\n".join(after).strip("\n")]
    path.write_text("\n\n".join(p for p in parts if p) + "\n")


def write_between_markers(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` in ``path`` (a
    sentence of the README that quotes a benchmark's figures) with ``text``."""
    opening, closing = f"<!-- {name} -->", f"<!-- /{name} -->"
    current = path.read_text()
    if current.count(opening) != 1 or current.count(closing) != 1:
        raise ValueError(f"{path} needs one {opening} ... {closing} pair")
    before, rest = current.split(opening)
    _, after = rest.split(closing)
    path.write_text(f"{before}{opening}{text}{closing}{after}")


def commit() -> str:
    """The commit of the code measured: HEAD, with ``+changes`` when files outside bench/ (whose
    scripts write their results there) differ from it."""
    import subprocess

    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    changed = git("status", "--porcelain", "--", ".", ":!bench")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")
