"""Text -> token ids, evaluation windows and calibration samples (protocol in METHODS.md).

Evaluation: tokenize the whole text once (BOS added once at the start), cut non-overlapping
windows of ``seqlen`` tokens, drop the remainder. Calibration: ``nsamples`` windows at random
starts ``randint(0, len(ids) - seqlen - 1)`` drawn with Python's ``random`` seeded by ``seed``,
the convention of the SparseGPT / Wanda lineage, so the same seed picks the same windows.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from jprune.errors import JpruneError

NAMED_DATASETS = ("wikitext2", "c4")


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    directory = Path(model_dir)
    if not any(
        (directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        raise JpruneError(
            f"no tokenizer files in {str(directory)!r} (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return AutoTokenizer.from_pretrained(str(directory))


def _named_dataset_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise JpruneError(
            f"dataset {name!r} needs the 'datasets' package (pip install 'jprune[datasets]'), or pass a text file"
        ) from None
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        shard = (
            "en/c4-train.00000-of-01024.json.gz"
            if split == "train"
            else "en/c4-validation.00000-of-00008.json.gz"
        )
        rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(rows["text"][:3000])
    except Exception as err:  # offline: datasets raises connection errors of several types
        raise JpruneError(
            f"cannot load dataset {name!r} (offline? pass a local text file instead): {err}"
        ) from None


def read_text(source: str | os.PathLike, split: str = "test") -> str:
    """The text of a file, or of a named dataset (``wikitext2``, ``c4``) when online."""
    if str(source) in NAMED_DATASETS and not Path(source).exists():
        return _named_dataset_text(str(source), split)
    path = Path(source)
    if not path.exists():
        raise JpruneError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise JpruneError(f"text file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JpruneError(f"text file {str(path)!r} is not UTF-8 text: {err}") from None
    if not text.strip():
        raise JpruneError(f"text file {str(path)!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text, BOS once at the start (the tokenizer's own convention)."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def eval_windows(ids: np.ndarray, seqlen: int, source: str = "text") -> np.ndarray:
    """Non-overlapping (windows, seqlen) slices; the remainder is dropped."""
    if seqlen < 2:
        raise JpruneError(f"seqlen must be at least 2, got {seqlen}")
    count = len(ids) // seqlen
    if count == 0:
        raise JpruneError(
            f"{source} has {len(ids)} tokens, shorter than one window of seqlen={seqlen}"
        )
    return ids[: count * seqlen].reshape(count, seqlen)


def calibration_windows(
    ids: np.ndarray, nsamples: int, seqlen: int, seed: int, source: str = "text"
) -> np.ndarray:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts."""
    if nsamples < 1 or seqlen < 2:
        raise JpruneError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if nsamples * seqlen > len(ids) - 1:
        raise JpruneError(
            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen} tokens is more than "
            f"the {len(ids)} tokens of the calibration {source}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])
