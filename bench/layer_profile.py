"""Where the optimization methods' time goes, per linear role, on real layers of a real model.

Reads the layer problems ``bench/capture_layers.py`` saved (the Grams the engine hands each
linear while pruning smollm2-135m, intra-block, with sparsegpt pruning meanwhile), then for
each problem times, in this one process, each stage of every method at its settings, a bare
GEMM ``(d_out, d_in) @ (d_in, d_in)`` of the same shape, and each method's layer error:

* sparsegpt (the whole layer method);
* fista before issue 16 (lam search 12 x 30, 2 x 10 pursuit steps of 32 CG, final refit to
  d_in CG steps) and after (its defaults: lam search 3 x 3, 24 l0-ADMM iterations, 30 refit
  CG steps);
* l0-admm (eigendecomposition + 30 ADMM iterations, 30 refit CG steps);
* optima with the wanda mask (selection, masked CG to 1e-6, at most 4 d_in steps).

Stage seconds are of separately jitted calls (best of ``--repeat``, compile excluded); the
method totals are the whole layer methods. "GEMMs" = seconds / bare GEMM seconds. The error
column is each method's layer error on fista's objective (correction 0.25) relative to
sparsegpt's: ``(e - e_dense) / (e_sparsegpt - e_dense)``; below 1 is better than sparsegpt.

    .venv/bin/python bench/layer_profile.py --layers .cache/layers --sparsity 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jprune.methods import METHODS
from jprune.methods.base import LayerProblem, corrected_gram
from jprune.methods.optima import layer_quadratic, refit, row_errors
from jprune.solvers import (
    l0_admm,
    lam_search,
    parse_pattern,
    unit_scale,
)

from common import machine

OLD_FISTA = {
    "num_bisect": 12,
    "maxiter": 30,
    "polish_iters": 0,
    "pursuit_steps": 10,
    "refit_iters": None,
}


def load(path: Path) -> LayerProblem:
    arrays = np.load(path)
    cross = jnp.asarray(arrays["cross_gram"]) if "cross_gram" in arrays else None
    return LayerProblem(
        jnp.asarray(arrays["weight"]),
        jnp.asarray(arrays["gram"]),
        cross,
        int(arrays["num_tokens"]),
        path.stem,
    )


def best_of(fn, repeat: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return min(times)


def profile_layer(problem: LayerProblem, pattern, repeat: int) -> dict:
    target = problem._replace(cross_gram=corrected_gram(problem.gram, problem.cross_gram, 0.25))
    H_damped, C, H = layer_quadratic(target, 0.01)
    W0 = problem.weight.astype(jnp.float32)
    scale = unit_scale(H_damped)
    H_unit = H_damped * scale[:, None] * scale[None, :]
    C_unit = C * scale[None, :]
    V0 = W0 / scale[None, :]

    gemm = jax.jit(lambda W, H: W @ H)
    row = {"shape": list(problem.weight.shape), "gemm": best_of(lambda: gemm(W0, H), repeat)}

    def stage(name, fn):
        row[name] = best_of(fn, repeat)

    def method(name, label, **options):
        chosen = METHODS[name]
        parsed = chosen.parse_options(options)
        row[label] = best_of(lambda: chosen.layer(problem, pattern, parsed).weight, repeat)
        return chosen.layer(problem, pattern, parsed).weight

    answers = {
        "sparsegpt": method("sparsegpt", "sparsegpt"),
        "fista_old": method("fista", "fista_old", **OLD_FISTA),
        "fista": method("fista", "fista"),
        "l0-admm": method("l0-admm", "l0-admm"),
        "optima": method("optima", "optima", mask_from="wanda"),
    }
    for label, (bisect, iters) in (("old", (12, 30)), ("new", (3, 3))):
        search = jax.jit(
            lambda H, C, V, b=bisect, i=iters: lam_search(
                H, C, pattern, W0=V, num_bisect=b, maxiter=i, tol=1e-4
            )[0]
        )
        stage(f"fista_{label}.lasso", lambda s=search: s(H_unit, C_unit, V0))
    lasso = (
        jax.jit(lambda H, C, V: lam_search(H, C, pattern, W0=V, num_bisect=3, maxiter=3)[0])(
            H_unit, C_unit, V0
        )
        * scale[None, :]
    )
    polish = jax.jit(
        lambda H, C, W: l0_admm(H, C, pattern, W0=W, maxiter=24, growth=1.25, refit_maxiter=0)[0]
    )
    stage("fista.polish", lambda: polish(H, C, lasso))
    polished = polish(H, C, lasso)
    final = jax.jit(lambda H, C, W: refit(H, C, W != 0, W, maxiter=30, tol=1e-5)[0])
    stage("fista.refit", lambda: final(H, C, polished))
    # The old pursuit and final refit: the whole old layer solve minus its lasso search.
    row["fista_old.pursuit+refit"] = row["fista_old"] - row["fista_old.lasso"]
    admm_only = jax.jit(lambda H, C, W: l0_admm(H, C, pattern, W0=W, refit_maxiter=0)[0])
    stage("l0-admm.admm", lambda: admm_only(H, C, W0))
    row["l0-admm.refit"] = row["l0-admm"] - row["l0-admm.admm"]
    stage("optima.select", lambda: METHODS["wanda"](problem, pattern).weight)
    row["optima.cg"] = row["optima"] - row["optima.select"]

    def error(W):
        return float(jnp.sum(row_errors(W.astype(jnp.float32), H, C)))

    dense, reference = error(W0), error(answers["sparsegpt"])
    row["error"] = {k: (error(W) - dense) / (reference - dense) for k, W in answers.items()}
    return row


def render(rows: dict[str, dict], args) -> str:
    by_role: dict[str, list[dict]] = defaultdict(list)
    for name, row in rows.items():
        by_role[name.split(".", 1)[1]].append(row)
    columns = [
        "sparsegpt",
        "fista_old",
        "fista_old.lasso",
        "fista_old.pursuit+refit",
        "fista",
        "fista_new.lasso",
        "fista.polish",
        "fista.refit",
        "l0-admm",
        "l0-admm.admm",
        "l0-admm.refit",
        "optima",
        "optima.select",
        "optima.cg",
    ]
    lines = [
        f"Per linear role, summed over the {len(rows) // max(len(by_role), 1)} captured blocks "
        f"({args.layers}, sparsity {args.sparsity}); seconds (GEMMs = seconds / bare GEMM). "
        f"Machine: {machine()}.",
        "",
        "| stage | " + " | ".join(by_role) + " |",
        "|---|" + "---|" * len(by_role),
        "| bare GEMM (ms) | "
        + " | ".join(f"{1e3 * sum(r['gemm'] for r in rs):.1f}" for rs in by_role.values())
        + " |",
    ]
    for column in columns:
        cells = []
        for rs in by_role.values():
            seconds = sum(r[column] for r in rs)
            gemms = seconds / sum(r["gemm"] for r in rs)
            cells.append(f"{seconds:.2f} s / {gemms:.0f}")
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    for method in ("fista_old", "fista", "l0-admm", "optima"):
        cells = [f"{np.mean([r['error'][method] for r in rs]):.3f}" for rs in by_role.values()]
        lines.append(f"| error / sparsegpt's: {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=Path, required=True, help="capture_layers.py output")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    parser.add_argument("--repeat", type=int, default=2, help="timed calls per stage (best)")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    args = parser.parse_args()
    pattern = parse_pattern(args.sparsity)
    rows = {}
    for path in sorted(args.layers.glob("*.npz")):
        rows[path.stem] = profile_layer(load(path), pattern, args.repeat)
        print(path.stem, f"{rows[path.stem]['fista']:.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(render(rows, args))


if __name__ == "__main__":
    main()
