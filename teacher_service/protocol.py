"""Arrow IPC wire protocol between students and the teacher service.

A request is one Arrow IPC stream (content type `application/vnd.apache.arrow.stream`) with
one row per image:

- `keep`: list<int16>, the kept patch indices on the teacher's patch grid, row-major
  (index = row * grid_w + col). Other integer widths are accepted too.
- exactly one pixel column, list<uint8> or list<float16>:
  `patches`: the kept patches' pixels, patch-major (patch k's C*ph*pw pixels contiguous,
  each patch in (C, ph, pw) order), so a row contains len(keep) * C*ph*pw values; or
  `image`: the whole image, C*H*W values in (C, H, W) order. With `image`, a null `keep`
  means every patch.

Pixels are unnormalised: uint8 in 0..255 or float16 in [0, 1]. Rows may keep different
numbers of patches. Schema metadata keys (all optional, UTF-8): `protocol_version`,
`run_id`, `request_id`, `logits_dtype` (`float16` or `float32`).

A response is one Arrow IPC stream with a `logits` column, fixed_size_list<float16 or
float32>[num_classes], one row per request row in request order, and schema metadata
`request_id`, `macs_spent`, `macs_saved`, `images`, `protocol_version`.

The patch grid and the numpy patch cutting live in `teacher_service.patches`.

Nothing here unpickles or evaluates input: bodies are parsed by the Arrow IPC reader and
fully validated before any buffer is read.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from teacher_service.patches import GridLike, PatchGrid

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "1"
CONTENT_TYPE = "application/vnd.apache.arrow.stream"
PIXEL_DTYPES = ("uint8", "float16")
LOGITS_DTYPES = ("float16", "float32")

PixelKind = Literal["patches", "image"]
_PIXEL_COLUMNS: tuple[PixelKind, ...] = ("patches", "image")
_METADATA_KEYS = ("protocol_version", "run_id", "request_id", "logits_dtype")
_MAX_METADATA_VALUE_CHARS = 256


class ProtocolError(ValueError):
    """A request the service rejects, with the HTTP status and a machine-readable code.

    Attributes:
        status: HTTP status code (400, 401, 413, 415, 422, 429, 503, ...).
        code: short snake_case error code, stable across versions.
        message: human-readable explanation naming the offending value.
        retry_after_s: seconds a client should wait before retrying (429 and 503 only).
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from all four fields when unpickled (Ray and multiprocessing do this).
        return (type(self), (self.status, self.code, self.message, self.retry_after_s))

    def to_json(self) -> dict[str, Any]:
        """Return the JSON error body `{"error": {"code": ..., "message": ...}}`."""
        return {"error": {"code": self.code, "message": self.message}}


def invalid_content(message: str) -> ProtocolError:
    """Build the 422 error for a well-formed Arrow stream whose content is invalid."""
    return ProtocolError(422, "invalid_content", message)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def _list_array(rows: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((row.size for row in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(
            f"request contains {offsets[-1]} values in one column, more than an Arrow list "
            "can index; split it into smaller requests"
        )
    if rows:
        flat = np.concatenate([np.ravel(row) for row in rows])
    else:
        flat = np.zeros(0, dtype=value_type.to_pandas_dtype())
    values = pa.array(flat, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _pixel_type(dtype: np.dtype) -> pa.DataType:
    if dtype == np.uint8:
        return pa.uint8()
    if dtype == np.float16:
        return pa.float16()
    raise ValueError(
        f"pixels must be uint8 (0..255) or float16 ([0, 1]) on the wire, got {dtype}; "
        "convert float images with .astype(numpy.float16)"
    )


def encode_request(
    pixels: np.ndarray | Sequence[np.ndarray],
    keep: np.ndarray | Sequence[np.ndarray] | None,
    *,
    kind: PixelKind = "patches",
    run_id: str | None = None,
    request_id: str | None = None,
    logits_dtype: str = "float16",
) -> bytes:
    """Encode one request as an Arrow IPC stream.

    Args:
        pixels: with kind "patches", kept patches [B, K, P] or a list of [K_i, P] arrays;
            with kind "image", whole images [B, C, H, W] or a list of [C, H, W] arrays.
            dtype uint8 or float16.
        keep: kept patch indices [B, K] or a list of 1-D arrays; None (kind "image"
            only) means every patch of every image.
        kind: which pixel column to send, "patches" or "image".
        run_id: student run name, recorded in the service's metrics.
        request_id: echoed in the response; the service generates one if None.
        logits_dtype: "float16" or "float32", the response's logits type.

    Returns:
        The request body.
    """
    if kind not in _PIXEL_COLUMNS:
        raise ValueError(f"kind must be one of {_PIXEL_COLUMNS}, got {kind!r}")
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    pixel_rows = [np.asarray(row) for row in pixels]
    if not pixel_rows:
        raise ValueError("a request needs at least one image, got 0")
    dtypes = {row.dtype for row in pixel_rows}
    if len(dtypes) != 1:
        raise ValueError(f"all pixel rows must share one dtype, got {sorted(map(str, dtypes))}")
    pixel_type = _pixel_type(pixel_rows[0].dtype)

    if keep is None:
        if kind != "image":
            raise ValueError("keep=None (every patch) is only valid with kind='image'")
        keep_array = pa.nulls(len(pixel_rows), type=pa.list_(pa.int16()))
    else:
        keep_rows = [np.asarray(row, dtype=np.int16) for row in keep]
        if len(keep_rows) != len(pixel_rows):
            raise ValueError(
                f"keep has {len(keep_rows)} rows but pixels has {len(pixel_rows)}; "
                "pass one keep row per image"
            )
        keep_array = _list_array(keep_rows, pa.int16())

    metadata = {"protocol_version": PROTOCOL_VERSION, "logits_dtype": logits_dtype}
    if run_id is not None:
        metadata["run_id"] = run_id
    if request_id is not None:
        metadata["request_id"] = request_id
    table = pa.table(
        {"keep": keep_array, kind: _list_array(pixel_rows, pixel_type)}, metadata=metadata
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@dataclass
class RowGroup:
    """Rows of one request that keep the same number of patches.

    Attributes:
        rows: positions of these rows in the request, ascending.
        keep: kept patch indices [n, K], int64.
        pixels: kind "patches": [n, K, C*ph*pw]; kind "image": [n, C, H, W].
            dtype uint8 or float16.
        kind: "patches" or "image".
    """

    rows: np.ndarray
    keep: np.ndarray
    pixels: np.ndarray
    kind: PixelKind

    @property
    def keep_count(self) -> int:
        """Patches kept per image in this group (K)."""
        return int(self.keep.shape[1])


@dataclass
class DecodedRequest:
    """A validated request, grouped by kept count.

    Attributes:
        groups: rows grouped by kept count, each group's rows in request order.
        num_images: number of rows (images) in the request.
        patches_kept: kept patches summed over images.
        patches_total: grid patches summed over images.
        request_id: the request's id (generated when the request carried none).
        run_id: the student run's name, or None.
        logits_dtype: "float16" or "float32".
        protocol_version: the request's protocol version.
        pixel_dtype: "uint8" or "float16".
    """

    groups: list[RowGroup]
    num_images: int
    patches_kept: int
    patches_total: int
    request_id: str
    run_id: str | None = None
    logits_dtype: str = "float16"
    protocol_version: str = PROTOCOL_VERSION
    pixel_dtype: str = "uint8"
    keep_counts: list[int] = field(default_factory=list)


def _read_metadata(schema: pa.Schema) -> dict[str, str]:
    raw = schema.metadata or {}
    metadata: dict[str, str] = {}
    for key_bytes, value_bytes in raw.items():
        try:
            key = key_bytes.decode("utf-8")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            raise invalid_content(f"schema metadata must be UTF-8 text: {err}") from None
        if key in _METADATA_KEYS:
            if len(value) > _MAX_METADATA_VALUE_CHARS:
                raise invalid_content(
                    f"metadata {key!r} is {len(value)} characters long, "
                    f"more than the {_MAX_METADATA_VALUE_CHARS} allowed"
                )
            metadata[key] = value
    return metadata


def _flatbuffer_field(buffer: bytes, table: int, index: int) -> int | None:
    """Return the position of field `index` of the flatbuffer table at `table`, or None."""
    (vtable_offset,) = struct.unpack_from("<i", buffer, table)
    vtable = table - vtable_offset
    if not 0 <= vtable < len(buffer):
        raise struct.error(f"flatbuffer vtable offset {vtable} outside the message")
    (vtable_bytes,) = struct.unpack_from("<H", buffer, vtable)
    if 4 + 2 * index >= vtable_bytes:
        return None
    (field_offset,) = struct.unpack_from("<H", buffer, vtable + 4 + 2 * index)
    return table + field_offset if field_offset else None


def _flatbuffer_target(buffer: bytes, position: int) -> int:
    """Follow the unsigned offset stored at `position`."""
    (offset,) = struct.unpack_from("<I", buffer, position)
    return position + offset


def _is_compressed(message: pa.ipc.Message) -> bool:
    """Return whether a record batch or dictionary batch message has compressed buffers.

    Reads the `compression` field of the message's RecordBatch flatbuffer (Arrow
    format/Message.fbs: Message.header is field 2, DictionaryBatch.data is field 1 and
    RecordBatch.compression is field 3) without decompressing anything.
    """
    metadata = message.metadata.to_pybytes()
    root = _flatbuffer_target(metadata, 0)
    header = _flatbuffer_field(metadata, root, 2)
    if header is None:
        return False
    batch = _flatbuffer_target(metadata, header)
    if message.type == "dictionary batch":
        data = _flatbuffer_field(metadata, batch, 1)
        if data is None:
            return False
        batch = _flatbuffer_target(metadata, data)
    return _flatbuffer_field(metadata, batch, 3) is not None


def _reject_compressed(buffer: pa.Buffer) -> None:
    """Raise for a stream with compressed buffers, before the reader inflates them.

    A compressed buffer can expand a thousandfold, so a body under the size limit could
    make the replica allocate gigabytes.
    """
    for message in pa.ipc.MessageReader.open_stream(buffer):
        if message.type not in ("record batch", "dictionary batch"):
            continue
        try:
            compressed = _is_compressed(message)
        except (struct.error, IndexError):
            raise ProtocolError(
                400, "malformed_body", "body is not a valid Arrow IPC stream: corrupt message"
            ) from None
        if compressed:
            raise ProtocolError(
                400,
                "malformed_body",
                "compressed Arrow IPC buffers are not accepted; write the stream without "
                "compression (IpcWriteOptions(compression=None))",
            )


def _read_table(body: bytes) -> pa.Table:
    if not body:
        raise ProtocolError(400, "malformed_body", "request body is empty")
    try:
        _reject_compressed(pa.py_buffer(body))
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        table = reader.read_all()
        for batch in table.to_batches():
            batch.validate(full=True)
    except (pa.ArrowException, OSError) as err:
        raise ProtocolError(
            400, "malformed_body", f"body is not a valid Arrow IPC stream: {err}"
        ) from None
    return table


def _list_column(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise invalid_content(f"column {name!r} must be a list column, got type {array.type}")
    return array


def _row_bounds(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (starts, lengths) of each row inside array.flatten()."""
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    lengths = lengths.astype(np.int64)
    starts = np.zeros_like(lengths)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts, lengths


def _first_null_row(array: pa.Array) -> int:
    return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])


def _check_columns(table: pa.Table) -> PixelKind:
    names = table.column_names
    unknown = [name for name in names if name not in ("keep", *_PIXEL_COLUMNS)]
    if unknown:
        raise invalid_content(
            f"unknown column {unknown[0]!r}; a request has columns 'keep' and one of "
            "'patches' or 'image'"
        )
    if "keep" not in names:
        raise invalid_content("missing column 'keep' (list<int16> of kept patch indices)")
    kinds = [name for name in _PIXEL_COLUMNS if name in names]
    if len(kinds) != 1:
        raise invalid_content(
            f"a request needs exactly one pixel column, 'patches' or 'image', got {kinds or 'none'}"
        )
    return kinds[0]


def _decode_pixels(array: pa.Array, kind: PixelKind) -> tuple[np.ndarray, str]:
    value_type = array.type.value_type
    if value_type == pa.uint8():
        dtype = "uint8"
    elif value_type == pa.float16():
        dtype = "float16"
    else:
        raise invalid_content(
            f"column {kind!r} must hold uint8 or float16 pixels, got {value_type}"
        )
    if array.null_count:
        raise invalid_content(f"column {kind!r} row {_first_null_row(array)} is null")
    values = array.flatten()
    if values.null_count:
        raise invalid_content(f"column {kind!r} contains null pixel values")
    return values.to_numpy(zero_copy_only=False), dtype


def _check_float_pixels(values: np.ndarray, starts: np.ndarray, kind: PixelKind) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        position = int(np.argmax(bad))
        row = int(np.searchsorted(starts, position, side="right") - 1)
        raise invalid_content(
            f"column {kind!r} row {row} has pixel value {float(values[position])}; float16 "
            "pixels must be finite and in [0, 1] (send uint8 for 0..255 pixels)"
        )


def _decode_keep(
    array: pa.Array, kind: PixelKind, num_patches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return keep values (int64), row starts, kept counts and the null-row mask.

    A null row (kind "image" only) keeps every patch, so its kept count is num_patches.
    """
    if not pa.types.is_integer(array.type.value_type):
        raise invalid_content(
            f"column 'keep' must hold integers (int16), got {array.type.value_type}"
        )
    null_rows = array.is_null().to_numpy(zero_copy_only=False)
    if null_rows.any() and kind == "patches":
        raise invalid_content(
            f"column 'keep' row {int(np.flatnonzero(null_rows)[0])} is null; "
            "with 'patches' every row must list its kept indices"
        )
    values = array.flatten()
    if values.null_count:
        raise invalid_content("column 'keep' contains null indices")
    keep_values = values.to_numpy(zero_copy_only=False).astype(np.int64)
    starts, lengths = _row_bounds(array)
    empty = (lengths == 0) & ~null_rows
    if empty.any():
        raise invalid_content(
            f"column 'keep' row {int(np.flatnonzero(empty)[0])} is empty; keep at least "
            "one patch per image"
        )
    too_many = lengths > num_patches
    if too_many.any():
        row = int(np.flatnonzero(too_many)[0])
        raise invalid_content(
            f"column 'keep' row {row} lists {int(lengths[row])} patch indices, more than the "
            f"teacher's grid of {num_patches} patches; keep each patch at most once"
        )
    out_of_range = (keep_values < 0) | (keep_values >= num_patches)
    if out_of_range.any():
        position = int(np.argmax(out_of_range))
        row = int(np.searchsorted(starts, position, side="right") - 1)
        raise invalid_content(
            f"column 'keep' row {row} has patch index {int(keep_values[position])}, outside "
            f"the teacher's grid of {num_patches} patches (valid: 0..{num_patches - 1})"
        )
    keep_counts = np.where(null_rows, num_patches, lengths)
    return keep_values, starts, keep_counts, null_rows


def decode_request(
    body: bytes, spec: GridLike | PatchGrid, *, max_images: int | None = None
) -> DecodedRequest:
    """Decode and validate a request body.

    Args:
        body: the Arrow IPC stream.
        spec: the teacher's `TeacherSpec` or `PatchGrid`.
        max_images: maximum number of rows (images) per request; None for no limit.

    Returns:
        The request, grouped by kept count.

    Raises:
        ProtocolError: 400 for a body that is not an Arrow IPC stream, 413 for more
            than `max_images` rows, 422 for valid Arrow with invalid content (the
            message names the column, row and value).
    """
    grid = spec if isinstance(spec, PatchGrid) else PatchGrid.from_spec(spec)
    table = _read_table(body)
    metadata = _read_metadata(table.schema)
    version = metadata.get("protocol_version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise invalid_content(
            f"unsupported protocol_version {version!r}; this service speaks {PROTOCOL_VERSION!r}"
        )
    logits_dtype = metadata.get("logits_dtype", "float16")
    if logits_dtype not in LOGITS_DTYPES:
        raise invalid_content(
            f"metadata logits_dtype {logits_dtype!r} is invalid; use one of {LOGITS_DTYPES}"
        )
    kind = _check_columns(table)
    num_rows = table.num_rows
    if num_rows == 0:
        raise invalid_content("request has no rows; send at least one image")
    if max_images is not None and num_rows > max_images:
        raise ProtocolError(
            413,
            "too_many_images",
            f"request holds {num_rows} images, more than the {max_images} allowed per "
            "request; split it into smaller requests",
        )

    keep_values, keep_starts, keep_counts, keep_null = _decode_keep(
        _list_column(table, "keep"), kind, grid.num_patches
    )
    pixel_array = _list_column(table, kind)
    pixel_values, pixel_dtype = _decode_pixels(pixel_array, kind)
    pixel_starts, pixel_lengths = _row_bounds(pixel_array)
    expected = (
        keep_counts * grid.patch_dim if kind == "patches" else np.full(num_rows, grid.image_dim)
    )
    wrong = np.flatnonzero(pixel_lengths != expected)
    if wrong.size:
        row = int(wrong[0])
        rule = (
            f"len(keep) * {grid.patch_dim} = {int(expected[row])} (C*ph*pw = {grid.patch_dim})"
            if kind == "patches"
            else f"C*H*W = {grid.image_dim} for images of {grid.in_chans}x"
            f"{grid.img_size[0]}x{grid.img_size[1]}"
        )
        raise invalid_content(
            f"column {kind!r} row {row} has {int(pixel_lengths[row])} pixel values, expected {rule}"
        )
    if pixel_dtype == "float16":
        _check_float_pixels(pixel_values, pixel_starts, kind)

    groups = _group_rows(
        kind, grid, keep_values, keep_starts, keep_counts, keep_null, pixel_values, pixel_starts
    )
    return DecodedRequest(
        groups=groups,
        num_images=num_rows,
        patches_kept=int(keep_counts.sum()),
        patches_total=num_rows * grid.num_patches,
        request_id=metadata.get("request_id") or uuid.uuid4().hex,
        run_id=metadata.get("run_id") or None,
        logits_dtype=logits_dtype,
        protocol_version=version,
        pixel_dtype=pixel_dtype,
        keep_counts=[int(count) for count in keep_counts],
    )


def _group_rows(
    kind: PixelKind,
    grid: PatchGrid,
    keep_values: np.ndarray,
    keep_starts: np.ndarray,
    keep_counts: np.ndarray,
    keep_null: np.ndarray,
    pixel_values: np.ndarray,
    pixel_starts: np.ndarray,
) -> list[RowGroup]:
    all_patches = np.arange(grid.num_patches, dtype=np.int64)
    groups = []
    for keep_count in np.unique(keep_counts):
        rows = np.flatnonzero(keep_counts == keep_count)
        keep_rows = []
        pixel_rows = []
        for row in rows:
            start = keep_starts[row]
            if keep_null[row]:
                keep_rows.append(all_patches)
            else:
                keep_rows.append(keep_values[start : start + keep_count])
            length = keep_count * grid.patch_dim if kind == "patches" else grid.image_dim
            pixel_rows.append(pixel_values[pixel_starts[row] : pixel_starts[row] + length])
        keep = np.stack(keep_rows)  # [n, K]
        _check_unique(keep, rows)
        pixels = np.stack(pixel_rows)  # [n, K*P] or [n, C*H*W]
        if kind == "patches":
            pixels = pixels.reshape(len(rows), int(keep_count), grid.patch_dim)
        else:
            pixels = pixels.reshape(len(rows), grid.in_chans, *grid.img_size)
        groups.append(RowGroup(rows=rows, keep=keep, pixels=pixels, kind=kind))
    return groups


def _check_unique(keep: np.ndarray, rows: np.ndarray) -> None:
    ordered = np.sort(keep, axis=1)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if repeated.any():
        group_row, column = np.argwhere(repeated)[0]
        raise invalid_content(
            f"column 'keep' row {int(rows[group_row])} lists patch index "
            f"{int(ordered[group_row, column])} more than once; each kept index must be unique"
        )


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


@dataclass
class DecodedResponse:
    """A decoded response.

    Attributes:
        logits: float32 [B, num_classes], rows in request order.
        request_id: the request's id.
        macs_spent: teacher multiply-accumulates spent on this request.
        macs_saved: multiply-accumulates saved against running every patch.
        images: number of images (rows) in the response.
        protocol_version: the service's protocol version.
    """

    logits: np.ndarray
    request_id: str | None
    macs_spent: int
    macs_saved: int
    images: int
    protocol_version: str


def encode_response(
    logits: np.ndarray,
    *,
    request_id: str,
    macs_spent: int,
    macs_saved: int,
    logits_dtype: str = "float16",
) -> bytes:
    """Encode logits [B, num_classes] and the request's costs as an Arrow IPC stream."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, num_classes], got {logits.shape}")
    B, num_classes = logits.shape
    values = np.ascontiguousarray(logits, dtype=np.dtype(logits_dtype)).reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), num_classes)
    metadata = {
        "request_id": request_id,
        "macs_spent": str(int(macs_spent)),
        "macs_saved": str(int(macs_saved)),
        "images": str(B),
        "protocol_version": PROTOCOL_VERSION,
    }
    table = pa.table({"logits": column}, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_response(body: bytes) -> DecodedResponse:
    """Decode a response body into float32 logits and its metadata.

    Raises:
        ValueError: the body is not a response stream of this protocol.
    """
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"response is not a valid Arrow IPC stream: {err}") from None
    if "logits" not in table.column_names:
        raise ValueError(f"response has no 'logits' column, got {table.column_names}")
    column = table.column("logits").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"response 'logits' must be a fixed_size_list, got {column.type}")
    num_classes = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    logits = values.astype(np.float32).reshape(len(column), num_classes)
    metadata = {
        key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()
    }
    return DecodedResponse(
        logits=logits,
        request_id=metadata.get("request_id"),
        macs_spent=int(metadata.get("macs_spent", 0)),
        macs_saved=int(metadata.get("macs_saved", 0)),
        images=int(metadata.get("images", len(column))),
        protocol_version=metadata.get("protocol_version", ""),
    )
