"""Scaling benchmark (not a test): how solver, Gram and memory cost grow with the layer shape.

    python bench/scaling.py                          # CPU-sized sweeps -> "## Scaling" in RESULTS.md
    python bench/scaling.py --quick --no-write       # small sweeps, print only
    python bench/scaling.py --shapes llama3-8b --peak-tflops 989   # on a GPU: the real 8B shapes

Sweeps (default): warm time of ``fista`` and of ``box_qp`` (masked CG on a fixed 50% mask, the
OPTIMA / FISTA-refit QP) for a fixed number of iterations (``tol=0``) as ``d_in`` and ``d_out``
grow, and of the Gram ``X^T X`` as the token count and ``d_in`` grow, with least-squares
exponents on log-log; the documented per-layer memory bound (``memory.layer_memory_bytes``) at
the LLaMA-3-8B shapes next to the measured peak-RSS growth of one real layer solve; and a
projection of the 8B per-layer cost from the fitted exponents. ``--shapes llama3-8b`` times the
8B layer shapes themselves on synthetic activations and reports TFLOP/s against
``--peak-tflops``. Device-agnostic JAX: runs on whatever ``jax.devices()[0]`` is.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jprune.methods import LayerProblem, get_method
from jprune.solvers import Unstructured, box_qp, fista

from common import (
    RESULTS_MD,
    add_matmul_precision,
    load_text,
    machine,
    seconds,
    timed,
    use_matmul_precision,
    write_section,
)

SECTION = "## Scaling"

# LLaMA-3-8B: hidden 4096, intermediate 14336, 32 query / 8 KV heads of dim 128, 32 blocks.
LLAMA3_8B = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}
LLAMA3_8B_BLOCKS = 32
LLAMA3_8B_HIDDEN = 4096
# One Gram per distinct linear input of a block: attention input, o input, MLP input, down input.
LLAMA3_8B_GRAM_DIMS = (4096, 4096, 4096, 14336)
CALIB_TOKENS = 128 * 2048

# Iterations per layer at the methods' defaults (jprune/methods/fista.py, optima.py): FISTAPruner
# runs 1 + num_bisect = 13 lasso solves of maxiter = 30, then 1 + swaps = 11 masked-CG refits of
# at most d_in iterations (tol 1e-5); OPTIMA runs one masked CG of at most 4 d_in (tol 1e-6). The
# CG counts are caps: CG stops at its tolerance, after a data-dependent number of iterations.
FISTA_LASSO_ITERS = 13 * 30
FISTA_REFITS = 11
OPTIMA_CG_FACTOR = 4


@functools.partial(jax.jit, static_argnums=(1, 2))
def activations(key, tokens: int, d_in: int) -> jax.Array:
    # Channel scales spanning two decades: a few loud channels and an ill-conditioned Gram, as in
    # LLM activations; only the shapes matter for the timings.
    scale = jnp.logspace(0, -2, d_in, dtype=jnp.float32)
    return jax.random.normal(key, (tokens, d_in), jnp.float32) * scale


@functools.partial(jax.jit, donate_argnums=0)
def gram_step(gram, x):
    return gram + x.T @ x


def accumulate(x: jax.Array, num_batches: int) -> jax.Array:
    """``sum_b x_b^T x_b`` over ``num_batches`` calibration batches, one dispatch per batch as the
    engine's ``stream_grams`` does. The batch is reused: only its shape matters for the time."""
    gram = jnp.zeros((x.shape[1], x.shape[1]), jnp.float32)
    for _ in range(num_batches):
        gram = gram_step(gram, x)
    return jax.block_until_ready(gram)


def layer_problem(d_out: int, d_in: int, gram: jax.Array | None = None, seed: int = 0):
    """``(H, C, keep, lam)``: per-token Gram with a 1% ridge, ``C = W0 H``, a random 50% mask."""
    k_x, k_w, k_m = jax.random.split(jax.random.key(seed), 3)
    if gram is None:
        tokens = 4 * d_in
        gram = accumulate(activations(k_x, tokens, d_in), 1) / tokens
    H = gram + 0.01 * jnp.mean(jnp.diagonal(gram)) * jnp.eye(d_in, dtype=jnp.float32)
    W0 = 0.02 * jax.random.normal(k_w, (d_out, d_in), jnp.float32)
    C = W0 @ H
    keep = jax.random.bernoulli(k_m, 0.5, (d_out, d_in))
    lam = 0.01 * jnp.max(jnp.abs(C), axis=1)
    return jax.block_until_ready((H, C, keep, lam))


def solver_call(name: str, H, C, keep, lam, iters: int):
    if name == "fista":
        return lambda: fista(H, C, lam, mask=keep, maxiter=iters, tol=0.0)
    lower = jnp.where(keep, -jnp.inf, 0.0)
    upper = jnp.where(keep, jnp.inf, 0.0)
    return lambda: box_qp(H, C, lower, upper, maxiter=iters, tol=0.0, method="cg")


def time_solver(name: str, d_out: int, d_in: int, iters: int, repeats: int, gram=None) -> dict:
    """Warm time of ``iters`` iterations, compile time, and the time per iteration
    ``(t(iters) - t(0)) / iters``: the 0-iteration call is the per-solve setup (power iteration,
    initial residual, certificate). The two are timed interleaved, min of ``repeats`` each, so
    load drifting on a shared machine hits both alike."""
    H, C, keep, lam = layer_problem(d_out, d_in, gram)
    solve = solver_call(name, H, C, keep, lam, iters)
    setup = solver_call(name, H, C, keep, lam, 0)
    first, _, (_, info) = timed(solve, repeats=0)
    if int(info.iterations) != iters:
        raise RuntimeError(f"{name} {d_out}x{d_in} stopped after {int(info.iterations)} iterations")
    jax.block_until_ready(setup())
    warm = setup_s = np.inf
    for _ in range(repeats):
        warm = min(warm, seconds(solve))
        setup_s = min(setup_s, seconds(setup))
    per_iter = max(warm - setup_s, 1e-9) / iters
    return {
        "solver": name,
        "d_out": d_out,
        "d_in": d_in,
        "iters": iters,
        "compile_s": max(first - warm, 0.0),
        "warm_s": warm,
        "setup_s": setup_s,
        "per_iter_s": per_iter,
        "gflops": 2.0 * d_out * d_in * d_in / per_iter / 1e9,
    }


def time_gram(tokens: int, d_in: int, batch: int, repeats: int) -> dict:
    x = activations(jax.random.key(1), min(batch, tokens), d_in)
    num_batches = max(tokens // x.shape[0], 1)
    first, warm, _ = timed(accumulate, x, num_batches, repeats=repeats)
    tokens = num_batches * x.shape[0]
    return {
        "tokens": tokens,
        "d_in": d_in,
        "compile_s": max(first - warm, 0.0),
        "warm_s": warm,
        "gflops": 2.0 * tokens * d_in * d_in / warm / 1e9,
    }


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# ---------------------------------------------------------------- memory


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_growth(run) -> tuple[int, str]:
    """Growth of the peak RSS over the current RSS while ``run()`` runs.

    On Linux the peak (VmHWM) is reset through ``/proc/self/clear_refs`` first; elsewhere
    ``getrusage``'s lifetime peak is used, which hides growth below the import-time peak.
    """
    base = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        source = "VmHWM"
    except (OSError, TypeError):
        base, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    run()
    if source == "VmHWM":
        return _status_bytes("VmHWM") - base, source
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, source


def rss_probe(d: int, iters: int) -> dict:
    """One layer in miniature at (d, d): Gram of 16k tokens, a fista solve, a masked-CG refit.

    The activations exist before (as in the engine, and counted by the bound); the layer is run
    twice: the first run's growth includes XLA compiling the executables, the second's is the
    arrays and temporaries of the compiled run, the part the bound describes.
    """
    from jprune.memory import layer_memory_bytes

    tokens = 16384
    x = jax.block_until_ready(activations(jax.random.key(1), tokens, d))

    def layer():
        gram = accumulate(x, 1) / tokens
        H, C, keep, lam = layer_problem(d, d, gram)
        jax.block_until_ready(solver_call("fista", H, C, keep, lam, iters)())
        jax.block_until_ready(solver_call("box_qp", H, C, keep, lam, iters)())

    jax.block_until_ready(jnp.zeros(8) + 1)
    cold, source = _peak_growth(layer)
    warm, _ = _peak_growth(layer)
    return {
        "d": d,
        "tokens": tokens,
        "source": source,
        "base_bytes": _status_bytes("VmRSS") or 0,
        "activation_bytes": x.nbytes,
        "cold_bytes": cold,
        "warm_bytes": warm,
        "bound_bytes": layer_memory_bytes(d, d, 1, x.nbytes),
    }


def measure_rss(d: int, iters: int) -> dict:
    """``rss_probe`` in a fresh process, so the peak is this solve's and not the sweeps'."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss-probe", str(d), "--iters", str(iters)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(rss: dict | None) -> list[str]:
    from jprune.memory import layer_memory_bytes

    gib = 2.0**30
    act = CALIB_TOKENS * LLAMA3_8B_HIDDEN * 4
    lines = [
        "Per-layer bound `jprune.memory.layer_memory_bytes(d_out, d_in, num_grams, "
        "activation_bytes)` at the LLaMA-3-8B shapes, 128 x 2048 calibration tokens, float32 "
        f"(one activation stream = {act / gib:.0f} GiB). Single stream (one Gram; SparseGPT, "
        "Wanda, OPTIMA) and intra-block (three Grams, dense + pruned streams; FISTA):",
        "",
        "| layer | d_out x d_in | weights + solver state (GiB) | one Gram (GiB) | "
        "bound, 1 stream (GiB) | bound, intra-block (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for role, (d_out, d_in) in LLAMA3_8B.items():
        state = 4 * 6 * d_out * d_in
        one = layer_memory_bytes(d_out, d_in, 1, act)
        three = layer_memory_bytes(d_out, d_in, 3, 2 * act)
        lines.append(
            f"| {role} | {d_out} x {d_in} | {state / gib:.2f} | {4 * d_in * d_in / gib:.2f} | "
            f"{one / gib:.2f} | {three / gib:.2f} |"
        )
    if rss is not None:
        mib = 2.0**20
        data = rss["bound_bytes"] - rss["activation_bytes"]
        lines += [
            "",
            f"Measured here, in a fresh process: one {rss['d']} x {rss['d']} layer (Gram of "
            f"{rss['tokens']:,} tokens whose activations, {rss['activation_bytes'] / mib:.0f} "
            "MiB, already exist; a fista solve; a masked-CG refit), peak RSS growth "
            f"({rss['source']}, reset before each run). First run, compiling: "
            f"{rss['cold_bytes'] / mib:.0f} MiB; second run, compiled: "
            f"{rss['warm_bytes'] / mib:.0f} MiB. The bound's non-activation part for this layer "
            f"(weights, solver state, one Gram) is {data / mib:.0f} MiB, "
            f"{rss['bound_bytes'] / mib:.0f} MiB with the activations. The first run's excess "
            "is XLA compiling; the second may reuse pages the first freed to the allocator, so "
            "treat it as a lower estimate.",
        ]
    return lines


# ---------------------------------------------------------------- projections


def projection_lines(per_iter: dict, gram_s: dict, label: str) -> list[str]:
    """Per-layer and whole-model cost of the methods' iteration counts from per-iteration times
    (``per_iter[solver][role]``: FISTA for the lasso, masked CG for the refits and OPTIMA) and
    per-Gram times by d_in (``gram_s``)."""
    lines = [
        f"| layer | d_out x d_in | GFLOP / iteration | {label} ms / iteration (fista, CG) | FISTAPruner "
        "lasso (390 it) h | + refits (<= 11 d_in it) h | OPTIMA CG (<= 4 d_in it) h |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = np.zeros(4)
    for role, (d_out, d_in) in LLAMA3_8B.items():
        t, t_cg = per_iter["fista"][role], per_iter["box_qp"][role]
        lasso = FISTA_LASSO_ITERS * t / 3600
        refits = FISTA_REFITS * d_in * t_cg / 3600
        optima = OPTIMA_CG_FACTOR * d_in * t_cg / 3600
        totals += [t, lasso, refits, optima]
        lines.append(
            f"| {role} | {d_out} x {d_in} | {2 * d_out * d_in * d_in / 1e9:,.0f} | "
            f"{1e3 * t:.3g}, {1e3 * t_cg:.3g} | "
            f"{lasso:.3g} | {refits:.3g} | {optima:.3g} |"
        )
    grams = sum(gram_s[d] for d in LLAMA3_8B_GRAM_DIMS)
    n = LLAMA3_8B_BLOCKS
    lines += [
        f"| block (7 layers) | | {sum(2 * o * i * i for o, i in LLAMA3_8B.values()) / 1e9:,.0f} "
        f"| {1e3 * totals[0]:.3g} | {totals[1]:.3g} | {totals[2]:.3g} | {totals[3]:.3g} |",
        "",
        f"Whole model ({n} blocks): one iteration of every layer is "
        f"{n * sum(2 * o * i * i for o, i in LLAMA3_8B.values()) / 1e12:.0f} TFLOP, "
        f"{n * totals[0]:.3g} s here; "
        f"FISTAPruner lasso stage {n * totals[1]:.3g} h plus refits up to "
        f"{n * totals[2]:.3g} h; OPTIMA up to {n * totals[3]:.3g} h; the four Grams per block "
        f"(128 x 2048 tokens, one stream) {n * grams / 3600:.3g} h (x3 for the intra-block "
        "cross and dense Grams). The CG columns are caps (maxiter); CG stops at its tolerance "
        "after a number of iterations set by the conditioning of H, not by d_in.",
    ]
    return lines


# ---------------------------------------------------------------- sweeps


def run_sweeps(args) -> str:
    start = time.perf_counter()
    loads = [load_text()]
    rows = []
    for d_in in args.d_in:
        for name in ("fista", "box_qp"):
            rows.append(
                {"sweep": "d_in", **time_solver(name, args.fixed, d_in, args.iters, args.repeats)}
            )
    for d_out in args.d_out:
        for name in ("fista", "box_qp"):
            rows.append(
                {"sweep": "d_out", **time_solver(name, d_out, args.fixed, args.iters, args.repeats)}
            )
    loads.append(load_text())
    grams_t = [time_gram(t, args.fixed, args.gram_batch, args.repeats) for t in args.tokens]
    grams_d = [time_gram(args.gram_batch, d, args.gram_batch, args.repeats) for d in args.d_in]
    loads.append(load_text())
    rss = measure_rss(args.rss_dim, args.iters) if args.rss_dim else None
    elapsed = time.perf_counter() - start

    lines = [
        SECTION,
        "",
        f"`bench/scaling.py` on {machine()}.",
        "",
        "```",
        f".venv/bin/python bench/scaling.py {' '.join(sys.argv[1:])}".rstrip(),
        "```",
        "",
        f"Warm times are the minimum of {args.repeats} calls after a compiling call; compile = "
        f"first call - warm. Solvers run exactly {args.iters} iterations (`tol=0`; the script "
        "checks the iteration count); box_qp is masked CG (`method='cg'`, what OPTIMA and the "
        "FISTA refit run) with lower = upper = 0 on a random 50% of the entries and +-inf "
        f"elsewhere. Per iteration = (t({args.iters} it) - t(0 it)) / {args.iters}: the "
        "0-iteration call is the per-solve setup (power iteration for L, initial residual, "
        "certificate), timed interleaved with the solve; GFLOP/s counts the one (d_out, d_in) x (d_in, d_in) GEMM of an "
        f"iteration, 2 d_out d_in^2 FLOP. Load average (1, 5, 15 min) before / between / after: "
        f"{' / '.join(loads)} (the 2 cores were shared with other jobs); run time "
        f"{elapsed:.0f} s.",
        "",
        f"| sweep | solver | d_out x d_in | compile (s) | {args.iters} it, warm (s) | "
        "setup (s) | per iteration (ms) | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sweep']} | {r['solver']} | {r['d_out']} x {r['d_in']} | {r['compile_s']:.2f} "
            f"| {r['warm_s']:.3f} | {r['setup_s']:.3f} | {1e3 * r['per_iter_s']:.1f} | "
            f"{r['gflops']:.0f} |"
        )
    lines += [
        "",
        f"Gram `X^T X` (float32), batches of {args.gram_batch:,} tokens, one "
        "jitted `G + x^T x` per batch as in `walk.statistics`:",
        "",
        "| tokens | d_in | compile (s) | warm (s) | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for g in grams_t + grams_d:
        lines.append(
            f"| {g['tokens']:,} | {g['d_in']} | {g['compile_s']:.2f} | {g['warm_s']:.3f} | "
            f"{g['gflops']:.0f} |"
        )

    def fit(sweep, solver, key, size):
        sel = [r for r in rows if r["sweep"] == sweep and r["solver"] == solver]
        return slope([r[size] for r in sel], [r[key] for r in sel])

    exps = {}
    lines += [
        "",
        "Fitted exponents p of time ~ size^p (least squares on log-log over the sweep):",
        "",
        f"| sweep | solver | p ({args.iters}-iteration solve) | p (per iteration) | expected |",
        "|---|---|---|---|---|",
    ]
    for sweep, expected in (("d_in", "2 (GEMM d_out d_in^2)"), ("d_out", "1 (GEMM d_out d_in^2)")):
        for solver in ("fista", "box_qp"):
            exps[sweep, solver] = fit(sweep, solver, "per_iter_s", sweep)
            lines.append(
                f"| {sweep} ({args.fixed} fixed) | {solver} | "
                f"{fit(sweep, solver, 'warm_s', sweep):.2f} | {exps[sweep, solver]:.2f} | "
                f"{expected} |"
            )
    p_tok = slope([g["tokens"] for g in grams_t], [g["warm_s"] for g in grams_t])
    p_gram = slope([g["d_in"] for g in grams_d], [g["warm_s"] for g in grams_d])
    lines += [
        f"| tokens (d_in {args.fixed}) | Gram | {p_tok:.2f} | | 1 (2 tokens d_in^2) |",
        f"| d_in ({args.gram_batch:,} tokens) | Gram | {p_gram:.2f} | | 2 |",
        "",
        "Below the expected exponent at the small end, the fixed per-call and per-iteration "
        "overheads (dispatch, the while-loop's elementwise updates and row norms, O(d_out d_in)) "
        "are not negligible next to the GEMM; the GEMM's efficiency also grows with size until "
        "the cores are saturated. The per-iteration exponents are the ones to extrapolate with.",
        "",
        "### Memory per layer",
        "",
        *memory_table(rss),
        "",
        "### LLaMA-3-8B: projection, not a measurement",
        "",
        "No GPU was lent to this task, so the LLaMA-3-8B per-layer GPU solve times, TFLOP/s and "
        "whole-model times against the published costs (OPTIMA: 40 h for 8B on an H100; "
        "FISTAPruner: ~12 h for 70B on an A100; SparseGPT: < 4.5 h for 175B) were **not "
        "measured**. `python bench/scaling.py --shapes llama3-8b --peak-tflops P` times the real "
        "8B layer shapes on synthetic activations when a GPU is available.",
        "",
    ]
    # Extrapolate from the largest measured shape with the fitted per-iteration exponents.
    per_iter, ref_rate = {}, {}
    for solver in ("fista", "box_qp"):
        ref = max(
            (r for r in rows if r["sweep"] == "d_in" and r["solver"] == solver),
            key=lambda r: r["d_in"],
        )
        ref_rate[solver] = ref["gflops"]
        per_iter[solver] = {
            role: ref["per_iter_s"]
            * (d_out / ref["d_out"]) ** exps["d_out", solver]
            * (d_in / ref["d_in"]) ** exps["d_in", solver]
            for role, (d_out, d_in) in LLAMA3_8B.items()
        }
    g_ref = max(grams_t, key=lambda g: g["tokens"])
    gram_s = {
        d: g_ref["warm_s"]
        * (CALIB_TOKENS / g_ref["tokens"]) ** p_tok
        * (d / g_ref["d_in"]) ** p_gram
        for d in set(LLAMA3_8B_GRAM_DIMS)
    }
    lines += [
        "CPU projection (this machine): per-iteration time of the largest measured shape "
        f"({args.fixed} x {max(args.d_in)}; fista {ref_rate['fista']:.0f} GFLOP/s, masked CG "
        f"{ref_rate['box_qp']:.0f} GFLOP/s) scaled by (d_out / {args.fixed})^p_out (d_in / "
        f"{max(args.d_in)})^p_in with each solver's fitted per-iteration exponents; Grams by the Gram "
        f"exponents from {g_ref['tokens']:,} tokens at d_in {g_ref['d_in']}. Iteration counts "
        "are the methods' defaults. To scale to a GPU, divide the GFLOP per iteration by its "
        "sustained float32 GEMM rate.",
        "",
        *projection_lines(per_iter, gram_s, "projected CPU"),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- real 8B shapes


def run_llama3_8b(args) -> str:
    device = jax.devices()[0]
    rows, gram_s = [], {}
    for d_in in sorted({d for _, d in LLAMA3_8B.values()}):
        g = time_gram(args.calib_tokens, d_in, args.gram_batch, args.repeats)
        gram_s[d_in] = g["warm_s"]
        x = activations(jax.random.key(1), args.gram_batch, d_in)
        gram = accumulate(x, 1) / args.gram_batch
        del x
        for role, (d_out, d) in LLAMA3_8B.items():
            if d != d_in:
                continue
            for name in ("fista", "box_qp"):
                r = time_solver(name, d_out, d_in, args.iters, args.repeats, gram)
                rows.append({"role": role, **r, "gram": g})
        del gram
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    lines = [
        f"{SECTION}: LLaMA-3-8B layer shapes on {device.device_kind}",
        "",
        f"`bench/scaling.py` on {machine()}; peak {args.peak_tflops:g} TFLOP/s as given.",
        "",
        "```",
        f"python bench/scaling.py {' '.join(sys.argv[1:])}",
        "```",
        "",
        f"Synthetic float32 activations; Grams over {args.calib_tokens:,} tokens in batches of "
        f"{args.gram_batch:,}. Per iteration = (t({args.iters} it) - t(0 it)) / {args.iters}, "
        f"min of {args.repeats}. Device peak memory: "
        f"{'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'}.",
        "",
        "| layer | solver | d_out x d_in | compile (s) | per iteration (ms) | TFLOP/s | % of peak "
        "| Gram (s) | Gram TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gram"]
        lines.append(
            f"| {r['role']} | {r['solver']} | {r['d_out']} x {r['d_in']} | {r['compile_s']:.1f} | "
            f"{1e3 * r['per_iter_s']:.2f} | {r['gflops'] / 1e3:.1f} | "
            f"{100 * r['gflops'] / 1e3 / args.peak_tflops:.0f}% | {g['warm_s']:.2f} | "
            f"{g['gflops'] / 1e3:.1f} |"
        )
    per_iter = {
        solver: {r["role"]: r["per_iter_s"] for r in rows if r["solver"] == solver}
        for solver in ("fista", "box_qp")
    }
    lines += ["", *projection_lines(per_iter, gram_s, "measured")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- whole methods at 8B shapes

# The distinct LLaMA-3-8B layer shapes and the roles that share each (q/o, k/v, gate/up, down).
LLAMA3_8B_SHAPES = {
    (4096, 4096): ("q", "o"),
    (1024, 4096): ("k", "v"),
    (14336, 4096): ("gate", "up"),
    (4096, 14336): ("down",),
}


def method_problem(d_out: int, d_in: int, tokens: int, seed: int = 0) -> LayerProblem:
    """A layer problem as the engine hands it over: a summed float32 Gram of ``tokens`` synthetic
    activations (two decades of channel scales) and a dense weight of LLaMA-like magnitude."""
    k_x, k_w = jax.random.split(jax.random.key(seed))
    gram = accumulate(activations(k_x, tokens, d_in), 1)
    weight = 0.02 * jax.random.normal(k_w, (d_out, d_in), jnp.float32)
    return LayerProblem(jax.block_until_ready(weight), gram, None, tokens, f"{d_out}x{d_in}")


def time_method(name: str, d_out: int, d_in: int, tokens: int, options: dict) -> dict:
    """First call (compile + solve) and a second, warm call of one method on one layer shape."""
    problem = method_problem(d_out, d_in, tokens)
    method = get_method(name)
    pattern = Unstructured(0.5)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = method(problem, pattern, **options)
        jax.block_until_ready(result.weight)
        times.append(time.perf_counter() - start)
    weight = np.asarray(result.weight)
    kept = np.count_nonzero(weight) / weight.size
    # The report's relative error, ||(W - W0) X||^2 / ||W0 X||^2, by the engine's own formula.
    from jprune.records import reconstruction_error

    error, reference = reconstruction_error(
        result.weight, problem.weight, problem.gram, None, problem.gram
    )
    err = float(error / reference)
    return {
        "method": name,
        "d_out": d_out,
        "d_in": d_in,
        "first_s": times[0],
        "warm_s": times[1],
        "density": kept,
        "rel_error": err,
        "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float))},
    }


METHOD_OPTIONS = {"sparsegpt": {}, "fista": {}, "optima": {"mask_from": "wanda"}, "wanda": {}}


def run_methods_8b(args) -> str:
    """Whole layer methods (their defaults, 50% per row) on the 8B shapes, one JSON line each to
    ``--json-out`` as it finishes, so a run cut short keeps what it measured."""
    device = jax.devices()[0]
    rows = []
    if args.json_out and args.json_out.exists():
        rows = [json.loads(line) for line in args.json_out.read_text().splitlines() if line]
    done = {(r["method"], r["d_out"], r["d_in"]) for r in rows}
    for name in args.methods:
        for d_out, d_in in LLAMA3_8B_SHAPES:
            if (name, d_out, d_in) in done:
                continue
            r = time_method(name, d_out, d_in, args.method_tokens, METHOD_OPTIONS[name])
            r["precision"] = args.matmul_precision
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json_out:
                with args.json_out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    gram_s = {
        d: time_gram(args.calib_tokens, d, args.gram_batch, 1)["warm_s"]
        for d in set(LLAMA3_8B_GRAM_DIMS)
    }
    grams_block = sum(gram_s[d] for d in LLAMA3_8B_GRAM_DIMS)
    lines = [
        f"### Whole methods at the LLaMA-3-8B layer shapes on {device.device_kind}",
        "",
        f"`bench/scaling.py` on {machine()}; matmul precision `{args.matmul_precision}`.",
        "",
        "```",
        f"python bench/scaling.py {' '.join(sys.argv[1:])}",
        "```",
        "",
        "Each method with its defaults at 50% unstructured per row on one synthetic layer problem "
        f"(Gram summed over {args.method_tokens:,} synthetic tokens); first call includes "
        "compilation, the warm call is a second call on the same shape (what every later block "
        "costs). Error = ||(W - W0) X||^2 / ||W0 X||^2 on the synthetic Gram.",
        "",
        "| method | d_out x d_in | roles | first call (s) | warm (s) | density | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        roles = "/".join(LLAMA3_8B_SHAPES[(r["d_out"], r["d_in"])])
        lines.append(
            f"| {r['method']} | {r['d_out']} x {r['d_in']} | {roles} | {r['first_s']:.1f} | "
            f"{r['warm_s']:.2f} | {r['density']:.4f} | {r['rel_error']:.4f} |"
        )
    lines += [
        "",
        f"Gram per block (four streams of {args.calib_tokens:,} tokens): {grams_block:.2f} s.",
        "",
        "| method | one block, warm (s) | whole model, 32 blocks (h) | published |",
        "|---|---|---|---|",
    ]
    published = {
        "fista": "FISTAPruner: ~12 h for 70B on an A100",
        "optima": "OPTIMA: 40 h for 8B on an H100",
        "sparsegpt": "SparseGPT: < 4.5 h for 175B on an A100",
        "wanda": "",
    }
    for name in dict.fromkeys(r["method"] for r in rows):
        by_shape = {(r["d_out"], r["d_in"]): r for r in rows if r["method"] == name}
        if len(by_shape) < len(LLAMA3_8B_SHAPES):
            continue
        block = sum(len(roles) * by_shape[s]["warm_s"] for s, roles in LLAMA3_8B_SHAPES.items())
        compile_once = sum(by_shape[s]["first_s"] - by_shape[s]["warm_s"] for s in LLAMA3_8B_SHAPES)
        total = LLAMA3_8B_BLOCKS * (block + grams_block) + compile_once
        lines.append(f"| {name} | {block:.1f} | {total / 3600:.2f} | {published[name]} |")
    lines += [
        "",
        "Whole model = 32 x (the block's 7 layer solves + its Grams) + one compilation per shape; "
        "it leaves out the forward passes (one block forward per calibration batch, a few "
        "percent of a solve here) and the host I/O of loading and saving the checkpoint.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("sweep", "llama3-8b"), default="sweep")
    parser.add_argument("--iters", type=int, default=20, help="solver iterations per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixed", type=int, default=1024, help="the other dimension of a sweep")
    parser.add_argument("--d-in", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--d-out", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144]
    )
    parser.add_argument("--gram-batch", type=int, default=16384, help="tokens per Gram batch")
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    parser.add_argument("--rss-dim", type=int, default=2048, help="0: skip the RSS measurement")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (llama3-8b)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHOD_OPTIONS),
        help="with --shapes llama3-8b: time these whole methods per layer instead of the solvers",
    )
    parser.add_argument(
        "--method-tokens", type=int, default=16384, help="synthetic tokens in a method's Gram"
    )
    parser.add_argument("--json-out", type=Path, help="--methods: append one JSON line per layer")
    add_matmul_precision(parser)
    parser.add_argument("--quick", action="store_true", help="small sweeps for a smoke test")
    parser.add_argument("--results", type=Path, default=RESULTS_MD)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_matmul_precision(args.matmul_precision)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe, args.iters)))
        return
    if args.quick:
        args.d_in, args.d_out, args.fixed = [128, 256, 512], [128, 256, 512], 256
        args.tokens, args.gram_batch, args.rss_dim, args.repeats = [4096, 8192], 4096, 512, 2
    if args.methods:
        if args.shapes != "llama3-8b":
            parser.error("--methods needs --shapes llama3-8b")
        text = run_methods_8b(args)
        print(text)
        return
    if args.shapes == "llama3-8b":
        if args.peak_tflops <= 0:
            parser.error("--shapes llama3-8b needs --peak-tflops (the device's float32 peak)")
        text = run_llama3_8b(args)
    else:
        text = run_sweeps(args)
    print(text)
    if not args.no_write:
        write_section(args.results, text)


if __name__ == "__main__":
    main()
