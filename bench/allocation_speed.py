"""What a layer-wise allocation costs in prune time: uniform, owl and optimal side by side.

One process prunes smollm2-135m (``--model``) at ``--sparsity`` with each method under each
allocation, no evaluation: first a warm-up (magnitude at 30%, uniform) that compiles the
engine's own programs (embedding, block passes, Grams), then per method uniform, owl, optimal.
Each cell's ``prune_seconds`` (report.json) includes the dense allocation pass, whose own time
is report.json's ``allocation.seconds``; the ratio to uniform is the whole prune time's.

``--compare DIR`` checks each non-uniform cell's masks against a checkpoint written by other
code (for example the code before counts became traced data) with the same settings, at
``DIR/<method>-<allocation>``: every decoder linear's zero pattern equal, and the per-layer
zero counts of report.json's allocation equal.

Results go to ``bench/allocation_speed.json`` and the ``## Allocation: prune time`` section of
``bench/RESULTS.md``:

    .venv/bin/python bench/allocation_speed.py --model .cache/smollm2-135m \\
        --compare /work/baseline/before-alloc

``--recompare KEPT --compare DIR`` adds the comparisons the run could not make (the other
code's checkpoints written later), from this run's checkpoints kept at ``KEPT/<cell>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as read_tensors_file

import jprune.prune as jp
from jprune.config import PruneConfig

from common import ASSETS, BENCH, RESULTS_MD, ROOT, load_text, machine, write_section

RESULTS_JSON = BENCH / "allocation_speed.json"
SECTION = "## Allocation: prune time"
METHODS = ("wanda", "sparsegpt", "fista")
ALLOCATIONS = ("uniform", "owl", "optimal")
WITHIN = 1.2  # the target: a non-uniform allocation within 1.2x of uniform's prune time


def prune(args, method: str, sparsity: float, allocation: str, out: Path) -> dict:
    config = PruneConfig.of(
        args.model, method, sparsity=sparsity, calib=args.calib, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=0, out=out, allocation={"method": allocation},
        evaluate_dense=False,
    )  # fmt: skip
    return jp.prune(config)


def _allocated(directory: Path) -> list:
    """The per-layer allocation of a run: report.json's, or (a run's staging directory kept
    before its report was written) its journal's."""
    report = directory / "report.json"
    if report.is_file():
        return json.loads(report.read_text())["allocation"]["layers"]
    return json.loads((directory / "jprune-progress.json").read_text())["allocation"]["layers"]


def _decoder_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The decoder blocks' tensors, shard by shard (a kept staging directory has no index)."""
    out = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        out |= {k: v for k, v in read_tensors_file(shard).items() if ".layers." in k}
    return out


def masks_equal(ours: Path, theirs: Path) -> dict:
    """Every decoder tensor's zero pattern, and the per-layer allocation, compared."""
    a, b = _decoder_tensors(ours), _decoder_tensors(theirs)
    differ = [k for k in a if k not in b or not np.array_equal(a[k] == 0, b[k] == 0)]
    differ += [k for k in b if k not in a]
    allocated = [_allocated(d) for d in (ours, theirs)]
    return {
        "tensors": len(a),
        "masks_differ": differ,
        "allocation_equal": allocated[0] == allocated[1],
    }


def run(args) -> dict:
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = prune(args, "magnitude", 0.3, "uniform", Path(tmp) / "warmup")
        print(f"warm-up: {warm['prune_seconds']:.1f} s", flush=True)
        for method in args.methods:
            for allocation in ALLOCATIONS:
                out = Path(tmp) / f"{method}-{allocation}"
                report = prune(args, method, args.sparsity, allocation, out)
                cell = {
                    "method": method,
                    "allocation": allocation,
                    "prune_seconds": report["prune_seconds"],
                    "allocation_seconds": report["allocation"]["seconds"],
                    "sparsity": report["summary"]["sparsity"],
                    "relative_error_sum": report["summary"]["relative_error_sum"],
                    "load": load_text(),
                }
                if args.compare and allocation != "uniform":
                    theirs = args.compare / f"{method}-{allocation}"
                    cell["compare"] = (
                        masks_equal(out, theirs) if (theirs / "report.json").is_file() else None
                    )
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "command": "python bench/allocation_speed.py " + " ".join(args.argv),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "model": args.model.name,
        "sparsity": args.sparsity,
        "calibration": f"{args.nsamples} x {args.seqlen} tokens of {args.calib.name}, seed 0",
        "cells": cells,
    }


def _verdict(ratio: float) -> str:
    return "met" if ratio <= WITHIN else "missed"


def render(result: dict) -> str:
    cells = {(c["method"], c["allocation"]): c for c in result["cells"]}
    methods = [m for m in METHODS if (m, "uniform") in cells]
    lines = [
        SECTION,
        "",
        f"Commit {result['commit']}, {result['date']}, {result['machine']}. {result['model']} at "
        f"{result['sparsity']:.0%}, calibration {result['calibration']}; one process, no "
        "evaluation, a warm-up run first (magnitude 30%, uniform). Each cell: prune seconds "
        "(the dense allocation pass included; the pass's own seconds in brackets) and the ratio "
        f"to uniform's prune seconds of the same method and run. Target: within {WITHIN}x.",
        "",
        "```",
        f"    {result['command']}",
        "```",
        "",
        "| method | uniform | owl | optimal |",
        "|---|---|---|---|",
    ]
    verdicts = []
    for method in methods:
        base = cells[(method, "uniform")]["prune_seconds"]
        row = [method, f"{base:.1f} s"]
        for allocation in ALLOCATIONS[1:]:
            cell = cells.get((method, allocation))
            if cell is None:
                row.append("not run")
                continue
            ratio = cell["prune_seconds"] / base
            row.append(
                f"{cell['prune_seconds']:.1f} s ({cell['allocation_seconds']:.1f} s), {ratio:.2f}x"
            )
            without = (cell["prune_seconds"] - cell["allocation_seconds"]) / base
            verdicts.append(
                f"* {method} {allocation}: {ratio:.2f}x, {_verdict(ratio)}; without the dense "
                f"pass {without:.2f}x"
            )
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *verdicts, ""]
    compared = [c for c in result["cells"] if "compare" in c]
    if compared:
        lines.append("Masks against the checkpoints of the code before traced counts:")
        if "recompared" in result:
            lines += ["", "```", f"    {result['recompared']}", "```"]
        lines.append("")
        for c in compared:
            found = c["compare"]
            if found is None:
                text = "no checkpoint of the other code to compare"
            else:
                same = not found["masks_differ"]
                text = (
                    f"{'every' if same else 'NOT every'} one of {found['tensors']} tensors' zero "
                    f"pattern equal; per-layer allocation "
                    f"{'equal' if found['allocation_equal'] else 'DIFFERENT'}"
                )
            lines.append(f"* {c['method']} {c['allocation']}: {text}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "smollm2-135m")
    parser.add_argument("--calib", type=Path, default=ASSETS / "text" / "wikitext2_valid.txt")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--compare", type=Path, help="checkpoints of other code to compare masks")
    parser.add_argument("--render-only", action="store_true", help="re-render the JSON")
    parser.add_argument(
        "--recompare",
        type=Path,
        help="with --compare: compare the cells the JSON has no comparison for, from this run's "
        "checkpoints kept at DIR/<method>-<allocation> (an output or a staging directory)",
    )
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.recompare and not args.compare:
        parser.error("--recompare needs --compare (the other code's checkpoints)")
    if args.recompare:
        result = json.loads(RESULTS_JSON.read_text())
        for cell in result["cells"]:
            label = f"{cell['method']}-{cell['allocation']}"
            theirs, ours = args.compare / label, args.recompare / label
            if cell.get("compare", 0) is None and theirs.is_dir() and ours.is_dir():
                cell["compare"] = masks_equal(ours, theirs) | {"kept": str(ours)}
                result["recompared"] = "python bench/allocation_speed.py " + " ".join(args.argv)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    elif args.render_only:
        result = json.loads(RESULTS_JSON.read_text())
    else:
        result = run(args)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    write_section(RESULTS_MD, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
