"""A catalogue of malformed requests against a live, token-guarded teacher service.

Each request must get the status and error code that docs/protocol.md lists, as JSON that
names the problem. Afterwards the service must still return correct logits for a valid
request. The service has no endpoint that takes a JSON body: `/v1/logits` takes Arrow IPC
only and every other route is a GET, so JSON sent anywhere is a content-type or method
error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch

from teacher_service.engine import MaskedTeacher
from teacher_service.protocol import CONTENT_TYPE
from tests.reliability.helpers import (
    FLOAT16_TOLERANCE,
    GRID,
    TOKEN,
    DeployedApp,
    LocalServe,
    arrow_headers,
    arrow_stream,
    decode_logits,
    deployed_app,
    images,
    keep_rows,
    valid_body,
    write_teacher,
    write_token,
)

APP = "bad-requests"
MAX_BODY_BYTES = 64 * 1024
MAX_IMAGES_PER_REQUEST = 8
PATCH = GRID.patch_dim  # 16 pixels a patch
IMAGE = GRID.image_dim  # 256 pixels an image
INT16 = pa.int16()
UINT8 = pa.uint8()


@dataclass
class Teacher:
    app: DeployedApp
    engine: MaskedTeacher


@pytest.fixture(scope="module")
def teacher(
    shared_serve: LocalServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Teacher]:
    folder = tmp_path_factory.mktemp("bad-requests")
    teacher_path = write_teacher(folder)
    args = {
        "teacher": str(teacher_path),
        "num_cpus": 0,
        "token_file": str(write_token(folder)),
        "max_body_bytes": MAX_BODY_BYTES,
        "max_batch_images": 16,
        "max_images_per_request": MAX_IMAGES_PER_REQUEST,
        "batch_wait_ms": 2.0,
    }
    with deployed_app(shared_serve, APP, args) as app:
        yield Teacher(app=app, engine=MaskedTeacher.from_source(str(teacher_path)))


# -- Body builders ------------------------------------------------------------------------------


def _list(rows: list[list[int]] | list[list[float]], value_type: pa.DataType) -> pa.Array:
    return pa.array(rows, type=pa.list_(value_type))


def _keep(*rows: list[int], value_type: pa.DataType = INT16) -> pa.Array:
    return _list(list(rows), value_type)


def _patches(*counts: int, value_type: pa.DataType = UINT8, value: float = 0) -> pa.Array:
    return _list([[value] * (count * PATCH) for count in counts], value_type)


def _request(
    keep: pa.Array, pixels: pa.Array, metadata: dict | None = None, **extra: pa.Array
) -> bytes:
    return arrow_stream({"keep": keep, "patches": pixels, **extra}, metadata)


def _float_patches(bad_value: float) -> bytes:
    values = np.full(2 * PATCH, 0.5, dtype=np.float16)
    values[5] = bad_value
    return _request(_keep([0, 1]), pa.array([values], type=pa.list_(pa.float16())))


def _truncated() -> bytes:
    body = valid_body()
    return body[: len(body) // 2]


def _arrow_file_format() -> bytes:
    table = pa.table({"keep": _keep([0]), "patches": _patches(1)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _schema_only() -> bytes:
    return arrow_stream({"keep": _keep([0]), "patches": _patches(1)}, batches=0)


def _mismatched_row_counts() -> bytes:
    """A record batch that declares 3 rows while its columns contain 2."""
    body = bytearray(_request(_keep([0], [1]), _patches(1, 1)))
    # Each IPC message starts with 0xFFFFFFFF and its metadata length. Skip the schema.
    continuation, schema_bytes = struct.unpack_from("<Ii", body, 0)
    assert continuation == 0xFFFFFFFF
    metadata_start = 8 + schema_bytes + 8  # the record batch message's flatbuffer
    root = metadata_start + struct.unpack_from("<I", body, metadata_start)[0]
    header_field = _field(body, root, 2)  # Message.header: the RecordBatch table
    batch = header_field + struct.unpack_from("<I", body, header_field)[0]
    length_field = _field(body, batch, 0)  # RecordBatch.length
    assert struct.unpack_from("<q", body, length_field)[0] == 2
    struct.pack_into("<q", body, length_field, 3)
    return bytes(body)


def _field(buffer: bytearray, table: int, index: int) -> int:
    vtable = table - struct.unpack_from("<i", buffer, table)[0]
    offset = struct.unpack_from("<H", buffer, vtable + 4 + 2 * index)[0]
    assert offset, f"flatbuffer field {index} is absent"
    return table + offset


@dataclass
class BadRequest:
    """One malformed request and the error response that docs/protocol.md documents for it."""

    body: Callable[[], bytes] | bytes
    status: int
    code: str
    mentions: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=arrow_headers)
    method: str = "POST"
    path: str = "/v1/logits"


CATALOGUE = {
    # Bodies that are not a readable Arrow IPC stream.
    "empty_body": BadRequest(b"", 400, "malformed_body", ("empty",)),
    "garbage_bytes": BadRequest(
        b"\x00\xffnot arrow at all" * 8, 400, "malformed_body", ("Arrow IPC",)
    ),
    "truncated_stream": BadRequest(_truncated, 400, "malformed_body", ("Arrow IPC",)),
    "arrow_file_format": BadRequest(_arrow_file_format, 400, "malformed_body", ("Arrow IPC",)),
    "json_sent_as_arrow": BadRequest(b'{"keep": [[0]]}', 400, "malformed_body", ("Arrow IPC",)),
    "mismatched_row_counts": BadRequest(
        _mismatched_row_counts, 400, "malformed_body", ("Arrow IPC",)
    ),
    # Content type.
    "json_content_type": BadRequest(
        valid_body,
        415,
        "unsupported_media_type",
        ("application/json",),
        headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"},
    ),
    "missing_content_type": BadRequest(
        valid_body,
        415,
        "unsupported_media_type",
        (CONTENT_TYPE,),
        headers={"authorization": f"Bearer {TOKEN}"},
    ),
    "octet_stream_content_type": BadRequest(
        valid_body,
        415,
        "unsupported_media_type",
        ("application/octet-stream",),
        headers={"content-type": "application/octet-stream", "authorization": f"Bearer {TOKEN}"},
    ),
    # Columns.
    "missing_keep_column": BadRequest(
        lambda: arrow_stream({"patches": _patches(1)}), 422, "invalid_content", ("'keep'",)
    ),
    "missing_pixel_column": BadRequest(
        lambda: arrow_stream({"keep": _keep([0])}), 422, "invalid_content", ("pixel column",)
    ),
    "both_pixel_columns": BadRequest(
        lambda: _request(_keep([0]), _patches(1), image=_list([[0] * IMAGE], pa.uint8())),
        422,
        "invalid_content",
        ("exactly one pixel column",),
    ),
    "extra_column": BadRequest(
        lambda: _request(_keep([0]), _patches(1), labels=pa.array([3])),
        422,
        "invalid_content",
        ("unknown column 'labels'",),
    ),
    # Types.
    "keep_as_floats": BadRequest(
        lambda: _request(_keep([0], value_type=pa.float32()), _patches(1)),
        422,
        "invalid_content",
        ("'keep'", "integers"),
    ),
    "keep_not_a_list": BadRequest(
        lambda: _request(pa.array([0], type=pa.int16()), _patches(1)),
        422,
        "invalid_content",
        ("'keep'", "list column"),
    ),
    "patches_as_int32": BadRequest(
        lambda: _request(_keep([0]), _patches(1, value_type=pa.int32())),
        422,
        "invalid_content",
        ("'patches'", "int32"),
    ),
    "patches_as_float32": BadRequest(
        lambda: _request(_keep([0]), _patches(1, value_type=pa.float32())),
        422,
        "invalid_content",
        ("'patches'", "float"),
    ),
    "patches_as_strings": BadRequest(
        lambda: _request(_keep([0]), _list([["0"] * PATCH], pa.string())),
        422,
        "invalid_content",
        ("'patches'", "string"),
    ),
    "patches_nested_lists": BadRequest(
        lambda: _request(
            _keep([0]), pa.array([[[0] * PATCH]], type=pa.list_(pa.list_(pa.uint8())))
        ),
        422,
        "invalid_content",
        ("'patches'",),
    ),
    # Sizes.
    "too_few_pixels": BadRequest(
        lambda: _request(_keep([0, 1]), _list([[0] * (2 * PATCH - 1)], pa.uint8())),
        422,
        "invalid_content",
        ("'patches' row 0", str(2 * PATCH - 1)),
    ),
    "too_many_pixels": BadRequest(
        lambda: _request(_keep([0]), _patches(2)), 422, "invalid_content", ("'patches' row 0",)
    ),
    "whole_image_wrong_size": BadRequest(
        lambda: arrow_stream({"keep": _keep([0]), "image": _list([[0] * (IMAGE + 4)], pa.uint8())}),
        422,
        "invalid_content",
        ("'image'", "C*H*W"),
    ),
    # Indices.
    "index_out_of_range": BadRequest(
        lambda: _request(_keep([0, 1], [2, GRID.num_patches]), _patches(2, 2)),
        422,
        "invalid_content",
        ("row 1", str(GRID.num_patches)),
    ),
    "negative_index": BadRequest(
        lambda: _request(_keep([-1, 2]), _patches(2)), 422, "invalid_content", ("-1",)
    ),
    "huge_index": BadRequest(
        lambda: _request(_keep([2**40], value_type=pa.int64()), _patches(1)),
        422,
        "invalid_content",
        (str(2**40),),
    ),
    "duplicated_index": BadRequest(
        lambda: _request(_keep([3, 5, 3]), _patches(3)), 422, "invalid_content", ("more than once",)
    ),
    "empty_keep_list": BadRequest(
        lambda: _request(_keep([]), _patches(0)), 422, "invalid_content", ("empty",)
    ),
    "more_kept_than_grid": BadRequest(
        lambda: _request(
            _keep(list(range(GRID.num_patches)) + [0]), _patches(GRID.num_patches + 1)
        ),
        422,
        "invalid_content",
        (f"{GRID.num_patches + 1} patch indices",),
    ),
    "null_keep_row_with_patches": BadRequest(
        lambda: _request(pa.array([None], type=pa.list_(pa.int16())), _patches(1)),
        422,
        "invalid_content",
        ("null",),
    ),
    "null_index": BadRequest(
        lambda: _request(_keep([0, None]), _patches(2)),
        422,
        "invalid_content",
        ("null",),  # type: ignore[list-item]
    ),
    "null_pixel_row": BadRequest(
        lambda: _request(_keep([0]), pa.array([None], type=pa.list_(pa.uint8()))),
        422,
        "invalid_content",
        ("null",),
    ),
    # Rows.
    "empty_batch": BadRequest(
        lambda: _request(_keep(), _patches()), 422, "invalid_content", ("no rows",)
    ),
    "schema_without_batches": BadRequest(_schema_only, 422, "invalid_content", ("no rows",)),
    "too_many_images": BadRequest(
        lambda: valid_body(count=MAX_IMAGES_PER_REQUEST + 1, keep_count=1),
        413,
        "too_many_images",
        (str(MAX_IMAGES_PER_REQUEST),),
    ),
    "oversized_body": BadRequest(
        b"\0" * (MAX_BODY_BYTES + 1), 413, "body_too_large", (str(MAX_BODY_BYTES),)
    ),
    # Pixel values.
    "nan_pixel": BadRequest(lambda: _float_patches(np.nan), 422, "invalid_content", ("nan",)),
    "inf_pixel": BadRequest(lambda: _float_patches(np.inf), 422, "invalid_content", ("inf",)),
    "float_pixel_above_one": BadRequest(
        lambda: _float_patches(2.0), 422, "invalid_content", ("2.0", "[0, 1]")
    ),
    # Metadata.
    "huge_run_id": BadRequest(
        lambda: _request(_keep([0]), _patches(1), {"run_id": "r" * 5000}),
        422,
        "invalid_content",
        ("'run_id'", "5000"),
    ),
    "huge_unknown_metadata": BadRequest(
        lambda: _request(_keep([0]), _patches(1), {"notes": "x" * (2 * MAX_BODY_BYTES)}),
        413,
        "body_too_large",
        (str(MAX_BODY_BYTES),),
    ),
    "non_utf8_metadata": BadRequest(
        lambda: _request(_keep([0]), _patches(1), {b"run_id": b"\xff\xfe"}),
        422,
        "invalid_content",
        ("UTF-8",),
    ),
    "unknown_protocol_version": BadRequest(
        lambda: _request(_keep([0]), _patches(1), {"protocol_version": "2"}),
        422,
        "invalid_content",
        ("protocol_version", "'2'"),
    ),
    "unknown_logits_dtype": BadRequest(
        lambda: _request(_keep([0]), _patches(1), {"logits_dtype": "bfloat16"}),
        422,
        "invalid_content",
        ("logits_dtype", "bfloat16"),
    ),
    # Tokens.
    "missing_token": BadRequest(
        valid_body, 401, "unauthorized", ("missing bearer token",), headers=arrow_headers(None)
    ),
    "wrong_token": BadRequest(
        valid_body,
        401,
        "unauthorized",
        ("invalid bearer token",),
        headers=arrow_headers(TOKEN + "x"),
    ),
    "token_without_bearer_scheme": BadRequest(
        valid_body,
        401,
        "unauthorized",
        ("invalid bearer token",),
        headers={"content-type": CONTENT_TYPE, "authorization": TOKEN},
    ),
    "wrong_token_on_model_card": BadRequest(
        b"",
        401,
        "unauthorized",
        ("invalid bearer token",),
        headers={"authorization": "Bearer nope"},
        method="GET",
        path="/v1/teacher",
    ),
    # Routes: no route takes a JSON body.
    "json_posted_to_model_card": BadRequest(
        b'{"arch": "x"',
        405,
        "method_not_allowed",
        ("Method Not Allowed",),
        headers={"content-type": "application/json"},
        path="/v1/teacher",
    ),
    "unknown_path": BadRequest(
        b"", 404, "not_found", ("Not Found",), method="GET", path="/v2/logits"
    ),
}


def _send(teacher: Teacher, case: BadRequest) -> httpx.Response:
    body = case.body() if callable(case.body) else case.body
    return httpx.request(
        case.method,
        f"{teacher.app.url}{case.path}",
        content=body if body or case.method == "POST" else None,
        headers=case.headers,
        timeout=60.0,
    )


def _assert_valid_request_still_correct(teacher: Teacher) -> None:
    count, keep_count, seed = 3, 7, 11
    response = httpx.post(
        f"{teacher.app.url}/v1/logits",
        content=valid_body(count, keep_count, seed, logits_dtype="float32"),
        headers=arrow_headers(),
        timeout=60.0,
    )
    assert response.status_code == 200, response.text
    keep = keep_rows(count, keep_count, seed)
    expected = teacher.engine.forward_images(
        torch.as_tensor(images(count, seed)), torch.as_tensor(keep)
    )
    np.testing.assert_allclose(
        decode_logits(response.content), expected.numpy(), **FLOAT16_TOLERANCE
    )


def test_catalogue_has_25_distinct_cases() -> None:
    assert len(CATALOGUE) >= 25
    assert len({id(case.body) for case in CATALOGUE.values() if callable(case.body)}) >= 20


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_bad_request_gets_documented_error(teacher: Teacher, name: str) -> None:
    case = CATALOGUE[name]
    response = _send(teacher, case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == case.code
    for text in case.mentions:
        assert text in error["message"], error["message"]
    _assert_valid_request_still_correct(teacher)
