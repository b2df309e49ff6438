"""Real models, whole pipeline: perplexity, prune seconds and peak resident memory per cell.

Every cell runs the CLI in a child process, one after the other, exactly as a user would:
``jprune prune`` (calibration ``--nsamples`` x ``--seqlen`` windows of ``--calib``, seed 0),
then ``jprune eval`` of the written checkpoint on the first ``--eval-chars`` bytes of the
WikiText-2 raw test text at seqlen 512. The resident memory of the child's process tree is
sampled every 20 ms (the engine restarts the kernel's peak counter per block, so ``ru_maxrss``
understates a run's lifetime peak). Each written checkpoint is then reloaded in transformers and
every decoder linear is checked for the exact pattern (``d_in - floor(s d_in)`` nonzeros per row,
or N of every M).

``--parity SEQLEN`` first compares ``jprune eval`` on the dense model with transformers' own
perplexity on the same windows at that seqlen (1024 puts Gemma 3's sliding window of 512 to
work).

    .venv/bin/python bench/real_model.py --model .cache/gemma3-270m --nsamples 16 \\
        --parity 1024 --cells sparsegpt:0.5 sparsegpt:2:4 fista:0.5 fista:2:4 l0-admm:0.5 l0-admm:2:4

Results are appended to ``bench/real_model.json`` (keyed by model and cell; ``--resume`` skips
cells already there) and the ``## Real models`` section of bench/RESULTS.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ASSETS,
    BENCH,
    RESULTS_MD,
    add_calibration,
    commit,
    load_average,
    measure,
    write_section,
)

RESULTS_JSON = BENCH / "real_model.json"
SECTION = "## Real models"
WIKI_TEST = ASSETS / "text" / "wikitext2_raw_test.txt"
JPRUNE = [sys.executable, "-m", "jprune.cli"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- one cell


def target_flags(target: str) -> list[str]:
    return ["--pattern", target] if ":" in target else ["--sparsity", target]


def evaluate(model: Path, text: Path, seqlen: int) -> dict:
    run = measure(
        [*JPRUNE, "eval", "--model", str(model), "--text", str(text), "--seqlen", str(seqlen)]
        + ["--json", "--quiet"]
    )
    result = json.loads(run["stdout"].strip().splitlines()[-1])
    return {
        "perplexity": result["perplexity"],
        "eval_peak_rss": run["sampled_peak_rss_bytes"],
        "eval_seconds": run["seconds"],
    }


def pattern_check(path: Path, target: str) -> dict:
    """Reload in transformers and check every decoder linear's pattern: no row (or group of
    M) holds more nonzeros than the target keeps (``d_in - floor(s d_in)``, or N). A weight
    the dense model already holds at zero may be kept and still read as zero (a quantized
    source such as Gemma 3's GGUF has ~6% of them), so "exact" (exactly that many nonzeros
    everywhere) is reported beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    within = exact = total = 0
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS):
            continue
        nonzero = (module.weight != 0).numpy()
        d_out, d_in = nonzero.shape
        if ":" in target:
            n, m = (int(v) for v in target.split(":"))
            counts, kept = nonzero.reshape(d_out, d_in // m, m).sum(-1), n
        else:
            counts, kept = nonzero.sum(1), d_in - math.floor(float(target) * d_in)
        within += int((counts <= kept).all())
        exact += int((counts == kept).all())
        total += 1
    del model
    return {"linears_within": within, "linears_exact": exact, "linears": total}


def run_cell(args, method: str, target: str, eval_text: Path, scratch: Path) -> dict:
    out = scratch / f"{method}-{target.replace(':', '-')}"
    run = measure(
        [*JPRUNE, "prune", "--model", str(args.model), "--method", method, *target_flags(target)]
        + ["--calib", str(args.calib), "--nsamples", str(args.nsamples)]
        + ["--seqlen", str(args.seqlen), "--seed", "0", "--out", str(out), "--force", "--quiet"]
    )
    report = json.loads((out / "report.json").read_text())
    entry = {
        "method": method,
        "target": target,
        "prune_seconds": report["prune_seconds"],
        "prune_wall_seconds": run["seconds"],
        "prune_peak_rss": run["sampled_peak_rss_bytes"],
        "engine_peak_rss": report.get("peak_rss_bytes"),
        "memory_bound": report.get("memory", {}).get("bound_bytes"),
        "sparsity": report["summary"]["sparsity"],
        **evaluate(out, eval_text, 512),
        **pattern_check(out, target),
    }
    return entry


def parity(model: Path, text: Path, seqlen: int) -> dict:
    """``jprune eval`` against transformers' perplexity on the same windows."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from jprune.data import eval_windows, load_tokenizer, read_text, tokenize

    ours = evaluate(model, text, seqlen)
    windows = eval_windows(tokenize(load_tokenizer(model), read_text(text)), seqlen)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for window in windows:
            ids = torch.as_tensor(window[None].astype(np.int64))
            logits = reference(ids).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    theirs = math.exp(total / (windows.shape[0] * (seqlen - 1)))
    return {
        "seqlen": seqlen,
        "windows": int(windows.shape[0]),
        "jprune": ours["perplexity"],
        "transformers": theirs,
        "relative_difference": abs(ours["perplexity"] - theirs) / theirs,
    }


# ---------------------------------------------------------------- results


def gib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**30:.2f}"


def _invocations(run: dict) -> list[str]:
    """Every invocation that wrote a figure of ``run``, in order: the cells' own, then the
    run's last one (with ``--resume`` the dense figure is the first invocation's)."""
    commands = [c["command"] for c in run["cells"]] + [run["command"]]
    return list(dict.fromkeys(commands))


def section(results: dict) -> str:
    lines = [
        SECTION,
        "",
        "Generated by `bench/real_model.py` from `bench/real_model.json`. Every cell is a",
        "`jprune prune` child process and then a `jprune eval` child process, one after the",
        "other; prune seconds are wall clock, with the 5-minute load average when the cell",
        "ended (2 means the 2 cores were busy); peak RSS is the child's process tree sampled every",
        "20 ms. Perplexity: WikiText-2 raw test, first 60,000 bytes, seqlen 512. Pattern: decoder",
        "linears, reloaded in transformers, none of whose rows (groups of M) holds more nonzeros",
        "than the target keeps; in brackets, those holding exactly that many everywhere (a",
        "weight the dense model holds at zero may be kept and read as zero).",
    ]
    for name, run in results.items():
        checkpoint = run["checkpoint_bytes"]
        lines += [
            "",
            f"### {name}",
            "",
            "```",
            *_invocations(run),
            "```",
            "",
            f"Commit {run['commit']}, {run['date']}; {run['machine']}. Calibration "
            f"{run['nsamples']} x {run['seqlen']} windows of `{run['calib']}`, seed 0. "
            f"Float32 checkpoint {checkpoint / 2**30:.2f} GiB; dense perplexity "
            f"{run['dense']['perplexity']:.4f} (`jprune eval` peak RSS "
            f"{gib(run['dense']['eval_peak_rss'])} GiB).",
        ]
        if "parity" in run:
            p = run["parity"]
            lines += [
                "",
                f"Evaluation against transformers at seqlen {p['seqlen']} ({p['windows']} "
                f"windows of the same text): jprune {p['jprune']:.6f}, transformers "
                f"{p['transformers']:.6f}, relative difference {p['relative_difference']:.2e}.",
            ]
        lines += [
            "",
            "| method | target | perplexity | x dense | prune s | prune peak RSS GiB "
            "| x checkpoint | eval peak RSS GiB | pattern | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cell in run["cells"]:
            lines.append(
                f"| {cell['method']} | {cell['target']} | {cell['perplexity']:.4f} | "
                f"{cell['perplexity'] / run['dense']['perplexity']:.2f}x | "
                f"{cell['prune_seconds']:.1f} | {gib(cell['prune_peak_rss'])} | "
                f"{cell['prune_peak_rss'] / checkpoint:.2f}x | {gib(cell['eval_peak_rss'])} | "
                f"{cell['linears_within']} / {cell['linears']} ({cell['linears_exact']} exact) | "
                f"{cell['load_average'][1]:.1f} |"
            )
    return "\n".join(lines) + "\n"


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration(parser)
    parser.add_argument("--name", help="the model's name in the results (default: folder name)")
    parser.add_argument("--cells", nargs="+", default=[], help="method:target, e.g. fista:2:4")
    parser.add_argument("--eval-chars", type=int, default=60_000, help="WikiText-2 test prefix")
    parser.add_argument("--parity", type=int, help="also compare eval with transformers here")
    parser.add_argument("--resume", action="store_true", help="keep cells already in the JSON")
    parser.add_argument("--table", action="store_true", help="rewrite the section and stop")
    args = parser.parse_args()
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if args.table:
        write_section(RESULTS_MD, section(results))
        return
    name = args.name or args.model.name
    previous = results.get(name, {}) if args.resume else {}
    for cell in previous.get("cells", []):  # cells measured before each recorded its own
        cell.setdefault("command", previous["command"])
    run = {
        "command": "python bench/real_model.py " + shlex.join(sys.argv[1:]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "calib": args.calib.name,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "checkpoint_bytes": checkpoint_bytes(args.model),
        "cells": [c for c in previous.get("cells", [])],
    }
    from common import machine

    run["machine"] = machine()
    with tempfile.TemporaryDirectory(prefix="real-model-") as tmp:
        scratch = Path(tmp)
        eval_text = scratch / "wikitext2_test_prefix.txt"
        eval_text.write_bytes(WIKI_TEST.read_bytes()[: args.eval_chars])
        run["dense"] = previous.get("dense") or evaluate(args.model, eval_text, 512)
        print(f"{name} dense: ppl {run['dense']['perplexity']:.4f}", flush=True)
        if args.parity:
            run["parity"] = parity(args.model, eval_text, args.parity)
            print(f"parity: {run['parity']}", flush=True)
        elif "parity" in previous:
            run["parity"] = previous["parity"]
        done = {(c["method"], c["target"]) for c in run["cells"]}
        for cell in args.cells:
            method, target = cell.split(":", 1)
            if (method, target) in done:
                continue
            entry = run_cell(args, method, target, eval_text, scratch)
            entry["load_average"] = load_average()
            entry["command"] = run["command"]
            run["cells"].append(entry)
            results[name] = run
            RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"{method} {target}: {entry['prune_seconds']:.1f} s, peak "
                f"{gib(entry['prune_peak_rss'])} GiB, ppl {entry['perplexity']:.4f}, pattern "
                f"{entry['linears_within']}/{entry['linears']} ({entry['linears_exact']} exact)",
                flush=True,
            )
    results[name] = run
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_section(RESULTS_MD, section(results))


if __name__ == "__main__":
    main()
