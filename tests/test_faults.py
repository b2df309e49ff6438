"""Faults a long run meets, refused like bad flags: one ``jprune: error:`` line naming the
problem, exit status 2, nothing at ``--out``. (Signals, killed runs and concurrent runs on one
output: test_streaming, whose runs are real processes.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jprune.cli import main
from jprune.staging import lock_path, staging_path

from conftest import CALIB_TEXT, STORIES260K


def _damaged_copy(directory, name: str, change) -> None:
    """stories260K with ``change(array)`` applied to tensor ``name`` (in place, float32)."""
    shutil.copytree(STORIES260K, directory)
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    changed = tensors[name].copy()
    change(changed)
    tensors[name] = changed
    save_file(tensors, weights, metadata={"format": "pt"})


def _prune(capsys, model, out, *extra):
    argv = ["prune", "--model", str(model), "--method", "wanda", "--sparsity", "0.5"]
    argv += ["--calib", str(CALIB_TEXT), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    code = main([*argv, "--out", str(out), *extra])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("name", "value"),
    [("model.layers.2.mlp.up_proj.weight", np.nan), ("model.embed_tokens.weight", np.inf)],
)
def test_a_non_finite_weight_is_refused_by_name(assets, tmp_path, capsys, name, value):
    model = tmp_path / "model"

    def poison(array):
        array[3, 5] = value

    _damaged_copy(model, name, poison)
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (
        f"jprune: error: tensor {name!r} in {str(model / 'model.safetensors')!r} holds 1 NaN "
        f"or infinite value of {np.prod(load_file(STORIES260K / 'model.safetensors')[name].shape)}"
        ": the checkpoint is damaged"
    ), err
    # nothing at --out; a failure in block 2 keeps the two finished blocks for a resume
    assert not out.exists() and not lock_path(out).exists()
    assert staging_path(out).exists() == (name.startswith("model.layers.2."))


def test_convert_of_a_non_finite_weight_writes_nothing(assets, tmp_path, capsys):
    """convert writes each block as it reads it: a NaN in block 2 is found after blocks 0
    and 1 are written, and they go with the staging directory, nothing at --out."""
    model = tmp_path / "model"
    name = "model.layers.2.self_attn.v_proj.weight"

    def poison(array):
        array[1, 2] = np.nan

    _damaged_copy(model, name, poison)
    work = tmp_path / "work"
    work.mkdir()
    code = main(["convert", "--model", str(model), "--out", str(work / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"jprune: error: tensor {name!r} in "), err
    assert err.endswith(": the checkpoint is damaged"), err
    assert list(work.iterdir()) == []


def test_activations_that_overflow_are_refused_at_the_block_they_enter(assets, tmp_path, capsys):
    """Finite weights whose outputs overflow float32 (a row of block 1's down_proj at 1e38):
    the residual stream entering block 2 is Inf, and its statistics are refused there, by block
    and by the linears reading them, before any solve of that block."""
    model = tmp_path / "model"

    def overflow(array):
        array[0, :] = 1e38

    _damaged_copy(model, "model.layers.1.mlp.down_proj.weight", overflow)
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(
        "jprune: error: the calibration activations entering block 2 are not finite: the "
    ), err
    assert "model.layers.2.self_attn.q_proj" in err, err
    assert not out.exists() and not lock_path(out).exists()
    assert staging_path(out).is_dir()  # blocks 0 and 1 are finished and journaled


def test_a_write_error_is_one_line_and_resume_completes_once_it_is_gone(
    assets, tmp_path, capsys, monkeypatch
):
    """The disk fills while block 2's shard is written (an ENOSPC injected into the staging
    writer's ``pwrite`` on that shard's file): one line naming the file, the bytes it needed and the bytes free; nothing at
    --out; blocks 0 and 1 kept; --resume, once writes succeed again, writes the bytes of a run
    that never failed."""
    import errno
    import json
    import os
    from pathlib import Path

    from jprune.converters.hf import read_tensors
    from jprune.staging import PROGRESS

    whole = tmp_path / "whole"
    assert _prune(capsys, STORIES260K, whole)[0] == 0
    pwrite = os.pwrite

    def full_disk_at_the_third_shard(fd, data, offset):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith("model-00003-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk_at_the_third_shard)
    out = tmp_path / "out"
    code, err = _prune(capsys, STORIES260K, out)
    assert code == 2 and len(err.splitlines()) == 1, err
    shard = staging_path(out) / "model-00003-of-00006.safetensors"
    assert err.startswith(f"jprune: error: cannot write {str(shard)!r} ("), err
    assert " needed, " in err and " free there): No space left on device; 2 of 5 blocks " in err
    assert err.endswith("--resume continues once the cause is fixed"), err
    assert not out.exists() and not lock_path(out).exists()
    assert json.loads((staging_path(out) / PROGRESS).read_text())["blocks_done"] == 2

    monkeypatch.setattr(os, "pwrite", pwrite)
    assert _prune(capsys, STORIES260K, out, "--resume")[0] == 0
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == 2
    expected, found = read_tensors(whole), read_tensors(out)
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        assert np.array_equal(tensor.view(np.uint32), found[name].view(np.uint32)), name
