"""Benchmark of jprune.solvers (not a test): per-iteration cost vs one bare GEMM, and time to a
common objective tolerance vs jaxopt vmapped over rows.

    python bench/solvers.py                 # shapes 1024x1024 1024x2752 2752x1024 (m x d)
    python bench/solvers.py --quick         # one small shape
    python bench/solvers.py --shapes 512x512 --rtol 1e-5
    python bench/solvers.py --grams .cache/layers/block15.*.npz   # real Grams (capture_layers.py)

Device-agnostic JAX: runs on whatever ``jax.devices()[0]`` is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from jprune.solvers import box_qp, fista, lasso_admm

from common import add_matmul_precision, load_average, machine, timed, use_matmul_precision


def problem(m, d, seed=0):
    """Correlated features with a decaying spectrum: H = A^T A from n = 4d samples."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = rng.standard_normal((4 * d, d)) @ (np.logspace(0, -2, d)[:, None] * Q)
    H = jnp.asarray(A.T @ A / (4 * d), jnp.float32)
    W0 = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    keep = jnp.asarray(rng.random((m, d)) < 0.5)
    return H, W0 @ H, keep


def captured_problem(path):
    """A layer problem ``bench/capture_layers.py`` saved, as fista's lasso sees it: the Gram per
    token with fista's 1% ridge, in unit-input coordinates, the dense target (correction 0.25);
    the fixed mask is Wanda's at 50%."""
    arrays = np.load(path)
    n = float(arrays["num_tokens"])
    gram = arrays["gram"].astype(np.float64) / n
    cross = arrays["cross_gram"].astype(np.float64) / n if "cross_gram" in arrays else gram
    weight = arrays["weight"].astype(np.float64)
    C = weight @ (0.25 * cross + 0.75 * gram)
    H = gram + 0.01 * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
    scale = 1.0 / np.sqrt(np.diag(H))
    H, C = H * scale[:, None] * scale[None, :], C * scale[None, :]
    score = np.abs(weight) / scale[None, :]
    keep = score >= np.median(score, axis=1, keepdims=True)
    return jnp.asarray(H, jnp.float32), jnp.asarray(C, jnp.float32), jnp.asarray(keep)


def bare_gemms(H, C, k):
    """``k`` bare ``W @ H`` products in a loop, shaped like a solver call for ``per_iteration``
    (one product is dispatch-bound on a GPU; the loop difference cancels dispatch)."""
    scale = 1.0 / jnp.linalg.norm(H)  # keeps the iterates finite; one multiply per product
    return (jax.lax.fori_loop(0, k, lambda _, W: (W @ H) * scale, C),)


def per_iteration(solve, H, C, n):
    """Seconds per iteration: difference of runs of 2n and n iterations (setup cancels)."""
    short = jax.jit(lambda H, C: solve(H, C, n)[0])
    long = jax.jit(lambda H, C: solve(H, C, 2 * n)[0])
    return max(timed(long, H, C).best - timed(short, H, C).best, 0.0) / n


def time_to_target(run, target, cap_s, refine_steps=3):
    """Seconds for the fewest iterations ``k`` at which ``run(k)`` -> (objective, seconds)
    reaches ``target``: double ``k`` from 8 until it does, then bisect between the last miss and
    the first hit ``refine_steps`` times (a doubling alone overstates a method's time by up to
    2x, by a different factor for each method)."""
    k, miss = 8, 0
    while True:
        try:
            obj, seconds = run(k)
        except jax.errors.JaxRuntimeError:  # vmapping jaxopt materializes per-row d x d arrays
            return None, k
        if obj <= target:
            break
        if seconds > cap_s:
            return None, k
        miss, k = k, 2 * k
    for _ in range(refine_steps):
        middle = (miss + k) // 2
        if middle in (miss, k):
            break
        obj, middle_seconds = run(middle)
        if obj <= target:
            k, seconds = middle, middle_seconds
        else:
            miss = middle
    return seconds, k


def ours_run(solve, H, C):
    def run(k):
        f = jax.jit(lambda H, C: solve(H, C, k)[1].objective.sum())
        seconds = timed(f, H, C, repeats=1).best
        return float(f(H, C)), seconds

    return run


def jaxopt_lasso_run(H, C, lam):
    def fun(w, c):
        return 0.5 * w @ (H @ w) - c @ w

    def run(k):
        pg = jaxopt.ProximalGradient(fun=fun, prox=jaxopt.prox.prox_lasso, maxiter=k, tol=0.0)

        @jax.jit
        def solve(C):
            W = jax.vmap(lambda c: pg.run(jnp.zeros_like(c), lam, c).params)(C)
            return jnp.sum(0.5 * (W @ H) * W - C * W) + lam * jnp.abs(W).sum()

        seconds = timed(solve, C, repeats=1).best
        return float(solve(C)), seconds

    return run


def jaxopt_box_run(H, C, lower, upper):
    def run(k):
        osqp = jaxopt.BoxOSQP(
            matvec_Q=lambda Q, x: Q @ x, matvec_A=lambda _, x: x, maxiter=k, tol=1e-12
        )

        @jax.jit
        def solve(C, lower, upper):
            def one(c, l, u):
                return osqp.run(
                    params_obj=(H, -c), params_eq=0.0, params_ineq=(l, u)
                ).params.primal[0]

            W = jax.vmap(one)(C, lower, upper)
            W = jnp.clip(W, lower, upper)  # ADMM iterates are only approximately feasible
            return jnp.sum(0.5 * (W @ H) * W - C * W)

        seconds = timed(solve, C, lower, upper, repeats=1).best
        return float(solve(C, lower, upper)), seconds

    return run


def log(message):
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_shape(m, d, args, captured=None):
    """One table row for an (m, d) problem (``captured``: a saved layer's path instead)."""
    H, C, keep = problem(m, d) if captured is None else captured_problem(captured)
    m, d = C.shape
    label = f"{m}x{d}" if captured is None else f"{m}x{d} {Path(captured).stem}"
    log(f"{label}: problem built")
    lam = 0.01 * float(jnp.abs(C).max())
    bound = jnp.where(keep, jnp.inf, 0.0)
    gemm = per_iteration(bare_gemms, H, C, args.iters)

    def lasso(H, C, k):
        return fista(H, C, lam, maxiter=k, tol=0.0)

    def admm(H, C, k):
        return lasso_admm(H, C, lam, maxiter=k, tol=0.0)

    def box(method):
        return lambda H, C, k: box_qp(H, C, -bound, bound, maxiter=k, tol=0.0, method=method)

    solvers = (lasso, admm, box("cg"), box("apg"))
    ratios = [per_iteration(s, H, C, args.iters) / gemm for s in solvers]
    log(f"per-iteration ratios {ratios}")

    # Reference optima: run to a tight gradient tolerance, stopping early once every row is there.
    ref_l = fista(H, C, lam, maxiter=3000, tol=1e-6)[1]
    ref_b = box_qp(H, C, -bound, bound, maxiter=3000, tol=1e-6, method="cg")[1]
    f_lasso, f_box = float(ref_l.objective.sum()), float(ref_b.objective.sum())
    target_lasso = f_lasso + args.rtol * abs(f_lasso)
    target_box = f_box + args.rtol * abs(f_box)
    log("reference optima done")
    ours_l, it_l = time_to_target(ours_run(lasso, H, C), target_lasso, 10 * args.cap)
    ours_a, it_a = time_to_target(ours_run(admm, H, C), target_lasso, 10 * args.cap)
    ours_b, it_b = time_to_target(ours_run(box("cg"), H, C), target_box, 10 * args.cap)
    log(f"ours to tolerance: {ours_l} s, {ours_a} s, {ours_b} s")
    jo_l, jo_it = time_to_target(jaxopt_lasso_run(H, C, lam), target_lasso, args.cap)
    log(f"jaxopt lasso to tolerance: {jo_l} s ({jo_it} iterations)")
    jo_b = "skipped"
    if not args.skip_jaxopt_box:
        jo_b, _ = time_to_target(jaxopt_box_run(H, C, -bound, bound), target_box, args.cap)

    def fmt(x):
        if isinstance(x, str):
            return x
        return f">{args.cap:.0f} (not reached or out of memory)" if x is None else f"{x:.3f}"

    return (
        f"| {label} | {1e3 * gemm:.2f} | "
        + " | ".join(f"{r:.2f}" for r in ratios)
        + f" | {fmt(ours_l)} ({it_l}) / {fmt(ours_a)} ({it_a}) / {fmt(jo_l)} ({jo_it}) "
        f"| {fmt(ours_b)} ({it_b}) / {fmt(jo_b)} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["1024x1024", "1024x2752", "2752x1024"])
    parser.add_argument("--quick", action="store_true", help="one 256x256 problem")
    parser.add_argument("--iters", type=int, default=20, help="iterations for per-iteration time")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative objective tolerance")
    parser.add_argument("--cap", type=float, default=60.0, help="give up on jaxopt after (s)")
    parser.add_argument(
        "--skip-jaxopt-box",
        action="store_true",
        help="do not time vmapped jaxopt BoxOSQP (at d >= 1024 it holds a d x d matrix per row "
        "and runs for many minutes before the cap applies)",
    )
    parser.add_argument(
        "--grams", nargs="*", default=[], help="layer problems saved by capture_layers.py"
    )
    add_matmul_precision(parser)
    args = parser.parse_args()
    use_matmul_precision(args.matmul_precision)
    shapes = ["256x256"] if args.quick else args.shapes
    print(f"machine: {machine()}; matmul precision: {args.matmul_precision}")
    print(f"load average at start: {load_average()[0]:.1f} (timings are wall clock)")
    print(
        "| m x d | GEMM ms | fista it / GEMM | lasso_admm it / GEMM | box_qp cg it / GEMM "
        "| box_qp apg it / GEMM | lasso to tol: fista s (iters) / lasso_admm s (iters) / jaxopt s "
        "(iters) | box_qp fixed mask to tol: ours s (iters) / jaxopt s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if args.grams:
        for path in args.grams:
            print(bench_shape(0, 0, args, captured=path), flush=True)
        return
    for shape in shapes:
        print(bench_shape(*map(int, shape.split("x")), args))


if __name__ == "__main__":
    main()
