"""The ``jprune`` command line: parse, show progress, call one library function, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jprune.errors import JpruneError

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _progress_bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    # Drawn only once work has been done: an input refused before the first batch (seqlen,
    # batch size) then ends in the one error line alone, with no bar residue on stderr.
    return tqdm(
        total=total, desc=desc, unit="block", disable=quiet, file=sys.stderr, leave=False, delay=0.1
    )


def _evaluate_text(model, tokenizer, text_source: str, seqlen: int, batch_size: int, quiet: bool):
    from jprune.data import eval_windows, read_text, tokenize
    from jprune.evaluate import perplexity

    windows = eval_windows(
        tokenize(tokenizer, read_text(text_source)), seqlen, source=f"text {text_source!r}"
    )
    with _progress_bar(model.spec.num_layers, f"eval {text_source}", quiet) as bar:
        return perplexity(model, windows, batch_size=batch_size, progress=bar.update)


def _task_spec(args: argparse.Namespace):
    """The zero-shot tasks of ``--tasks`` and its companions, checked (None without --tasks)."""
    from jprune.zeroshot import TaskSpec

    if args.tasks is None:
        for flag in ("include_path", "num_fewshot", "limit"):
            if getattr(args, flag) is not None:
                raise JpruneError(f"--{flag.replace('_', '-')} is for --tasks")
        return None
    return TaskSpec(args.tasks, args.include_path, args.num_fewshot, args.limit).check()


def cmd_eval_tasks(args: argparse.Namespace, spec) -> int:
    from jprune.zeroshot import evaluate_checkpoint, format_results

    result = evaluate_checkpoint(args.model, spec, batch_size=args.batch_size, dtype=args.dtype)
    if args.json:
        print(json.dumps({"model": args.model, **result.as_dict()}, default=str))
    else:
        print("\n".join(format_results(result.results)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    spec = _task_spec(args)
    if (spec is None) == (args.text is None):
        raise JpruneError("give one of --text (perplexity) and --tasks (zero-shot accuracy)")
    if spec is not None:
        return cmd_eval_tasks(args, spec)
    from jprune.converters.hf import Checkpoint
    from jprune.data import load_tokenizer

    model = Checkpoint(args.model, dtype=args.dtype)  # read a block at a time
    tokenizer = load_tokenizer(args.model)
    seqlen = args.seqlen or model.spec.default_seqlen
    result = _evaluate_text(
        model, tokenizer, args.text, seqlen, args.batch_size, args.quiet or args.json
    )
    if args.json:
        print(json.dumps({"model": args.model, "text": args.text, **result._asdict()}))
    else:
        print(
            f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens, {result.windows} windows of {result.seqlen})"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jprune.converters.hf import load_model, save_model

    model, config = load_model(args.model, dtype=args.dtype)
    out = save_model(model, config, args.out, source=args.model, force=args.force)
    print(f"wrote {out}")
    return 0


def _method_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"method option {text!r} is not KEY=VALUE")
    return key.strip(), value


# --flag -> (config section, key); flags left out of the command line keep the --config value.
FLAG_FIELDS = {
    "model": ("model", "path"),
    "dtype": ("model", "dtype"),
    "method": ("target", "method"),
    "scope": ("target", "scope"),
    "calib": ("calibration", "text"),
    "nsamples": ("calibration", "nsamples"),
    "seqlen": ("calibration", "seqlen"),
    "seed": ("calibration", "seed"),
    "intra_block": ("engine", "intra_block"),
    "batch_size": ("engine", "batch_size"),
    "mesh": ("engine", "mesh"),
    "offload": ("engine", "offload"),
    "row_blocks": ("engine", "row_blocks"),
    "matmul_precision": ("engine", "matmul_precision"),
    "eval": ("evaluation", "texts"),
    "eval_seqlen": ("evaluation", "seqlen"),
    "tasks": ("evaluation", "tasks"),
    "include_path": ("evaluation", "include_path"),
    "num_fewshot": ("evaluation", "num_fewshot"),
    "limit": ("evaluation", "limit"),
    "out": ("output", "out"),
    "force": ("output", "force"),
    "resume": ("output", "resume"),
    "allocation": ("allocation", "method"),
    "outlier_m": ("allocation", "outlier_m"),
    "owl_lambda": ("allocation", "owl_lambda"),
    "allocation_spread": ("allocation", "spread"),
    "allocation_points": ("allocation", "points"),
    "allocation_estimate": ("allocation", "estimate"),
    "allocation_weight": ("allocation", "weight"),
}


def prune_config(args: argparse.Namespace):
    """The run's configuration: the --config file, then every flag given on the command line."""
    from jprune.config import PruneConfig, read_config

    data = read_config(args.config) if args.config else {}
    data = {name: dict(section or {}) for name, section in data.items()}

    file_method = (data.get("target") or {}).get("method")

    def put(section: str, key: str, value) -> None:
        data.setdefault(section, {})[key] = value

    for flag, (section, key) in FLAG_FIELDS.items():
        if getattr(args, flag) is not None:
            put(section, key, getattr(args, flag))
    if args.parallel_blocks:
        put("engine", "sequential", False)
    if args.sparsity is not None or args.pattern is not None:
        put("target", "sparsity", args.sparsity)
        put("target", "pattern", args.pattern)
    options = dict(data.get("target", {}).get("options") or {})
    if args.method is not None and args.method != file_method:
        options = {}  # another method on the command line: the file's options were for its own
    options.update(dict(args.option or ()))
    if args.mask_from is not None:
        options["mask_from"] = args.mask_from
    put("target", "options", options)
    for section, key, flag in (
        ("model", "path", "--model"),
        ("target", "method", "--method"),
        ("calibration", "text", "--calib"),
    ):
        if not data.get(section, {}).get(key):
            raise JpruneError(
                f"{flag} is required (on the command line or as {section}.{key} in --config)"
            )
    target = data["target"]
    if target.get("sparsity") is None and target.get("pattern") is None:
        raise JpruneError(
            "give --sparsity or --pattern (or target.sparsity / target.pattern in --config)"
        )
    return PruneConfig.from_dict(data, f"--config {args.config}" if args.config else "command line")


def cmd_prune(args: argparse.Namespace) -> int:
    if args.help_options:
        return _print_method_options(args.method)
    from jprune.plan import resolve

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


def add_prune_parser(sub) -> None:
    pr = sub.add_parser(
        "prune",
        help="prune a model and write a pruned HF checkpoint",
        description="Prune every linear inside the decoder blocks of an HF model, block by block from a calibration text, "
        "and write an HF checkpoint (dense tensors with zeros) with report.json inside. Every setting can also come "
        "from --config (YAML or JSON, sections model/target/calibration/engine/evaluation/output; a report.json "
        "replays its run); flags given on the command line override the file.",
    )
    _target_flags(pr.add_argument_group("what to prune"))
    _allocation_flags(
        pr.add_argument_group("layer-wise sparsity allocation (unstructured --sparsity)")
    )
    _data_flags(pr.add_argument_group("calibration and evaluation"))
    _engine_flags(pr.add_argument_group("engine"))
    _output_flags(pr.add_argument_group("output"))
    pr.set_defaults(func=cmd_prune)


def _target_flags(group) -> None:
    from jprune.methods import METHODS
    from jprune.methods.optima import SELECTORS

    structured = sorted(n for n, m in METHODS.items() if m.structured)
    group.add_argument(
        "--config",
        metavar="FILE",
        help="read the run's configuration from a YAML or JSON recipe, or from a report.json to replay that run",
    )
    group.add_argument("--model", help="Hugging Face model directory to prune (required)")
    group.add_argument(
        "--method",
        choices=sorted(METHODS),
        help="pruning method (required); structured (channels removed, smaller checkpoint): "
        + ", ".join(structured)
        + "; --help-options lists each method's options",
    )
    group.add_argument(
        "--help-options",
        action="store_true",
        help="list the options of --method (of every method without it) with their defaults, and exit",
    )
    target = group.add_mutually_exclusive_group()
    target.add_argument(
        "--sparsity",
        type=float,
        help="fraction of weights set to zero, in (0, 1); for structured methods the fraction of channels removed",
    )
    target.add_argument(
        "--pattern",
        help="semi-structured N:M pattern: keep N of every M consecutive inputs (e.g. 2:4, 4:8)",
    )
    group.add_argument(
        "--scope",
        choices=("row", "matrix"),
        help="with --sparsity: exact count per output row (default) or per layer",
    )
    group.add_argument(
        "--option",
        action="append",
        type=_method_option,
        metavar="KEY=VALUE",
        help="a method option, checked against the method's typed options before anything is loaded, "
        "e.g. --option blocksize=64; repeat for several (--help-options lists them)",
    )
    group.add_argument(
        "--mask-from",
        metavar="SELECTOR",
        help="optima: the method whose mask is reconstructed, one of "
        + ", ".join(SELECTORS)
        + " (default: wanda)",
    )
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="cast the weights on load (default: keep the stored dtype)",
    )


def _allocation_flags(group) -> None:
    group.add_argument(
        "--allocation",
        choices=("uniform", "owl", "optimal"),
        help="how the global budget of zeros is shared among the linears: uniform (every layer at "
        "--sparsity, default), owl (outlier-weighted, Yin et al. 2023: blocks with more Wanda-score "
        "outliers keep more weights), optimal (per-layer sparsities minimising the summed estimated "
        "relative error, solved exactly with a certificate); the global count of zeros is the "
        "uniform one in every case; N:M patterns and structured methods refuse it",
    )
    group.add_argument(
        "--outlier-m",
        type=float,
        metavar="M",
        help="owl: a score is an outlier above M times its block's mean score (default: 5)",
    )
    group.add_argument(
        "--owl-lambda",
        type=float,
        metavar="LAMBDA",
        help="owl: block sparsities spread within +-LAMBDA around --sparsity (default: 0.08)",
    )
    group.add_argument(
        "--allocation-spread",
        type=float,
        metavar="S",
        help="optimal: each layer's error is measured at sparsities within +-S of --sparsity "
        "(default: 0.1)",
    )
    group.add_argument(
        "--allocation-points",
        type=int,
        metavar="K",
        help="optimal: sparsities measured per layer, odd (default: 5)",
    )
    group.add_argument(
        "--allocation-estimate",
        choices=("obs", "mask"),
        help="optimal: the layer error estimate, obs (sum of OBS single-weight errors "
        "w^2/[H^-1]_jj, default) or mask (the exact error of the Wanda mask with no update)",
    )
    group.add_argument(
        "--allocation-weight",
        choices=("equal", "residual"),
        help="optimal: how the layers' relative errors are summed: residual (default; each "
        "weighted by its sublayer's mean per-token squared update of the residual stream "
        "relative to the stream, measured on the dense model: an error where the sublayer "
        "writes much of the stream costs more) or equal (unweighted)",
    )


def _data_flags(group) -> None:
    group.add_argument("--calib", help="calibration text file (required)")
    group.add_argument("--nsamples", type=int, help="calibration windows (default: 128)")
    group.add_argument("--seqlen", type=int, help="tokens per calibration window (default: 512)")
    group.add_argument(
        "--seed", type=int, help="seed of the calibration window starts (default: 0)"
    )
    group.add_argument(
        "--eval",
        action="append",
        metavar="FILE",
        help="text to report perplexity on before and after; repeat for several",
    )
    group.add_argument(
        "--eval-seqlen", type=int, help="window length for --eval (default: --seqlen)"
    )
    _task_flags(group)  # zero-shot accuracy before and after, into report.json


def _engine_flags(group) -> None:
    group.add_argument(
        "--parallel-blocks",
        action="store_true",
        help="feed every block the dense model's inputs instead of the pruned model's (FISTAPruner's parallel mode)",
    )
    group.add_argument(
        "--intra-block",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prune q,k,v -> o -> gate,up -> down in stages, each seeing the pruned upstream outputs, targeting the "
        "dense outputs (default: the method's own protocol; on for fista; structured methods refuse it)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        help="calibration/evaluation windows per forward pass (default: 8)",
    )
    group.add_argument(
        "--mesh",
        help="devices to spread the work over: N (the first N devices) or 'auto' (all); calibration "
        "batches are split across them and each layer's rows are sharded (default: one device)",
    )
    group.add_argument(
        "--offload",
        action="store_true",
        default=None,
        help="keep block activations in host memory between forward passes (for models whose "
        "calibration activations do not fit on the accelerator)",
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host run: call jax.distributed.initialize() (coordinator address, process count "
        "and id from the environment, see README); only process 0 writes --out",
    )
    group.add_argument(
        "--matmul-precision",
        choices=("float32", "tensorfloat32"),
        help="precision of every matrix product: float32 (default) keeps Grams and solvers in "
        "true float32; tensorfloat32 lets GPUs use TF32 tensor cores (faster, ~1e-3 relative "
        "error per product; CPUs compute float32 either way)",
    )
    group.add_argument(
        "--row-blocks",
        type=int,
        metavar="N",
        help="reproducible mode: sum the Grams window by window in a fixed order and solve each "
        "layer as N equal row blocks, so the pruned weights are bit-identical on every --mesh "
        "whose size divides N (e.g. 8 for 1, 2, 4 or 8 devices); slower, most on one device; "
        "structured methods get the fixed-order Grams and solve each layer whole (default 0: off)",
    )


def _output_flags(group) -> None:
    group.add_argument(
        "--out",
        help="output directory for the pruned checkpoint and report.json (must not exist unless --force)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="replace --out if it exists, and discard an interrupted run's staging directory",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue an interrupted run from the last block finished in --out's staging "
        "directory (.OUT.partial); refused if the model, calibration or settings differ",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")


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


def _task_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no task names in {text!r}")
    return names


def _task_flags(group) -> None:
    group.add_argument(
        "--tasks",
        type=_task_names,
        metavar="NAME[,NAME...]",
        help="lm-evaluation-harness tasks to report accuracy on (lm-eval's names, e.g. "
        "boolq,arc_easy, or tasks of --include-path); needs pip install 'jprune[eval]' and each "
        "task's dataset (downloaded, cached, or a local file)",
    )
    group.add_argument(
        "--include-path",
        metavar="DIR",
        help="--tasks: a folder of lm-eval task YAMLs, searched besides lm-eval's own",
    )
    group.add_argument(
        "--num-fewshot",
        type=int,
        metavar="K",
        help="--tasks: examples in each prompt (default: each task's own, 0 for most)",
    )
    group.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="--tasks: at most N documents per task (default: all)",
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
    _task_flags(ev)
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
    ev.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
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
        help="load an HF checkpoint into JAX and save it back",
        description="Load an HF model directory into jprune's JAX model and write it back in the save_pretrained layout (a round trip is bit-exact).",
    )
    cv.add_argument("--model", required=True, help="Hugging Face model directory to read")
    cv.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    cv.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
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
    except KeyboardInterrupt:
        print("jprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
