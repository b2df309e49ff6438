"""Zero-shot evaluation against lm-eval's own ``hf`` model (transformers, PyTorch) on a local
multiple-choice task built here: same accuracies, loglikelihoods within 1e-4, and the
rolling and generation requests; the errors for a missing extra, an unknown task and a
dataset that is not there offline."""

import json
import os
import random
import sys

import numpy as np
import pytest

from jprune.cli import main
from jprune.zeroshot import TaskSpec, bucket_length, continuation_logprobs

from conftest import CALIB_TEXT, EVAL_TEXT, STORIES260K

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra jprune[eval]")

TASK = "jprune_stories_mc"


def _items(count: int = 48, seed: int = 0) -> list[dict]:
    """Four-way story continuations: the true next six words of a TinyStories paragraph
    against the same span of three other paragraphs."""
    paragraphs = [p for p in EVAL_TEXT.read_text().splitlines() if len(p.split()) > 40]
    rng = random.Random(seed)
    items = []
    for paragraph in paragraphs[:count]:
        words = paragraph.split()
        others = [" " + " ".join(rng.choice(paragraphs).split()[24:30]) for _ in range(3)]
        label = rng.randrange(4)
        choices = [*others[:label], " " + " ".join(words[24:30]), *others[label:]]
        items.append({"context": " ".join(words[:24]), "choices": choices, "label": label})
    return items


def write_task(folder, name: str, data_file, **extra: str) -> None:
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data_file}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tasks(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "stories_mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in _items()))
    write_task(folder, TASK, data)
    return folder


@pytest.fixture(scope="module")
def hf_lm(assets):
    """lm-eval's own transformers model on stories260K, float32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(STORIES260K), dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def ours(assets):
    from jprune.converters.hf import load_model
    from jprune.data import load_hf_tokenizer
    from jprune.zeroshot import language_model

    model, _ = load_model(STORIES260K)
    return language_model(model, load_hf_tokenizer(STORIES260K), batch_size=8)


def _instances(tasks):
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(tasks), include_defaults=False).load([TASK])["tasks"][TASK]
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


def test_cli_accuracies_match_lm_eval_hf(tasks, hf_lm, capsys):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    reference = simple_evaluate(model=hf_lm, tasks=[TASK], task_manager=manager, log_samples=False)
    argv = ["eval", "--model", str(STORIES260K), "--tasks", TASK, "--include-path", str(tasks)]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref, got = reference["results"][TASK], out["results"][TASK]
    assert got["acc,none"] == ref["acc,none"]
    assert got["acc_norm,none"] == ref["acc_norm,none"]
    assert got["acc_stderr,none"] == pytest.approx(ref["acc_stderr,none"])
    # the model is far from chance on its own kind of text: not a trivial agreement
    assert 0.5 < got["acc,none"] < 1
    assert out["n-samples"][TASK]["effective"] == 48
    assert main([*argv, "--limit", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{TASK}  acc  ") for line in lines)


def test_loglikelihoods_match_lm_eval_hf(tasks, hf_lm, ours):
    from lm_eval.api.instance import Instance

    # short continuations the model predicts greedily, so that flag is exercised too
    greedy = [("Once upon a", " time"), ("Once upon a time, there was a little", " girl")]
    instances = [
        *_instances(tasks),
        *(Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(greedy)),
    ]
    reference = hf_lm.loglikelihood(instances, disable_tqdm=True)
    got = ours.loglikelihood(instances, disable_tqdm=True)
    assert len(got) == len(reference) == 4 * 48 + 2
    ref_lp, got_lp = np.array([r[0] for r in reference]), np.array([g[0] for g in got])
    assert np.abs(got_lp - ref_lp).max() < 1e-4
    assert [g[1] for g in got] == [r[1] for r in reference]
    assert got[-1][1] and got[-2][1]


def test_empty_context_and_rolling_match_lm_eval_hf(hf_lm, ours):
    from lm_eval.api.instance import Instance

    text = EVAL_TEXT.read_text()
    # one short string and one of about 1,300 tokens: three windows of the 512-token context
    rolling = [
        Instance("loglikelihood_rolling", {}, (s,), i)
        for i, s in enumerate(["Once upon a time.", text[:4000]])
    ]
    reference = hf_lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    got = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert len(ours.tok_encode(text[:4000])) > 2 * 512
    assert np.allclose(got, reference, rtol=0, atol=1e-3 * len(text[:4000]) / 4000)
    assert abs(got[0] - reference[0]) < 1e-4
    empty = [Instance("loglikelihood", {}, ("", " Once upon a time"), 0)]
    assert ours.loglikelihood(empty)[0][0] == pytest.approx(
        hf_lm.loglikelihood(empty)[0][0], abs=1e-4
    )


def test_generate_until_matches_lm_eval_hf(hf_lm, ours):
    from lm_eval.api.instance import Instance

    settings = {"until": ["."], "max_gen_toks": 24, "do_sample": False}
    prompts = ["Once upon a time, there was a little", "Tom and Sue went to the park. They", "The"]
    requests = [Instance("generate_until", {}, (p, settings), i) for i, p in enumerate(prompts)]
    reference = hf_lm.generate_until(requests, disable_tqdm=True)
    got = ours.generate_until(requests, disable_tqdm=True)
    assert got == reference
    assert all(g and "." not in g for g in got)


def test_batch_size_and_buckets_change_nothing(ours):
    model = ours.model
    rng = np.random.default_rng(0)
    pairs = [
        (list(rng.integers(3, 512, n)), list(rng.integers(3, 512, k)))
        for n, k in [(5, 1), (40, 3), (17, 9), (600, 4), (2, 2)]
    ]  # 600 + 4 tokens: left-truncated to the 512-token context
    one = continuation_logprobs(model, pairs, batch_size=1)
    three = continuation_logprobs(model, pairs, batch_size=3)
    assert np.allclose([o[0] for o in one], [t[0] for t in three], atol=1e-5)
    # Quarter-octave buckets: 33..40 -> 40, 65..80 -> 80; never above the context.
    assert [bucket_length(n, 512) for n in (5, 16, 17, 33, 40, 41, 64, 65)] == [
        16,
        16,
        20,
        40,
        40,
        48,
        64,
        80,
    ]
    assert bucket_length(600, 512) == 512 and bucket_length(500, 512) == 512
    assert bucket_length(5, 8) == 8


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jprune: error: ")
    return err[0]


def test_missing_extra_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    line = _error(capsys, "eval", "--model", str(STORIES260K), "--tasks", "boolq")
    assert "pip install 'jprune[eval]'" in line


def test_unknown_task_and_missing_dataset_offline(tasks, tmp_path, capsys):
    model = str(STORIES260K)
    line = _error(capsys, "eval", "--model", model, "--tasks", "nope", "--include-path", str(tasks))
    assert "no task 'nope'" in line
    write_task(tmp_path, "gone", tmp_path / "missing.jsonl")
    line = _error(
        capsys, "eval", "--model", model, "--tasks", "gone", "--include-path", str(tmp_path)
    )
    assert "task 'gone'" in line and "dataset 'json'" in line
    # a hub dataset that is not in the cache, with the hub offline
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "hub_task.yaml").write_text(
        (tmp_path / "gone.yaml")
        .read_text()
        .replace("task: gone", "task: hub_task")
        .replace("dataset_path: json", "dataset_path: jprune-tests/not-downloaded")
    )
    line = _error(
        capsys, "eval", "--model", model, "--tasks", "hub_task", "--include-path", str(folder)
    )
    assert "task 'hub_task'" in line and "'jprune-tests/not-downloaded'" in line
    assert "(offline)" in line


def test_task_flags_are_checked(capsys):
    model = str(STORIES260K)
    assert "one of --text" in _error(capsys, "eval", "--model", model)
    assert "--limit is for --tasks" in _error(
        capsys, "eval", "--model", model, "--text", "x", "--limit", "3"
    )
    assert "limit must be >= 1" in _error(
        capsys, "eval", "--model", model, "--tasks", "a", "--limit", "0"
    )
    with pytest.raises(Exception, match="num_fewshot"):
        TaskSpec(("a",), num_fewshot=-1).check()


def _prune_argv(tasks, out) -> list[str]:
    return [
        "prune", "--model", str(STORIES260K), "--method", "magnitude", "--sparsity", "0.5",
        "--calib", str(CALIB_TEXT), "--nsamples", "2", "--seqlen", "64", "--quiet",
        "--tasks", TASK, "--include-path", str(tasks), "--limit", "24", "--out", str(out),
    ]  # fmt: skip


def test_prune_reports_accuracy_before_and_after(tasks, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_argv(tasks, out)) == 0
    printed = capsys.readouterr().out
    zero_shot = json.loads((out / "report.json").read_text())["zero_shot"]
    assert json.loads((out / "report.json").read_text())["config"]["evaluation"]["tasks"] == [TASK]
    for label, model in (("before", STORIES260K), ("after", out)):
        argv = ["eval", "--model", str(model), "--tasks", TASK, "--include-path", str(tasks)]
        assert main([*argv, "--limit", "24", "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)["results"][TASK]
        assert zero_shot[label]["results"][TASK]["acc,none"] == alone["acc,none"]
        assert zero_shot[label]["n-samples"][TASK]["effective"] == 24
    before = zero_shot["before"]["results"][TASK]["acc,none"]
    after = zero_shot["after"]["results"][TASK]["acc,none"]
    assert f"{TASK} acc: {before:.4f} -> {after:.4f}" in printed


def test_prune_tasks_refused_before_any_work(tasks, tmp_path, capsys, monkeypatch):
    import jax

    out = tmp_path / "pruned"
    argv = _prune_argv(tasks, out)
    line = _error(
        capsys, *argv[: argv.index("--tasks") + 1], "nope", *argv[argv.index("--include-path") :]
    )
    assert "no task 'nope'" in line
    line = _error(capsys, *argv[: argv.index("--tasks")], "--limit", "3", "--out", str(out))
    assert "evaluation.limit is for evaluation.tasks" in line
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert "runs in one process" in _error(capsys, *argv)
    assert not out.exists()
