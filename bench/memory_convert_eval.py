"""Peak resident memory of ``jprune convert`` and ``jprune eval`` (issue 29), against the bounds
the code states.

Each command runs as a child process; its process tree's resident memory (``VmRSS`` of the
process and its descendants, from /proc) is sampled every 20 ms, and the kernel's high-water
mark of the child (``wait4``'s ``ru_maxrss``) is kept beside it. ``--jprune`` names the
installation to measure (another checkout's ``.venv/bin/jprune`` measures the code before a
change); results are kept per ``--label`` in ``bench/memory_convert_eval.json`` and the
``## Memory of convert and eval`` section of bench/RESULTS.md shows every label. The convert
output's files are hashed, so labels can be compared byte for byte. Each command's baseline is
a process of the same installation before any weight: JAX started and the tokenizer loaded
(eval), the converter imported (convert).

    python bench/memory_convert_eval.py --label after --model .cache/smollm2-135m \\
        --text ../shared/assets/text/wikitext2_raw_test.txt
    python bench/memory_convert_eval.py --label before --jprune /work/main/.venv/bin/jprune \\
        --commit b7870d9 --whole-text-eval --model ... --text ...
    python bench/memory_convert_eval.py --label "after, --eval-memory 256" --skip-convert \\
        --eval-flag=--eval-memory --eval-flag=256 --model ... --text ...
    python bench/memory_convert_eval.py --section-only    # the section from the JSON

``--skip-convert`` / ``--skip-eval`` measure one command and keep the label's other one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import BENCH, RESULTS_MD, commit, load_text, machine, measure, write_section

RESULTS = BENCH / "memory_convert_eval.json"
GB = 1e9

# What each command holds before any weight: eval starts JAX and loads the tokenizer; convert
# imports the converter (JAX among it) and starts no backend.
EVAL_BASELINE = """
import sys
import jax.numpy as jnp
from jprune.data import load_tokenizer
load_tokenizer(sys.argv[1])
jnp.zeros(8).block_until_ready()
"""
CONVERT_BASELINE = "import jprune.cli, jprune.converters.hf"


# ---------------------------------------------------------------- measuring


def _file_hashes(directory: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(directory.iterdir()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.name] = digest.hexdigest()
    return hashes


# ---------------------------------------------------------------- the stated bounds


def eval_bounds(model: Path, text: Path, activation_bytes: int | None) -> dict:
    """The bounds ``jprune eval`` states on top of its baseline (README, "Memory"): the weights
    (the non-block tensors as stored, a float32 copy of the largest, one block as read and as
    placed: twice as stored) and the activations (``evaluation_bytes``; ``None``: the code before groups, every
    window at once, as it stated its bound)."""
    from jprune.converters.hf import Checkpoint
    from jprune.converters.safetensors_file import nbytes
    from jprune.data import eval_windows, load_tokenizer, read_text, tokenize
    from jprune.evaluate import LOGITS_CHUNK_BYTES, evaluation_bytes

    checkpoint = Checkpoint(model)
    spec = checkpoint.spec
    windows = eval_windows(
        tokenize(load_tokenizer(model), read_text(str(text))), spec.default_seqlen
    )
    outer = [s for n, s in checkpoint.shapes.items() if not n.startswith("layers.")]
    block = [s for n, s in checkpoint.shapes.items() if n.startswith("layers.0.")]
    weights = sum(nbytes(s) for s in outer) + 4 * max(int(np.prod(s.shape)) for s in outer)
    weights += 2 * sum(nbytes(s) for s in block)
    count, seqlen = windows.shape
    if activation_bytes is None:
        activations = 2 * count * seqlen * spec.hidden_size * 4 + 2 * LOGITS_CHUNK_BYTES
    else:
        activations = evaluation_bytes(spec, windows.shape, 8, activation_bytes)
    return {"windows": count, "seqlen": seqlen, "weights": weights, "activations": activations}


def _activation_bytes(args) -> int:
    from jprune.evaluate import ACTIVATION_BYTES

    flags = args.eval_flag
    if "--eval-memory" in flags:
        return int(flags[flags.index("--eval-memory") + 1]) * 2**20
    return ACTIVATION_BYTES


def run(args) -> dict:
    jprune = str(args.jprune)
    python = str(Path(jprune).with_name("python"))
    entry = {
        "commit": args.commit or commit(),
        "jprune": jprune,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average": load_text(),
        "model": str(args.model),
        "text": str(args.text),
        "eval_flags": args.eval_flag,
        # what the measured code evaluates at once: None, every window (before issue 29)
        "eval_activation_bytes": None if args.whole_text_eval else _activation_bytes(args),
    }
    if not args.skip_convert:
        entry["convert_baseline"] = measure([python, "-c", CONVERT_BASELINE])
        with tempfile.TemporaryDirectory(prefix="conv-") as scratch:
            out = Path(scratch) / "out"
            command = [jprune, "convert", "--model", str(args.model), "--out", str(out)]
            entry["convert"] = measure(command) | {"files": _file_hashes(out)}
    if not args.skip_eval:
        entry["baseline"] = measure([python, "-c", EVAL_BASELINE, str(args.model)])
        command = [jprune, "eval", "--model", str(args.model), "--text", str(args.text), "--json"]
        entry["eval"] = measure([*command, *args.eval_flag])
        entry["eval"]["result"] = json.loads(entry["eval"]["stdout"])
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="the row's name (results are kept per label)")
    parser.add_argument("--model", type=Path, help="HF checkpoint folder")
    parser.add_argument("--text", type=Path, help="evaluation text")
    parser.add_argument(
        "--jprune",
        type=Path,
        default=Path(sys.executable).with_name("jprune"),
        help="the jprune to measure (default: this environment's)",
    )
    parser.add_argument("--commit", help="what --jprune runs (default: this checkout's HEAD)")
    parser.add_argument("--eval-flag", action="append", default=[], help="extra jprune eval flag")
    parser.add_argument("--skip-convert", action="store_true", help="measure jprune eval only")
    parser.add_argument("--skip-eval", action="store_true", help="measure jprune convert only")
    parser.add_argument(
        "--whole-text-eval",
        action="store_true",
        help="the measured jprune evaluates every window at once (the code before issue 29): "
        "its bound is the one that code stated",
    )
    parser.add_argument(
        "--section-only", action="store_true", help="rewrite the section from the JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if not args.section_only and None in (args.label, args.model, args.text):
        parser.error("--label, --model and --text are required to measure")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.section_only:
        results[args.label] = results.get(args.label, {}) | run(args)  # a skipped part stays
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_section(RESULTS_MD, section(results))
    return 0


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.3f} GB"


def section(results: dict) -> str:
    from jprune.converters.hf import Checkpoint, convert_bytes

    lines = [
        "## Memory of convert and eval",
        "",
        "`python bench/memory_convert_eval.py --label LABEL --model .cache/smollm2-135m --text "
        "../shared/assets/text/wikitext2_raw_test.txt [--jprune OTHER/.venv/bin/jprune --commit C "
        "--whole-text-eval] [--skip-convert | --skip-eval] [--eval-flag=--eval-memory "
        "--eval-flag=MIB]` (issue 29). Each command runs in its own process; peak RSS is its "
        "process tree's VmRSS sampled every 20 ms (the kernel's `ru_maxrss` beside it). "
        "Baselines are processes of the same installation before any weight: for eval, JAX "
        "started and the tokenizer loaded; for convert, the converter imported. Bounds are the "
        "README's, on top of the baseline: convert `converters.hf.convert_bytes` (the code "
        "before streaming loaded the whole model: no bound is shown for it); eval the weights "
        "(non-block tensors + a float32 copy of the largest + one block as read and placed) + "
        "the activations (`evaluate.evaluation_bytes`; the code before groups stated every "
        "window's, `2 x windows x seqlen x hidden x 4` + 2 x 64 MiB). XLA's compiled programs "
        "and working buffers come on top of the bounds.",
        "",
        "| label | commit | command | wall | peak RSS (sampled) | ru_maxrss | baseline "
        "| peak - baseline | stated bound | above the bound | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for label, entry in results.items():
        model = Path(entry["model"])
        rows = []
        if "convert" in entry:
            streamed = entry["eval_activation_bytes"] is not None
            bound = convert_bytes(Checkpoint(model)) if streamed else None
            rows.append(
                ("convert", entry["convert"], entry["convert_baseline"], bound, _digest(entry))
            )
        if "eval" in entry:
            bounds = eval_bounds(model, Path(entry["text"]), entry["eval_activation_bytes"])
            bound = bounds["weights"] + bounds["activations"]
            shown = f"perplexity {entry['eval']['result']['perplexity']!r}"
            rows.append(("eval", entry["eval"], entry["baseline"], bound, shown))
            notes.append(f"- {label}: eval on {bounds['windows']} windows of {bounds['seqlen']}.")
        for name, measured, baseline, bound, shown in rows:
            peak, base = measured["sampled_peak_rss_bytes"], baseline["sampled_peak_rss_bytes"]
            flags = " ".join(entry["eval_flags"]) if name == "eval" else ""
            stated = (
                ("whole model", "") if bound is None else (_gb(bound), _gb(peak - base - bound))
            )
            lines.append(
                f"| {label} | {entry['commit']} | {name} {flags}".rstrip()
                + f" | {measured['seconds']:.0f} s | {_gb(peak)} | "
                f"{_gb(measured['ru_maxrss_bytes'])} | {_gb(base)} | {_gb(peak - base)} "
                f"| {stated[0]} | {stated[1]} | {shown} |"
            )
        notes.append(
            f"- {label}: last measured {entry['date']}, {entry['machine']} (load average "
            f"{entry['load_average']})."
        )
    perplexities = {e["eval"]["result"]["perplexity"] for e in results.values() if "eval" in e}
    digests = {_digest(e) for e in results.values() if "convert" in e}
    notes.append(
        f"- Perplexities equal across labels: {len(perplexities) == 1}; convert outputs "
        f"identical file for file across labels (the digest of their SHA-256s): "
        f"{len(digests) == 1}."
    )
    return "\n".join([*lines, "", *notes])


def _digest(entry: dict) -> str:
    """A short digest of the convert output's file hashes (equal outputs, equal digests)."""
    files = json.dumps(entry["convert"]["files"], sort_keys=True).encode()
    return "files " + hashlib.sha256(files).hexdigest()[:12]


if __name__ == "__main__":
    sys.exit(main())
