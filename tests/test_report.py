"""``jprune report``: the summary table and the per-layer figure, rendered to a PNG."""

import json
import sys

import pytest

from jprune.cli import main
from jprune.report import certificate, layer_series, read_report, summary_rows

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _report(method: str, info) -> dict:
    layers = [
        {
            "name": f"model.layers.{b}.{r}",
            "block": b,
            "role": r,
            "shape": [8, 8],
            "sparsity": 0.6 + 0.01 * b,
            "relative_error": 0.01 * (b + 1) * (i + 1),
            "info": info,
        }
        for b in range(4)
        for i, r in enumerate(ROLES)
    ]
    return {
        "model": "m",
        "method": method,
        "pattern": "0.6 unstructured per row",
        "config": {
            "target": {"options": {"correction": 0.25}},
            "calibration": {"text": "c.txt", "nsamples": 8, "seqlen": 64, "seed": 0},
        },
        "allocation": {
            "method": "optimal",
            "certificate": {"objective": 1.0, "uniform": 1.2, "lower_bound": 1.0, "gap": 0.0},
        },
        "summary": {"sparsity": 0.6, "relative_error_sum": 1.5},
        "perplexity": {"eval.txt": {"before": 10.0, "after": 12.5, "seqlen": 64}},
        "zero_shot": {
            "before": {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.41}}},
            "after": {
                "results": {"hellaswag": {"acc,none": 0.38, "acc_stderr,none": 0.01}},
            },
        },
        "prune_seconds": 12.0,
        "wall_seconds": 20.0,
        "memory": {"peak_rss_bytes": 2**30, "bound_bytes": 2**29, "baseline_rss_bytes": 2**28},
        "layers": layers,
    }


def test_certificate_reads_solver_outcomes_or_the_obs_loss():
    outcomes = {"lasso_result": {"converged": 6, "max_iterations": 2, "nonfinite": 0}}
    assert certificate({"info": outcomes}) == ("rows converged (share)", 0.75)
    assert certificate({"info": {"obs_loss": 3.5}}) == ("OBS loss", 3.5)
    assert certificate({"info": {}}) is None
    panels = layer_series(_report("wanda", {}))
    assert list(panels)[:2] == ["sparsity", "relative error"]
    assert set(panels["sparsity"]) == set(ROLES)
    assert [b for b, _ in panels["sparsity"]["q"]] == [0, 1, 2, 3]


def test_report_prints_the_table_and_renders_a_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    info = {"lasso_result": {"converged": 7, "max_iterations": 1, "nonfinite": 0}}
    (run / "report.json").write_text(json.dumps(_report("fista", info)))
    rows = dict(summary_rows(read_report(run)))
    assert rows["perplexity eval.txt"] == "10.0000 -> 12.5000"
    assert rows["accuracy hellaswag acc"] == "0.4100 -> 0.3800"
    assert not any("stderr" in name for name in rows)
    assert rows["allocation"] == "optimal" and "gap 0" in rows["allocation certificate"]
    png = tmp_path / "layers.png"
    assert main(["report", str(run), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "fista" in out and "peak memory" in out and f"wrote {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_refuses_a_missing_run_and_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no report.json" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps(_report("wanda", {})))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jprune: error: --plot needs matplotlib: pip install 'jprune[report]'"
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("text", ["{", '{"layers": []}'])
def test_report_refuses_what_is_not_a_report(tmp_path, capsys, text):
    (tmp_path / "report.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    assert "jprune: error:" in capsys.readouterr().err
