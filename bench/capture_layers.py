"""Capture real layer problems (Grams, dense weights) from a model, for solver benchmarks.

Runs the engine with a capturing wrapper around a method (default sparsegpt, intra-block, so
each linear sees the inputs the already-pruned model feeds it, as fista does) and saves the
``LayerProblem`` of every linear of the chosen blocks to ``OUT/block{b}.{role}.npz``
(``weight``, ``gram``, ``cross_gram`` when the dense inputs differ, ``num_tokens``).

    .venv/bin/python bench/capture_layers.py --model .cache/smollm2-135m \
        --calib ../shared/assets/text/wikitext2_valid.txt --blocks 0 15 29 --out .cache/layers
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np

import jprune.prune as jp
from jprune.config import PruneConfig
from jprune.methods import METHODS
from jprune.methods.base import register_layer_method

ROLE = re.compile(r"layers\.(\d+)\.(.+)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint folder")
    parser.add_argument("--calib", type=Path, required=True, help="calibration text file")
    parser.add_argument("--blocks", type=int, nargs="+", required=True, help="blocks to save")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .npz files")
    parser.add_argument("--method", default="sparsegpt", help="method that prunes meanwhile")
    parser.add_argument("--sparsity", type=float, default=0.5, help="its target sparsity")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    inner = METHODS[args.method]
    wanted = set(args.blocks)

    @register_layer_method("capture", intra_block=True, summary="save problems, then prune")
    def capture(problem, pattern, options):
        match = ROLE.search(problem.name)
        if match and int(match.group(1)) in wanted:
            arrays = {
                "weight": np.asarray(problem.weight, np.float32),
                "gram": np.asarray(problem.gram, np.float32),
                "num_tokens": np.asarray(problem.num_tokens),
            }
            if problem.cross_gram is not None:
                arrays["cross_gram"] = np.asarray(problem.cross_gram, np.float32)
            role = match.group(2).replace("/", "_")
            np.savez(args.out / f"block{match.group(1)}.{role}.npz", **arrays)
        return inner(problem, pattern)

    with tempfile.TemporaryDirectory() as tmp:
        config = PruneConfig.of(
            args.model,
            "capture",
            sparsity=args.sparsity,
            calib=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            out=Path(tmp) / "pruned",
        )
        jp.prune(config)
    print(f"saved {len(list(args.out.glob('*.npz')))} problems under {args.out}")


if __name__ == "__main__":
    main()
