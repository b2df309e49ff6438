"""Prune the reference model with every method at 2:4 and print its perplexity.

Run from the repository root: ``.venv/bin/python examples/prune_methods.py``.
"""

from jprune.config import PruneConfig
from jprune.prune import prune

ASSETS = "../shared/assets"
RUNS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {},
    "fista": {},  # cold start; e.g. {"warm_start": "sparsegpt"} or {"refit": False}
    "optima": {"mask_from": "wanda"},
}

for method, options in RUNS.items():
    config = PruneConfig.of(
        f"{ASSETS}/models/stories260K",
        method,
        pattern="2:4",
        calib=f"{ASSETS}/text/tinystories_calib.txt",
        nsamples=32,
        eval_texts=[f"{ASSETS}/text/tinystories_eval.txt"],
        method_options=options,
        out=f"/tmp/stories260K-{method}-2of4",
        force=True,
    )
    report = prune(config)
    (ppl,) = report["perplexity"].values()
    print(
        f"{method:10s} {ppl['before']:.3f} -> {ppl['after']:.3f} in {report['prune_seconds']:.1f} s"
    )
