"""Perplexity and pruning time of every unstructured / N:M method on the shared models.

For each model, method and target: prune with the shared calibration protocol (TinyStories
calibration text, 128 windows of 512 tokens, seed 0), write the HF checkpoint, reload it with
jprune's loader and evaluate perplexity on the TinyStories evaluation text (all windows) and on
WikiText-2 (the first ``--wikitext-windows`` windows: the full 1,591-window text costs ten times
the rest of a run on this CPU; the dense model is also reported on the whole text).

Results go to ``bench/prune_results.json`` (one entry per run, so an interrupted run resumes
with ``--resume``) and to the ``## Unstructured and N:M pruning`` section of ``bench/RESULTS.md``.

    .venv/bin/python bench/prune.py                      # the whole grid
    .venv/bin/python bench/prune.py --models stories260K --methods fista sparsegpt --targets 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jprune.prune as jp
from jprune.config import PruneConfig
from jprune.converters.hf import load_model
from jprune.data import eval_windows, load_tokenizer, read_text, tokenize
from jprune.errors import JpruneError
from jprune.evaluate import perplexity

from common import ASSETS, BENCH, RESULTS_MD, machine, read_section, write_section

CALIB = ASSETS / "text" / "tinystories_calib.txt"
TEXTS = {
    "tinystories": ASSETS / "text" / "tinystories_eval.txt",
    "wikitext2": ASSETS / "text" / "wikitext2_raw_test.txt",
}
RESULTS_JSON = BENCH / "prune_results.json"
SECTION = "## Unstructured and N:M pruning"

# label -> (registered method, method options)
METHODS = {
    "magnitude": ("magnitude", {}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "fista": ("fista", {}),
    # fista's defaults before issue 16 (lasso 12 x 30, pursuit, refit to d_in CG steps).
    "fista-pursuit": (
        "fista",
        {
            "num_bisect": 12,
            "maxiter": 30,
            "polish_iters": 0,
            "pursuit_steps": 10,
            "refit_iters": None,
        },
    ),
    "l0-admm": ("l0-admm", {}),
    # How much upstream error fista undoes (default 0.25; 1 is the paper's dense target).
    "fista-c0": ("fista", {"correction": 0.0}),
    "fista-c0.5": ("fista", {"correction": 0.5}),
    "fista-c1": ("fista", {"correction": 1.0}),
    "fista-paper": ("fista", {"refit": False, "correction": 1.0}),
    "optima-wanda": ("optima", {"mask_from": "wanda"}),
    # optima's CG ran to tolerance (at most 4 d_in steps) before issue 16 capped it.
    "optima-wanda-cg4d": ("optima", {"mask_from": "wanda", "maxiter": None}),
    "optima-sparsegpt": ("optima", {"mask_from": "sparsegpt", "maxiter": None}),
    "optima-wanda-tol1e-2": ("optima", {"mask_from": "wanda", "tol": 1e-2, "maxiter": None}),
}
TARGETS = ("0.5", "0.6", "0.7", "2:4", "4:8")


def windows_for(model_dir: Path, wikitext_windows: int) -> dict:
    tokenizer = load_tokenizer(model_dir)
    tiny = eval_windows(tokenize(tokenizer, read_text(TEXTS["tinystories"])), 512)
    wiki = eval_windows(tokenize(tokenizer, read_text(TEXTS["wikitext2"])), 512)
    return {"tinystories": tiny, "wikitext2": wiki[:wikitext_windows], "wikitext2_full": wiki}


def evaluate(model, windows: dict, full: bool = False) -> dict:
    names = ("tinystories", "wikitext2", "wikitext2_full") if full else ("tinystories", "wikitext2")
    return {name: perplexity(model, windows[name], batch_size=8).perplexity for name in names}


def run_one(model_dir: Path, label: str, target: str, args, windows: dict) -> dict:
    method, options = METHODS[label]
    target_kwargs = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    entry = {"model": model_dir.name, "method": label, "target": target}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        try:
            config = PruneConfig.of(
                model_dir,
                method,
                **target_kwargs,
                calib=CALIB,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                seed=args.seed,
                out=out,
                method_options=options,
            )
            report = jp.prune(config)
        except JpruneError as err:
            return entry | {"skipped": str(err)}
        pruned, _ = load_model(out)
        entry |= {
            "ppl": evaluate(pruned, windows),
            "sparsity": report["summary"]["sparsity"],
            "relative_error_sum": report["summary"]["relative_error_sum"],
            "prune_seconds": report["prune_seconds"],
            "wall_seconds": report["wall_seconds"],
        }
    return entry


def _fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def earlier_text() -> tuple[list[str], str]:
    """The section's command list and the notes under it, so a new run adds to them.

    Notes are the hand-written paragraphs between the command block and the first table.
    """
    section = read_section(RESULTS_MD, SECTION)
    if "```" not in section:
        return [], ""
    _, block, rest = section.split("```", 2)
    notes = rest.split("\n### ", 1)[0].strip("\n")
    return [line.rstrip() for line in block.strip("\n").splitlines()], notes


def render(results: list[dict], args) -> str:
    commands, notes = earlier_text()
    if "    " + args.command not in commands:
        commands.append("    " + args.command)
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}. Calibration: `tinystories_calib.txt`, {args.nsamples} windows x "
        f"{args.seqlen} tokens, seed {args.seed}. Perplexity at seqlen 512 on `tinystories_eval.txt` "
        f"(all 161 windows) and on the first {args.wikitext_windows} windows of "
        '`wikitext2_raw_test.txt` ("wiki*"; the dense model on the whole text is given too). '
        "Error: relative reconstruction error `||W Xp - W0 X||^2 / ||W0 X||^2` summed over the "
        "decoder linears (fista measures it against the dense block's outputs, the others against "
        "their own inputs, so compare it within a method). Time: pruning wall time (engine, "
        "compile included), then fista's as a multiple of sparsegpt's.",
        "",
        "```",
        *commands,
        "```",
        "",
        *([notes, ""] if notes else []),
    ]
    for model in sorted({r["model"] for r in results if r.get("method") != "dense"}):
        dense = next((r for r in results if r["model"] == model and r["method"] == "dense"), None)
        lines.append(f"### {model}")
        lines.append("")
        if dense:
            ppl = dense["ppl"]
            lines.append(
                f"Dense: tinystories {ppl['tinystories']:.4f}, wiki* {ppl['wikitext2']:.2f}, "
                f"WikiText-2 (whole text) {ppl['wikitext2_full']:.2f}."
            )
            lines.append("")
        targets = [
            t for t in TARGETS if any(r["model"] == model and r["target"] == t for r in results)
        ]
        header = "| method | " + " | ".join(f"{t} tiny / wiki* / error / s" for t in targets) + " |"
        lines += [header, "|---" * (len(targets) + 1) + "|"]
        for label in METHODS:
            row = [label]
            found = False
            for target in targets:
                r = next(
                    (
                        r
                        for r in results
                        if (r["model"], r["method"], r["target"]) == (model, label, target)
                    ),
                    None,
                )
                if r is None:
                    row.append("")
                elif "skipped" in r:
                    found = True
                    row.append("n/a")
                else:
                    found = True
                    row.append(
                        f"{_fmt(r['ppl']['tinystories'])} / {_fmt(r['ppl']['wikitext2'], 1)} / "
                        f"{_fmt(r['relative_error_sum'], 3)} / {r['prune_seconds']:.0f}"
                    )
            if found:
                lines.append("| " + " | ".join(row) + " |")
        for method in ("fista", "l0-admm"):
            ratios = []
            for target in targets:
                pair = [
                    next(
                        (
                            r
                            for r in results
                            if (r["model"], r["method"], r["target"]) == (model, m, target)
                            and "ppl" in r
                        ),
                        None,
                    )
                    for m in (method, "sparsegpt")
                ]
                if all(pair):
                    ratios.append(
                        f"{target}: {pair[0]['prune_seconds'] / pair[1]['prune_seconds']:.2f}x"
                    )
            if ratios:
                lines += ["", f"{method} / sparsegpt pruning time: " + ", ".join(ratios) + "."]
        skipped = {r["skipped"] for r in results if r["model"] == model and "skipped" in r}
        for reason in sorted(skipped):
            lines += ["", f"n/a: {reason}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["stories260K", "stories-mini"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wikitext-windows", type=int, default=128)
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in prune_results.json"
    )
    args = parser.parse_args()
    args.command = "python bench/prune.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("resume",)
    )
    results = json.loads(RESULTS_JSON.read_text()) if args.resume and RESULTS_JSON.exists() else []
    done = {(r["model"], r["method"], r["target"]) for r in results}
    for model_name in args.models:
        model_dir = ASSETS / "models" / model_name
        windows = windows_for(model_dir, args.wikitext_windows)
        if (model_name, "dense", "-") not in done:
            dense, _ = load_model(model_dir)
            results.append(
                {
                    "model": model_name,
                    "method": "dense",
                    "target": "-",
                    "ppl": evaluate(dense, windows, full=True),
                }
            )
        for target in args.targets:
            for label in args.methods:
                if (model_name, label, target) in done:
                    continue
                started = time.perf_counter()
                entry = run_one(model_dir, label, target, args, windows)
                results.append(entry)
                RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
                write_section(RESULTS_MD, render(results, args))
                summary = entry.get("skipped") or f"tiny {entry['ppl']['tinystories']:.3f}"
                print(
                    f"{model_name} {label} {target}: {summary} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_section(RESULTS_MD, render(results, args))


if __name__ == "__main__":
    main()
