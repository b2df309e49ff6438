"""Zero- and few-shot accuracy: lm-evaluation-harness tasks scored by jprune's JAX forward.

``JpruneLM`` is an lm-eval language model (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``) over a loaded ``CausalLM``. Requests become right-padded token batches
of a fixed row count whose length is rounded up to a bucket (a quarter-octave step), so the
jit-compiled forward serves a task with a handful of shapes; with a causal model the padding
after a sequence changes nothing before it. Only the scored positions go through the head.
Tokenization follows lm-eval's ``hf`` model (the tokenizer's own special tokens, context/continuation split on the whole string, BOS (else
EOS) before an empty context, left truncation to the model's context length), so both score
the same token sequences.

``evaluate_tasks`` runs lm-eval's ``simple_evaluate`` with it; lm-eval is the optional extra
``jprune[eval]`` and is imported only here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jprune.errors import JpruneError

MISSING_EXTRA = "zero-shot evaluation needs lm-eval: pip install 'jprune[eval]'"
# The shortest padded length: below it the bucket count grows without saving work.
MIN_BUCKET = 16


def require_lm_eval():
    """The ``lm_eval`` package, or a ``JpruneError`` naming the extra that provides it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise JpruneError(f"{MISSING_EXTRA} ({err})") from None
    return lm_eval


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which lm-eval tasks to run and how: checked by ``check`` before any model work."""

    names: tuple[str, ...]
    include_path: str | None = None  # a folder of task YAMLs, searched before lm-eval's own
    num_fewshot: int | None = None  # None: each task's own default (0 for most)
    limit: int | None = None  # at most this many documents per task

    def check(self) -> TaskSpec:
        if not self.names or any(not n.strip() for n in self.names):
            raise JpruneError(f"give task names, got {','.join(self.names)!r}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise JpruneError(f"task include path {self.include_path!r} is not a directory")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise JpruneError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise JpruneError(f"limit must be >= 1 documents, got {self.limit}")
        return self


def task_spec(evaluation) -> TaskSpec | None:
    """The tasks of a run's ``evaluation`` section (``config.EvaluationConfig``), if any."""
    if not evaluation.tasks:
        return None
    return TaskSpec(
        tuple(evaluation.tasks), evaluation.include_path, evaluation.num_fewshot, evaluation.limit
    )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


class ZeroShot(NamedTuple):
    """lm-eval's outcome for one model: its ``results`` (task -> metric -> value, the
    stderr beside each as ``"<metric>_stderr,<filter>"``), documents and shots per task."""

    results: dict[str, dict[str, Any]]
    samples: dict[str, Any]  # task -> {"original": n, "effective": n}
    num_fewshot: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (lm-eval leaves a few numpy scalars and "N/A" stderrs)."""
        data = {
            "results": self.results,
            "n-samples": self.samples,
            "n-shot": self.num_fewshot,
            "seconds": self.seconds,
        }
        return json.loads(json.dumps(data, default=_plain))


# ---- scoring: token sequences -> log-probabilities, batched over padded length buckets ----


@functools.partial(jax.jit, static_argnums=(0, 5))
def _token_scores(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids: jax.Array,
    targets: jax.Array,
    ends: jax.Array,
    score_width: int,
):
    """Log-probability of ``targets[b, t]`` after ``ids[b, :t+1]``, and whether it is the
    argmax, at the ``score_width`` positions before ``ends[b]`` of each row (positions below 0
    repeat position 0). Only those positions go through the head: with a 49k vocabulary the
    head and its log-softmax over every position cost a fifth of a small model's forward."""
    model = nnx.merge(graphdef, state)
    hidden = model.last_hidden(ids)
    positions = jnp.maximum(ends[:, None] - score_width + jnp.arange(score_width), 0)
    logits = model.head(jnp.take_along_axis(hidden, positions[..., None], axis=1))
    targets = jnp.take_along_axis(targets, positions, axis=1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = picked - jax.nn.logsumexp(logits, axis=-1)
    return logprob, jnp.argmax(logits, axis=-1) == targets


@functools.partial(jax.jit, static_argnums=0)
def _next_tokens(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, last: jax.Array):
    """The argmax next token after position ``last[b]`` of each row (only that position goes
    through the head)."""
    model = nnx.merge(graphdef, state)
    hidden = jnp.take_along_axis(model.last_hidden(ids), last[:, None, None], axis=1)
    return jnp.argmax(model.head(hidden)[:, 0], axis=-1)


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row is ``length``: the next multiple of a
    quarter of the power of two below it (2^k, 1.25 2^k, 1.5 2^k, 1.75 2^k; at least
    ``MIN_BUCKET``), never above ``max_length``. At most a quarter of a bucket is padding
    (power-of-two buckets pad 45-token rows to 64), and an octave compiles at most four shapes."""
    if length <= MIN_BUCKET:
        return min(MIN_BUCKET, max_length)
    step = (1 << ((length - 1).bit_length() - 1)) // 4
    return min(-(-length // step) * step, max_length)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices, longest first, ``batch_size`` at a time: rows of a batch have
    similar lengths, so little of a bucket is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def continuation_logprobs(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), continuation is greedy)`` for token-id pairs.

    ``context + continuation`` is left-truncated to ``max_length + 1`` tokens (the model's
    context length by default), the last token is dropped from the input, and the
    continuation's tokens are scored at the last ``len(continuation)`` positions. Each batch
    has ``batch_size`` rows (missing rows are zeros) and is right-padded to its bucket.
    """
    max_length = max_length or model.spec.max_position_embeddings
    if batch_size < 1:
        raise JpruneError(f"batch size must be positive, got {batch_size}")
    sequences = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise JpruneError("a loglikelihood request needs context and continuation tokens")
        if len(continuation) > max_length:
            raise JpruneError(
                f"continuation of {len(continuation)} tokens is longer than the context length {max_length}"
            )
        sequences.append((list(context) + list(continuation))[-(max_length + 1) :])
    graphdef, state = nnx.split(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    for batch in _batches([len(s) - 1 for s in sequences], batch_size):
        width = bucket_length(len(sequences[batch[0]]) - 1, max_length)
        ids = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        ends = np.zeros(batch_size, np.int32)
        # A continuation never reaches past its row's start: the context is not empty, and
        # the truncation keeps max_length + 1 >= len(continuation) + 1 tokens.
        scored = [len(pairs[index][1]) for index in batch]
        for row, index in enumerate(batch):
            seq = sequences[index]
            ids[row, : len(seq) - 1] = seq[:-1]
            targets[row, : len(seq) - 1] = seq[1:]
            ends[row] = len(seq) - 1
        # The scored positions: the last ``score_width`` before each row's end, enough for
        # the batch's longest continuation (bucketed like the length, so few shapes compile).
        score_width = min(bucket_length(max(scored), max_length), width)
        logprob, greedy = _token_scores(
            graphdef, state, jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(ends), score_width
        )
        logprob, greedy = np.asarray(logprob, np.float64), np.asarray(greedy)
        for row, index in enumerate(batch):
            first = score_width - scored[row]
            out[index] = (float(logprob[row, first:].sum()), bool(greedy[row, first:].all()))
    return out


def greedy_continuations(
    model,
    contexts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    stop,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[list[int]]:
    """Greedy decoding of each context for at most ``max_new_tokens[i]`` tokens, ending a
    row early once ``stop(i, tokens)`` is true. Without a KV cache every step is a whole
    forward of the batch over its bucket: fine for the short answers of zero-shot tasks."""
    max_length = max_length or model.spec.max_position_embeddings
    graphdef, state = nnx.split(model)
    out: list[list[int]] = [[] for _ in contexts]
    for batch in _batches([len(c) for c in contexts], batch_size):
        longest = max(len(contexts[i]) + max_new_tokens[i] for i in batch)
        width = bucket_length(min(longest, max_length), max_length)
        ids = np.zeros((batch_size, width), np.int32)
        lengths = np.ones(batch_size, np.int32)
        for row, index in enumerate(batch):
            ids[row, : len(contexts[index])] = contexts[index]
            lengths[row] = len(contexts[index])
        live = {row: index for row, index in enumerate(batch) if max_new_tokens[index] > 0}
        while live:
            tokens = np.asarray(
                _next_tokens(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths - 1))
            )
            for row, index in list(live.items()):
                out[index].append(int(tokens[row]))
                if lengths[row] < width:
                    ids[row, lengths[row]] = tokens[row]
                    lengths[row] += 1
                if (
                    len(out[index]) >= max_new_tokens[index]
                    or lengths[row] >= width
                    or stop(index, out[index])
                ):
                    del live[row]
    return out


# ---- the lm-eval model ----


def _lm_class():
    """``JpruneLM``, defined once lm-eval is importable (it subclasses lm-eval's base)."""
    lm_eval = require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class JpruneLM(TemplateLM):
        """An lm-eval model over a jprune ``CausalLM`` and its HF tokenizer."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            self.batch_size = batch_size
            self.max_length = max_length or model.spec.max_position_embeddings

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return self.eot_token_id if bos is None else bos

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.name_or_path.replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
            special = (
                {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            )
            # A string that already starts with the prefix token gets no second one.
            if add_special_tokens is None and string.startswith(
                self.tokenizer.decode(self.prefix_token_id)
            ):
                special = {"add_special_tokens": False}
            return self.tokenizer.encode(string, **special)

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            pairs = [(context, continuation) for _, context, continuation in requests]
            return continuation_logprobs(
                self.model, pairs, batch_size=self.batch_size, max_length=self.max_length
            )

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owners = [], []
            for number, request in enumerate(requests):
                (string,) = request.args
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ):
                    windows.append(make_disjoint_window(window))
                    owners.append(number)
            scores = continuation_logprobs(
                self.model, windows, batch_size=self.batch_size, max_length=self.max_length
            )
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, scores, strict=True):
                totals[owner] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            contexts, limits, stops = [], [], []
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            for request in requests:
                context, settings = request.args
                settings = dict(settings or {})
                if settings.get("do_sample") and settings.get("temperature", 1.0) > 0:
                    raise JpruneError("generate_until: jprune decodes greedily (do_sample=false)")
                until = settings.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                limit = int(settings.get("max_gen_toks", settings.get("max_new_tokens", 256)))
                if limit >= self.max_length:
                    raise JpruneError(
                        f"generate_until: max_gen_toks {limit} is not below the context length {self.max_length}"
                    )
                tokens = self.tok_encode(context)[-(self.max_length - limit) :]
                contexts.append(tokens)
                limits.append(limit)
                stops.append([*until, eos])

            def stop(index: int, tokens: list[int]) -> bool:
                if tokens[-1] == self.eot_token_id:
                    return True
                text = self.tok_decode(tokens)
                return any(term and term in text for term in stops[index])

            generated = greedy_continuations(
                self.model,
                contexts,
                limits,
                stop,
                batch_size=self.batch_size,
                max_length=self.max_length,
            )
            answers = []
            for tokens, terms in zip(generated, stops, strict=True):
                text = self.tok_decode(tokens)
                for term in terms:
                    if term:
                        text = text.split(term)[0]
                answers.append(text)
            return answers

    del lm_eval
    return JpruneLM


def language_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``LM`` scoring with ``model`` (a loaded ``CausalLM``); ``tokenizer``: a
    transformers tokenizer (``data.load_hf_tokenizer``), whose API lm-eval uses."""
    return _lm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length)


# ---- tasks ----


def task_manager(spec: TaskSpec):
    """lm-eval's ``TaskManager`` for ``spec``. When every name is a task of
    ``include_path``, lm-eval's own few thousand task files are not indexed (seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if spec.include_path is not None:
        local = TaskManager(include_path=spec.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in spec.names):
            return local
    return TaskManager(include_path=spec.include_path)


def _dataset_of(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    path = cfg.get("dataset_path")
    if path is None:
        return "its dataset"
    return f"dataset {path!r}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")


def check_tasks(spec: TaskSpec, manager=None):
    """Load ``spec``'s tasks once, so that an unknown name or a dataset that cannot be loaded
    (offline, say) is refused with the task's name before any model work. Returns the
    ``TaskManager`` that found them."""
    spec.check()
    manager = manager or task_manager(spec)
    for name in spec.names:
        if name not in manager.all_tasks:
            where = f" or in {spec.include_path!r}" if spec.include_path else ""
            raise JpruneError(f"lm-eval has no task {name!r}{where}")
        try:
            manager.load([name])
        except Exception as err:  # datasets raises connection / file errors of many types
            offline = any(
                os.environ.get(v, "").lower() in ("1", "true")
                for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
            )
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise JpruneError(
                f"task {name!r}: cannot load {_dataset_of(manager, name)}"
                f"{' (offline)' if offline else ''}: {first}"
            ) from None
    return manager


def evaluate_tasks(
    model, tokenizer, spec: TaskSpec, *, batch_size: int = 8, manager=None
) -> ZeroShot:
    """Run ``spec``'s tasks through lm-eval's ``simple_evaluate`` with ``model`` (a loaded
    ``CausalLM``) and ``tokenizer`` (``data.load_hf_tokenizer``); ``manager``: a ``TaskManager``
    from ``check_tasks``."""
    manager = manager or check_tasks(spec)
    from lm_eval.evaluator import simple_evaluate

    started = time.perf_counter()
    out = simple_evaluate(
        model=language_model(model, tokenizer, batch_size),
        tasks=list(spec.names),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=manager,
        log_samples=False,
    )
    return ZeroShot(
        results=out["results"],
        samples=out.get("n-samples", {}),
        num_fewshot=out.get("n-shot", {}),
        seconds=time.perf_counter() - started,
    )


def evaluate_checkpoint(
    path: str | os.PathLike, spec: TaskSpec, *, batch_size: int = 8, dtype: str | None = None
) -> ZeroShot:
    """``evaluate_tasks`` on an HF checkpoint directory, loaded whole (not block by block:
    lm-eval sends requests one batch at a time, each through the whole model)."""
    from jprune.converters.hf import load_model
    from jprune.data import load_hf_tokenizer

    manager = check_tasks(spec)  # unknown tasks and missing datasets before the model
    tokenizer = load_hf_tokenizer(path)
    model, _ = load_model(path, dtype=dtype)
    return evaluate_tasks(model, tokenizer, spec, batch_size=batch_size, manager=manager)


def _metrics(results: dict[str, dict[str, Any]]):
    """(task, metric, filter, value, stderr or None) for every numeric metric of ``results``."""
    for task in sorted(results):
        metrics = results[task]
        for key in sorted(metrics):
            metric, _, filt = key.partition(",")
            value = metrics[key]
            if metric.endswith("_stderr") or not filt or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            yield task, metric, filt, value, stderr if isinstance(stderr, (int, float)) else None


def format_results(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task and metric: ``task  metric  value  ± stderr``."""
    return [
        f"{task}  {metric}  {value:.4f}" + ("" if err is None else f"  ± {err:.4f}")
        for task, metric, _, value, err in _metrics(results)
    ]


def format_change(zero_shot: dict[str, Any]) -> list[str]:
    """``task metric: before -> after`` lines from a report's ``zero_shot`` record."""
    before = (zero_shot.get("before") or {}).get("results", {})
    lines = []
    for task, metric, filt, value, _ in _metrics(zero_shot["after"]["results"]):
        old = before.get(task, {}).get(f"{metric},{filt}")
        lines.append(f"{task} {metric}: {'n/a' if old is None else f'{old:.4f}'} -> {value:.4f}")
    return lines
