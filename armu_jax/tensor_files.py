"""safetensors files one tensor at a time: reads of one tensor (or one shard of it), streamed writes.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, optional __metadata__), then the tensors' bytes back to back. Reading a block maps
only that tensor and unmaps it when done; writing puts one tensor in memory at a time. So loading
layers 0..l of a 70 GB checkpoint, or copying it file by file into an export, never holds more
than one tensor on the host (safetensors' own save_file needs every tensor of a file in memory).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from armu_jax import storage
from armu_jax.errors import UserError

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class StoredTensors:
    """The tensors of one safetensors file, by name, read without loading the file."""

    def __init__(self, path):
        self.path = path if storage.is_url(path) else Path(path)
        size = storage.size(self.path)
        try:
            (length,) = struct.unpack("<Q", storage.read_range(self.path, 0, min(8, size)))
            if 8 + length > size:
                raise ValueError
            header = json.loads(storage.read_range(self.path, 8, 8 + length))
            if not isinstance(header, dict):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            raise UserError(f"{self.path} is not a safetensors file (unreadable header)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + length
        self.entries = header
        self._check(size)

    def _check(self, size: int) -> None:
        """Every entry well formed and inside the file: a file cut short (an interrupted download or
        copy) is refused here, in one line, not when a tensor is mapped."""
        end = 0
        for key, entry in self.entries.items():
            try:
                begin, stop = (int(n) for n in entry["data_offsets"])
                shape = [int(n) for n in entry["shape"]]
                code = entry["dtype"]
                if begin < 0 or stop < begin:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{self.path}: the header entry of {key} is malformed (needs dtype, shape and "
                                "data_offsets); the file is damaged, fetch it again") from None
            if code in DTYPES and stop - begin != int(np.prod(shape)) * DTYPES[code].itemsize:
                raise UserError(f"{self.path}: tensor {key} of shape {tuple(shape)} ({code}) has {stop - begin} "
                                "bytes; the file is damaged, fetch it again")
            end = max(end, stop)
        if self.data_start + end > size:
            raise UserError(f"{self.path} is cut short: its header describes {self.data_start + end} bytes, the file "
                            f"has {size}; the download or copy did not finish, fetch the file again")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        code = self.entries[key]["dtype"]
        if code not in DTYPES:
            raise UserError(f"{self.path}: tensor {key} has dtype {code}, which armu_jax does not read")
        return DTYPES[code]

    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """The tensor, or the block `index` (a tuple of slices) of it, as a new array. From GCS one
        ranged read of the block's rows (all columns: a column block is sliced after the read)."""
        begin, _ = self.entries[key]["data_offsets"]
        shape, dtype = self.shape(key), self.dtype(key)
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        if storage.is_url(self.path):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            lo, hi, step = index[0].indices(shape[0])
            hi = max(hi, lo)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            start = self.data_start + begin
            data = storage.read_range(self.path, start + lo * row_bytes, start + hi * row_bytes)
            rows = np.frombuffer(data, dtype).reshape((hi - lo, *shape[1:]))
            return np.array(rows[(slice(None, None, step), *index[1:])])
        mapped = np.memmap(self.path, dtype, "r", offset=self.data_start + begin, shape=shape)
        try:
            return np.array(mapped[index])
        finally:
            mapped._mmap.close()  # unmap now, not when the garbage collector gets to it

    def raw(self, key: str) -> "StoredBytes":
        """The tensor's bytes as they are stored, for a copy that never decodes them."""
        begin, end = self.entries[key]["data_offsets"]
        return StoredBytes(self.path, self.data_start + begin, end - begin)


class StoredBytes:
    """A byte range of a file, copied in chunks (a tensor written unchanged)."""
    CHUNK = 64 << 20

    def __init__(self, path, offset: int, length: int):
        self.path, self.offset, self.length = path, offset, length

    def copy_to(self, out) -> None:
        done = 0
        while done < self.length:
            block = storage.read_range(self.path, self.offset + done, self.offset + min(self.length, done + self.CHUNK))
            if not block:
                raise OSError(f"{self.path} ended before the tensor's bytes did")
            out.write(block)
            done += len(block)


Entry = tuple[str, tuple[int, ...], np.dtype, "Callable[[], np.ndarray] | StoredBytes"]


def write(path: Path, entries: Iterable[Entry], metadata: dict | None = None) -> int:
    """Write (name, shape, dtype, source) entries in order; a source is a function making the array,
    called only when its bytes are written, or StoredBytes copied as they are. Returns the bytes of
    tensor data written."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with storage.open_write(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape, dtype, source in entries:
            if isinstance(source, StoredBytes):
                if source.length != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise ValueError(f"tensor {name}: {source.length} stored bytes, header says otherwise")
                source.copy_to(f)
                continue
            array = np.ascontiguousarray(source(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: shape {array.shape}, header says {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)
    return offset
