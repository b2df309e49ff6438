"""Zero-shot accuracy of dense and pruned checkpoints on a local task set, and the time of
``jprune eval --tasks`` against lm-eval's own ``hf`` model (transformers, PyTorch) on it.

The task set is built from the shared texts (no dataset downloads): two four-way
multiple-choice tasks in the style of HellaSwag's story endings. Each item is the first
``CONTEXT`` words of a paragraph, and the choices are its next ``SPAN`` words against the same
span of three other paragraphs drawn at random (seeded):

* ``wikitext_mc``: paragraphs of the WikiText-2 raw test text (headings skipped);
* ``tinystories_mc``: paragraphs of the TinyStories evaluation text.

lm-eval reports ``acc`` (summed log-likelihood) and ``acc_norm`` (per byte). The dense
checkpoint is evaluated by both models in the same process, one after the other, with the same
batch size; each time covers lm-eval's ``simple_evaluate`` (requests, scoring, metrics) on a
model already loaded, JAX's compilation included. The accuracies of the two must be equal, or
the script exits non-zero.

    .venv/bin/python bench/zeroshot.py --dense .cache/smollm2-135m \\
        --pruned sparsegpt-50=/tmp/sg50 --pruned sparsegpt-2:4=/tmp/sg24 --write
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from common import ASSETS, BENCH, RESULTS_MD, load_text, machine, read_section, write_section

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTEXT, SPAN, MIN_WORDS = 30, 8, 45
TASKS = {
    "wikitext_mc": ASSETS / "text" / "wikitext2_raw_test.txt",
    "tinystories_mc": ASSETS / "text" / "tinystories_eval.txt",
}
METRICS = ("acc,none", "acc_norm,none")


def paragraphs(text: str) -> list[list[str]]:
    lines = (line.strip() for line in text.splitlines())
    return [
        line.split()
        for line in lines
        if not line.startswith("=") and len(line.split()) >= MIN_WORDS
    ]


def items(source: Path, count: int, seed: int) -> list[dict]:
    pool = paragraphs(source.read_text())
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pool)), count)
    out = []
    for index in chosen:
        words = pool[index]
        others = [pool[i] for i in rng.sample(range(len(pool)), 4) if i != index][:3]
        label = rng.randrange(4)
        spans = [" " + " ".join(w[CONTEXT : CONTEXT + SPAN]) for w in others]
        spans.insert(label, " " + " ".join(words[CONTEXT : CONTEXT + SPAN]))
        out.append({"context": " ".join(words[:CONTEXT]), "choices": spans, "label": label})
    return out


def build_tasks(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(i) + "\n" for i in items(source, count, seed)))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1\n"
        )


def ours(path: str, spec, batch_size: int) -> tuple[dict, float]:
    from jprune.converters.hf import load_model
    from jprune.data import load_hf_tokenizer
    from jprune.zeroshot import check_tasks, evaluate_tasks

    model, _ = load_model(path)
    result = evaluate_tasks(
        model, load_hf_tokenizer(path), spec, batch_size=batch_size, manager=check_tasks(spec)
    )
    return result.results, result.seconds


def lm_eval_hf(path: str, spec, batch_size: int) -> tuple[dict, float]:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from jprune.zeroshot import check_tasks

    manager = check_tasks(spec)
    lm = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=batch_size)
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=list(spec.names), task_manager=manager, log_samples=False)
    return out["results"], time.perf_counter() - started


def pruning(directory: Path) -> dict | None:
    """How a pruned checkpoint was made, from its report.json (None: no report there)."""
    from jprune.errors import JpruneError
    from jprune.report import read_report

    try:
        data = read_report(directory)
    except JpruneError:
        return None
    target, calibration = data["config"]["target"], data["config"]["calibration"]
    return {
        "method": target["method"],
        "target": target["pattern"] or target["sparsity"],
        "options": target["options"],
        "calibration": f"{Path(calibration['text']).name}, "
        f"{calibration['nsamples']} x {calibration['seqlen']} tokens, seed {calibration['seed']}",
        "sparsity": data["summary"]["sparsity"],
        "prune_seconds": data["prune_seconds"],
        "reconstruct": (data["config"].get("reconstruction") or {}).get("enabled", False),
    }


def _changed_options(method: str, options: dict) -> str:
    """The options of a run that differ from the method's defaults, as ``k=v`` text."""
    from jprune.methods import get_method
    from jprune.options import as_dict

    defaults = as_dict(get_method(method).parse_options({}))
    return ", ".join(f"{k}={v}" for k, v in options.items() if defaults.get(k) != v)


def table(rows: dict[str, dict]) -> list[str]:
    head = "| model | " + " | ".join(f"{t} acc / acc_norm" for t in TASKS) + " | mean acc |"
    lines = [head, "|---" * (len(TASKS) + 2) + "|"]
    for label, results in rows.items():
        cells = [
            " / ".join(f"{results[t][m]:.3f}" for m in METRICS) if t in results else "missing"
            for t in TASKS
        ]
        accs = [results[t]["acc,none"] for t in TASKS if t in results]
        mean = f"{sum(accs) / len(accs):.3f}" if len(accs) == len(TASKS) else "missing"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dense", help="the dense HF checkpoint (left out: only --pruned, added to --json)"
    )
    parser.add_argument(
        "--pruned", action="append", default=[], metavar="LABEL=DIR", help="a pruned checkpoint"
    )
    parser.add_argument("--items", type=int, default=100, help="documents per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks-dir", default="/tmp/jprune-zeroshot-tasks")
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's hf model")
    parser.add_argument("--json", default=str(BENCH / "zeroshot.json"), help="results file")
    parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = parser.parse_args(argv)

    from jprune.zeroshot import TaskSpec

    build_tasks(Path(args.tasks_dir), args.items, args.seed)
    spec = TaskSpec(tuple(TASKS), include_path=args.tasks_dir).check()
    record = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    # "machine": where the dense row and the timing were measured (accuracies do not depend
    # on it; a run adding pruned rows only leaves it as it was)
    if args.dense or "machine" not in record:
        record["machine"] = machine()
    record.update(items=args.items, batch_size=args.batch_size)
    rows = record.setdefault("rows", {})
    if args.dense:
        rows["dense"], seconds = ours(args.dense, spec, args.batch_size)
        print(f"dense: {seconds:.1f} s", file=sys.stderr)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.dense and not args.no_hf:
        reference, hf_seconds = lm_eval_hf(args.dense, spec, args.batch_size)
        # jprune once more in the same process: its length buckets are compiled by now, so
        # the difference is what compilation cost the first pass.
        _, warm_seconds = ours(args.dense, spec, args.batch_size)
        record["timing"] = {
            "jprune_seconds": seconds,
            "hf_seconds": hf_seconds,
            "ratio_hf_over_jprune": hf_seconds / seconds,
            "jprune_compiled_seconds": warm_seconds,
            "load_average": load_text(),
        }
        print(json.dumps(record["timing"]), file=sys.stderr)
        for task in TASKS:
            for metric in METRICS:
                if reference[task][metric] != rows["dense"][task][metric]:
                    print(
                        f"MISMATCH {task} {metric}: hf {reference[task][metric]}", file=sys.stderr
                    )
                    return 1
    for label_dir in args.pruned:
        label, _, path = label_dir.partition("=")
        rows[label], seconds = ours(path, spec, args.batch_size)
        record.setdefault("pruning", {})[label] = pruning(Path(path))
        print(f"{label}: {seconds:.1f} s", file=sys.stderr)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(table(rows)))
    if args.write:
        write_section(RESULTS_MD, section(record))
    return 0


def section(record: dict) -> str:
    timing = record.get("timing", {})
    lines = [
        "## Zero-shot",
        "",
        f"`python bench/zeroshot.py` on {record['machine']}; {record['items']} documents per task, "
        f"batch size {record['batch_size']}. Task set built from the shared texts (module "
        "docstring: four-way story / article continuations); chance is 0.25.",
        "",
        *table(record["rows"]),
    ]
    errors = [
        results[t][m.replace(",", "_stderr,")]
        for results in record["rows"].values()
        for t in TASKS
        if t in results
        for m in METRICS
    ]
    if errors:
        lines += [
            "",
            f"Standard error of each accuracy (lm-eval's `acc_stderr`): {min(errors):.3f} to "
            f"{max(errors):.3f}; differences between rows smaller than about twice that are noise.",
        ]
    made = record.get("pruning", {})
    if made:
        lines += [
            "",
            "How each pruned row was made (its report.json; the seconds are as it recorded them,"
            " on whatever else the machine ran then):",
            "",
        ]
        for label in [r for r in record["rows"] if r in made]:
            info = made[label]
            if info is None:
                lines.append(f"- {label}: no report.json next to the checkpoint")
                continue
            options = _changed_options(info["method"], info["options"]) or "default options"
            stage = " --reconstruct" if info.get("reconstruct") else ""
            lines.append(
                f"- {label}: `jprune prune --method {info['method']}{stage}` to {info['target']} "
                f"({options}); calibration {info['calibration']}; achieved sparsity over the "
                f"decoder linears {info['sparsity']:.6f}; pruned in {info['prune_seconds']:.0f} s."
            )
    if timing:
        lines += [
            "",
            f"Time of `jprune eval --tasks` against lm-eval's `hf` model on the dense checkpoint, "
            f"same process, same tasks and batch size: jprune {timing['jprune_seconds']:.1f} s, "
            f"hf {timing['hf_seconds']:.1f} s, ratio hf / jprune **{timing['ratio_hf_over_jprune']:.2f}** "
            f"(load average {timing['load_average']}). Both gave the same accuracies. Each time "
            "is one run, JAX's compilation of each length bucket included.",
        ]
        if "jprune_compiled_seconds" in timing:
            warm = timing["jprune_compiled_seconds"]
            lines += [
                "",
                f"jprune again in the same process, its length buckets already compiled: "
                f"{warm:.1f} s, ratio hf / jprune {timing['hf_seconds'] / warm:.2f} (the first "
                f"pass spent about {timing['jprune_seconds'] - warm:.0f} s compiling).",
            ]
    notes = _hand_notes()
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


HAND_NOTES = "Notes written by hand (the script does not write them):"


def _hand_notes() -> list[str]:
    """The section's hand-written notes, kept as they are when the script rewrites it."""
    current = read_section(RESULTS_MD, "## Zero-shot").split("\n")
    if HAND_NOTES not in current:
        return []
    notes = current[current.index(HAND_NOTES) :]
    while notes and not notes[-1].strip():
        notes.pop()
    return notes


if __name__ == "__main__":
    sys.exit(main())
