"""The block-reconstruction stage's learning rate, chosen on tuning text.

The runs are ``jprune prune`` commands (below) on smollm2-135m: sparsegpt at 70%, calibration
32 x 512 windows of ``wikitext2_valid.txt`` (seed 0), the stage at 16 steps of 4 windows with
learning rates 1e-4, 3e-4, 1e-3 and 3e-3, and one run without it; perplexity on the first 60,000
bytes of ``wikitext2_valid.txt`` and of ``tinystories_calib.txt`` (tuning texts, never
reported as results). The signal per block is the stage's objective on its held-out
calibration windows (also tuning text), before and after. Runs stopped early to save time
count with the blocks they finished (their journal). This script gathers the runs' report.json
or journal into ``--json`` and writes the ``## Block reconstruction: tuning`` section of
bench/RESULTS.md from it.

    .venv/bin/python bench/reconstruction_tuning.py --runs /work/tune --json \\
        bench/reconstruction_tuning.json
    .venv/bin/python bench/reconstruction_tuning.py --json bench/reconstruction_tuning.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jprune.config import ReconstructionConfig

from common import RESULTS_MD, write_section

SECTION = "## Block reconstruction: tuning"
DEFAULT_RATE = ReconstructionConfig().learning_rate
COMMAND = (
    "jprune prune --model .cache/smollm2-135m --method sparsegpt --sparsity 0.7 "
    "--calib ../shared/assets/text/wikitext2_valid.txt --nsamples 32 --seqlen 512 --seed 0 "
    "--eval wiki_valid_60k.txt --eval tiny_calib_60k.txt --eval-seqlen 512 --no-eval-dense "
    "[--reconstruct --reconstruct-steps 16 --reconstruct-lr LR] --out sgpt70-lrLR"
)


def gather(runs: Path) -> list[dict]:
    """Each run folder's (finished: report.json; stopped: its journal) records."""
    found = []
    for folder in sorted(runs.glob("sgpt70-lr*")) + sorted(runs.glob(".sgpt70-lr*.partial")):
        if not folder.is_dir():
            continue
        rate = folder.name.strip(".").removeprefix("sgpt70-lr").removesuffix(".partial")
        report = folder / "report.json"
        if report.exists():
            data = json.loads(report.read_text())
            blocks = (data["reconstruction"] or {}).get("blocks", [])
            perplexity = {Path(t).name: p["after"] for t, p in data["perplexity"].items()}
            finished = True
        else:
            journal = json.loads((folder / "jprune-progress.json").read_text())
            blocks, perplexity, finished = journal.get("reconstruction", []), {}, False
        if any(r["learning_rate"] == rate for r in found):
            continue  # a finished run's staging folder is gone; a stopped one has no report
        found.append(
            {
                "learning_rate": rate,
                "finished": finished,
                "perplexity": perplexity,
                "held_out": [[b["held_out_before"], b["held_out_after"]] for b in blocks],
            }
        )
    return found


def render(runs: list[dict]) -> str:
    lines = [
        SECTION,
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "```",
        COMMAND,
        "```",
        "",
        "| learning rate | blocks | held-out objective after / before, mean over blocks | "
        "wiki valid ppl | tiny calib ppl |",
        "|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: float(r["learning_rate"])):
        held = run["held_out"]
        ratio = sum(a / b for b, a in held) / len(held) if held else None
        ppl = {k: f"{v:.2f}" for k, v in run["perplexity"].items()}
        rate = run["learning_rate"] if float(run["learning_rate"]) else "off (no stage)"
        lines.append(
            f"| {rate} | {len(held)}{'' if run['finished'] else ' (stopped)'} | "
            f"{'—' if ratio is None else f'{ratio:.3f}'} | "
            f"{ppl.get('wiki_valid_60k.txt', '—')} | {ppl.get('tiny_calib_60k.txt', '—')} |"
        )
    rates = [r for r in runs if r["held_out"]]
    common = min((len(r["held_out"]) for r in rates), default=0)
    if common:
        lines += [
            "",
            f"On the first {common} blocks, which every run with the stage finished "
            "(held-out objective after / before, mean): "
            + ", ".join(
                f"lr {r['learning_rate']}: "
                f"{sum(a / b for b, a in r['held_out'][:common]) / common:.3f}"
                for r in rates
            )
            + ".",
        ]
    finished = [r for r in rates if r["finished"]]
    off = next((r for r in runs if not float(r["learning_rate"]) and r["perplexity"]), None)
    lines += [
        "",
        f"Chosen: {DEFAULT_RATE} (`config.ReconstructionConfig`), of the finished runs with the "
        f"stage ({', '.join(r['learning_rate'] for r in finished)}) the one with the lowest "
        "held-out ratio. 3e-3 led on the blocks it finished before it was stopped for time: a "
        "larger rate is not ruled out.",
    ]
    for run in finished:
        if off:
            cuts = ", ".join(
                f"{name} {1 - run['perplexity'][name] / p:.0%}"
                for name, p in off["perplexity"].items()
            )
            lines[-1] += f" lr {run['learning_rate']} cut the tuning perplexities by {cuts}."
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, help="the folder of the tuning runs (gather)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.runs:
        args.json.write_text(json.dumps(gather(args.runs), indent=1) + "\n")
    write_section(RESULTS_MD, render(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
