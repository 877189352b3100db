"""Shard files: one capture per Arrow IPC file, uncompressed so that a memory map reads it zero-copy.

Format (version 1):
- Arrow IPC *file* format (random access, footer), no compression: compressed buffers cannot be
  memory-mapped zero-copy, and bf16 activations barely compress anyway.
- Columns q_sub, k, v, teacher_sub: `arrow.fixed_shape_tensor` with the per-row shape [B, H, n, D].
  Arrow has no bfloat16, so bf16 is stored as its uint16 bits; fp16 as float16, fp32 as float32. The
  torch dtype is in each tensor field's metadata ("tessera.dtype"), and a read reinterprets the bits
  (a view, no conversion), so round trips are exact to the bit (NaN payloads and -0 included).
- query_index: fixed_shape_tensor(int64, [Nq]). Scalars: layer, step, sigma, cfg, text_len,
  latent_h, latent_w, prompt_id, seed_id, and order (the store's insertion order).
  How often a capture was sampled is the store index's: the file is immutable once its checksum is
  recorded.
- Schema metadata "tessera.replay" = "1" names the format version.

One capture per file, because a capture (0.5 MB for the reference model, 60-800 MB for Flux) is far
larger than a file's overhead (a few KB of Arrow metadata): eviction and spill then move exactly one
capture's bytes, the budgets stay exact with no half-dead shards, producers write their own files
without coordinating, and a damaged file costs one capture. Readers still take a row index.

The checksum is CRC-32 (zlib) over the file's bytes, computed as they are written (no second pass).
It detects accidental damage (bit rot, a torn copy, truncation); it is not a defence against
tampering.
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from core.distill.capture import CAPTURE_DTYPES, DTYPE_NAMES, TENSOR_FIELDS, Capture, CaptureMeta

FORMAT_KEY = b"tessera.replay"
FORMAT_VERSION = b"1"
DTYPE_KEY = b"tessera.dtype"
# Arrow storage of each torch dtype: bf16 as raw bits, the others natively.
_STORAGE: dict[torch.dtype, tuple[pa.DataType, torch.dtype]] = {
    torch.bfloat16: (pa.uint16(), torch.uint16),
    torch.float16: (pa.float16(), torch.float16),
    torch.float32: (pa.float32(), torch.float32),
}
_SCALARS: tuple[tuple[str, pa.DataType], ...] = (
    ("layer", pa.string()),
    ("step", pa.int32()),
    ("sigma", pa.float64()),
    ("cfg", pa.float64()),
    ("text_len", pa.int32()),
    ("latent_h", pa.int32()),
    ("latent_w", pa.int32()),
    ("prompt_id", pa.int64()),
    ("seed_id", pa.int64()),
)


WRITE_BUFFER = 1 << 20


class ShardError(ValueError):
    """A shard file that is not a readable version-1 capture file."""


@dataclass(frozen=True)
class WrittenShard:
    nbytes: int
    crc32: int


def _tensor_column(t: torch.Tensor) -> tuple[pa.Field, pa.Array]:
    """A one-row fixed_shape_tensor column viewing `t`'s memory (CPU, contiguous: no copy)."""
    arrow_type, view_dtype = _STORAGE[t.dtype]
    flat = pa.array(t.view(view_dtype).reshape(-1).numpy(), type=arrow_type)
    storage = pa.FixedSizeListArray.from_arrays(flat, len(flat))
    array = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(arrow_type, list(t.shape)), storage)
    return pa.field("", array.type, metadata={DTYPE_KEY: DTYPE_NAMES[t.dtype].encode()}), array


def capture_batch(capture: Capture, order: int) -> pa.RecordBatch:
    """The capture as a one-row record batch. Tensors must be on the CPU and contiguous (see
    `host_capture`); the batch aliases their memory."""
    fields, arrays = [], []
    for name in TENSOR_FIELDS:
        f, a = _tensor_column(getattr(capture, name))
        fields.append(f.with_name(name))
        arrays.append(a)
    idx = capture.query_index
    idx_type = pa.fixed_shape_tensor(pa.int64(), [idx.shape[0]])
    idx_flat = pa.array(idx.numpy(), type=pa.int64())
    fields.append(pa.field("query_index", idx_type))
    arrays.append(
        pa.ExtensionArray.from_storage(idx_type, pa.FixedSizeListArray.from_arrays(idx_flat, len(idx_flat)))
    )
    meta = capture.meta
    for name, typ in _SCALARS:
        fields.append(pa.field(name, typ))
        arrays.append(pa.array([getattr(meta, name)], type=typ))
    fields.append(pa.field("order", pa.int64()))
    arrays.append(pa.array([order], type=pa.int64()))
    schema = pa.schema(fields, metadata={FORMAT_KEY: FORMAT_VERSION})
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def with_order(batch: pa.RecordBatch, order: int) -> pa.RecordBatch:
    """The same batch with another insertion order (the file's size does not depend on it)."""
    i = batch.schema.get_field_index("order")
    return batch.set_column(i, batch.schema.field(i), pa.array([order], type=pa.int64()))


def host_capture(capture: Capture) -> Capture:
    """The capture with CPU, contiguous tensors (a device copy only where needed)."""
    names = (*TENSOR_FIELDS, "query_index")
    if all(getattr(capture, n).device.type == "cpu" and getattr(capture, n).is_contiguous() for n in names):
        return capture
    return Capture(meta=capture.meta, **{n: getattr(capture, n).cpu().contiguous() for n in names})


def shard_size(batch: pa.RecordBatch) -> int:
    """The exact size in bytes of the shard file `write_shard` makes of `batch` (counted, not written)."""
    sink = pa.MockOutputStream()
    with ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.size()


class _BoundedSink:
    """A file object for Arrow's writer: writes to `fd`, refuses to go past `limit` bytes (a budget
    check before every write), and folds the bytes into a CRC-32 as they pass."""

    def __init__(self, fd: int, limit: int, path: str) -> None:
        self.fd, self.limit, self.path = fd, limit, path
        self.written = 0
        self.crc = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.written + view.nbytes > self.limit:
            raise OSError(errno.EFBIG, f"shard write past its {self.limit}-byte reservation", self.path)
        self.crc = zlib.crc32(view, self.crc)
        while view.nbytes:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def write_shard(path: str, batch: pa.RecordBatch, *, limit: int) -> WrittenShard:
    """Write `batch` as a new shard file at `path` (which must not exist), at most `limit` bytes.
    On any failure the partial file is removed and the error raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        sink = _BoundedSink(fd, limit, path)
        # Arrow writes metadata and padding in many small pieces: coalesce them (large tensor
        # buffers pass straight through), one system call each instead of dozens.
        with (
            pa.PythonFile(sink, mode="w") as raw,
            pa.BufferedOutputStream(raw, buffer_size=WRITE_BUFFER) as f,
            ipc.new_file(f, batch.schema) as writer,
        ):
            writer.write_batch(batch)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return WrittenShard(sink.written, sink.crc)


def file_crc32(mapped: pa.MemoryMappedFile) -> int:
    """CRC-32 over a memory-mapped file's bytes (read straight from the page cache)."""
    mapped.seek(0)
    return zlib.crc32(mapped.read_buffer(mapped.size()))


def check_mapped(mapped: pa.MemoryMappedFile, nbytes: int, crc32: int) -> str | None:
    """Why a mapped shard is damaged (wrong size, wrong CRC-32), or None if it is intact."""
    size = mapped.size()
    if size != nbytes:
        return f"{'truncated' if size < nbytes else 'oversized'}: {size} bytes, expected {nbytes}"
    found = file_crc32(mapped)
    if found != crc32:
        return f"checksum: crc32 {found:#010x}, expected {crc32:#010x}"
    return None


def check_shard(path: str | os.PathLike, nbytes: int, crc32: int) -> str | None:
    with pa.memory_map(str(path)) as mapped:
        return check_mapped(mapped, nbytes, crc32)


def read_capture(mapped: pa.MemoryMappedFile, row: int = 0) -> tuple[Capture, int]:
    """Capture `row` of a mapped shard and its insertion order. The tensors are zero-copy views of
    the map (read-only memory: copy them before writing, e.g. `Capture.copy_to`); no Arrow heap is
    allocated. Raises ShardError for a file that is not a version-1 shard."""
    try:
        batch_reader = ipc.open_file(mapped)
        schema = batch_reader.schema
        if (schema.metadata or {}).get(FORMAT_KEY) != FORMAT_VERSION:
            raise ShardError(
                f"not a version-{FORMAT_VERSION.decode()} replay shard (schema metadata {schema.metadata})"
            )
        batch = batch_reader.get_batch(0)
        tensors = {name: _tensor_view(batch, schema, name, row) for name in TENSOR_FIELDS}
        idx_col = batch.column("query_index")
        size = idx_col.type.shape[0]
        query_index = torch.from_dlpack(idx_col.storage.values.slice(row * size, size))
        scalars = {name: batch.column(name)[row].as_py() for name, _ in _SCALARS}
        order = batch.column("order")[row].as_py()
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, IndexError) as err:
        raise ShardError(f"unreadable shard: {err}") from err
    return Capture(meta=CaptureMeta(**scalars), query_index=query_index, **tensors), order


def _tensor_view(batch: pa.RecordBatch, schema: pa.Schema, name: str, row: int) -> torch.Tensor:
    field = schema.field(name)
    dtype_name = (field.metadata or {}).get(DTYPE_KEY, b"").decode()
    if dtype_name not in CAPTURE_DTYPES:
        raise ShardError(f"shard column {name}: unknown dtype {dtype_name!r}")
    dtype = CAPTURE_DTYPES[dtype_name]
    col = batch.column(name)
    shape = col.type.shape
    size = 1
    for s in shape:
        size *= s
    if col.storage.offset != 0:
        raise ShardError(f"shard column {name}: unexpected storage offset {col.storage.offset}")
    flat = torch.from_dlpack(col.storage.values.slice(row * size, size))
    if flat.dtype != _STORAGE[dtype][1]:
        raise ShardError(f"shard column {name}: storage {flat.dtype} does not hold {dtype_name}")
    return flat.view(dtype).reshape(shape)
