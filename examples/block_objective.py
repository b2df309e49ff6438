"""Replace the block-reconstruction stage's objective with your own pure function.

After each block's layer solves, the stage (``jprune.reconstruct``) fits the block's kept
weights to its target outputs; what it minimises is a pure function of one calibration window's
block outputs and targets, ``(seqlen, hidden)`` each. The default is the relative squared error
of the outputs. The one below compares them after a parameter-free RMS normalisation: every
next block (and the final norm) reads the residual stream through an RMSNorm, so an error in
the stream's per-token scale matters less than one in its direction, and tokens with a large
residual norm (the first tokens of a window often carry outliers) stop dominating the fit.

The objective goes in through the public API; the same engine runs it (streaming, mesh,
reproducible mode, resume, held-out selection of the best iterate)::

    .venv/bin/python examples/block_objective.py --model ../shared/assets/models/stories260K \\
        --calib ../shared/assets/text/tinystories_calib.txt \\
        --eval ../shared/assets/text/tinystories_eval.txt --sparsity 0.7 --steps 32
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import jprune.prune as jp
from jprune.config import PruneConfig


def normalized_output_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error of the RMS-normalised outputs against the RMS-normalised targets."""

    def rms_normalized(x):
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)

    return jnp.mean(jnp.square(rms_normalized(outputs) - rms_normalized(targets)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--calib", required=True, help="calibration text file")
    parser.add_argument("--eval", action="append", default=[], help="text to report on")
    parser.add_argument("--method", default="sparsegpt", help="the layer-wise method")
    parser.add_argument("--sparsity", type=float, default=0.7, help="fraction of zeros")
    parser.add_argument("--steps", type=int, default=32, help="reconstruction steps per block")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    parser.add_argument("--out", default=None, help="write the pruned checkpoint here")
    args = parser.parse_args(argv)
    config = PruneConfig.of(
        args.model, args.method, sparsity=args.sparsity, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, eval_texts=args.eval, out=args.out,
        force=args.out is not None,
        reconstruction={"enabled": True, "steps": args.steps, "learning_rate": args.lr},
    )  # fmt: skip
    report = jp.prune(config, objective=normalized_output_error)
    for text, values in report["perplexity"].items():
        print(f"perplexity on {text}: {values['before']:.4f} -> {values['after']:.4f}")
    blocks = report["reconstruction"]["blocks"]
    gains = [b["held_out_after"] / b["held_out_before"] for b in blocks]
    print(f"held-out objective after / before, per block: {[round(g, 3) for g in gains]}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
