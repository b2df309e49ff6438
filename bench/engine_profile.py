"""Where the engine's own time goes (forward passes and Grams, not the solver), per kind of pass.

Prunes a model once with the engine's pass functions wrapped in timers (each waits for its
result, so a pass's seconds are its own) and prints the seconds per kind of pass: the
statistics passes by the taps and statistics they gather, the block-output passes, the
attention / residual passes the engine caches between intra-block stages, and the stages'
solves (``solve``: the units' solves plus their records). Run it with a near-free solver
setting to see the engine alone:

    .venv/bin/python bench/engine_profile.py --model .cache/smollm2-135m \\
        --method l0-admm --options '{"iterations": 1, "refit_iters": 1}'

Wraps what exists: on a checkout without the cached residual (before issue 16's second
session) the ``cache`` line is absent and each attention pass shows as ``pass:attend``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import jax

import jprune.engine as engine
import jprune.prune as jp
from jprune.config import PruneConfig

from common import add_calibration, load_average, machine

SECONDS: dict[str, float] = defaultdict(float)
CALLS: Counter = Counter()


def timed(name: str, label) -> None:
    """Replace ``engine.<name>`` by a version that waits for its result and adds its seconds
    under ``label(args)``."""
    inner = getattr(engine, name, None)
    if inner is None:
        return

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = inner(*args, **kwargs)
        if isinstance(result, engine.Activations):
            jax.block_until_ready(result.batches)
        elif (
            isinstance(result, dict)
            and result
            and all(isinstance(v, engine.Activations) for v in result.values())
        ):
            jax.block_until_ready([v.batches for v in result.values()])
        else:
            jax.block_until_ready(result)
        key = label(args)
        SECONDS[key] += time.perf_counter() - started
        CALLS[key] += 1
        return result

    setattr(engine, name, wrapper)


def statistics_label(args) -> str:
    wanted = args[1]
    return (
        "stats:" + ",".join(sorted(wanted)) + ":" + ",".join(sorted(set().union(*wanted.values())))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration(parser)
    parser.add_argument("--method", default="l0-admm", help="pruning method")
    parser.add_argument("--options", default="{}", help="method options, as JSON")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    args = parser.parse_args()

    timed("stream_statistics", statistics_label)
    timed("_block_pass", lambda a: "pass:" + a[0].__name__.strip("_"))
    timed("_advance_cache", lambda a: "cache (attention / residual passes)")
    timed("_prune_stage", lambda a: "solve (units and their records)")
    with tempfile.TemporaryDirectory() as tmp:
        config = PruneConfig.of(
            args.model,
            args.method,
            sparsity=args.sparsity,
            calib=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            method_options=json.loads(args.options),
            evaluate_dense=False,
            out=Path(tmp) / "pruned",
        )
        started = time.perf_counter()
        report = jp.prune(config)
        total = time.perf_counter() - started
    print(f"machine: {machine()}; load average at the end: {load_average()[0]:.1f}")
    print(f"{args.method} {args.options}: run {total:.1f} s, prune {report['prune_seconds']:.1f} s")
    # The cache passes call _block_pass themselves: their passes are listed on their own lines
    # and inside the cache line, so the engine's sum leaves the cache line out.
    passes = sum(s for k, s in SECONDS.items() if k.startswith(("stats:", "pass:")))
    print(f"engine passes (statistics + block passes): {passes:.1f} s")
    print("| pass | seconds | calls |\n|---|---|---|")
    for key in sorted(SECONDS):
        print(f"| {key} | {SECONDS[key]:.2f} | {CALLS[key]} |")


if __name__ == "__main__":
    main()
