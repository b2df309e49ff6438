"""``jprune report``: a finished run's report.json as a table, and its layers against depth.

``summary_rows`` and ``layer_series`` are pure functions of the report; ``render_table`` makes
text of the rows and ``plot_layers`` draws the series with matplotlib (the ``report`` extra):
per-layer sparsity, relative reconstruction error and solver certificate against block index,
one line per linear role.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jprune.errors import JpruneError

OUTCOMES = ("converged", "max_iterations", "nonfinite")


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A run directory (or its report.json) -> the report."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise JpruneError(f"no report.json in {str(path)!r} (is it a jprune prune output?)")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise JpruneError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(report, Mapping) or "layers" not in report or "method" not in report:
        raise JpruneError(f"{str(file)!r} is not a jprune report (no method or layers)")
    return dict(report)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _gigabytes(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GB"


def _before_after(table: Mapping[str, Any], label: str) -> list[tuple[str, str]]:
    """Rows of a ``name -> {before, after}`` mapping (perplexities, accuracies)."""
    rows = []
    for name, values in table.items():
        if isinstance(values, Mapping) and "after" in values:
            before, after = values.get("before"), values.get("after")
            rows.append((f"{label} {name}", f"{_number(before)} -> {_number(after)}"))
    return rows


def zero_shot_metrics(zero_shot: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``report.json``'s ``zero_shot`` (lm-eval's results before and after) -> ``"task metric"
    -> {before, after}`` for every numeric metric but the standard errors."""
    if not isinstance(zero_shot, Mapping) or not zero_shot.get("after"):
        return {}
    before = (zero_shot.get("before") or {}).get("results", {})
    table = {}
    for task, metrics in zero_shot["after"].get("results", {}).items():
        for key, value in metrics.items():
            if "stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = key.removesuffix(",none")
            table[f"{task} {metric}"] = {"before": before.get(task, {}).get(key), "after": value}
    return table


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, value) pairs: what was run, with which settings, and what it gave."""
    config = report.get("config", {})
    target = config.get("target", {})
    calibration = config.get("calibration", {})
    allocation = report.get("allocation") or {"method": "uniform"}
    summary = report.get("summary", {})
    memory = report.get("memory", {})
    rows = [
        ("model", str(report.get("model"))),
        ("method", str(report["method"])),
        ("pattern", str(report.get("pattern"))),
        ("allocation", str(allocation.get("method"))),
    ]
    options = target.get("options") or {}
    if options:
        rows.append(("options", ", ".join(f"{k}={v}" for k, v in sorted(options.items()))))
    if calibration:
        rows.append(
            (
                "calibration",
                f"{calibration.get('nsamples')} x {calibration.get('seqlen')} tokens of "
                f"{calibration.get('text')} (seed {calibration.get('seed')})",
            )
        )
    certificate = allocation.get("certificate")
    if certificate:
        rows.append(
            (
                "allocation certificate",
                f"summed error {certificate['objective']:.4g} (uniform {certificate['uniform']:.4g}), "
                f"lower bound {certificate['lower_bound']:.4g}, gap {certificate['gap']:.2g}",
            )
        )
    rows.append(("sparsity", _number(summary.get("sparsity"))))
    rows.append(("summed relative error", _number(summary.get("relative_error_sum"))))
    rows += _before_after(report.get("perplexity", {}), "perplexity")
    rows += _before_after(zero_shot_metrics(report.get("zero_shot")), "accuracy")
    rows.append(("prune time", f"{_number(report.get('prune_seconds'), 1)} s"))
    rows.append(("wall time", f"{_number(report.get('wall_seconds'), 1)} s"))
    rows.append(
        (
            "peak memory",
            f"{_gigabytes(memory.get('peak_rss_bytes'))} RSS "
            f"(bound {_gigabytes(memory.get('bound_bytes'))} + baseline "
            f"{_gigabytes(memory.get('baseline_rss_bytes'))})",
        )
    )
    return rows


def render_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(field) for field, _ in rows)
    return "\n".join(f"{field:<{width}}  {value}" for field, value in rows)


def certificate(record: Mapping[str, Any]) -> tuple[str, float] | None:
    """A layer's solver certificate as one number: the share of rows whose solves converged
    (methods whose info counts solver outcomes), else SparseGPT's OBS loss; None without one."""
    info = record.get("info") or {}
    counts = [v for v in info.values() if isinstance(v, Mapping) and set(v) <= set(OUTCOMES)]
    counts = [c for c in counts if c]
    if counts:
        total = sum(sum(c.values()) for c in counts)
        return "rows converged (share)", sum(c.get("converged", 0) for c in counts) / max(total, 1)
    if isinstance(info.get("obs_loss"), (int, float)):
        return "OBS loss", float(info["obs_loss"])
    return None


def layer_series(report: Mapping[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Panel -> role -> [(block, value)], from the per-layer records."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {
        "sparsity": {},
        "relative error": {},
    }
    label = None
    for record in report["layers"]:
        role, block = record["role"], record["block"]
        panels["sparsity"].setdefault(role, []).append((block, record["sparsity"]))
        panels["relative error"].setdefault(role, []).append((block, record["relative_error"]))
        found = certificate(record)
        if found is not None:
            label = found[0]
            panels.setdefault(label, {}).setdefault(role, []).append((block, found[1]))
    if label is None:
        panels["certificate (none: the method runs no solver)"] = {}
    return panels


def plot_layers(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw ``layer_series`` into ``path`` (PNG, or any format matplotlib knows by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise JpruneError("--plot needs matplotlib: pip install 'jprune[report]'") from None
    panels = layer_series(report)
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True)
    for axis, (title, lines) in zip(axes, panels.items(), strict=True):
        for role, points in lines.items():
            blocks, values = zip(*sorted(points), strict=True)
            axis.plot(blocks, values, marker="o", markersize=3, label=role)
        if title == "relative error" and lines:
            axis.set_yscale("log")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
        if lines:
            axis.legend(fontsize=7, ncol=7, loc="best")
    axes[-1].set_xlabel("block")
    allocation = (report.get("allocation") or {}).get("method", "uniform")
    figure.suptitle(f"{report['method']} {report.get('pattern')}, allocation {allocation}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
