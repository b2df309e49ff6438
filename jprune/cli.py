"""The ``jprune`` command line: parse, show progress, call one library function, report.

``jprune prune``'s flags are generated from the run configuration (``config.SECTIONS``): one
flag per field, spelled, typed, explained and defaulted by the field itself (its ``option``
metadata), so a field added to a section is a flag, a recipe key and a report.json entry at
once. Only the flags that set no field (--config, --help-options, --distributed, --quiet) are
written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from jprune.config import (
    DTYPES,
    SECTIONS,
    EvaluationConfig,
    PruneConfig,
    read_config,
)
from jprune.errors import JpruneError
from jprune.options import Flag, default_of, parse_fields, split_optional
from jprune.plan import resolve
from jprune.stop import Interrupted


def _progress_bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    # Drawn only once work has been done: an input refused before the first batch (seqlen,
    # batch size) then ends in the one error line alone, with no bar residue on stderr.
    return tqdm(
        total=total, desc=desc, unit="block", disable=quiet, file=sys.stderr, leave=False, delay=0.1
    )


def _evaluate_text(model, tokenizer, text_source: str, seqlen: int, quiet: bool, **options):
    """Perplexity of ``model`` on a text; ``options``: ``evaluate.perplexity``'s."""
    from jprune.data import eval_windows, read_text, tokenize
    from jprune.evaluate import perplexity

    windows = eval_windows(
        tokenize(tokenizer, read_text(text_source)), seqlen, source=f"text {text_source!r}"
    )
    with _progress_bar(model.spec.num_layers, f"eval {text_source}", quiet) as bar:

        def advance(done: int, total: int) -> None:  # blocks x groups of windows
            bar.total = total
            bar.update(done - bar.n)

        return perplexity(model, windows, progress=advance, **options)


def _task_spec(args: argparse.Namespace):
    """The zero-shot tasks of ``--tasks`` and its companions, checked (None without --tasks)."""
    from jprune.zeroshot import TaskSpec

    tasks, *companions = task_flags()
    if getattr(args, tasks.dest) is None:
        for flag in companions:
            if getattr(args, flag.dest) is not None:
                raise JpruneError(f"{flag.name} is for {tasks.name}")
        return None
    return TaskSpec(*(getattr(args, f.dest) for f in (tasks, *companions))).check()


def cmd_eval_tasks(args: argparse.Namespace, spec) -> int:
    from jprune.zeroshot import evaluate_checkpoint, format_results

    result = evaluate_checkpoint(args.model, spec, batch_size=args.batch_size, dtype=args.dtype)
    if args.json:
        print(json.dumps({"model": args.model, **result.as_dict()}, default=str))
    else:
        print("\n".join(format_results(result.results)))
    return 0


def _eval_memory(args: argparse.Namespace) -> int:
    """--eval-memory, checked as ``jprune prune`` checks it (its default when not given)."""
    flag = eval_memory_flag()
    given = getattr(args, flag.dest)
    if given is None:
        return default_of(flag.field)
    return parse_fields(
        EvaluationConfig, {flag.field.name: given}, "command line: evaluation"
    ).memory_mib


def cmd_eval(args: argparse.Namespace) -> int:
    spec = _task_spec(args)
    if (spec is None) == (args.text is None):
        raise JpruneError("give one of --text (perplexity) and --tasks (zero-shot accuracy)")
    if spec is not None:
        if getattr(args, eval_memory_flag().dest) is not None:
            raise JpruneError("--eval-memory is for --text (--tasks loads the model whole)")
        return cmd_eval_tasks(args, spec)
    from jprune.converters.hf import Checkpoint
    from jprune.data import load_tokenizer

    memory_mib = _eval_memory(args)
    model = Checkpoint(args.model, dtype=args.dtype)  # read a block at a time
    tokenizer = load_tokenizer(args.model)
    seqlen = args.seqlen or model.spec.default_seqlen
    options = {"batch_size": args.batch_size, "activation_bytes": memory_mib * 2**20}
    result = _evaluate_text(model, tokenizer, args.text, seqlen, args.quiet or args.json, **options)
    if args.json:
        print(json.dumps({"model": args.model, "text": args.text, **result._asdict()}))
    else:
        print(
            f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens, {result.windows} windows of {result.seqlen})"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jprune.converters.hf import convert

    out = convert(args.model, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")
    return 0


class ConfigFlag(NamedTuple):
    """A ``jprune prune`` flag generated from one field of a configuration section."""

    section: str  # the section's name in ``config.SECTIONS`` (and in a recipe)
    field: dataclasses.Field
    hint: Any  # the field's type

    @property
    def spelling(self) -> Flag:
        return self.field.metadata.get("flag") or Flag()

    @property
    def name(self) -> str:
        return self.spelling.name or "--" + self.field.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.field.name}"

    @property
    def exclusive(self) -> str | None:
        return self.field.metadata.get("exclusive")

    def value(self, given: Any) -> Any:
        """The field's value for what argparse parsed."""
        if self.spelling.inverted:
            return not given
        if _is_mapping(self.hint):
            return dict(given)  # (key, value) pairs
        return given


def _is_mapping(hint) -> bool:
    return typing.get_origin(hint) in (Mapping, dict)


def section_flags(section: str, cls) -> list[ConfigFlag]:
    """One flag per field of the section dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    return [ConfigFlag(section, f, hints[f.name]) for f in dataclasses.fields(cls)]


def config_flags() -> list[ConfigFlag]:
    """One flag per field of every configuration section, in section order."""
    return [flag for name, cls in SECTIONS.items() for flag in section_flags(name, cls)]


def _alternatives(flag: ConfigFlag, flags: Sequence[ConfigFlag]) -> list[ConfigFlag]:
    """The other flags of ``flag``'s exclusive set (giving one unsets the others)."""
    if flag.exclusive is None:
        return []
    return [
        f
        for f in flags
        if f is not flag and (f.section, f.exclusive) == (flag.section, flag.exclusive)
    ]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"method option {text!r} is not KEY=VALUE")
    return key.strip(), value


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(n.strip() for n in text.split(",") if n.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"no names in {text!r}")
    return items


def _default_text(flag: ConfigFlag, alternatives: Sequence[ConfigFlag]) -> str:
    """The default as --help shows it: the field's own, or what leaving it unset means."""
    meta = flag.field.metadata
    if meta.get("required"):
        return "required" + "".join(f" unless {f.name}" for f in alternatives)
    default = default_of(flag.field)
    if flag.spelling.inverted:
        default = not default
    if default is None or default in ((), {}):
        shown = meta.get("unset") or "none"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = str(default)
    return f"default: {shown}"


def _argument(flag: ConfigFlag, alternatives: Sequence[ConfigFlag]) -> dict[str, Any]:
    """argparse's keywords for ``flag``: action, type and choices from the field's type.

    Every flag's argparse default is None, so a flag left out is told apart from one given,
    and the --config file keeps its value."""
    meta = flag.field.metadata
    help_text = f"{meta.get('help', '')} ({_default_text(flag, alternatives)})"
    kwargs: dict[str, Any] = {"dest": flag.dest, "help": help_text.replace("%", "%%")}
    base, _ = split_optional(flag.hint)
    if base is bool:
        return kwargs | {"action": argparse.BooleanOptionalAction}
    if _is_mapping(base):
        kwargs |= {"action": "append", "type": _key_value}
    elif typing.get_origin(base) is tuple:
        kwargs |= {"action": "append"} if flag.spelling.repeat else {"type": _comma_list}
    elif base in (int, float):
        kwargs["type"] = base
    choices = [c for c in meta.get("choices") or () if c is not None]
    if choices:
        return kwargs | {"choices": choices}
    metavar = flag.spelling.metavar or flag.name.removeprefix("--").replace("-", "_").upper()
    return kwargs | {"metavar": metavar}


def add_flags(container, flags: Sequence[ConfigFlag]) -> None:
    """One argument per flag; the alternatives of an exclusive set exclude each other."""
    exclusive_groups: dict[str, Any] = {}
    for flag in flags:
        alternatives = _alternatives(flag, flags)
        target = container
        if alternatives:
            if flag.exclusive not in exclusive_groups:
                exclusive_groups[flag.exclusive] = container.add_mutually_exclusive_group()
            target = exclusive_groups[flag.exclusive]
        target.add_argument(flag.name, **_argument(flag, alternatives))


def given_values(args: argparse.Namespace, flags: Sequence[ConfigFlag]) -> dict[str, dict]:
    """The fields set on the command line, by section; a flag left out sets nothing."""
    given: dict[str, dict] = {}
    for flag in flags:
        value = getattr(args, flag.dest)
        if value is None:
            continue
        section = given.setdefault(flag.section, {})
        section[flag.field.name] = flag.value(value)
        for other in _alternatives(flag, flags):  # the file's alternative gives way
            section.setdefault(other.field.name, default_of(other.field))
    return given


def _unset(value: Any) -> bool:
    return value is None or value == ""


def _check_required(data: Mapping[str, Mapping], flags: Sequence[ConfigFlag]) -> None:
    """Refuse, naming the flags and keys, a required field that neither the command line nor
    --config gave."""
    for flag in flags:
        if not flag.field.metadata.get("required"):
            continue
        group = [flag, *_alternatives(flag, flags)]
        if not all(_unset(data.get(f.section, {}).get(f.field.name)) for f in group):
            continue
        if len(group) == 1:
            raise JpruneError(
                f"{flag.name} is required (on the command line or as {flag.dest} in --config)"
            )
        raise JpruneError(
            f"give {' or '.join(f.name for f in group)} "
            f"(or {' / '.join(f.dest for f in group)} in --config)"
        )


def prune_config(args: argparse.Namespace):
    """The run's configuration: the --config file, then every flag given on the command line."""
    data = read_config(args.config) if args.config else {}
    data = {name: dict(section or {}) for name, section in data.items()}
    flags = config_flags()
    given = given_values(args, flags)
    file_target, given_target = data.get("target", {}), given.get("target", {})
    file_method = file_target.get("method")
    # The file's method options are for its own method: another --method starts afresh.
    same_method = given_target.get("method", file_method) == file_method
    options = dict(file_target.get("options") or {}) if same_method else {}
    options.update(given_target.get("options", {}))
    for section, values in given.items():
        data.setdefault(section, {}).update(values)
    data.setdefault("target", {})["options"] = options
    _check_required(data, flags)
    return PruneConfig.from_dict(data, f"--config {args.config}" if args.config else "command line")


def cmd_prune(args: argparse.Namespace) -> int:
    if args.help_options:
        return _print_method_options(getattr(args, "target.method"))
    run = resolve(prune_config(args))
    from tqdm import tqdm

    from jprune.prune import prune

    if args.distributed:
        from jprune.sharding import initialize_distributed

        initialize_distributed()
    bar = tqdm(total=None, desc="prune", unit="block", disable=args.quiet, file=sys.stderr)

    def progress(stage: str, done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.set_description(stage)
        bar.refresh()

    try:
        report = prune(run, progress=progress)
    finally:
        bar.close()
    summary = report["summary"]
    print(
        f"{report['method']} {report['pattern']}: sparsity {summary['sparsity']:.4f}, "
        f"summed relative error {summary['relative_error_sum']:.4g}, pruned in {report['prune_seconds']:.1f} s"
    )
    if report["parameters"] != report["parameters_before"]:
        print(f"parameters: {report['parameters_before']:,} -> {report['parameters']:,}")
    for text, ppl in report["perplexity"].items():
        before = "n/a" if ppl["before"] is None else f"{ppl['before']:.4f}"
        print(f"perplexity on {text}: {before} -> {ppl['after']:.4f}")
    if report.get("zero_shot"):
        from jprune.zeroshot import format_change

        print("\n".join(format_change(report["zero_shot"])))
    out = run.config.output.out
    if out:
        import jax

        if jax.process_index() == 0:
            print(f"wrote {out} (report.json inside)")
        else:
            print(
                f"process {jax.process_index()} of {jax.process_count()}: "
                f"{out} is written by process 0"
            )
    return 0


def _print_method_options(name: str | None) -> int:
    from jprune.methods import METHODS, get_method

    methods = [get_method(name)] if name else [METHODS[n] for n in sorted(METHODS)]
    print("\n\n".join(m.describe_options() for m in methods))
    return 0


def _wrapped(text: str) -> str:
    """A paragraph (a docstring's too) filled for the raw-description help."""
    return textwrap.fill(" ".join(text.split()), 76)


def _methods_epilog() -> str:
    """The registered methods, one line each (the registry may grow: read when the parser is
    built)."""
    from jprune.methods import METHODS

    labels = {n: n + (" (structured)" if m.structured else "") for n, m in METHODS.items()}
    width = max(map(len, labels.values()))
    lines = [
        "methods (--help-options lists each one's options; a structured method removes "
        "channels\nand writes a smaller checkpoint):"
    ]
    for name in sorted(METHODS):
        head = f"  {labels[name]:<{width}}  "
        lines.append(
            textwrap.fill(
                METHODS[name].summary, 78, initial_indent=head, subsequent_indent=" " * len(head)
            )
        )
    return "\n".join(lines)


def add_prune_parser(sub) -> None:
    pr = sub.add_parser(
        "prune",
        help="prune a model and write a pruned HF checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrapped(
            "Prune every linear inside the decoder blocks of an HF model, block by block from "
            "a calibration text, and write an HF checkpoint (dense tensors with zeros) with "
            "report.json inside. Every setting can also come from --config (YAML or JSON, one "
            f"mapping per section: {', '.join(SECTIONS)}, keyed by the field names; a "
            "report.json replays its run); flags given on the command line override the file."
        ),
        epilog=_methods_epilog(),
    )
    pr.add_argument(
        "--config",
        metavar="FILE",
        help="read the run's configuration from a YAML or JSON recipe, or from a report.json to "
        "replay that run",
    )
    pr.add_argument(
        "--help-options",
        action="store_true",
        help="list the options of --method (of every method without it) with their defaults, "
        "and exit",
    )
    groups = {}
    for name, cls in SECTIONS.items():
        groups[name] = pr.add_argument_group(name, _wrapped(cls.__doc__ or ""))
        add_flags(groups[name], section_flags(name, cls))
    groups["engine"].add_argument(
        "--distributed",
        action="store_true",
        help="multi-host run: call jax.distributed.initialize() (coordinator address, process count "
        "and id from the environment, see README); only process 0 writes --out",
    )
    groups["output"].add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_prune)


def cmd_report(args: argparse.Namespace) -> int:
    from jprune.report import plot_layers, read_report, render_table, summary_rows

    report = read_report(args.out_dir)
    print(render_table(summary_rows(report)))
    if args.plot:
        print(f"wrote {plot_layers(report, args.plot)}")
    return 0


def add_report_parser(sub) -> None:
    rp = sub.add_parser(
        "report",
        help="summarize a pruning run's report.json (and plot its layers)",
        description="Print a summary table of a jprune prune output's report.json (method, settings, "
        "perplexities and accuracies before -> after, time, memory) and, with --plot, draw per-layer "
        "sparsity, relative reconstruction error and solver certificate against depth, one line per "
        "linear role (needs matplotlib: pip install 'jprune[report]').",
    )
    rp.add_argument(
        "out_dir", metavar="OUT_DIR", help="a jprune prune output directory (or its report.json)"
    )
    rp.add_argument("--plot", metavar="FILE.png", help="write the per-layer figure to this file")
    rp.set_defaults(func=cmd_report)


TASK_FIELDS = ("tasks", "include_path", "num_fewshot", "limit")


def task_flags() -> list[ConfigFlag]:
    """The evaluation section's zero-shot fields, which ``jprune eval`` takes too."""
    flags = {f.field.name: f for f in section_flags("evaluation", EvaluationConfig)}
    return [flags[name] for name in TASK_FIELDS]


def eval_memory_flag() -> ConfigFlag:
    """The evaluation section's --eval-memory, which ``jprune eval`` takes too."""
    return next(
        f for f in section_flags("evaluation", EvaluationConfig) if f.field.name == "memory_mib"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jprune",
        description="Post-training pruning of Hugging Face LLMs in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser(
        "eval",
        help="perplexity of a model on a text, or its accuracy on lm-eval tasks",
        description="Perplexity of an HF model directory on a text file, under the protocol of METHODS.md: the whole text tokenized once, non-overlapping windows, remainder dropped. "
        "With --tasks instead of --text: lm-evaluation-harness tasks (needs pip install 'jprune[eval]') scored by jprune's JAX forward, the model loaded whole.",
    )
    ev.add_argument(
        "--model",
        required=True,
        help="Hugging Face model directory (config.json + safetensors or pytorch_model.bin, tokenizer files)",
    )
    ev.add_argument(
        "--text",
        help="text file to evaluate on, or a named dataset (wikitext2, c4) when online",
    )
    add_flags(ev, task_flags())
    ev.add_argument(
        "--seqlen",
        type=int,
        default=None,
        help="tokens per window (default: min(max_position_embeddings, 2048))",
    )
    ev.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows (with --tasks: requests) per forward pass (default: 8)",
    )
    add_flags(ev, [eval_memory_flag()])
    ev.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="cast the weights on load (default: keep the stored dtype); arithmetic is float32",
    )
    ev.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (perplexity, tokens, seqlen, ...; with --tasks lm-eval's results) instead of a sentence",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    cv = sub.add_parser(
        "convert",
        help="read an HF checkpoint as jprune does and write it back",
        description="Read an HF model directory through jprune's converter (tensor names, fused "
        "layouts, dtypes, finiteness checked) and write it back in the save_pretrained layout "
        "(a round trip is bit-exact). Safetensors are read and written a decoder block at a "
        "time, so memory holds one block (or the embeddings and head) at a time; a "
        "pytorch_model.bin has no index and is loaded whole. The output goes to a temporary directory beside --out, renamed to --out only "
        "once complete.",
    )
    cv.add_argument("--model", required=True, help="Hugging Face model directory to read")
    cv.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    cv.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="cast the weights (default: keep the stored dtype)",
    )
    cv.add_argument("--force", action="store_true", help="replace --out if it exists")
    cv.set_defaults(func=cmd_convert)

    add_prune_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except JpruneError as err:
        print(f"jprune: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stopped:  # SIGINT / SIGTERM, at a block boundary
        print(f"jprune: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("jprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
