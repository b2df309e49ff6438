"""Out-of-core pruning: memory bounded by one block whatever the depth; resuming a killed or
signalled run bit-identically; one run at a time on an output. Every run here is a real
``jprune prune`` (a subprocess where it must die or be signalled, in-process otherwise)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jprune.cli import main
from jprune.converters.hf import read_tensors
from jprune.staging import MANIFEST, PROGRESS, lock_path, staging_path

from conftest import CALIB_TEXT, CHEAP_OPTIONS, STORIES260K, decoder_linears

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _llama(
    directory: Path, layers: int, hidden: int, intermediate: int, dtype: str, vocab: int = 512
) -> Path:
    """A random-initialised LLaMA checkpoint with stories260K's tokenizer (its 512 tokens are
    the first ``vocab`` ids; the rest only make the embedding and head larger)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy2(STORIES260K / name, directory / name)
    return directory


def _prune_command(model, out, *extra):
    return [
        sys.executable, "-m", "jprune.cli", "prune", "--model", str(model),
        "--calib", str(CALIB_TEXT), "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def _assert_half_of_every_row(path, blocks):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    count = 0
    for name, weight in decoder_linears(model):
        d_in = weight.shape[1]
        assert ((weight != 0).sum(1) == d_in - math.floor(0.5 * d_in)).all(), name
        count += 1
    assert count == 7 * blocks


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """4 and 16 blocks of hidden 512 in bfloat16, pruned with wanda: the deeper model's
    peak RSS is within 1.3x of the shallower one's, and grows by less than 3/4 of the 12 extra
    blocks' bytes. The second check is the one a run holding the whole model fails (it holds
    them at least once: loading both models whole grew the peak by 1.8x those bytes, and
    passed the 1.3x check); block-to-block allocator noise is about +-30 MB here. wanda has the
    engine gather the same full Gram per linear input as sparsegpt, whose OBS solves on
    2048-wide layers only cost time here (a layer's solver state is the per-block bound's).

    The peak is report.json's: the kernel's high-water mark (``VmHWM``), which the engine
    restarts per block for the per-block figures, folded over those restarts. (``wait4``'s
    ``ru_maxrss`` is no check of it: Linux carries the forking parent's peak across exec, so
    under a large pytest process it reports that process's size.)"""
    reports, sizes = {}, {}
    # Both runs compile: loading the deeper run's programs from a compilation cache (one set by
    # conftest in JAX_COMPILATION_CACHE_DIR) would spare it the compiler's own peak, and that could
    # hide a model held whole.
    uncached = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for layers in (4, 16):
        model = _llama(tmp_path / f"llama{layers}", layers, 512, 2048, "bfloat16")
        sizes[layers] = sum(os.path.getsize(p) for p in model.glob("*.safetensors"))
        out = tmp_path / f"pruned{layers}"
        command = _prune_command(
            model, out, "--method", "wanda", "--sparsity", "0.5",
            "--nsamples", "4", "--seqlen", "64",
        )  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=uncached)
        assert done.returncode == 0, done.stderr
        reports[layers] = json.loads((out / "report.json").read_text())
        _assert_half_of_every_row(out, layers)
        assert {str(w.dtype) for w in read_tensors(out).values()} == {"bfloat16"}
    extra_blocks = sizes[16] - sizes[4]
    assert extra_blocks > 9e7
    reported = {n: r["memory"]["peak_rss_bytes"] for n, r in reports.items()}
    assert reported[16] <= 1.3 * reported[4], reported
    assert reported[16] - reported[4] < 0.75 * extra_blocks, (reported, extra_blocks)
    for layers, report in reports.items():
        usage = report["memory"]
        assert len(usage["blocks"]) == layers
        assert max(b["peak_rss_bytes"] for b in usage["blocks"]) <= usage["peak_rss_bytes"]
    # the stated bound counts one block, not the model
    assert reports[16]["memory"]["bound_bytes"] == reports[4]["memory"]["bound_bytes"]


def test_a_large_vocabulary_is_held_once(tmp_path):
    """Two 2-block checkpoints that differ only in their vocabulary, 512 and 131,072 tokens
    (hidden 256, embedding and head untied: 255 MiB more), pruned with wanda: the larger's
    peak RSS grows by the extra embedding and head once. A second copy of either matrix
    (128 MiB: read again for the writer beside the one the run holds, a serialised file, a
    device copy of a host array on the CPU, each of which a run held before) passes half of
    it over the limit; allocator noise is about +-30 MB. Peaks are report.json's, compiled
    without the cache (as in the depth test above)."""
    uncached = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    peaks, sizes = {}, {}
    for vocab in (512, 131072):
        model = _llama(tmp_path / f"vocab{vocab}", 2, 256, 688, "float32", vocab=vocab)
        sizes[vocab] = sum(os.path.getsize(p) for p in model.glob("*.safetensors"))
        out = tmp_path / f"pruned{vocab}"
        command = _prune_command(
            model, out, "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
            "--seqlen", "64",
        )  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=uncached)
        assert done.returncode == 0, done.stderr
        peaks[vocab] = json.loads((out / "report.json").read_text())["memory"]["peak_rss_bytes"]
        written = read_tensors(out)
        source = read_tensors(model)
        assert np.array_equal(
            written["model.embed_tokens.weight"], source["model.embed_tokens.weight"]
        )
        assert np.array_equal(written["lm_head.weight"], source["lm_head.weight"])
    extra = sizes[131072] - sizes[512]
    one_matrix = 131072 * 256 * 4
    assert extra > 2 * one_matrix * 0.99
    assert peaks[131072] - peaks[512] < extra + one_matrix / 2, (peaks, extra)


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory) -> Path:
    """Eight small blocks: each takes long enough with fista to stop the run between two.
    Their linears have stories260K's shapes, so the solvers compiled for it serve here too."""
    root = tmp_path_factory.mktemp("deep")
    return _llama(root / "llama8", 8, 64, 172, "float32")


# fista (two calibration streams: intra-block error correction) with its cheapest settings
RESUME_SETTINGS = (
    "--method", "fista", "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "64",
    *(a for k, v in CHEAP_OPTIONS["fista"].items() for a in ("--option", f"{k}={v}")),
)  # fmt: skip


def _blocks_done(staging: Path) -> int:
    try:
        return json.loads((staging / PROGRESS).read_text()).get("blocks_done", 0)
    except (OSError, json.JSONDecodeError):
        return 0


def _wait_for_blocks(process, staging: Path, blocks: int) -> int:
    """Wait until the journal of ``process``'s run records ``blocks`` finished blocks."""
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        done = _blocks_done(staging)
        if done >= blocks:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be stopped"
    return done


def _kill_after_blocks(command, staging: Path, blocks: int) -> int:
    """Start ``command`` and SIGKILL it once its journal records ``blocks`` finished blocks."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = _wait_for_blocks(process, staging, blocks)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return done


@pytest.fixture(scope="module")
def uninterrupted(deep_tiny, tmp_path_factory) -> Path:
    """deep_tiny pruned with RESUME_SETTINGS in one go: what every stopped run must resume to."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    assert main(_prune_command(deep_tiny, whole, *RESUME_SETTINGS)[3:]) == 0
    return whole


def _assert_same_tensors(expected_dir: Path, found_dir: Path) -> None:
    expected, found = read_tensors(expected_dir), read_tensors(found_dir)
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == found[name].dtype
        assert np.array_equal(tensor.view(np.uint32), found[name].view(np.uint32)), name


def _cli(capsys, command) -> tuple[int, str]:
    """``jprune`` in this process: exit code and the error lines."""
    code = main(command[3:])
    return code, capsys.readouterr().err.strip()


def _with(settings, flag, value):
    settings = list(settings)
    if flag in settings:
        settings[settings.index(flag) + 1] = value
        return settings
    return [*settings, flag, value]


def test_a_killed_run_resumes_bit_identically(deep_tiny, uninterrupted, tmp_path, capsys):
    model, calib = tmp_path / "model", tmp_path / "calib.txt"
    shutil.copytree(deep_tiny, model)
    shutil.copy2(CALIB_TEXT, calib)

    def command(out, *settings):
        return [*_prune_command(model, out, *settings), "--calib", str(calib)]

    whole = uninterrupted  # the same model and text, from their originals
    out = tmp_path / "resumed"
    staging = staging_path(out)
    killed_at = _kill_after_blocks(command(out, *RESUME_SETTINGS), staging, 3)
    assert 3 <= killed_at < 8 and not out.exists()
    assert (staging / MANIFEST).is_file()

    # without --resume the partial run is reported, not reused
    code, err = _cli(capsys, command(out, *RESUME_SETTINGS))
    assert code == 2 and "a partial run exists" in err and "--resume" in err, err
    # a resume with other settings, calibration or model is refused, naming the difference
    refusals = {
        "setting target.sparsity was 0.5, now 0.6": _with(RESUME_SETTINGS, "--sparsity", "0.6"),
        "setting calibration.seed was 0, now 1": _with(RESUME_SETTINGS, "--seed", "1"),
        "setting target.options.polish_iters was 8, now 3": [
            *RESUME_SETTINGS, "--option", "polish_iters=3",
        ],
    }  # fmt: skip
    for message, settings in refusals.items():
        code, err = _cli(capsys, command(out, *settings, "--resume"))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    original = calib.read_text()
    calib.write_text(original + "\nOne more story.\n")
    code, err = _cli(capsys, command(out, *RESUME_SETTINGS, "--resume"))
    assert code == 2 and "calibration text's contents changed" in err, err
    calib.write_text(original)
    weights = model / "model.safetensors"
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    os.utime(weights, ns=(times[0], times[1] + 10**9))
    code, err = _cli(capsys, command(out, *RESUME_SETTINGS, "--resume"))
    assert code == 2 and "model checkpoint changed since (file 'model.safetensors')" in err, err
    os.utime(weights, ns=times)
    assert json.loads((staging / PROGRESS).read_text())["blocks_done"] == killed_at

    assert _cli(capsys, command(out, *RESUME_SETTINGS, "--resume"))[0] == 0
    assert not staging.exists()
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] == killed_at
    assert len(report["layers"]) == 8 * 7
    assert not any(p.name.startswith(("jprune-", "streams-")) for p in out.iterdir())
    _assert_same_tensors(whole, out)
    whole_report = json.loads((whole / "report.json").read_text())
    for ours, theirs in zip(report["layers"], whole_report["layers"], strict=True):
        assert ours["relative_error"] == theirs["relative_error"], ours["name"]

    # --force discards a stale partial run
    other = tmp_path / "other"
    staging_path(other).mkdir()
    (staging_path(other) / MANIFEST).write_text("{}")
    code, err = _cli(capsys, command(other, *RESUME_SETTINGS))
    assert code == 2 and "a partial run exists" in err
    assert _cli(capsys, command(other, *RESUME_SETTINGS, "--force"))[0] == 0
    assert not staging_path(other).exists()
    assert json.loads((other / "report.json").read_text())["resumed_from_block"] is None


def test_sigterm_stops_at_a_block_boundary_and_resume_completes(
    deep_tiny, uninterrupted, tmp_path, capsys
):
    """SIGTERM in the middle of a run: the block in progress is finished and journaled, the run
    says how to resume in one line and exits 143 (128 + 15, as a shell reports a process the
    signal ended); nothing is at --out, the lock is gone, and --resume writes the uninterrupted
    run's bytes."""
    out = tmp_path / "out"
    staging = staging_path(out)
    command = _prune_command(deep_tiny, out, *RESUME_SETTINGS)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    signalled_at = _wait_for_blocks(process, staging, 2)
    # Stopped first, so the signal is there before the last block ends however fast the blocks
    # go (a warm compilation cache makes the whole run take about a second); delivered on
    # SIGCONT, it reaches the run in the middle of a block.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    done = _blocks_done(staging)
    assert signalled_at <= done < 8
    notice, stopped = err.strip().splitlines()[-2:]
    assert notice.startswith("jprune: SIGTERM received: stopping at the end of this block")
    assert stopped == (
        f"jprune: stopped by SIGTERM after block {done} of 8; {done} of 8 blocks are kept in "
        f"{str(staging)!r}: the same command with --resume continues the run"
    ), stopped
    assert not out.exists() and not lock_path(out).exists()
    assert (staging / MANIFEST).is_file()
    assert _cli(capsys, [*command, "--resume"])[0] == 0
    assert json.loads((out / "report.json").read_text())["resumed_from_block"] == done
    _assert_same_tensors(uninterrupted, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_on_a_live_runs_output_is_refused_force_or_not(
    deep_tiny, uninterrupted, tmp_path, capsys
):
    """The first run holds the output's lock: a second is refused in one line naming the
    first's process, before it changes anything (with --force too, which would otherwise
    discard the first's staging directory); the first finishes undisturbed. A lock file left
    by a process that no longer runs is stale and taken over."""
    out = tmp_path / "out"
    command = _prune_command(deep_tiny, out, *RESUME_SETTINGS)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_blocks(first, staging_path(out), 1)  # the lock is held from before the staging
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock, however fast its blocks go
    try:
        for extra in ((), ("--force",), ("--resume",)):
            code, err = _cli(capsys, [*command, *extra])
            assert code == 2 and len(err.splitlines()) == 1, err
            assert err == (
                f"jprune: error: another jprune run (process {first.pid}) is writing "
                f"{str(out)!r}: wait for it to finish (--force does not stop a live run)"
            ), err
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _assert_same_tensors(uninterrupted, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    stale = tmp_path / "stale"
    lock_path(stale).write_text("4194304\n")  # above Linux's largest process id: no such run
    cheap = ("--method", "magnitude", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32")
    assert _cli(capsys, _prune_command(deep_tiny, stale, *cheap))[0] == 0
    assert (stale / "report.json").is_file() and not lock_path(stale).exists()


def test_a_killed_run_with_block_reconstruction_resumes_bit_identically(
    deep_tiny, tmp_path, capsys
):
    """The stage's records and weights, and the streams it leaves, survive a kill: the
    resumed run writes the uninterrupted run's bytes."""
    model, calib = tmp_path / "model", tmp_path / "calib.txt"
    shutil.copytree(deep_tiny, model)
    shutil.copy2(CALIB_TEXT, calib)
    settings = (
        "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "64",
        "--reconstruct", "--reconstruct-steps", "24", "--reconstruct-lr", "1e-3", "--reconstruct-holdout", "2",
        "--reconstruct-windows", "2", "--reconstruct-eval-every", "4",
    )  # fmt: skip

    def command(out, *extra):
        return [*_prune_command(model, out, *settings, *extra), "--calib", str(calib)]

    whole = tmp_path / "whole"
    assert _cli(capsys, command(whole))[0] == 0
    out = tmp_path / "resumed"
    killed_at = _kill_after_blocks(command(out), staging_path(out), 3)
    assert 3 <= killed_at < 8 and not out.exists()
    code, err = _cli(capsys, command(out, "--resume", "--reconstruct-steps", "8"))
    assert code == 2 and "reconstruction.steps was 24, now 8" in err, err
    assert _cli(capsys, command(out, "--resume"))[0] == 0
    report = json.loads((out / "report.json").read_text())
    whole_report = json.loads((whole / "report.json").read_text())
    assert report["resumed_from_block"] == killed_at

    def timeless(blocks):
        return [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]

    ours, theirs = report["reconstruction"]["blocks"], whole_report["reconstruction"]["blocks"]
    assert [b["block"] for b in ours] == list(range(8))
    assert timeless(ours) == timeless(theirs)
    assert any(b["best_step"] > 0 for b in ours)
    expected, found = read_tensors(whole), read_tensors(out)
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        assert np.array_equal(tensor.view(np.uint32), found[name].view(np.uint32)), name
