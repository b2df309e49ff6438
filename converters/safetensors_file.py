"""A safetensors file written a tensor at a time, in any order: byte for byte what
``safetensors.numpy.save_file`` writes for the same tensors.

``save_file`` needs every tensor of a file in memory at once, and a model's blocks are each
spread over its files (the layout sorts tensors by name: ``layers.1``, ``layers.10``, ...). The
layout depends only on the tensors' names, dtypes and shapes, so it is formed up front
(``layout``): an 8-byte little-endian header length, the JSON header (``__metadata__`` first,
then every tensor in data order, compact, padded with spaces to a multiple of 8 bytes), then
the data, sorted by dtype (the last of safetensors' ``Dtype`` list first) and by name within a
dtype. Each tensor is written at its offset when it comes (``SafetensorsFile.write``).
tests/test_convert.py checks the bytes against ``save_file``'s.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jprune.errors import JpruneError, writing

# safetensors' dtype names for numpy's, in the order of its ``Dtype`` enum (data go last first).
DTYPE_CODES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_CODES)}


def nbytes(shape: Any) -> int:
    """Bytes of a tensor of ``shape.shape`` and ``shape.dtype``."""
    return int(np.prod(shape.shape, dtype=np.int64)) * np.dtype(shape.dtype).itemsize


def _code(dtype) -> str:
    code = DTYPE_CODES.get(np.dtype(dtype))
    if code is None:
        raise JpruneError(f"dtype {np.dtype(dtype)} cannot be written to safetensors here")
    return code


class Layout(NamedTuple):
    header: bytes  # the length prefix and the JSON header: the file's first bytes
    offsets: dict[str, int]  # tensor name -> where its bytes start in the file
    size: int  # the file's length


def layout(shapes: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Layout:
    """The layout ``save_file`` gives tensors of these names, shapes and dtypes."""
    codes = {name: _code(s.dtype) for name, s in shapes.items()}
    order = sorted(shapes, key=lambda name: (-_RANK[np.dtype(shapes[name].dtype)], name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    starts, end = {}, 0
    for name in order:
        size = nbytes(shapes[name])
        header[name] = {
            "dtype": codes[name],
            "shape": [int(d) for d in shapes[name].shape],
            "data_offsets": [end, end + size],
        }
        starts[name], end = end, end + size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    offsets = {name: base + start for name, start in starts.items()}
    return Layout(struct.pack("<Q", len(text)) + text, offsets, base + end)


def _write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:  # one pwrite moves at most about 2 GiB on Linux
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class SafetensorsFile:
    """``path`` opened for the tensors of ``shapes`` (name -> ``.shape`` and ``.dtype``), its
    header written; ``write`` each tensor once, in any order; ``close`` checks that every one
    was. A context manager: leaving it on an exception closes the file unchecked. Errors name
    ``shown_as`` (default ``path``): the final name of a file written under a temporary one."""

    def __init__(
        self,
        path: str | os.PathLike,
        shapes: Mapping[str, Any],
        metadata: Mapping[str, str] | None = None,
        shown_as: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.shown_as = self.path if shown_as is None else Path(shown_as)
        self.shapes = dict(shapes)
        self.layout = layout(self.shapes, metadata)
        self._missing = set(self.shapes)
        self._fd: int | None = None
        with writing(self.shown_as, self.layout.size):
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _write_at(self._fd, self.layout.header, 0)
            except BaseException:
                self.close(check=False)
                raise

    def write(self, name: str, array: np.ndarray) -> None:
        expected = self.shapes.get(name)
        if name not in self._missing or expected is None:
            raise JpruneError(f"{name!r} is not a tensor still to write in {str(self.path)!r}")
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            raise JpruneError(
                f"tensor {name!r} was read as {array.dtype} {tuple(array.shape)}, its header "
                f"says {np.dtype(expected.dtype)} {tuple(expected.shape)}"
            )
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        with writing(self.shown_as, self.layout.size):
            _write_at(self._fd, data, self.layout.offsets[name])
        self._missing.discard(name)

    def close(self, check: bool = True) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if check and self._missing:
            raise JpruneError(f"{str(self.path)!r} lacks tensor {sorted(self._missing)[0]!r}")

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(check=kind is None)


# numpy's dtype for each of safetensors' dtype names (the headers name them so).
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (``__metadata__`` left out) and where its data start."""
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        text = f.read(length)
    if len(text) < length:
        raise ValueError(f"header of {length} bytes cut short at {len(text)}")
    header = json.loads(text)
    header.pop("__metadata__", None)
    return header, 8 + length


# JAX's CPU backend uses a host array's memory as its own (no copy) when it starts on a
# 64-byte boundary; numpy's allocator only promises 16.
ALIGNMENT = 64


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose data start on an ``ALIGNMENT``-byte boundary."""
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + size].view(dtype).reshape(shape)


def read_tensors(file: Path, names=None) -> dict[str, np.ndarray]:
    """Name -> array for ``names`` (default: every tensor) of a safetensors file, each read
    from the file straight into an array of its own (``readinto``): one copy in memory, where
    ``safe_open(..., framework="np").get_tensor`` holds two while it converts (a transient
    twice the size of a large embedding), and nothing mapped from the file stays resident.
    ``ValueError`` for a truncated or malformed file."""
    header, start = read_header(file)
    wanted = list(header) if names is None else list(names)
    out = {}
    with open(file, "rb", buffering=0) as f:
        for name in wanted:
            if name not in header:
                raise ValueError(f"no tensor {name!r}")
            entry = header[name]
            dtype = DTYPES_BY_CODE.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, not read here")
            begin, end = entry["data_offsets"]
            array = _aligned_empty(entry["shape"], dtype)
            if end - begin != array.nbytes:
                raise ValueError(f"tensor {name!r}: {end - begin} bytes for {array.nbytes}")
            f.seek(start + begin)
            view = memoryview(array.reshape(-1).view(np.uint8))
            got = 0
            while got < array.nbytes:
                count = f.readinto(view[got:])
                if not count:
                    raise ValueError(f"tensor {name!r} cut short at {got} of {array.nbytes} bytes")
                got += count
            array.flags.writeable = False  # JAX may then use its memory as its own
            out[name] = array
    return out
