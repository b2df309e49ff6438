"""The walk's cost, streamed from disk against the whole model in memory, part by part.

One process prunes the same checkpoint both ways, ``--repeats`` times, alternating which goes
first (the process's first run also compiles the block programs):

* streamed: ``jprune.prune.prune`` into an output directory, no evaluation: blocks read,
  pruned, written and journaled one at a time;
* in memory: ``converters.hf.load_model``, then ``engine.prune_model`` on the loaded
  ``CausalLM`` with the engine options and matmul precision ``jprune.prune`` would use.

Where a run's time went, per block and part, is the engine's own record (report.json's
``memory.blocks[i].seconds``: load, cache, statistics, solve, outputs, write, journal; each
part waits for its results). Each part is set against its floor, measured in this process:

* load: the block's weight bytes at the checkpoint file's read speed (the page cache dropped
  first where this process may do so);
* cache, statistics, outputs: the FLOPs of the walk's programs for one block (XLA's count,
  the engine's calls replayed stage by stage) at the rate of a bare float32 GEMM of the
  block's shape, (batch tokens, hidden) x (hidden, intermediate);
* write, journal: the block's weight bytes and the calibration streams kept for a resume, at
  the file system's write speed (no fsync, like the run).

The two checkpoints are compared tensor by tensor. Results go to ``bench/walk_profile.json``
(every run's per-block seconds) and the ``## Walk profile`` section of ``bench/RESULTS.md``:

    .venv/bin/python bench/walk_profile.py --model .cache/smollm2-135m \\
        --calib ../shared/assets/text/wikitext2_valid.txt --method sparsegpt --sparsity 0.5 \\
        --nsamples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jprune.prune as jp
from jprune import walk
from jprune.blocks import CheckpointBlocks
from jprune.config import PruneConfig
from jprune.converters.hf import Checkpoint, load_model, save_model
from jprune.data import calibration_windows, load_tokenizer, read_text, tokenize
from jprune.engine import EngineOptions, prune_model
from jprune.plan import Plan, resolve

from common import (
    BENCH,
    RESULTS_MD,
    ROOT,
    add_calibration,
    identical,
    load_average,
    machine,
    timed,
    write_section,
)

RESULTS_JSON = BENCH / "walk_profile.json"
SECTION = "## Walk profile"
PARTS = ("load", "cache", "statistics", "solve", "outputs", "write", "journal")
STREAMED, IN_MEMORY = "streamed", "in memory"
STREAMED_ONLY = ("write", "journal")  # the in-memory path writes no shard and keeps no journal
TARGET_RATIO = 1.1  # issue 26: streamed within 1.1x of the in-memory path
MB = 1e6


# ---------------------------------------------------------------- the two ways


def prune_config(args, out: Path) -> PruneConfig:
    return PruneConfig.of(
        args.model, args.method, sparsity=args.sparsity, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, evaluate_dense=False, out=out, force=True,
    )  # fmt: skip


def engine_options(run: Plan) -> EngineOptions:
    """The options ``jprune.prune`` builds from the configuration, on one device."""
    engine = run.config.engine
    return EngineOptions(
        sequential=engine.sequential,
        intra_block=engine.intra_block,
        batch_size=engine.batch_size,
        row_blocks=engine.row_blocks,
    )


def calibration(run: Plan) -> np.ndarray:
    """The calibration windows ``jprune.prune`` draws for this configuration."""
    calib = run.config.calibration
    tokens = tokenize(load_tokenizer(run.config.model.path), read_text(calib.text, split="train"))
    return calibration_windows(tokens, calib.nsamples, calib.seqlen, calib.seed)


def streamed(args, out: Path) -> dict[str, Any]:
    report = jp.prune(prune_config(args, out))
    return {"prune_seconds": report["prune_seconds"], "blocks": report["memory"]["blocks"]}


def in_memory(args, out: Path) -> dict[str, Any]:
    run = resolve(prune_config(args, out))
    windows = calibration(run)
    started = time.perf_counter()
    model, hf_config = load_model(args.model, run.config.model.dtype)
    loaded = time.perf_counter() - started
    with jax.default_matmul_precision(run.config.engine.matmul_precision):
        started = time.perf_counter()
        outcome = prune_model(
            model, windows, run.method, run.target, run.method_options, engine_options(run),
            hf_config=hf_config,
        )  # fmt: skip
        seconds = time.perf_counter() - started
    save_model(outcome.model, hf_config, out, source=str(args.model), force=True)
    return {
        "prune_seconds": seconds,
        "load_model_seconds": loaded,
        "blocks": outcome.memory["blocks"],
    }


# ---------------------------------------------------------------- floors


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache (root only); whether it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_speed(file: Path) -> float:
    """Bytes per second reading ``file`` whole, in 16 MiB chunks."""
    chunk = bytearray(16 << 20)
    started = time.perf_counter()
    with open(file, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass
    return file.stat().st_size / (time.perf_counter() - started)


def write_speed(folder: Path, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second writing ``nbytes`` to a new file in ``folder`` (best of ``repeats``;
    no fsync: the run's shards and journal are not synced either)."""
    data = np.random.default_rng(0).bytes(nbytes)
    best = float("inf")
    for i in range(repeats):
        file = folder / f"write-speed-{i}.bin"
        started = time.perf_counter()
        file.write_bytes(data)
        best = min(best, time.perf_counter() - started)
        file.unlink()
    return nbytes / best


def gemm_rate(m: int, k: int, n: int, precision: str) -> float:
    """FLOP/s of one jitted float32 (m, k) x (k, n) product (best of the warm calls)."""
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    with jax.default_matmul_precision(precision):
        best = timed(jax.jit(jnp.matmul), a, b, repeats=10).best
    return 2 * m * k * n / best


def flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn`` traced at ``args`` (arrays or shape structs)."""
    return float(jax.jit(fn).lower(*args).cost_analysis().get("flops", 0.0))


def uses_dense(stages, options: EngineOptions) -> bool:
    """Whether the engine keeps the dense model's stream beside the pruned one."""
    wanted = (set(w) for stage in stages for w in stage.statistics.values())
    return any(walk.DENSE_STATISTICS & w for w in wanted) or not options.sequential


def pass_flops(stages, options: EngineOptions, weights: walk.BlockWeights, x: walk.Stream):
    """The FLOPs of one block's passes by part (cache, statistics, outputs), replaying the
    engine's calls: per stage the cache is advanced and the statistics gathered, then the
    stage's units are final; the outputs pass resumes from the last cache. The dense weights
    stand in for the pruned ones (same shapes, same FLOPs)."""
    use_dense = uses_dense(stages, options)
    x_dense = x if use_dense else None
    graphdef = weights.graphdef

    def block(state) -> walk.BlockWeights:
        return walk.BlockWeights(graphdef, state)

    out = dict.fromkeys(("cache", "statistics", "outputs"), 0.0)
    cache, dense_cache, final = {}, {}, frozenset()
    last = len(stages)
    for number, stage in enumerate(stages, 1):

        def advance(state, stream, kept, final=final):
            return walk.advance_cache(block(state), stream, kept, set(final))

        out["cache"] += flops(advance, weights.state, x, cache)
        cache = jax.eval_shape(advance, weights.state, x, cache)
        if x_dense is not None:
            out["cache"] += flops(advance, weights.state, x_dense, dense_cache)
            dense_cache = jax.eval_shape(advance, weights.state, x_dense, dense_cache)

        def gather(state, a, b, kept, kept_dense, stage=stage, last=number == last):
            return walk.statistics(
                block(state), block(state), stage.statistics, a, b, kept, kept_dense,
                reproducible=options.row_blocks > 0, dense_outputs=use_dense and last,
            )  # fmt: skip

        out["statistics"] += flops(gather, weights.state, x, x_dense, cache, dense_cache)
        final = final | {str(getattr(unit, "name", unit)) for unit in stage.units}
    if options.sequential:
        out["outputs"] = flops(
            lambda state, stream, kept: walk.outputs(block(state), stream, kept),
            weights.state, x, cache,
        )  # fmt: skip
    return out


def _nbytes(shape) -> int:
    return int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize


def measure_floors(args, run: Plan, options: EngineOptions, folder: Path) -> dict[str, Any]:
    """Read, write and GEMM speeds, and per block the bytes and FLOPs the parts move."""
    checkpoint = Checkpoint(args.model, run.config.model.dtype)
    spec = checkpoint.spec
    block_bytes = [
        sum(_nbytes(checkpoint.shapes[n]) for n in checkpoint.block_names(i))
        for i in range(spec.num_layers)
    ]
    files = sorted(Path(args.model).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    cold = drop_page_cache()
    read_cold = size / sum(f.stat().st_size / read_speed(f) for f in files)
    read_warm = size / sum(f.stat().st_size / read_speed(f) for f in files)
    write = write_speed(folder, max(block_bytes))
    stages = run.method.program.stages(spec, run.method_options, options.intra_block)
    precision = run.config.engine.matmul_precision
    blocks = CheckpointBlocks(checkpoint)
    with jax.default_matmul_precision(precision):
        x = walk.embed(blocks.shell, calibration(run), options.batch_size, walk.ON_DEVICE)
        counted = pass_flops(stages, options, walk.place_block(blocks.load(0), None), x)
    gemm = (
        options.batch_size * run.config.calibration.seqlen,
        spec.hidden_size,
        spec.intermediate_size,
    )
    kept = int(options.sequential) + int(uses_dense(stages, options))
    return {
        "page_cache_dropped": cold,
        "read_bytes_per_second": read_cold,
        "page_cache_read_bytes_per_second": read_warm,
        "write_bytes_per_second": write,
        "gemm_shape": gemm,
        "gemm_flops_per_second": gemm_rate(*gemm, precision),
        "block_bytes": block_bytes,
        "journal_bytes": kept * x.nbytes,
        "block_flops": counted,  # block 0's; every block of these models has its shapes
    }


# ---------------------------------------------------------------- the runs


def commit() -> str:
    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    dirty = (
        " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    )
    return git("rev-parse", "--short", "HEAD") + dirty


# Settings that change the runs' speed from outside: scipy's OpenBLAS, which jax's CPU LAPACK
# calls (the solvers' Cholesky factorizations), spins its threads while waiting for work, so
# on a busy machine its default thread count can slow a solve twenty-fold.
ENVIRONMENT = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")
OPENBLAS_NOTE = (
    "`OPENBLAS_NUM_THREADS=1`: the OpenBLAS that jax's CPU LAPACK calls (the solves' Cholesky "
    "factorizations) runs on one thread. On this machine, busy with other jobs, warm in-memory "
    "prunes of stories-mini (sparsegpt 50%, 32 x 256) spent 2 to 25 s in their solves with "
    "OpenBLAS's default two threads (over a dozen runs) and 0.9 to 1.1 s with one (three): the "
    "default swamps the difference looked for here. One thread also rounds those LAPACK "
    "calls differently: these checkpoints are bit-identical between the two ways, not "
    "to a default run's."
)


def command(args) -> str:
    settings = "".join(f"{k}={os.environ[k]} " for k in ENVIRONMENT if k in os.environ)
    return settings + (
        f"python bench/walk_profile.py --model {args.model} --calib {args.calib} "
        f"--method {args.method} --sparsity {args.sparsity} --nsamples {args.nsamples} "
        f"--seqlen {args.seqlen} --repeats {args.repeats}"
    )


def measure(args) -> dict[str, Any]:
    """Floors first (they drop the page cache), then the runs, alternating the two ways."""
    started = load_average()
    runs, same = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = resolve(prune_config(args, folder / "unused"))
        floors = measure_floors(args, run, engine_options(run), folder)
        for repetition in range(args.repeats):
            order = (STREAMED, IN_MEMORY) if repetition % 2 == 0 else (IN_MEMORY, STREAMED)
            outs = {way: folder / f"{way.replace(' ', '-')}-{repetition}" for way in order}
            for way in order:
                before = load_average()
                result = (streamed if way == STREAMED else in_memory)(args, outs[way])
                runs.append(
                    {"way": way, "repetition": repetition, "load_average": before, **result}
                )
                print(f"{way}: {result['prune_seconds']:.1f} s (load {before[0]:.1f})", flush=True)
            same.append(identical(outs[STREAMED], outs[IN_MEMORY]))
            for out in outs.values():
                shutil.rmtree(out)
        # A busy machine slows the bare GEMM too: the floor takes the faster of two moments.
        rate = gemm_rate(*floors["gemm_shape"], run.config.engine.matmul_precision)
        floors["gemm_flops_per_second"] = max(floors["gemm_flops_per_second"], rate)
    return {
        "command": command(args),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average": {"start": started, "end": load_average()},
        "num_blocks": len(floors["block_bytes"]),
        "floors": floors,
        "runs": runs,
        "identical": same,
    }


# ---------------------------------------------------------------- RESULTS.md


def part_seconds(run: dict[str, Any]) -> dict[str, float]:
    """Seconds of each part summed over the blocks (0 for parts a way does not have)."""
    return {p: sum(b["seconds"].get(p, 0.0) for b in run["blocks"]) for p in PARTS}


def best(runs: list[dict[str, Any]], way: str) -> dict[str, Any]:
    """The way's fastest run: the least disturbed by a shared machine, and warm."""
    return min((r for r in runs if r["way"] == way), key=lambda r: r["prune_seconds"])


def blockwise_best(runs: list[dict[str, Any]], way: str) -> float:
    """Each block's fastest time over the way's runs, summed over the blocks: a busy
    machine's bursts land in different blocks of different runs."""
    theirs = [r for r in runs if r["way"] == way]
    count = len(theirs[0]["blocks"])
    return sum(min(sum(r["blocks"][i]["seconds"].values()) for r in theirs) for i in range(count))


def floor_rows(data: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """Part -> (its floor summed over the blocks in seconds, or None; what the floor is)."""
    f = data["floors"]
    blocks = data["num_blocks"]
    weights = sum(f["block_bytes"])
    read, write, gemm = (
        f["read_bytes_per_second"], f["write_bytes_per_second"], f["gemm_flops_per_second"]
    )  # fmt: skip
    how = "cold" if f["page_cache_dropped"] else "page cache"
    rows = {
        "load": (
            weights / read,
            f"{weights / blocks / MB:.1f} MB a block at {read / MB:.0f} MB/s ({how} read; the "
            f"runs find the file in the page cache: {f['page_cache_read_bytes_per_second'] / MB:.0f}"
            " MB/s); in memory: none (loaded before)",
        ),
        "solve": (None, "not measured"),
        "write": (
            weights / write,
            f"{weights / blocks / MB:.1f} MB a block at {write / MB:.0f} MB/s",
        ),
        "journal": (
            f["journal_bytes"] * blocks / write,
            f"{f['journal_bytes'] / MB:.1f} MB of streams a block at {write / MB:.0f} MB/s",
        ),
    }
    for part, count in f["block_flops"].items():
        rows[part] = (
            count * blocks / gemm,
            f"{count / 1e9:.1f} GFLOP a block at {gemm / 1e9:.1f} GFLOP/s",
        )
    return rows


def render(data: dict[str, Any]) -> str:
    runs = data["runs"]
    load = data["load_average"]
    fast = {way: best(runs, way) for way in (STREAMED, IN_MEMORY)}
    ratio = fast[STREAMED]["prune_seconds"] / fast[IN_MEMORY]["prune_seconds"]
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    blockwise = {way: blockwise_best(runs, way) for way in (STREAMED, IN_MEMORY)}
    seconds = {way: part_seconds(run) for way, run in fast.items()}
    own = sum(seconds[STREAMED][p] for p in ("load", *STREAMED_ONLY)) - seconds[IN_MEMORY]["load"]
    loads = (
        ", ".join(f"{v:.1f}" for v in load["start"])
        + " at the start, "
        + ", ".join(f"{v:.1f}" for v in load["end"])
    )
    f = data["floors"]
    lines = [
        SECTION,
        "",
        f"`{data['command']}`",
        "",
        f"Commit {data['commit']}, {data['date']}, on {data['machine']}; load average (1, 5, "
        f"15 min) {loads} at the end. One process prunes the checkpoint both ways: streamed "
        "(`jprune.prune.prune` into an output directory, no evaluation) and in memory "
        "(`load_model`, then `engine.prune_model` on the loaded model, the same engine options "
        "and matmul precision), alternating which goes first; the process's first run also "
        "compiles the block programs. Seconds are the engine's own per-block record "
        "(`memory.blocks[i].seconds` in report.json; each part waits for its results); "
        "`bench/walk_profile.json` keeps every run's blocks.",
        *([] if "OPENBLAS_NUM_THREADS=1 " not in data["command"] else ["", OPENBLAS_NOTE]),
        "",
        "| run | way | prune seconds | load average (1 min) before |",
        "|---|---|---|---|",
    ]
    for number, run in enumerate(runs, 1):
        lines.append(
            f"| {number} | {run['way']} | {run['prune_seconds']:.1f} | {run['load_average'][0]:.1f} |"
        )
    same = all(data["identical"])
    lines += [
        "",
        f"- Fastest run of each way: streamed {fast[STREAMED]['prune_seconds']:.1f} s, in memory "
        f"{fast[IN_MEMORY]['prune_seconds']:.1f} s; streamed / in memory = {ratio:.3f} "
        f"(target <= {TARGET_RATIO}: {verdict}).",
        f"- Each block's fastest time over the runs of its way, summed over the blocks: "
        f"streamed {blockwise[STREAMED]:.1f} s, in memory {blockwise[IN_MEMORY]:.1f} s; "
        f"streamed / in memory = {blockwise[STREAMED] / blockwise[IN_MEMORY]:.3f}.",
        f"- The streamed way's own work (its load, write and journal, less the in-memory "
        f"load) in its fastest run: {own:.2f} s, {own / fast[IN_MEMORY]['prune_seconds']:.1%} "
        "of the fastest in-memory run. The other parts run the same compiled programs on the "
        "same arrays both ways.",
        f"- The streamed and in-memory checkpoints are "
        f"{'bit-identical' if same else 'NOT bit-identical'} "
        f"({sum(data['identical'])} of {len(data['identical'])} repetitions).",
        "",
        f"Where the fastest run of each way spent its time, seconds summed over the "
        f"{data['num_blocks']} blocks, and each part's floor:",
        "",
        "| part | streamed | in memory | floor | floor from |",
        "|---|---|---|---|---|",
    ]
    floors = floor_rows(data)
    for part in PARTS:
        floor, how = floors.get(part, (None, "—"))
        shown = [
            "—" if part in STREAMED_ONLY and way == IN_MEMORY else f"{seconds[way][part]:.2f}"
            for way in (STREAMED, IN_MEMORY)
        ]
        lines.append(
            f"| {part} | {shown[0]} | {shown[1]} | {'—' if floor is None else f'{floor:.2f}'} | {how} |"
        )
    other = {w: fast[w]["prune_seconds"] - sum(seconds[w].values()) for w in fast}
    lines += [
        f"| other (total − parts) | {other[STREAMED]:.2f} | {other[IN_MEMORY]:.2f} | | "
        "the embedding, the pruned block's host copy |",
        f"| total | {fast[STREAMED]['prune_seconds']:.2f} | {fast[IN_MEMORY]['prune_seconds']:.2f} | | |",
        "",
        f"Floors measured in the same process: the weights files read at "
        f"{f['read_bytes_per_second'] / MB:.0f} MB/s "
        f"{'with the page cache dropped first' if f['page_cache_dropped'] else '(page cache: could not drop it)'}"
        f", {f['page_cache_read_bytes_per_second'] / MB:.0f} MB/s from the page cache; a "
        f"float32 {tuple(f['gemm_shape'][:2])} x {tuple(f['gemm_shape'][1:])} GEMM at "
        f"{f['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s (the faster of before and after the "
        "runs); files written at "
        f"{f['write_bytes_per_second'] / MB:.0f} MB/s (no fsync). FLOPs are XLA's count of the "
        "walk's programs for block 0, the engine's calls replayed stage by stage.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_calibration(parser)
    parser.add_argument("--method", default="sparsegpt", help="pruning method")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite RESULTS.md from the JSON"
    )
    args = parser.parse_args()
    if not args.render_only:
        RESULTS_JSON.write_text(json.dumps(measure(args), indent=1) + "\n")
    text = render(json.loads(RESULTS_JSON.read_text()))
    write_section(RESULTS_MD, text)
    print(text)


if __name__ == "__main__":
    main()
