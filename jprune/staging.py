"""The staging directory of a pruning run, and resuming an interrupted one.

A run writes its output into ``.NAME.partial`` beside ``NAME`` and renames it into place only
when everything (weights, config, report) is there, so ``NAME`` is never half-written. While the
run is going the staging directory also holds its journal:

* ``jprune-run.json``: what the pruned tensors depend on (the model, target, calibration and
  engine settings, the checkpoint files' sizes and times, the calibration text's SHA-256);
* ``jprune-progress.json``: how many blocks are finished, their records and parameter shapes,
  the dense-model perplexities once measured, and the folder of calibration streams to
  continue from (``streams-NNNNN/``, one ``.npy`` per batch, float32 as the engine held them).

A block's shard is renamed into place before the progress file names it, and the progress file
is replaced atomically, so whatever point a run is killed at, the journal describes finished
blocks only. ``--resume`` reloads the streams and continues at the next block: the tensors are
bit-identical to an uninterrupted run's. A resume whose settings, model or calibration differ
is refused naming the difference; without ``--resume`` an existing staging directory is
refused (``--force`` discards it).

A run holds ``.NAME.lock`` beside ``NAME`` for its lifetime (``RunLock``, an ``flock``): a second
run on the same output is refused while the first is alive, ``--force`` or not, since forcing
would discard the staging directory the first is writing. The kernel drops the lock when its
process dies, so a lock file a dead run left behind is stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jprune.blocks import BlockState
from jprune.errors import JpruneError, writing

MANIFEST = "jprune-run.json"
PROGRESS = "jprune-progress.json"
JOURNAL_FORMAT = 1
# The settings the pruned tensors depend on (evaluation and output do not change them).
PRUNING_SECTIONS = ("model", "target", "allocation", "calibration", "engine", "reconstruction")


def staging_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


class RunLock:
    """An exclusive lock on an output path for a run's lifetime (``acquire`` ... ``release``).

    ``flock`` on ``.NAME.lock``; the file holds the owner's process id, for the refusal's
    message. ``release`` removes the file: a run that opened it just before sees, once it holds
    the lock, that the path no longer names the file it locked, and starts over."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = lock_path(out)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise JpruneError(
                    f"another jprune run ({self._owner()}) is writing {str(self.out)!r}: wait "
                    "for it to finish (--force does not stop a live run)"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed while we waited: lock the new file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _owner(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "process unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(model: Path) -> dict[str, list[int]]:
    """Weight and config files of a checkpoint -> [size, mtime_ns] (hashing 100 GB is not an
    option; a rewritten file changes one of them)."""
    out = {}
    for file in sorted(model.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".json") and file.is_file():
            stat = file.stat()
            out[file.name] = [stat.st_size, stat.st_mtime_ns]
    return out


def fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's pruned tensors depend on, from its resolved configuration (``to_dict``)."""
    return {
        "format": JOURNAL_FORMAT,
        "settings": {k: config[k] for k in PRUNING_SECTIONS},
        "model_files": _checkpoint_files(Path(config["model"]["path"])),
        "calibration_sha256": _sha256(Path(config["calibration"]["text"])),
    }


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                return f"{where} was not set, now {new[key]!r}"
            if key not in new:
                return f"{where} was {old[key]!r}, now not set"
            found = _first_difference(old[key], new[key], where)
            if found:
                return found
        return None
    if old != new:
        return f"{path} was {old!r}, now {new!r}"
    return None


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """One phrase naming the first thing that differs between two fingerprints, or None."""
    if old.get("format") != new.get("format"):
        return f"journal format {old.get('format')} (this jprune writes {new['format']})"
    found = _first_difference(old["settings"], new["settings"])
    if found:
        return f"setting {found}"
    if old["model_files"] != new["model_files"]:
        changed = sorted(
            set(old["model_files"]).symmetric_difference(new["model_files"])
            | {k for k in old["model_files"] if old["model_files"][k] != new["model_files"].get(k)}
        )
        return f"the model checkpoint changed since (file {changed[0]!r})"
    if old["calibration_sha256"] != new["calibration_sha256"]:
        return "the calibration text's contents changed since"
    return None


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_suffix(".tmp")
    text = json.dumps(data, indent=2) + "\n"
    with writing(path, len(text)):
        partial.write_text(text)
        os.replace(partial, path)


class Staging:
    """A run's staging directory and journal. ``writer=False`` (processes other than 0 of a
    multi-host run) reads it but never changes it."""

    def __init__(self, path: Path, writer: bool = True, journal: bool = True):
        self.path = path
        self.writer = writer
        self.journal = journal  # False: a throw-away directory, no resume state kept
        self.resumed_from: int | None = None
        self.lock: RunLock | None = None  # held by the writing process of a run with --out
        self._identity: dict[str, Any] | None = None

    @classmethod
    def open(
        cls,
        out: str | os.PathLike,
        identity: Mapping[str, Any],
        *,
        resume: bool,
        force: bool,
        writer: bool = True,
    ) -> Staging:
        """Lock ``out`` (the writing process) and check it and its staging directory, changing
        nothing else; ``create`` then starts it, unless this run resumes it, and ``close``
        releases the lock once the run is over."""
        lock = RunLock(out).acquire() if writer else None
        try:
            staging = cls._checked(Path(out), identity, resume=resume, force=force, writer=writer)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        staging.lock = lock
        return staging

    def close(self) -> None:
        """Release the output's lock (the run is over, committed or not)."""
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def _checked(
        cls, out: Path, identity: Mapping[str, Any], *, resume: bool, force: bool, writer: bool
    ) -> Staging:
        path = staging_path(out)
        if out.exists() and not force:
            raise JpruneError(f"output {str(out)!r} already exists (use --force to replace it)")
        staging = cls(path, writer=writer)
        if path.exists():
            manifest = path / MANIFEST
            if not resume and not force:
                raise JpruneError(
                    f"a partial run exists in {str(path)!r}: --resume continues it, "
                    "--force discards it"
                )
            if resume:
                if not manifest.is_file():
                    raise JpruneError(
                        f"cannot resume: {str(path)!r} has no {MANIFEST} (not a jprune run); "
                        "remove it or use --force without --resume"
                    )
                old = json.loads(manifest.read_text())
                difference = describe_difference(old, identity)
                if difference:
                    raise JpruneError(f"cannot resume the run in {str(path)!r}: {difference}")
                staging.resumed_from = staging.progress().get("blocks_done", 0)
                return staging
        staging._identity = dict(identity)  # created by ``create`` once every process checked
        return staging

    def create(self) -> None:
        """Start the directory afresh (discarding a stale one), unless resuming one."""
        if self._identity is None or not self.writer:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        out_name = self.path.name.removeprefix(".").removesuffix(".partial")
        partial = Path(tempfile.mkdtemp(prefix=f".{out_name}.new-", dir=self.path.parent))
        _write_json(partial / MANIFEST, self._identity)
        _write_json(partial / PROGRESS, {"blocks_done": 0})
        partial.rename(self.path)

    # ------------------------------------------------------------ progress

    def progress(self) -> dict[str, Any]:
        file = self.path / PROGRESS
        return json.loads(file.read_text()) if file.is_file() else {"blocks_done": 0}

    def _update(self, **values: Any) -> None:
        if self.writer and self.journal:
            _write_json(self.path / PROGRESS, self.progress() | values)

    def remember(self, key: str, value: Any) -> None:
        """Keep a result (e.g. the dense perplexities) so a resumed run need not redo it."""
        self._update(**{key: value})

    def recall(self, key: str) -> Any:
        return self.progress().get(key)

    def save(self, state: BlockState) -> None:
        """The engine's state after a finished block (whose shard is already written)."""
        if not (self.writer and self.journal):
            return
        folder = self.path / f"streams-{state.next_block:05d}"
        partial = self.path / f".streams-{state.next_block:05d}.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        counts = {name: len(batches) for name, batches in state.streams.items()}
        nbytes = sum(b.nbytes for batches in state.streams.values() for b in batches)
        with writing(folder, nbytes):  # the calibration streams a resume continues from
            partial.mkdir()
            for name, batches in state.streams.items():
                for i, batch in enumerate(batches):
                    np.save(partial / f"{name}-{i:05d}.npy", np.asarray(batch))
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        previous = self.progress().get("streams")
        self._update(
            blocks_done=state.next_block,
            records=state.records,
            shapes=state.shapes,
            reconstruction=state.reconstruction,
            streams={"folder": folder.name, "batches": counts},
        )
        if previous and previous["folder"] != folder.name:
            shutil.rmtree(self.path / previous["folder"], ignore_errors=True)

    def load(self) -> BlockState | None:
        progress = self.progress()
        streams = progress.get("streams")
        if not progress.get("blocks_done") or streams is None:
            return None
        folder = self.path / streams["folder"]
        loaded = {
            name: [np.load(folder / f"{name}-{i:05d}.npy") for i in range(count)]
            for name, count in streams["batches"].items()
        }
        return BlockState(
            progress["blocks_done"], loaded, progress["records"], progress["shapes"],
            progress.get("reconstruction", []),
        )  # fmt: skip

    # ------------------------------------------------------------ the end

    def commit(self, out: str | os.PathLike) -> Path:
        """Drop the journal and rename the staging directory to ``out``."""
        out = Path(out)
        if not self.writer:
            return out
        for item in self.path.iterdir():
            if item.name in (MANIFEST, PROGRESS) or item.name.startswith(("streams-", ".streams-")):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        self.path.rename(out)
        return out
