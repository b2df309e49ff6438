"""Block reconstruction on a real model: each method without and with the stage, side by side.

Every cell prunes the same model with the same protocol in this one process (``--nsamples``
windows of ``--seqlen`` tokens of ``--calib``, seed 0), one cell after the other, and reports
the pruned checkpoint's perplexity at seqlen 512 on the first ``--eval-chars`` bytes of the
WikiText-2 raw test text and on the whole TinyStories evaluation text, its prune seconds (the
engine, compile and stage included), the stage's own seconds, and the pruning's peak RSS (the
largest of the per-block peaks report.json records, so a cell's figure does not carry an earlier
cell's). A cell is ``method:target`` (the stage off) or ``method:target:stage`` (the stage at
its defaults, ``config.ReconstructionConfig``; ``--steps`` overrides its step count). Results are appended to ``--json`` as each cell
finishes (``--resume`` skips cells already there); ``--render`` writes the ``## Block
reconstruction`` section of bench/RESULTS.md from the JSON alone, with the issue's targets
checked against it.

    .venv/bin/python bench/reconstruction.py --model .cache/smollm2-135m \\
        --json bench/reconstruction.json --render
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jprune.prune as jp
from jprune.config import PruneConfig

from common import ASSETS, RESULTS_MD, add_calibration, load_average, machine, write_section

WIKI_TEST = ASSETS / "text" / "wikitext2_raw_test.txt"
TINY_EVAL = ASSETS / "text" / "tinystories_eval.txt"
SECTION = "## Block reconstruction"
CELLS = tuple(
    f"{method}:{target}{stage}"
    for method in ("sparsegpt", "fista")
    for target in ("0.5", "0.7", "2:4")
    for stage in ("", ":stage")
)
# The run the section shows (fista 50% last: the cells the targets bite on first).
COMMAND = (
    ".venv/bin/python bench/reconstruction.py --model .cache/smollm2-135m "
    "--json bench/reconstruction.json --render --keep /work/keep --cells sparsegpt:0.5 "
    "sparsegpt:0.5:stage sparsegpt:0.7 sparsegpt:0.7:stage sparsegpt:2:4 sparsegpt:2:4:stage "
    "fista:0.7 fista:0.7:stage fista:2:4 fista:2:4:stage fista:0.5 fista:0.5:stage"
)
# The targets: WikiText-2 perplexity with the stage at most this fraction of the same
# method's without it (50%: not higher), and the bounds on time and memory.
PERPLEXITY_TARGETS = {"0.5": 1.0, "0.7": 0.8, "2:4": 0.9}
TIME_BOUND = 4.0  # x sparsegpt's prune seconds without the stage, same target
RSS_BOUND = 1.3  # x the same cell's pruning peak RSS without the stage


def parse_cell(text: str) -> tuple[str, str, bool]:
    stage = text.endswith(":stage")
    method, target = text.removesuffix(":stage").split(":", 1)
    return method, target, stage


def run_cell(args, cell: str, eval_files: dict[str, Path]) -> dict:
    method, target, stage = parse_cell(cell)
    target_kwargs = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    with tempfile.TemporaryDirectory() as tmp:
        kept = args.keep / cell.replace(":", "-") if args.keep and stage else None
        config = PruneConfig.of(
            args.model, method, **target_kwargs, calib=args.calib, nsamples=args.nsamples,
            seqlen=args.seqlen, eval_texts=[str(f) for f in eval_files.values()],
            eval_seqlen=512, evaluate_dense=args.dense, out=kept or Path(tmp) / "pruned",
            force=kept is not None,
            reconstruction={"enabled": stage} | ({"steps": args.steps} if args.steps else {}),
        )  # fmt: skip
        started = time.perf_counter()
        report = jp.prune(config)
        wall = time.perf_counter() - started
    names = {str(f): name for name, f in eval_files.items()}
    blocks = report["memory"]["blocks"]
    stage_records = (report["reconstruction"] or {}).get("blocks", [])
    return {
        "cell": cell,
        "method": method,
        "target": target,
        "stage": stage,
        "reconstruction": report["config"]["reconstruction"],
        "perplexity": {names[t]: p["after"] for t, p in report["perplexity"].items()},
        "perplexity_dense": {names[t]: p["before"] for t, p in report["perplexity"].items()},
        "prune_seconds": report["prune_seconds"],
        "stage_seconds": sum(b["seconds"].get("reconstruct", 0.0) for b in blocks),
        "wall_seconds": wall,
        "peak_rss_bytes": max(b["peak_rss_bytes"] for b in blocks),
        "sparsity": report["summary"]["sparsity"],
        "held_out": [
            [r["held_out_before"], r["held_out_after"], r["best_step"]] for r in stage_records
        ],
        "load_average": load_average(),
        "machine": machine(),
    }


def _find(results, method, target, stage):
    return next(
        (r for r in results if (r["method"], r["target"], r["stage"]) == (method, target, stage)),
        None,
    )


def render(results: list[dict]) -> str:
    """The RESULTS.md section, from the JSON alone."""
    dense = next((r["perplexity_dense"] for r in results if r["perplexity_dense"]["wiki"]), None)
    staged = next((r for r in results if r["stage"]), None)
    settings = staged["reconstruction"] if staged else {}
    lines = [
        SECTION,
        "",
        f"Machine: {results[0]['machine']}. Model: smollm2-135m. Calibration: 32 x 512 windows "
        "of `wikitext2_valid.txt`, seed 0. Perplexity at seqlen 512 on the first 60,000 bytes of "
        "`wikitext2_raw_test.txt` (wiki) and on all of `tinystories_eval.txt` (tiny). One "
        "process, the cells in the order below. The stage at its defaults: "
        + ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("seed", "enabled"))
        + ". Prune s: the whole pruning (engine, compiles, stage); stage s: the stage's part; "
        "peak RSS: the largest per-block peak of the pruning.",
        "",
        "```",
        COMMAND,
        "```",
        "",
    ]
    if dense:
        lines += [f"Dense: wiki {dense['wiki']:.2f}, tiny {dense['tiny']:.4f}.", ""]
    lines += [
        "| method | target | stage | wiki | tiny | prune s | stage s | peak RSS GB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['target']} | {'on' if r['stage'] else 'off'} | "
            f"{r['perplexity']['wiki']:.2f} | {r['perplexity']['tiny']:.4f} | "
            f"{r['prune_seconds']:.0f} | {r['stage_seconds']:.0f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['load_average'][0]:.1f} |"
        )
    lines += ["", "Targets (the issue's), each from the rows above:", ""]
    for r in results:
        if not r["stage"]:
            continue
        plain = _find(results, r["method"], r["target"], False)
        base = _find(results, "sparsegpt", r["target"], False)
        if plain is None or base is None:
            continue
        ratio = r["perplexity"]["wiki"] / plain["perplexity"]["wiki"]
        bound = PERPLEXITY_TARGETS[r["target"]]
        time_ratio = r["prune_seconds"] / base["prune_seconds"]
        rss_ratio = r["peak_rss_bytes"] / plain["peak_rss_bytes"]
        lines.append(
            f"- {r['method']} {r['target']}: wiki {r['perplexity']['wiki']:.2f} with the stage / "
            f"{plain['perplexity']['wiki']:.2f} without = {ratio:.3f} (target <= {bound}: "
            f"{'met' if ratio <= bound else 'missed'}); prune {r['prune_seconds']:.0f} s / "
            f"sparsegpt's {base['prune_seconds']:.0f} s = {time_ratio:.2f}x (target <= "
            f"{TIME_BOUND}x: {'met' if time_ratio <= TIME_BOUND else 'missed'}); peak RSS "
            f"{rss_ratio:.2f}x the run without (target <= {RSS_BOUND}x: "
            f"{'met' if rss_ratio <= RSS_BOUND else 'missed'})."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_calibration(parser)
    parser.add_argument("--eval-chars", type=int, default=60_000, help="WikiText-2 test prefix")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="method:target[:stage]")
    parser.add_argument(
        "--steps", type=int, default=None, help="the stage's steps (default: its default)"
    )
    parser.add_argument("--json", type=Path, required=True, help="results file (appended)")
    parser.add_argument(
        "--keep", type=Path, help="write the cells with the stage here (for bench/zeroshot.py)"
    )
    parser.add_argument("--resume", action="store_true", help="skip cells already in --json")
    parser.add_argument("--render", action="store_true", help="write the RESULTS.md section")
    parser.add_argument("--render-only", action="store_true", help="render --json and stop")
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    if not args.render_only:
        done = {r["cell"] for r in results} if args.resume else set()
        results = [r for r in results if r["cell"] in done]
        args.dense = not any(r["perplexity_dense"]["wiki"] for r in results)
        with tempfile.TemporaryDirectory() as tmp:
            wiki = Path(tmp) / "wikitext2_test_prefix.txt"
            wiki.write_bytes(WIKI_TEST.read_bytes()[: args.eval_chars])
            for cell in args.cells:
                if cell in done:
                    continue
                entry = run_cell(args, cell, {"wiki": wiki, "tiny": TINY_EVAL})
                args.dense = False  # the dense model once: the same model and texts every cell
                results.append(entry)
                args.json.write_text(json.dumps(results, indent=1) + "\n")
                print(
                    f"{cell}: {entry['prune_seconds']:.0f} s (stage {entry['stage_seconds']:.0f}"
                    f" s), wiki {entry['perplexity']['wiki']:.2f}",
                    flush=True,
                )
    if args.render or args.render_only:
        write_section(RESULTS_MD, render(results))


if __name__ == "__main__":
    main()
