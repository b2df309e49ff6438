"""Out-of-core pruning against loading the whole model, side by side in one run.

Both paths prune the same checkpoint with the same settings, each in its own process:

* streamed: ``jprune prune`` (the default): blocks read, pruned, written and dropped one at a
  time; evaluation block by block with chunked head logits;
* in memory: ``load_model`` + ``engine.prune_model`` on the loaded ``CausalLM`` (the API path
  for notebooks), ``save_model`` and ``perplexity`` of the loaded model.

Reported: wall time, peak resident memory (the process's high-water mark folded over the
engine's per-block restarts: ``jprune.memory.lifetime_peak``), the stated bound, the
perplexities, and whether the two checkpoints are bit-identical. Writes the
``## Out-of-core pruning`` section of bench/RESULTS.md.

    python bench/streaming.py --model .cache/smollm2-135m --calib ../shared/assets/text/wikitext2_valid.txt \\
        --eval /tmp/wiki60k.txt --nsamples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_MD, identical, load_text, machine, write_section

IN_MEMORY = """
import json, sys, time
from jprune import memory
from jprune.converters.hf import load_model, save_model
from jprune.data import calibration_windows, eval_windows, load_tokenizer, read_text, tokenize
from jprune.engine import EngineOptions, prune_model
from jprune.evaluate import perplexity
from jprune.methods import get_method
from jprune.solvers import Unstructured

model_dir, calib, text, nsamples, seqlen, method, sparsity, out = sys.argv[1:9]
started = time.perf_counter()
tokenizer = load_tokenizer(model_dir)
windows = calibration_windows(
    tokenize(tokenizer, read_text(calib, split="train")), int(nsamples), int(seqlen), 0
)
evaluation = eval_windows(tokenize(tokenizer, read_text(text)), int(seqlen))
model, config = load_model(model_dir)
before = perplexity(model, evaluation).perplexity
chosen = get_method(method)
outcome = prune_model(
    model, windows, chosen, Unstructured(float(sparsity)), None,
    EngineOptions(intra_block=chosen.intra_block), hf_config=config,
)
after = perplexity(outcome.model, evaluation).perplexity
save_model(outcome.model, config, out, source=model_dir, force=True)
print(json.dumps({
    "seconds": time.perf_counter() - started, "peak_rss_bytes": memory.lifetime_peak(),
    "before": before, "after": after,
}))
"""


def streamed(args, out: Path) -> dict:
    command = [
        str(Path(sys.executable).parent / "jprune"), "prune", "--model", args.model,
        "--method", args.method, "--sparsity", str(args.sparsity), "--calib", args.calib,
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", args.eval,
        "--out", str(out), "--force", "--quiet",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    ppl = next(iter(report["perplexity"].values()))
    usage = report["memory"]
    return {
        "seconds": seconds,
        "peak_rss_bytes": usage["peak_rss_bytes"],
        "baseline_rss_bytes": usage["baseline_rss_bytes"],
        "bound_bytes": max(usage["bound_bytes"], usage["eval_bound_bytes"]),
        "before": ppl["before"],
        "after": ppl["after"],
    }


def in_memory(args, out: Path) -> dict:
    command = [
        sys.executable, "-c", IN_MEMORY, args.model, args.calib, args.eval,
        str(args.nsamples), str(args.seqlen), args.method, str(args.sparsity), str(out),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "streamed (jprune prune)": streamed(args, Path(tmp) / "streamed"),
            "whole model in memory": in_memory(args, Path(tmp) / "in-memory"),
        }
        same = identical(Path(tmp) / "streamed", Path(tmp) / "in-memory")
    gb = 1e9
    lines = [
        "## Out-of-core pruning",
        "",
        f"`python bench/streaming.py --model {args.model} --calib {args.calib} --eval {args.eval} "
        f"--method {args.method} --sparsity {args.sparsity} --nsamples {args.nsamples} "
        f"--seqlen {args.seqlen}`, on {machine()} (load average {load_text()}). Both paths run in "
        "their own process, one after the other; wall time includes loading, both evaluations "
        "and writing.",
        "",
        "| path | wall time | peak RSS | perplexity before -> after |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['seconds']:.1f} s | {row['peak_rss_bytes'] / gb:.2f} GB | "
            f"{row['before']:.4f} -> {row['after']:.4f} |"
        )
    stream, whole = rows["streamed (jprune prune)"], rows["whole model in memory"]
    lines += [
        "",
        f"- Time ratio streamed / in memory: {stream['seconds'] / whole['seconds']:.2f}; "
        f"peak RSS ratio: {stream['peak_rss_bytes'] / whole['peak_rss_bytes']:.2f}.",
        f"- The two checkpoints are {'bit-identical' if same else 'NOT bit-identical'}.",
        f"- Streamed run: baseline (runtime and tokenizer, before any weight) "
        f"{stream['baseline_rss_bytes'] / gb:.2f} GB; stated bound on top of it "
        f"{stream['bound_bytes'] / gb:.2f} GB; measured on top of it "
        f"{(stream['peak_rss_bytes'] - stream['baseline_rss_bytes']) / gb:.2f} GB (the rest is "
        "XLA's compiled programs and allocator slack).",
    ]
    write_section(RESULTS_MD, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
