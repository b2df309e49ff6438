"""Configuration as typed data: options and settings refused before any model work, recipes
read from YAML / JSON, and a report that replays its run bit for bit."""

from __future__ import annotations

import json
import time

import pytest

import jprune.converters.hf as hf
import jprune.prune
from jprune.cli import main
from jprune.config import PruneConfig, read_config
from jprune.converters.hf import read_tensors
from jprune.errors import JpruneError
from jprune.plan import resolve

from conftest import CALIB_TEXT, STORIES260K


def _prune_argv(method, *extra, target=("--sparsity", "0.5")):
    return [
        "prune", "--model", str(STORIES260K), "--method", method, *target,
        "--calib", str(CALIB_TEXT), "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading the model fails the test: a refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(hf, "load_model", refuse)
    monkeypatch.setattr(jprune.prune, "Checkpoint", refuse)


MISTAKES = [
    # (method, extra arguments, what the one error line must say)
    ("fista", ["--option", "lamda=3"], "method 'fista' has no option 'lamda' (its options: "),
    (
        "sparsegpt",
        ["--option", "blocksize=-3"],
        "'blocksize' must be an integer in [1, inf], got '-3'",
    ),
    (
        "sparsegpt",
        ["--option", "blocksize=big"],
        "'blocksize' must be an integer in [1, inf], got 'big'",
    ),
    ("sparsegpt", ["--option", 'blocksize="big"'], "'blocksize' must be an integer"),
    (
        "fista",
        ["--option", "correction=0.2.5"],
        "'correction' must be a number in [0, 1], got '0.2.5'",
    ),
    ("fista", ["--option", "correction=2"], "'correction' must be a number in [0, 1], got '2'"),
    ("fista", ["--option", "refit=maybe"], "'refit' must be a boolean"),
    ("fista", ["--option", "warm_start=obs"], "'warm_start' must be one of none, sparsegpt, wanda"),
    ("wanda", ["--option", "swap_rtol=1e-4"], "'swap_rtol' is an option of method 'spap'"),
    (
        "optima",
        ["--option", "mask_from=foo"],
        "'mask_from' must be one of magnitude, wanda, sparsegpt, fista",
    ),
    ("fista", ["--option", "mask_from=wanda"], "method 'fista' has no option 'mask_from'"),
    ("fasp", ["--option", "correction=0.5", "--intra-block"], "--intra-block is for unstructured"),
    ("wanda-sp", ["--option", "correction=0.5"], "method 'wanda-sp' has no option 'correction'"),
    ("spap", ["--option", "layer_sparsity=0.1,x"], "'layer_sparsity' must be"),
    ("wanda", ["--batch-size", "0"], "'batch_size' must be an integer in [1, inf]"),
    ("wanda", ["--nsamples", "-1"], "'nsamples' must be an integer in [1, inf]"),
    ("wanda", ["--mesh", "foo"], "mesh must be a device count >= 1 or 'auto', got 'foo'"),
    ("wanda", ["--seqlen", "0"], "calibration option 'seqlen' must be an integer in [1, inf]"),
]


@pytest.mark.parametrize(("method", "extra", "message"), MISTAKES)
def test_every_kind_of_mistake_is_one_line_before_the_model_loads(
    no_model_work, tmp_path, capsys, method, extra, message
):
    out = tmp_path / "out"
    started = time.perf_counter()
    code = main(_prune_argv(method, "--out", str(out), *extra))
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("jprune: error: ") and message in err[0], err
    assert not list(tmp_path.iterdir())
    assert elapsed < 2.0


def test_sparsegpt_blocksize_must_fit_the_pattern(no_model_work, capsys):
    argv = _prune_argv("sparsegpt", "--option", "blocksize=6", target=("--pattern", "2:4"))
    assert main(argv) == 2
    assert "must be a multiple of M=4" in capsys.readouterr().err


def test_an_option_that_is_not_key_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(_prune_argv("fista", "--option", "lamda"))
    assert exit.value.code == 2 and "is not KEY=VALUE" in capsys.readouterr().err


def test_help_options_lists_a_methods_options_with_their_defaults(capsys):
    assert main(["prune", "--method", "fista", "--help-options"]) == 0
    text = capsys.readouterr().out
    assert "correction (a number in [0, 1]; default 0.25)" in text
    assert "warm_start (one of none, sparsegpt, wanda; default none)" in text
    assert main(["prune", "--method", "wanda", "--help-options"]) == 0
    assert "(no options)" in capsys.readouterr().out


def test_config_file_mistakes_are_named(no_model_work, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {path: x}\ntarget: {method: wanda, sparsity: 0.5}\nengin: {}\n")
    assert main(["prune", "--config", str(recipe), "--calib", str(CALIB_TEXT)]) == 2
    assert "has no section 'engin'" in capsys.readouterr().err
    recipe.write_text("model: {path: x}\ntarget: {method: wanda, sparsity: half}\n")
    assert main(["prune", "--config", str(recipe), "--calib", str(CALIB_TEXT)]) == 2
    assert "'sparsity' must be a number or none, got 'half'" in capsys.readouterr().err
    recipe.write_text("model: [unclosed\n")
    assert main(["prune", "--config", str(recipe)]) == 2
    assert "is not valid" in capsys.readouterr().err
    assert main(["prune", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", "--method", "wanda", "--sparsity", "0.5"]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_resolved_configuration_holds_every_option():
    config = PruneConfig.of(STORIES260K, "optima", pattern="2:4", calib=CALIB_TEXT)
    run = resolve(config)
    assert run.config.target.options["mask_from"] == "wanda"
    assert run.config.target.options["tol"] == 1e-6
    assert run.config.engine.intra_block is False
    assert PruneConfig.from_dict(json.loads(json.dumps(run.config.to_dict()))) == run.config


def _checkpoint(directory):
    return read_tensors(directory)


def test_recipe_and_report_replay_give_the_command_lines_checkpoint(assets, tmp_path, capsys):
    settings = ["--nsamples", "4", "--seqlen", "64", "--seed", "3"]
    flags = _prune_argv(
        "sparsegpt", *settings, "--option", "blocksize=32", "--out", str(tmp_path / "flags")
    )
    assert main(flags) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model:
  path: {STORIES260K}
target:
  method: sparsegpt
  sparsity: 0.5
  options:
    blocksize: 32
calibration:
  text: {CALIB_TEXT}
  nsamples: 4
  seqlen: 64
  seed: 3
output:
  out: {tmp_path / "recipe"}
"""
    )
    assert main(["prune", "--config", str(recipe), "--quiet"]) == 0
    report = tmp_path / "flags" / "report.json"
    replay = ["prune", "--config", str(report), "--out", str(tmp_path / "replay"), "--quiet"]
    assert main(replay) == 0
    expected = _checkpoint(tmp_path / "flags")
    for other in ("recipe", "replay"):
        got = _checkpoint(tmp_path / other)
        assert got.keys() == expected.keys()
        assert all((got[k] == expected[k]).all() for k in expected), other
    embedded = read_config(report)
    assert embedded["target"]["options"] == {"blocksize": 32, "percdamp": 0.01}
    replayed = json.loads((tmp_path / "replay" / "report.json").read_text())["config"]
    assert {**replayed, "output": None} == {**embedded, "output": None}
    capsys.readouterr()


def test_read_config_refuses_a_report_without_its_configuration(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]")
    with pytest.raises(JpruneError, match="must hold a mapping of sections"):
        read_config(broken)


def test_another_method_on_the_command_line_drops_the_files_options(tmp_path):
    """A recipe's options belong to its method: --method on the command line starts afresh."""
    from jprune.cli import build_parser, prune_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: x}}\ntarget: {{method: sparsegpt, sparsity: 0.5, options: {{blocksize: 32}}}}\n"
        f"calibration: {{text: {CALIB_TEXT}}}\n"
    )
    parse = build_parser().parse_args
    kept = prune_config(parse(["prune", "--config", str(recipe)]))
    assert kept.target.options == {"blocksize": 32}
    same = prune_config(parse(["prune", "--config", str(recipe), "--method", "sparsegpt"]))
    assert same.target.options == {"blocksize": 32}
    other = prune_config(parse(["prune", "--config", str(recipe), "--method", "wanda"]))
    assert other.target.method == "wanda" and other.target.options == {}
    assert resolve(other).method.name == "wanda"
