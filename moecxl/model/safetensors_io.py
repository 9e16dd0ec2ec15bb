"""Lazy safetensors reading and atomic writing, without torch.

A checkpoint directory holds `model.safetensors`, or shards named by `model.safetensors.index.json`.
`TensorSource` parses each file's header itself (8-byte little-endian length, JSON, raw data) and hands
out numpy views into one read-only `np.memmap` per file, so opening a model reads no tensor data: an
expert's bytes are read from disk only when something touches them.

File layout: [u64 header_len][header JSON, space-padded][data]. Header entries are
`name -> {"dtype", "shape", "data_offsets": [begin, end]}` with offsets relative to the data start,
plus an optional `"__metadata__": {str: str}`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
ALIGN_BYTES = 8  # header padded so the data section starts 8-byte aligned

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed; the message names the file and the key."""


def dtype_name(dtype) -> str:
    """The safetensors name of a numpy dtype ("F32", "BF16", ...)."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return DTYPE_NAMES[dt]
    except KeyError:
        raise CheckpointError(f"dtype {dt} has no safetensors equivalent") from None


# ---- reading -------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, dict, int, int]:
    """(entries, metadata, data_start, file_bytes) of one file; validates every entry against the size."""
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {file_bytes} bytes, no safetensors header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_bytes:
                raise CheckpointError(
                    f"{path}: bad header length {n} for a file of {file_bytes} bytes "
                    "(truncated, or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is {type(header).__name__}, expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_bytes = file_bytes - data_start
    for key, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{path}: key {key!r}: header entry {e!r} lacks dtype/shape/data_offsets")
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: key {key!r}: unsupported dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: key {key!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: key {key!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        want = math.prod(shape) * DTYPES[e["dtype"]].itemsize
        if not 0 <= begin <= end or end - begin != want:
            raise CheckpointError(
                f"{path}: key {key!r}: data_offsets {offsets} hold {end - begin} bytes, "
                f"but {e['dtype']} {shape} needs {want}"
            )
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: key {key!r}: truncated file: data ends at byte {data_start + end}, "
                f"file has {file_bytes} bytes"
            )
    return header, metadata, data_start, file_bytes


class TensorSource:
    """Lazy, read-only view of a checkpoint directory (single file or index + shards), or of one file.

    `get(key)` returns a numpy view backed by a memmap (no copy, nothing read until touched).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._entries: dict[str, tuple[Path, dict]] = {}
        self._data_start: dict[Path, int] = {}
        self._maps: dict[Path, np.memmap] = {}
        self.metadata: dict[str, str] = {}
        if path.is_file():
            files = {path: None}
        elif (path / INDEX_FILE).is_file():
            files = self._read_index(path / INDEX_FILE)
        elif (path / SINGLE_FILE).is_file():
            files = {path / SINGLE_FILE: None}
        elif path.is_dir():
            raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        for file, expected in files.items():
            header, metadata, data_start, _ = read_header(file)
            self._data_start[file] = data_start
            self.metadata.update(metadata)
            for key, entry in header.items():
                if key in self._entries:
                    raise CheckpointError(f"{file}: key {key!r} also in {self._entries[key][0]}")
                self._entries[key] = (file, entry)
            if expected is not None:
                missing = sorted(set(expected) - set(header))
                if missing:
                    raise CheckpointError(
                        f"{file}: key {missing[0]!r} named by {INDEX_FILE} is not in this shard "
                        f"({len(missing)} missing)"
                    )

    @staticmethod
    def _read_index(index: Path) -> dict[Path, list[str]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is {type(weight_map).__name__}, expected an object")
        files: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            shard = index.parent / str(name)
            if not shard.is_file():
                raise CheckpointError(f"{index}: key {key!r} names shard {name!r}, which does not exist")
            files.setdefault(shard, []).append(key)
        return files

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> tuple[Path, dict]:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: missing tensor {key!r}") from None

    def file_of(self, key: str) -> Path:
        return self._entry(key)[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._entry(key)[1]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        """A read-only numpy view of `key` into the file's memmap."""
        file, e = self._entry(key)
        shape, dt = tuple(e["shape"]), DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        if begin == end:
            return np.zeros(shape, dt)
        mm = self._maps.get(file)
        if mm is None:
            try:
                mm = self._maps[file] = np.memmap(file, np.uint8, mode="r")
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{file}: key {key!r}: cannot map file: {err}") from err
        start = self._data_start[file]
        return mm[start + begin : start + end].view(dt).reshape(shape)

    def release(self, key: str) -> None:
        """Unmap the pages of `key` from this process (they stay in the page cache; touching a view
        reads them again). A loader that copies tensor by tensor calls it after each copy, so that the
        file pages it read do not add to its resident memory: a 5.6 GB checkpoint then peaks at about
        its copy's size, not twice that."""
        file, e = self._entry(key)
        begin, end = e["data_offsets"]
        mm = getattr(self._maps.get(file), "_mmap", None)  # numpy's mmap.mmap under the memmap
        if begin == end or mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = (self._data_start[file] + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), -(-(self._data_start[file] + end) // mmap.PAGESIZE) * mmap.PAGESIZE)
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Forget the file maps; views already handed out keep their map alive until dropped."""
        self._maps.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}, {len(self)} tensors)"


# ---- writing -------------------------------------------------------------------------------------


def _header_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, a in tensors.items():
        n = a.size * a.dtype.itemsize
        header[key] = {
            "dtype": dtype_name(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN_BYTES)
    return struct.pack("<Q", len(raw)) + raw


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write one safetensors file atomically: a temp file in the same directory, fsync, os.replace.

    Tensors are written one at a time (no whole-file buffer); keys keep their order.
    """
    path = Path(path)
    arrays = {}
    for k, a in tensors.items():
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[str(k)] = a
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header_bytes(arrays, metadata))
            for a in arrays.values():
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of keys (in order) into shards of at most `max_shard_bytes` (a larger tensor: alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes:
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def write_checkpoint(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write `model.safetensors`, or HF-style shards plus `model.safetensors.index.json` when the
    tensors exceed `max_shard_bytes`. Returns the file names written."""
    directory = Path(directory)
    total = sum(np.asarray(a).nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(directory / SINGLE_FILE, tensors, metadata)
        return [SINGLE_FILE]
    plan = shard_plan(((k, np.asarray(a).nbytes) for k, a in tensors.items()), max_shard_bytes)
    names, weight_map = [], {}
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(directory / name, {k: tensors[k] for k in keys}, metadata)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {
        "metadata": {"total_size": total, **(dict(metadata) if metadata else {})},
        "weight_map": weight_map,
    }
    write_text_atomic(directory / INDEX_FILE, json.dumps(index, indent=2))
    return names + [INDEX_FILE]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
