"""Low-level safetensors I/O: strict header parsing and a streaming shard writer.

The writer knows every tensor's dtype and shape up front (from the input headers), so it writes the header first
and then streams each tensor's bytes into the file. Unchanged tensors are copied as byte ranges (kernel
`copy_file_range`, no user-space buffer); cast tensors go through two reused 1 MiB buffers. Peak memory
therefore depends on neither the tensor, the shard nor the model size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .tables import CASTABLE_DTYPES, DTYPE_SIZES

# A header larger than this is certainly garbage (the real 32B index headers are ~100 KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024
CAST_CHUNK = 1024 * 1024  # small enough for both buffers to stay in CPU cache (16 MiB was 2-3x slower)

if sys.byteorder != "little":  # safetensors payloads are little-endian; the byte-range copy relies on it
    raise ImportError("hcxserve.convert needs a little-endian host")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an input shard: where its bytes are (absolute file offsets) and what they mean."""

    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard: its new name, its source, and the dtype it is written in."""

    name: str
    src: TensorInfo
    dtype: str

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.src.shape)

    @property
    def cast(self) -> bool:
        return self.dtype != self.src.dtype


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def output_dtype(src_dtype: str, target: str | None) -> str:
    """--dtype applies to floating tensors only; integer, bool and fp8 tensors keep their dtype."""
    if target is None or src_dtype not in CASTABLE_DTYPES:
        return src_dtype
    return target


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; any inconsistency (truncation included) is a CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (header length {header_len}, file {size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + header_len
    tensors = {key: _parse_entry(path, key, entry, base) for key, entry in header.items()}
    _check_layout(path, tensors, base, size)
    return tensors


def count_tensors(folder: Path) -> int:
    """Tensors in every safetensors file under `folder` (headers only): the manifest's count for the decoders."""
    return sum(len(read_header(f)) for f in sorted(folder.rglob("*.safetensors")))


def _parse_entry(path: Path, key: str, entry: object, base: int) -> TensorInfo:
    try:
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]  # type: ignore[index]
        ok = dtype in DTYPE_SIZES and all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= start <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}")
    if end - start != tensor_nbytes(dtype, shape):
        raise CheckpointError(
            f"{path}: tensor {key!r} has {end - start} bytes, {dtype}{list(shape)} needs {tensor_nbytes(dtype, shape)}"
        )
    return TensorInfo(path, key, dtype, shape, base + start, base + end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """Data must be contiguous from the header on and end exactly at the end of the file."""
    pos = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != pos:
            raise CheckpointError(f"{path}: corrupt safetensors layout (gap or overlap at tensor {info.key!r})")
        pos = info.end
    if pos != size:
        what = "truncated" if size < pos else "has trailing bytes"
        raise CheckpointError(f"{path}: file is {what}: {size} bytes on disk, header describes {pos}")


def build_header(tensors: Sequence[OutTensor]) -> bytes:
    """Header for `tensors` laid out in the given order, padded with spaces to a multiple of 8 bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.src.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, tensors: Sequence[OutTensor], on_bytes: Callable[[int], object] = lambda n: None) -> None:
    """Write one safetensors file: the header, then each tensor's bytes in order."""
    sources = _SourceFiles()
    caster: _ChunkedCaster | None = None
    try:
        with open(path, "wb", buffering=0) as out:
            _write_all(out.fileno(), build_header(tensors))
            for t in tensors:
                if t.cast:
                    caster = caster or _ChunkedCaster()
                    with single_torch_thread():
                        caster.write(t, sources.fd(t.src.path), out.fileno())
                else:
                    _copy_range(sources.fd(t.src.path), t.src.start, t.nbytes, out.fileno())
                on_bytes(t.nbytes)
    finally:
        sources.close()


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread. Our ops are small, memory-bound slices, far below what pays for a parallel
    region, and on a busy machine the OpenMP workers wait for each other: measured on 2 shared cores, a 1 MiB
    bf16->fp16 copy_ ran at 4.2 GB/s on 1 thread and 0.3 GB/s on 2."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_into(fd: int, view: memoryview, start: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], start + done)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while reading {len(view)} bytes at offset {start}")
        done += n


class _ChunkedCaster:
    """Casts a tensor slice by slice through two reused buffers: memory stays at 2 x CAST_CHUNK whatever the
    tensor size, and the buffers stay hot in cache instead of faulting in a fresh tensor-sized allocation.
    Element-wise rounding (torch's copy_) is the same as `tensor.to(dtype)` on the whole tensor."""

    def __init__(self) -> None:
        self._src = bytearray(CAST_CHUNK)
        self._dst = bytearray(CAST_CHUNK)

    def write(self, t: OutTensor, src_fd: int, dst_fd: int) -> None:
        import torch

        src_size, dst_size = DTYPE_SIZES[t.src.dtype], DTYPE_SIZES[t.dtype]
        per_chunk = CAST_CHUNK // max(src_size, dst_size)
        src = torch.frombuffer(self._src, dtype=torch_dtype(t.src.dtype))
        dst = torch.frombuffer(self._dst, dtype=torch_dtype(t.dtype))
        numel = math.prod(t.src.shape)
        for first in range(0, numel, per_chunk):
            n = min(per_chunk, numel - first)
            read_into(src_fd, memoryview(self._src)[: n * src_size], t.src.start + first * src_size)
            dst[:n].copy_(src[:n])
            _write_all(dst_fd, memoryview(self._dst)[: n * dst_size])


def torch_dtype(name: str):  # -> torch.dtype; torch is imported lazily so that planning stays torch-free
    import torch

    table = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    return table[name]


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[: 1 << 30])  # one write(2) moves at most ~2 GiB
        view = view[n:]


def _copy_range(src_fd: int, start: int, count: int, dst_fd: int) -> None:
    """Copy bytes [start, start+count) of src to the current position of dst, in the kernel when it can."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src_fd, dst_fd, count - done, start + done)
            if n == 0:
                raise CheckpointError(f"unexpected end of file while copying {count} bytes at offset {start}")
            done += n
        return
    except (AttributeError, OSError):
        pass  # no copy_file_range (old kernel, cross-device, some file systems): copy through a bounded buffer
    buf = bytearray(min(COPY_CHUNK, count - done))
    while done < count:
        view = memoryview(buf)[: min(len(buf), count - done)]
        read_into(src_fd, view, start + done)
        _write_all(dst_fd, view)
        done += len(view)


class _SourceFiles:
    """Input files opened once per shard write (plain fds: no mmap, so nothing of the input stays resident)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def pack_shards(tensors: Iterable[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy packing in name order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards
