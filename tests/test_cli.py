"""The ``jprune`` command line: real numbers, reloadable output, and one-line errors that write nothing."""

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from jprune.cli import build_parser, main
from jprune.config import SECTIONS, PruneConfig

from conftest import EVAL_TEXT, STORIES260K


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("jprune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jprune.cli"]


def _tree(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _assert_one_error_line(capsys, code: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("jprune: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    return lines[0]


def _copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _torch_state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


# ---------------------------------------------------------------- what works


def test_entry_point_eval_json_on_stories260k(assets):
    proc = subprocess.run(
        [
            *_entry_point(),
            "eval",
            "--model",
            str(STORIES260K),
            "--text",
            str(EVAL_TEXT),
            "--seqlen",
            "512",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert f"{result['perplexity']:.2f}" == "6.21"
    assert result["seqlen"] == 512
    assert result["tokens"] == result["windows"] * 511 > 80_000
    # --json implies no progress bar. The one other thing that may reach stderr here is a
    # warning of the suite's shared compilation cache (conftest; two processes can race on an
    # entry's access-time file), which a user's run does not have.
    cache_warning = ("persistent compilation cache", "warnings.warn(")
    assert [
        line for line in proc.stderr.splitlines() if not any(w in line for w in cache_warning)
    ] == []


def test_entry_point_error_exit_code(tmp_path):
    proc = subprocess.run(
        [
            *_entry_point(),
            "convert",
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"jprune: error: model path {str(tmp_path / 'nope')!r} does not exist"
    ]
    assert _tree(tmp_path) == set()


def test_eval_prints_one_sentence(assets, tmp_path, capsys):
    text = tmp_path / "head.txt"
    text.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    code = main(
        ["eval", "--model", str(STORIES260K), "--text", str(text), "--seqlen", "64", "--quiet"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    match = re.fullmatch(r"perplexity (\d+\.\d{4})  \((\d+) tokens, (\d+) windows of 64\)\n", out)
    assert match, out
    assert 1.0 < float(match[1]) < 512.0
    assert int(match[2]) == int(match[3]) * 63 > 0
    assert err == ""


def test_convert_writes_a_checkpoint_transformers_reloads(zoo, tmp_path, capsys):
    source = zoo["llama3-gqa"]
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(source), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert _tree(tmp_path) >= {"converted", "converted/config.json", "converted/model.safetensors"}
    assert not any(".partial-" in p for p in _tree(tmp_path))
    original, reloaded = _torch_state(source), _torch_state(out)
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name


def test_convert_force_replaces_existing_out(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code = main(["convert", "--model", str(zoo["opt"]), "--out", str(out)])
    _assert_one_error_line(capsys, code, "already exists", "--force", str(out))
    assert _tree(tmp_path) == {"out", "out/stale.txt"}

    assert (
        main(
            [
                "convert",
                "--model",
                str(zoo["opt"]),
                "--out",
                str(out),
                "--force",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert not (out / "stale.txt").exists()
    assert not any(".partial-" in p for p in _tree(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    ref = _torch_state(zoo["opt"])
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ref[name].to(torch.bfloat16)), name


def test_help_documents_every_flag(capsys):
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert {"eval", "convert"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        flags = [
            a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
        ]
        assert flags, name
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for action in flags:
            assert action.help and action.help.strip(), (name, action.option_strings)
            for option in action.option_strings:
                assert option in text, (name, option)


# ------------------------------------------------- prune's flags are the configuration's fields

HAND_WRITTEN = {"-h", "--help", "--config", "--help-options", "--distributed", "--quiet"}


def _prune_parser() -> argparse.ArgumentParser:
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    return subparsers.choices["prune"]


def _fields():
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            yield section, field, hints[field.name]


def _default(field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def test_every_config_field_is_a_prune_flag_with_its_default_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    actions = {a.dest: a for a in _prune_parser()._actions if a.option_strings}
    for section, field, _ in _fields():
        action = actions.pop(f"{section}.{field.name}")  # KeyError: a field without a flag
        assert all(option in text for option in action.option_strings), action.option_strings
        help_text = " ".join(action.help.split())
        assert help_text.startswith(" ".join(field.metadata["help"].split()))
        if field.metadata["required"]:
            assert help_text.endswith(")") and "(required" in help_text, help_text
            continue
        shown = re.fullmatch(r".*\(default: (.*)\)", help_text).group(1)
        default = _default(field)
        if default in (None, (), {}):
            assert shown == (field.metadata["unset"] or "none"), (section, field.name)
        elif isinstance(default, bool):
            flag_default = default != field.metadata["flag"].inverted
            assert shown == ("on" if flag_default else "off"), (section, field.name)
        else:
            assert type(default)(shown) == default, (section, field.name, shown)
    # and the other way round: every flag left is written by hand and sets no field
    assert {o for a in actions.values() for o in a.option_strings} == HAND_WRITTEN


def _sample(flag, hint):
    """A value of the flag's field other than its default, and the arguments that give it."""
    field, meta = flag.field, flag.field.metadata
    default = _default(field)
    members = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    choices = [c for c in meta["choices"] or () if c not in (None, default)]
    if bool in members:
        value = not default
        given = value != meta["flag"].inverted
        return value, [flag.name if given else "--no-" + flag.name.removeprefix("--")]
    if typing.get_origin(hint) is tuple:
        repeated = [flag.name, "a", flag.name, "b"] if meta["flag"].repeat else None
        return ("a", "b"), repeated or [flag.name, "a,b"]
    if isinstance(default, dict):
        return {"key": "value"}, [flag.name, "key=value"]
    if choices:
        value = choices[0]
    elif float in members:
        value = ((meta["low"] or 0) + (meta["high"] or 1)) / 2
    elif int in members:
        value = max(default or 0, meta["low"] or 0) + 1
    else:
        value = f"given-{field.name}"
    assert value != default
    return value, [flag.name, str(value)]


def test_every_prune_flag_sets_its_field_and_a_flag_left_out_keeps_the_recipes(tmp_path):
    from jprune.cli import config_flags, prune_config

    flags = config_flags()
    hints = {(s, f.name): hint for s, f, hint in _fields()}
    samples = {flag.dest: _sample(flag, hints[flag.section, flag.field.name]) for flag in flags}
    parse = build_parser().parse_args

    # a recipe with every field away from its default: nothing on the command line changes it
    everything = {}
    for flag in flags:
        value = samples[flag.dest][0]
        everything.setdefault(flag.section, {})[flag.field.name] = (
            list(value) if isinstance(value, tuple) else value
        )
    recipe = tmp_path / "everything.json"
    recipe.write_text(json.dumps(everything))
    assert prune_config(parse(["prune", "--config", str(recipe)])) == PruneConfig.from_dict(
        everything
    )

    # a minimal recipe, and each flag alone over it
    minimal = {
        "model": {"path": "m"},
        "target": {"method": "wanda", "sparsity": 0.5},
        "calibration": {"text": "c"},
    }
    recipe = tmp_path / "minimal.json"
    recipe.write_text(json.dumps(minimal))
    for flag in flags:
        value, argv = samples[flag.dest]
        config = prune_config(parse(["prune", "--config", str(recipe), *argv]))
        section = getattr(config, flag.section)
        assert getattr(section, flag.field.name) == value, (flag.name, argv)
        exclusive = flag.field.metadata["exclusive"]
        for other in flags:  # e.g. --pattern unsets the recipe's sparsity
            alternative = (other.section, other.field.metadata["exclusive"])
            if other is not flag and exclusive and alternative == (flag.section, exclusive):
                assert getattr(section, other.field.name) == _default(other.field), flag.name


# ---------------------------------------------------------------- what is refused


@pytest.fixture
def workdir(tmp_path):
    """An empty directory for --out: after a refused command it must still be empty."""
    work = tmp_path / "work"
    work.mkdir()
    yield work
    assert _tree(work) == set(), "a refused command left files behind"


def _convert(source, workdir) -> int:
    return main(["convert", "--model", str(source), "--out", str(workdir / "out")])


def test_missing_model_path(tmp_path, workdir, capsys):
    code = _convert(tmp_path / "nope", workdir)
    _assert_one_error_line(capsys, code, "does not exist", "nope")


def test_unsupported_model_type(tmp_path, workdir, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    code = _convert(model, workdir)
    _assert_one_error_line(capsys, code, "model_type 'gpt2'", "not supported")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
            "'yarn'",
        ),
        ({"sliding_attention_window": 128}, "'sliding_attention_window'"),
        ({"hidden_act": "tanh"}, "'tanh'"),
    ],
    ids=["yarn-rope", "unknown-field", "unknown-activation"],
)
def test_unhandled_config_feature(zoo, tmp_path, workdir, capsys, changes, needle):
    model = _copy_model(zoo["llama-mha"], tmp_path / "model", **changes)
    code = _convert(model, workdir)
    _assert_one_error_line(capsys, code, needle, "not")


def test_truncated_safetensors(zoo, tmp_path, workdir, capsys):
    model = _copy_model(zoo["llama-mha"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = _convert(model, workdir)
    _assert_one_error_line(capsys, code, "model.safetensors", "truncated")


def test_failure_while_writing_leaves_nothing(zoo, workdir, capsys, monkeypatch):
    """The disk fills after the first tensors are written: one line naming the file, and the
    staging directory with the written part goes."""
    import errno
    import os

    writes = []
    pwrite = os.pwrite

    def full_disk_at_the_third_write(fd, data, offset):
        writes.append(offset)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk_at_the_third_write)
    code = _convert(zoo["qwen2"], workdir)
    line = _assert_one_error_line(capsys, code, "model.safetensors", "No space left on device")
    assert " needed, " in line and " free there)" in line, line


@pytest.mark.parametrize(
    ("text", "args", "needles"),
    [
        (
            "Once upon a time there was a cat.",
            ["--seqlen", "512"],
            ["shorter than one window", "seqlen=512"],
        ),
        (None, [], ["does not exist", "text.txt"]),
        (b"\xff\xfe not utf-8", [], ["not UTF-8"]),
        (
            "Once upon a time there was a cat.",
            ["--seqlen", "4", "--batch-size", "0"],
            ["batch size"],
        ),
        ("Once upon a time there was a cat.", ["--seqlen", "1"], ["seqlen"]),
        (
            "Once upon a time there was a cat.",
            ["--seqlen", "4", "--eval-memory", "0"],
            ["'memory_mib' must be an integer in [1, inf], got 0"],
        ),
    ],
    ids=[
        "shorter-than-a-window",
        "missing-text",
        "not-utf8",
        "batch-size-0",
        "seqlen-1",
        "eval-memory-0",
    ],
)
def test_eval_refuses_bad_text_or_options(assets, tmp_path, capsys, text, args, needles):
    path = tmp_path / "text.txt"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    elif text is not None:
        path.write_bytes(text)
    before = _tree(tmp_path)
    code = main(["eval", "--model", str(STORIES260K), "--text", str(path), *args])
    _assert_one_error_line(capsys, code, *needles)
    assert _tree(tmp_path) == before


def test_eval_memory_is_for_text(assets, capsys):
    code = main(["eval", "--model", str(STORIES260K), "--tasks", "x", "--eval-memory", "64"])
    _assert_one_error_line(capsys, code, "--eval-memory is for --text")


def test_eval_model_without_tokenizer(zoo, capsys):
    code = main(["eval", "--model", str(zoo["llama-mha"]), "--text", str(EVAL_TEXT)])
    _assert_one_error_line(capsys, code, "no tokenizer files")
