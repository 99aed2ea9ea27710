"""Property-based fuzzing of the request decoder: it raises `ProtocolError` or nothing.

Two families of input: arbitrary bytes (and mutations of a valid body), and well-formed
Arrow IPC streams whose columns, types, values and metadata are drawn at random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_service.patches import PatchGrid, gather_patches
from teacher_service.protocol import ProtocolError, decode_request, encode_request

GRID = PatchGrid(img_size=(8, 8), patch_size=(4, 4), in_chans=1)  # 2x2 grid, 16 px a patch
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
COLUMN_NAMES = ("keep", "patches", "image", "extra")
VALUE_TYPES = (
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
    pa.bool_(),
    pa.string(),
    pa.null(),
)
METADATA_KEYS = ("protocol_version", "run_id", "request_id", "logits_dtype", "other")


def _valid_body() -> bytes:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    keep = np.array([[0, 3], [1, 2]])
    return encode_request(gather_patches(images, keep, GRID), keep)


VALID_BODY = _valid_body()


def _decode(body: bytes) -> None:
    """Decode `body`; any exception other than ProtocolError fails the property."""
    try:
        decoded = decode_request(body, GRID, max_images=8)
    except ProtocolError as error:
        assert 400 <= error.status < 500, error
        assert error.code
        assert error.message
        return
    assert decoded.num_images >= 1
    for group in decoded.groups:
        assert group.keep.min() >= 0
        assert group.keep.max() < GRID.num_patches


@FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_protocol_errors(body: bytes) -> None:
    _decode(body)


@FUZZ_SETTINGS
@given(st.data())
def test_mutated_valid_body_raises_only_protocol_errors(data: st.DataObject) -> None:
    body = bytearray(VALID_BODY)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        position = data.draw(st.integers(0, len(body) - 1), label="position")
        body[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(body)), label="truncate at")
    _decode(bytes(body[:cut]))


def _scalar_values(value_type: pa.DataType) -> st.SearchStrategy[Any]:
    if pa.types.is_integer(value_type):
        info = np.iinfo(value_type.to_pandas_dtype())
        interesting = st.sampled_from([0, 1, 3, 4, 15, 16, -1, int(info.min), int(info.max)])
        ranged = st.integers(int(info.min), int(info.max))
        return (
            st.one_of(interesting, ranged)
            if info.min < 0
            else st.one_of(interesting.filter(lambda value: value >= 0), ranged)
        )
    if pa.types.is_floating(value_type):
        return st.floats(allow_nan=True, allow_infinity=True, width=16)
    if pa.types.is_boolean(value_type):
        return st.booleans()
    if pa.types.is_string(value_type):
        return st.text(max_size=4)
    return st.none()


@st.composite
def _column(draw: st.DrawFn, num_rows: int) -> pa.Array:
    value_type = draw(st.sampled_from(VALUE_TYPES))
    values = _scalar_values(value_type)
    shape = draw(st.sampled_from(("list", "large_list", "flat", "nested")))
    if shape == "flat":
        return pa.array(
            [draw(st.one_of(st.none(), values)) for _ in range(num_rows)], type=value_type
        )
    rows = []
    for _ in range(num_rows):
        if draw(st.integers(0, 9)) == 0:
            rows.append(None)
            continue
        length = draw(st.sampled_from((0, 1, 2, 4, 16, 32, 64, 65)))
        rows.append(
            [
                draw(st.one_of(values, st.none())) if length < 8 else draw(values)
                for _ in range(length)
            ]
        )
    if shape == "nested":
        return pa.array(
            [None if row is None else [row] for row in rows], type=pa.list_(pa.list_(value_type))
        )
    list_type = pa.large_list(value_type) if shape == "large_list" else pa.list_(value_type)
    return pa.array(rows, type=list_type)


@st.composite
def _arrow_stream(draw: st.DrawFn) -> bytes:
    num_rows = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(COLUMN_NAMES), min_size=0, max_size=3, unique=True))
    columns = {name: draw(_column(num_rows)) for name in names}
    metadata = draw(
        st.dictionaries(
            st.sampled_from(METADATA_KEYS),
            st.one_of(st.sampled_from(["1", "2", "float16", "float32", ""]), st.text(max_size=300)),
            max_size=3,
        )
    )
    schema = pa.schema([(name, array.type) for name, array in columns.items()], metadata=metadata)
    batch = pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)
    compression = draw(st.sampled_from((None, None, "lz4", "zstd")))
    options = pa.ipc.IpcWriteOptions(compression=compression)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        for _ in range(draw(st.integers(0, 2))):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@FUZZ_SETTINGS
@given(_arrow_stream())
def test_random_arrow_tables_raise_only_protocol_errors(body: bytes) -> None:
    _decode(body)


@FUZZ_SETTINGS
@given(
    keep=st.lists(
        st.lists(st.integers(-(2**20), 2**20), min_size=0, max_size=6), min_size=1, max_size=4
    ),
    pixels_per_row=st.lists(st.integers(0, 100), min_size=1, max_size=4),
    pixel_type=st.sampled_from((pa.uint8(), pa.float16())),
)
def test_random_keep_lists_raise_only_protocol_errors(
    keep: list[list[int]], pixels_per_row: list[int], pixel_type: pa.DataType
) -> None:
    rows = min(len(keep), len(pixels_per_row))
    keep_column = pa.array(keep[:rows], type=pa.list_(pa.int32()))
    pixel_rows = [np.zeros(count, dtype=pixel_type.to_pandas_dtype()) for count in pixels_per_row]
    pixel_column = pa.array([row.tolist() for row in pixel_rows[:rows]], type=pa.list_(pixel_type))
    table = pa.table({"keep": keep_column, "patches": pixel_column})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    _decode(sink.getvalue().to_pybytes())
