"""Optimization methods against the heuristics on a real LLM: prune time and perplexity, side by side.

Every cell prunes the same model with the same protocol in this one process (calibration
windows of ``--calib``, seed 0), one cell after the other, and evaluates the pruned checkpoint's
perplexity on ``--eval`` (default: the first 60,000 characters of the WikiText-2 raw test text,
the slice of issue 16's ALPS comparison) at seqlen 512. Per cell: prune seconds (the engine,
compile included), solver seconds summed per linear role, engine seconds (prune minus solver:
forward passes, Grams, placement), peak RSS so far, perplexity. Results are appended to
``--json`` as each cell finishes (``--resume`` skips cells already there).

    .venv/bin/python bench/optimization.py --model .cache/smollm2-135m \
        --cells sparsegpt:0.5 fista:0.5 l0-admm:0.5 --json bench/optimization.json

A cell is ``method:target`` or ``label=method:target:key=value,key=value`` (target a sparsity
or N:M, e.g. ``fista-old=fista:0.5:num_bisect=12,polish_iters=0``).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jprune.prune as jp
from jprune.config import PruneConfig

from common import ASSETS, add_calibration, load_average, machine

WIKI_TEST = ASSETS / "text" / "wikitext2_raw_test.txt"


def parse_cell(text: str) -> tuple[str, str, str, dict]:
    label, _, spec = text.partition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
    method, remainder = spec.split(":", 1)
    nm = re.match(r"\d+:\d+", remainder)  # an N:M target holds a colon itself
    target = nm.group(0) if nm else remainder.split(":", 1)[0]
    rest = [remainder[len(target) + 1 :]] if len(remainder) > len(target) else []
    options = {}
    for pair in rest[0].split(",") if rest else ():
        key, value = pair.split("=", 1)
        options[key] = json.loads(value) if value not in ("None",) else None
    return label or f"{method}:{target}", method, target, options


def run_cell(args, label, method, target, options, eval_file: Path) -> dict:
    target_kwargs = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    with tempfile.TemporaryDirectory() as tmp:
        config = PruneConfig.of(
            args.model,
            method,
            **target_kwargs,
            calib=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            method_options=options,
            eval_texts=[str(eval_file)],
            eval_seqlen=512,
            evaluate_dense=args.dense_first,
            out=Path(tmp) / "pruned",
        )
        started = time.perf_counter()
        report = jp.prune(config)
        wall = time.perf_counter() - started
    by_role: dict[str, float] = defaultdict(float)
    for record in report["layers"]:
        by_role[record["role"]] += record["seconds"]
    solver = sum(by_role.values())
    (perplexity,) = report["perplexity"].values()
    return {
        "label": label,
        "method": method,
        "target": target,
        "options": options,
        "prune_seconds": report["prune_seconds"],
        "solver_seconds": solver,
        "engine_seconds": report["prune_seconds"] - solver,
        "solver_seconds_by_role": dict(by_role),
        "wall_seconds": wall,
        "sparsity": report["summary"]["sparsity"],
        "relative_error_sum": report["summary"]["relative_error_sum"],
        "perplexity": perplexity["after"],
        "perplexity_dense": perplexity["before"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average": load_average(),
        "machine": machine(),
    }


ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def table(results: list[dict]) -> str:
    """Markdown: one row per cell, its time as a multiple of sparsegpt's at the same target."""
    sparsegpt = {r["target"]: r["prune_seconds"] for r in results if r["method"] == "sparsegpt"}
    fasp = {r["target"]: r["prune_seconds"] for r in results if r["method"] == "fasp"}
    lines = [
        "| cell | prune s | x sparsegpt (x fasp) | solver s | engine s | perplexity | "
        + " | ".join(f"{role} s" for role in ROLES)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(ROLES),
    ]
    for r in results:
        base = fasp if r["method"] == "spap" else sparsegpt
        ratio = r["prune_seconds"] / base[r["target"]] if r["target"] in base else None
        shown = "—" if ratio is None else f"{ratio:.2f}x"
        if r["method"] == "spap" and ratio is not None:
            shown = f"({shown})"
        by_role = r["solver_seconds_by_role"]
        lines.append(
            f"| {r['label']} | {r['prune_seconds']:.1f} | {shown} | {r['solver_seconds']:.1f} | "
            f"{r['engine_seconds']:.1f} | {r['perplexity']:.4f} | "
            + " | ".join(f"{by_role[k]:.1f}" if k in by_role else "—" for k in ROLES)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration(parser)
    parser.add_argument(
        "--eval-chars", type=int, default=60_000, help="WikiText-2 test prefix, bytes"
    )
    parser.add_argument("--cells", nargs="+", default=[], help="method:target[:options]")
    parser.add_argument("--json", type=Path, required=True, help="results file (appended)")
    parser.add_argument("--resume", action="store_true", help="skip cells already in --json")
    parser.add_argument(
        "--dense-first",
        action="store_true",
        help="also evaluate the dense model, in the first cell this run prunes",
    )
    parser.add_argument("--table", action="store_true", help="print --json as a table and stop")
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    if args.table:
        print(table(results))
        return
    done = {r["label"] for r in results}
    with tempfile.TemporaryDirectory() as tmp:
        eval_file = Path(tmp) / "wikitext2_test_prefix.txt"
        # Bytes, as ``head -c``: the protocol of the earlier smollm2 rows in RESULTS.md.
        eval_file.write_bytes(WIKI_TEST.read_bytes()[: args.eval_chars])
        for cell in args.cells:
            label, method, target, options = parse_cell(cell)
            if args.resume and label in done:
                continue
            entry = run_cell(args, label, method, target, options, eval_file)
            args.dense_first = False  # once is enough: the same model and text every cell
            results.append(entry)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"{label}: {entry['prune_seconds']:.1f} s (solver {entry['solver_seconds']:.1f} s)"
                f", ppl {entry['perplexity']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
