"""Structured pruning benchmark: perplexity of fasp / spap / wanda-sp and the exported model's speed.

    .venv/bin/python bench/structured.py --out bench/structured.json      # run (appends rows)
    .venv/bin/python bench/structured.py --out bench/structured.json --results bench/RESULTS.md

For each model: prune MLP channels (and, with ``attention``, v/o channels too) at each ratio,
perplexity on the TinyStories eval text and WikiText-2 (seqlen 512), pruning time. Speed: the
30%-MLP fasp export of stories-mini against the dense checkpoint, both loaded by
``transformers.AutoModelForCausalLM`` in this process, forward passes interleaved, median.
Rows are appended to the JSON as they finish, so an interrupted run keeps what it measured;
``--resume`` skips the (model, nsamples, scope, ratio, method) rows the JSON already holds, and
``--methods`` limits the run to some methods. ``--results`` rewrites only the
``## Structured pruning`` section of RESULTS.md from the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ASSETS, load_average, seconds, write_section

TEXTS = {"tinystories": "tinystories_eval.txt", "wikitext2": "wikitext2_raw_test.txt"}
RATIOS = (0.1, 0.2, 0.3, 0.5)
METHODS = ("wanda-sp", "fasp", "spap")
SECTION = "## Structured pruning"


def prune_structured(net, hf_config, calibration, method, ratio, options, batch_size=8):
    """The engine on an in-memory model (pruned in place): (model, records, config, files)."""
    from jprune.engine import EngineOptions, prune_model
    from jprune.methods import Channels, get_method

    chosen = get_method(method)
    return prune_model(
        net,
        calibration,
        chosen,
        Channels(ratio),
        chosen.parse_options(options),
        EngineOptions(batch_size=batch_size),
        hf_config=hf_config,
    )


def _windows(model_dir, seqlen: int, max_windows: dict[str, int | None]):
    from jprune.data import eval_windows, load_tokenizer, read_text, tokenize

    tokenizer = load_tokenizer(model_dir)
    out = {}
    for name, file in TEXTS.items():
        windows = eval_windows(tokenize(tokenizer, read_text(ASSETS / "text" / file)), seqlen)
        out[name] = windows[: max_windows.get(name)]
    return tokenizer, out


def _append(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*rows, row], indent=1) + "\n")


def _key(row: dict) -> tuple:
    return (row["model"], row["nsamples"], row["attention"], row["ratio"], row["method"])


def label(method: str, correction: float, swap_rtol: float | None = None) -> str:
    """Rows with ``--correction c`` / ``--swap-rtol r`` are kept apart as ``spap-c<c>-rtol<r>``."""
    name = method if correction == 0 else f"{method}-c{correction:g}"
    return name if swap_rtol is None else f"{name}-rtol{swap_rtol:g}"


def run_quality(
    model_name,
    path,
    nsamples,
    seqlen,
    attention_ratios,
    wiki_windows,
    batch,
    methods,
    resume,
    correction=0.0,
    swap_rtol=None,
):
    from jprune.converters.hf import load_model
    from jprune.data import calibration_windows, read_text, tokenize
    from jprune.evaluate import perplexity
    from jprune.model import CausalLM, named_arrays, parameter_count

    model_dir = ASSETS / "models" / model_name
    net, config = load_model(model_dir)
    tokenizer, evals = _windows(model_dir, seqlen, {"wikitext2": wiki_windows})
    calib = calibration_windows(
        tokenize(tokenizer, read_text(ASSETS / "text" / "tinystories_calib.txt", split="train")),
        nsamples,
        seqlen,
        0,
    )
    common = {"model": model_name, "nsamples": nsamples, "seqlen": seqlen}
    common["eval_windows"] = {k: int(v.shape[0]) for k, v in evals.items()}
    done = set()
    if resume and path.exists():
        done = {_key(r) for r in json.loads(path.read_text()) if "model" in r}
    if (model_name, nsamples, False, 0.0, "dense") not in done:
        dense = {k: perplexity(net, w, batch_size=batch).perplexity for k, w in evals.items()}
        _append(
            path,
            {
                **common,
                "method": "dense",
                "ratio": 0.0,
                "attention": False,
                "ppl": dense,
                "parameters": parameter_count(net),
                "seconds": 0.0,
            },
        )
    for attention in (False, True):
        for ratio in RATIOS if not attention else attention_ratios:
            for method in methods:
                name = label(method, correction, swap_rtol)
                if (model_name, nsamples, attention, ratio, name) in done:
                    continue
                options = {"attention": attention, "correction": correction}
                if swap_rtol is not None:
                    options["swap_rtol"] = swap_rtol
                started = time.perf_counter()
                result = prune_structured(
                    CausalLM(net.spec, named_arrays(net)),  # the engine prunes in place
                    config,
                    calib,
                    method,
                    ratio,
                    options,
                    batch_size=batch,
                )
                seconds = time.perf_counter() - started
                ppl = {
                    k: perplexity(result.model, w, batch_size=batch).perplexity
                    for k, w in evals.items()
                }
                _append(
                    path,
                    {
                        **common,
                        "method": name,
                        "ratio": ratio,
                        "attention": attention,
                        "ppl": ppl,
                        "parameters": parameter_count(result.model),
                        "seconds": seconds,
                    },
                )


def run_speed(path, ratio, shapes, reps, nsamples, threads):
    """Forward tokens/s of the dense and the fasp-pruned stories-mini in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from jprune.converters.hf import load_model, save_model
    from jprune.data import calibration_windows, load_tokenizer, read_text, tokenize

    model_dir = ASSETS / "models" / "stories-mini"
    net, config = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    text = read_text(ASSETS / "text" / "tinystories_calib.txt", split="train")
    calib = calibration_windows(tokenize(tokenizer, text), nsamples, 512, 0)
    result = prune_structured(net, config, calib, "fasp", ratio, {})
    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(
            result.model, config, Path(tmp) / "pruned", config_updates=result.config_updates
        )
        models = {
            "dense": AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            "pruned": AutoModelForCausalLM.from_pretrained(out).eval(),
        }
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        for batch, seq in shapes:
            ids = torch.as_tensor(np.random.default_rng(0).integers(0, 512, (batch, seq)))
            times = {k: [] for k in models}
            with torch.inference_mode():
                for model in models.values():
                    model(ids)  # warm-up
                for _ in range(reps):
                    for name, model in models.items():
                        times[name].append(seconds(functools.partial(model, ids)))
            tps = {k: batch * seq / statistics.median(v) for k, v in times.items()}
            params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
            _append(
                path,
                {
                    "speed": True,
                    "ratio": ratio,
                    "batch": batch,
                    "seq": seq,
                    "reps": reps,
                    "threads": num_threads,
                    "tokens_per_s": tps,
                    "speedup": tps["pruned"] / tps["dense"],
                    "load_average": load_average()[0],
                    "parameters": params,
                },
            )


def render(rows: list[dict]) -> str:
    lines = [
        SECTION,
        "",
        "`bench/structured.py` (CPU, 2 cores). Channels removed per layer, uniform; `+attn` also "
        "removes the same fraction of v/o channels in every kv head (remote-code export). "
        "Calibration: tinystories_calib.txt, seqlen 512, seed 0. ppl: seqlen 512; time: pruning "
        "only (includes jit compilation).",
        "",
        "Commands: `bench/structured.py --out bench/structured.json --models stories260K "
        "--nsamples 128 --attention-ratios 0.3` (the first run); after the spap swap search, its "
        "spap rows were deleted and `bench/structured.py --out bench/structured.json --models "
        "stories260K stories-mini --nsamples 128 128 --resume` added every missing row; "
        "`--speed --models --nsamples` (speed only, on a quiet machine); then `--results "
        "bench/RESULTS.md`. WikiText-2 is its first 128 windows, for time. The `--resume` run "
        "shared the 2 cores with other jobs (1-minute load average 5-8): compare times within a "
        "table only roughly.",
        "",
        "Fourth session: spap's default `swap_rtol` (the smallest gain a swap must make, "
        "relative to `||W2 X||^2`) went from 1e-6 to 1e-4. The rows run with 1e-6 were "
        "relabelled `spap-rtol1e-06` (and `spap-c0.25-rtol1e-06`); the `spap` rows are the "
        "1e-4 runs. Commands (the 1e-4 rows timed on a machine otherwise quiet): "
        "`bench/structured.py --out bench/structured.json --models stories260K --nsamples 128 "
        "--methods spap --swap-rtol 1e-4 --resume` (and `--swap-rtol 1e-3`), the same for "
        "stories-mini with 1e-4; the correction study `--correction 0.25` (with 1e-6 then) on "
        "stories260K and on stories-mini with `--attention-ratios` (none: MLP only).",
        "",
        "Reading (lines under each table; 2 models x 8 settings x 2 texts = 32 comparisons "
        "with fasp): with 1e-4 spap is at or below fasp on TinyStories at 16 of 16 settings and "
        "on WikiText-2 at 13 of 16, and it takes 16-23 s on stories-mini; with 1e-6 it was 14 "
        "of 16 and 14 of 16 and took 67-220 s (those and the fasp rows timed at load 5-8). Swaps gaining less than 1e-4 of the output energy "
        "are below what 65k calibration tokens resolve, and taking them cost in-domain "
        "perplexity. `correction=0.25` (1e-6) closes the same two in-domain misses but loses "
        "WikiText-2 at high ratios on stories260K (5 of 8). The WikiText-2 misses move between "
        "cells with these settings (stories260K, 1e-6: MLP 30%; 1e-4: MLP+attn 30%; 1e-3: MLP "
        "50%) while the in-domain results change by under 2%: at this size the out-of-domain "
        "comparison of two near-equal selections is decided by noise more than by the method.",
        "",
        "spap is the penalty continuation of SPAP, then an exact best-improvement single-swap "
        "search on the layer's restoration objective, started from the better of the "
        "continuation's and the column score's selections (`jprune/methods/spap.py`): on every "
        "layer's objective it is never worse than fasp's selection, which bounds layer errors, "
        "not perplexity. Targets: spap at or below fasp perplexity at every ratio, and fasp "
        "below wanda-sp; the lines under each table say where they hold. Where spap misses, "
        "its selection's objective is still at or below fasp's on every layer (by "
        "construction), so there layer error and perplexity disagree.",
        "",
        "Session 10 (issue 16): spap's continuation schedule went from growth 1.2 over 100 "
        "stages to growth 2 over at most 30 (3-5x fewer stages on smollm2-135m's layers, a "
        "lower layer objective there). The earlier rows were relabelled `spap-g1.2`; the "
        "`spap` rows are the new default, re-run with `bench/structured.py --out "
        "bench/structured.json --models stories-mini stories260K --nsamples 128 128 --methods "
        "spap --resume` while a clean-clone CI run shared the 2 cores (their seconds are "
        "inflated).",
        "",
    ]
    order_base = ("dense", *METHODS)
    order = {m: i for i, m in enumerate(order_base)}
    order |= {m: len(order) for m in {r.get("method") for r in rows} - set(order)}
    for model in dict.fromkeys(r["model"] for r in rows if "model" in r):
        mine = sorted(
            (r for r in rows if r.get("model") == model),
            key=lambda r: (r["attention"], r["ratio"], order[r["method"]]),
        )
        first = mine[0]
        lines += [
            f"### {model} ({first['nsamples']} calibration windows; WikiText-2: first "
            f"{first['eval_windows']['wikitext2']} windows, TinyStories: all "
            f"{first['eval_windows']['tinystories']})",
            "",
            "| scope | ratio | method | TinyStories ppl | WikiText-2 ppl | params | time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            scope = "dense" if r["method"] == "dense" else ("MLP+attn" if r["attention"] else "MLP")
            lines.append(
                f"| {scope} | {r['ratio']:.0%} | {r['method']} | {r['ppl']['tinystories']:.3f} | "
                f"{r['ppl']['wikitext2']:.2f} | {r['parameters']:,} | {r['seconds']:.1f} |"
            )
        lines += ["", *_versus(mine, "spap", "fasp"), *_versus(mine, "fasp", "wanda-sp")]
        for other in sorted({r["method"] for r in mine} - set(order_base)):
            lines += _versus(mine, other, "fasp")
        lines.append("")
    speed = [r for r in rows if r.get("speed")]
    if speed:
        first = speed[0]
        lines += [
            "Forward speed in transformers, one run: stories-mini dense vs its fasp export at "
            f"{first['ratio']:.0%} MLP channels (stock `intermediate_size`; parameters "
            f"{first['parameters']['dense']:,} -> {first['parameters']['pruned']:,}); median of "
            f"{first['reps']} interleaved forward passes on random ids; 1-minute load average "
            f"{first.get('load_average', float('nan')):.1f} during the run.",
            "",
            "| torch threads | batch x seq | dense tok/s | pruned tok/s | speed-up |",
            "|---|---|---|---|---|",
        ]
        for r in speed:
            t = r["tokens_per_s"]
            lines.append(
                f"| {r['threads']} | {r['batch']} x {r['seq']} | {t['dense']:,.0f} | "
                f"{t['pruned']:,.0f} | {r['speedup']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def _versus(rows: list[dict], method: str, other: str) -> list[str]:
    """Where ``method``'s perplexity is at or below ``other``'s, per eval text."""
    pairs = {}
    for r in rows:
        if r["method"] in (method, other):
            pairs.setdefault((r["attention"], r["ratio"]), {})[r["method"]] = r["ppl"]
    pairs = {k: v for k, v in pairs.items() if len(v) == 2}
    lines = []
    for text, label in (("tinystories", "TinyStories"), ("wikitext2", "WikiText-2")):
        missed = [
            f"{'MLP+attn' if attention else 'MLP'} {ratio:.0%} "
            f"({v[method][text]:.3f} vs {v[other][text]:.3f})"
            for (attention, ratio), v in sorted(pairs.items())
            if v[method][text] > v[other][text]
        ]
        held = len(pairs) - len(missed)
        line = f"- {method} <= {other} on {label}: {held} of {len(pairs)} settings"
        lines.append(line + (f"; not at {', '.join(missed)}." if missed else "."))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON rows (appended)")
    parser.add_argument("--results", type=Path, help="rewrite this file's section from --out")
    parser.add_argument("--models", nargs="*", default=["stories-mini", "stories260K"])
    parser.add_argument("--nsamples", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--wiki-windows", type=int, default=128)
    parser.add_argument("--attention-ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument("--speed", action="store_true", help="measure the forward speed first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--resume", action="store_true", help="skip rows --out already holds")
    parser.add_argument(
        "--correction",
        type=float,
        default=0.0,
        help="fasp/spap option correction (rows labelled METHOD-cVALUE)",
    )
    parser.add_argument(
        "--swap-rtol",
        type=float,
        help="spap option swap_rtol, the smallest relative gain a swap must make (default 1e-6; "
        "rows labelled METHOD-rtolVALUE)",
    )
    args = parser.parse_args()
    if args.results is None:
        if args.speed:
            shapes = ((64, 64), (16, 256), (8, 512))
            run_speed(args.out, 0.3, shapes, reps=10, nsamples=32, threads=(1, 2))
        for model, nsamples in zip(args.models, args.nsamples, strict=True):
            run_quality(
                model,
                args.out,
                nsamples,
                512,
                args.attention_ratios,
                args.wiki_windows,
                args.batch,
                args.methods,
                args.resume,
                args.correction,
                args.swap_rtol,
            )
    else:
        write_section(args.results, render(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
