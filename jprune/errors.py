"""The one exception type the CLI turns into a one-line error and a non-zero exit, and the
conversion of a failed write into one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class JpruneError(ValueError):
    """Bad input from the user: a path, a model, a text or an option jprune cannot use."""


class WriteError(JpruneError):
    """A file could not be written: a full disk, missing permissions, a vanished directory."""


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def writing(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` (``nbytes`` long) into a
    ``WriteError`` naming the path, the bytes it needed and the bytes free where it goes."""
    try:
        yield
    except OSError as err:
        path = Path(path)
        free = _free_bytes(path.parent)
        sizes = [] if nbytes is None else [f"{_size(nbytes)} needed"]
        sizes += [] if free is None else [f"{_size(free)} free there"]
        detail = f" ({', '.join(sizes)})" if sizes else ""
        raise WriteError(f"cannot write {str(path)!r}{detail}: {err.strerror or err}") from None
