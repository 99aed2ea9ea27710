"""Unit tests of the Arrow IPC wire protocol (no Ray, no HTTP)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from teacher_service.patches import PatchGrid, gather_patches, patchify
from teacher_service.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

GRID = PatchGrid(img_size=(28, 28), patch_size=(4, 4), in_chans=1)
RGB_GRID = PatchGrid(img_size=(8, 12), patch_size=(4, 4), in_chans=3)


def _images(grid: PatchGrid, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, grid.in_chans, *grid.img_size), dtype=np.uint8)


def _stream(columns: dict[str, pa.Array], metadata: dict[str, str] | None = None) -> bytes:
    table = pa.table(columns, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _reject(body: bytes, grid: PatchGrid = GRID, **kwargs: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_request(body, grid, **kwargs)
    return caught.value


def test_patch_grid_geometry() -> None:
    assert GRID.grid_size == (7, 7)
    assert GRID.num_patches == 49
    assert GRID.patch_dim == 16
    assert RGB_GRID.grid_size == (2, 3)
    assert RGB_GRID.patch_dim == 48


def test_patch_grid_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="whole number of patches"):
        PatchGrid(img_size=(30, 28), patch_size=(4, 4), in_chans=1)


def test_patchify_is_row_major_channel_first() -> None:
    images = _images(RGB_GRID, 2)
    patches = patchify(images, RGB_GRID)
    assert patches.shape == (2, 6, 48)
    # Patch 4 sits at grid row 1, column 1: pixel rows 4..7, pixel columns 4..7.
    expected = images[1, :, 4:8, 4:8].reshape(-1)  # (C, ph, pw) order
    np.testing.assert_array_equal(patches[1, 4], expected)


def test_patchify_matches_engine_layout() -> None:
    # The engine flattens patches as the conv weight does; check against torch's unfold.
    images = _images(RGB_GRID, 3)
    unfolded = torch.nn.functional.unfold(
        torch.from_numpy(images).float(), kernel_size=4, stride=4
    )  # [B, C*ph*pw, N]
    np.testing.assert_array_equal(
        patchify(images, RGB_GRID), unfolded.transpose(1, 2).numpy().astype(np.uint8)
    )


def test_gather_patches_picks_kept_indices() -> None:
    images = _images(GRID, 2)
    keep = np.array([[0, 48, 7], [3, 2, 1]])
    kept = gather_patches(images, keep, GRID)
    assert kept.shape == (2, 3, 16)
    np.testing.assert_array_equal(kept[0, 1], images[0, 0, 24:28, 24:28].reshape(-1))
    np.testing.assert_array_equal(kept[1, 0], images[1, 0, 0:4, 12:16].reshape(-1))


def test_gather_patches_rejects_out_of_grid_index() -> None:
    with pytest.raises(ValueError, match="patch index 49 is outside"):
        gather_patches(_images(GRID, 1), np.array([[0, 49]]), GRID)
    with pytest.raises(ValueError, match="patch index -1 is outside"):
        gather_patches(_images(GRID, 1), np.array([[-1, 3]]), GRID)


def test_request_round_trip_ragged_patches() -> None:
    images = _images(GRID, 5)
    rng = np.random.default_rng(1)
    keep = [rng.permutation(49)[:count] for count in (10, 20, 10, 49, 3)]
    pixels = [gather_patches(images[i : i + 1], row[None], GRID)[0] for i, row in enumerate(keep)]
    body = encode_request(pixels, keep, run_id="run-a", request_id="req-1")
    decoded = decode_request(body, GRID)

    assert decoded.num_images == 5
    assert decoded.run_id == "run-a"
    assert decoded.request_id == "req-1"
    assert decoded.pixel_dtype == "uint8"
    assert decoded.logits_dtype == "float16"
    assert decoded.keep_counts == [10, 20, 10, 49, 3]
    assert decoded.patches_kept == 92
    assert decoded.patches_total == 5 * 49
    assert sorted(group.keep_count for group in decoded.groups) == [3, 10, 20, 49]
    seen_rows = []
    for group in decoded.groups:
        for position, row in enumerate(group.rows):
            seen_rows.append(int(row))
            np.testing.assert_array_equal(group.keep[position], keep[row])
            np.testing.assert_array_equal(group.pixels[position], pixels[row])
    assert sorted(seen_rows) == [0, 1, 2, 3, 4]


def test_request_round_trip_float16_images() -> None:
    images = (_images(RGB_GRID, 2) / 255.0).astype(np.float16)
    keep = np.array([[0, 5], [1, 2]])
    body = encode_request(images, keep, kind="image", logits_dtype="float32")
    decoded = decode_request(body, RGB_GRID)
    assert decoded.pixel_dtype == "float16"
    assert decoded.logits_dtype == "float32"
    (group,) = decoded.groups
    assert group.kind == "image"
    np.testing.assert_array_equal(group.pixels, images)
    np.testing.assert_array_equal(group.keep, keep)


def test_image_request_with_null_keep_keeps_every_patch() -> None:
    images = _images(GRID, 2)
    decoded = decode_request(encode_request(images, None, kind="image"), GRID)
    (group,) = decoded.groups
    assert group.keep_count == 49
    np.testing.assert_array_equal(group.keep, np.tile(np.arange(49), (2, 1)))
    assert decoded.patches_kept == 98


def test_request_without_request_id_gets_one() -> None:
    body = encode_request(np.zeros((1, 1, 16), np.uint8), np.array([[0]]))
    assert len(decode_request(body, GRID).request_id) == 32


def test_encode_request_rejects_float32_pixels() -> None:
    with pytest.raises(ValueError, match="uint8 .* or float16"):
        encode_request(np.zeros((1, 1, 16), np.float32), np.array([[0]]))


def test_encode_request_rejects_row_count_mismatch() -> None:
    with pytest.raises(ValueError, match="keep has 2 rows but pixels has 1"):
        encode_request(np.zeros((1, 1, 16), np.uint8), np.array([[0], [1]]))


def test_decode_rejects_empty_body() -> None:
    error = _reject(b"")
    assert (error.status, error.code) == (400, "malformed_body")


def test_decode_rejects_bytes_that_are_not_arrow() -> None:
    error = _reject(b'{"keep": [1, 2, 3]}')
    assert (error.status, error.code) == (400, "malformed_body")


def test_decode_rejects_truncated_stream() -> None:
    body = encode_request(np.zeros((2, 3, 16), np.uint8), np.array([[0, 1, 2], [3, 4, 5]]))
    error = _reject(body[: len(body) // 2])
    assert error.status == 400


@pytest.mark.parametrize(
    ("columns", "fragment"),
    [
        ({"patches": pa.array([[0] * 16], pa.list_(pa.uint8()))}, "missing column 'keep'"),
        ({"keep": pa.array([[0]], pa.list_(pa.int16()))}, "exactly one pixel column"),
        (
            {
                "keep": pa.array([[0]], pa.list_(pa.int16())),
                "patches": pa.array([[0] * 16], pa.list_(pa.uint8())),
                "extra": pa.array([1]),
            },
            "unknown column 'extra'",
        ),
        (
            {
                "keep": pa.array([[0]], pa.list_(pa.int16())),
                "patches": pa.array([[0.0] * 16], pa.list_(pa.float32())),
            },
            "uint8 or float16",
        ),
        (
            {
                "keep": pa.array([["a"]], pa.list_(pa.string())),
                "patches": pa.array([[0] * 16], pa.list_(pa.uint8())),
            },
            "must hold integers",
        ),
        (
            {
                "keep": pa.array([1], pa.int16()),
                "patches": pa.array([[0] * 16], pa.list_(pa.uint8())),
            },
            "column 'keep' must be a list column",
        ),
    ],
)
def test_decode_rejects_wrong_columns(columns: dict[str, pa.Array], fragment: str) -> None:
    error = _reject(_stream(columns))
    assert error.status == 422
    assert error.code == "invalid_content"
    assert fragment in error.message


def test_decode_names_out_of_grid_index() -> None:
    keep = pa.array([[0, 1], [2, 49]], pa.list_(pa.int16()))
    patches = pa.array([[0] * 32, [0] * 32], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert error.status == 422
    assert "'keep' row 1" in error.message
    assert "patch index 49" in error.message


def test_decode_names_row_of_negative_index() -> None:
    keep = pa.array([[-3]], pa.list_(pa.int16()))
    error = _reject(_stream({"keep": keep, "patches": pa.array([[0] * 16], pa.list_(pa.uint8()))}))
    assert "row 0" in error.message
    assert "-3" in error.message


def test_decode_names_repeated_index() -> None:
    keep = pa.array([[1, 2], [5, 5]], pa.list_(pa.int16()))
    patches = pa.array([[0] * 32, [0] * 32], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert "'keep' row 1" in error.message
    assert "patch index 5 more than once" in error.message


def test_decode_names_row_with_wrong_pixel_count() -> None:
    keep = pa.array([[1, 2], [3, 4]], pa.list_(pa.int16()))
    patches = pa.array([[0] * 32, [0] * 31], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert "'patches' row 1 has 31 pixel values" in error.message
    assert "32" in error.message


def test_decode_names_image_row_with_wrong_size() -> None:
    keep = pa.array([[1]], pa.list_(pa.int16()))
    image = pa.array([[0] * 100], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "image": image}))
    assert "'image' row 0 has 100 pixel values" in error.message
    assert "784" in error.message


def test_decode_names_float_pixel_outside_unit_range() -> None:
    values = np.zeros(32, np.float16)
    values[20] = 2.5
    keep = pa.array([[1], [2]], pa.list_(pa.int16()))
    patches = pa.array([values[:16], values[16:]], pa.list_(pa.float16()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert "'patches' row 1 has pixel value 2.5" in error.message


def test_decode_rejects_nan_pixel() -> None:
    values = np.zeros(16, np.float16)
    values[3] = np.nan
    keep = pa.array([[1]], pa.list_(pa.int16()))
    error = _reject(_stream({"keep": keep, "patches": pa.array([values], pa.list_(pa.float16()))}))
    assert "nan" in error.message


def test_decode_rejects_empty_and_null_keep_rows() -> None:
    patches = pa.array([[0] * 16, []], pa.list_(pa.uint8()))
    empty = _reject(
        _stream({"keep": pa.array([[1], []], pa.list_(pa.int16())), "patches": patches})
    )
    assert "'keep' row 1 is empty" in empty.message
    null = _reject(
        _stream({"keep": pa.array([[1], None], pa.list_(pa.int16())), "patches": patches})
    )
    assert "'keep' row 1 is null" in null.message


def test_decode_rejects_null_pixel_row() -> None:
    keep = pa.array([[1], [2]], pa.list_(pa.int16()))
    patches = pa.array([[0] * 16, None], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert "'patches' row 1 is null" in error.message


def test_decode_rejects_zero_rows() -> None:
    keep = pa.array([], pa.list_(pa.int16()))
    patches = pa.array([], pa.list_(pa.uint8()))
    error = _reject(_stream({"keep": keep, "patches": patches}))
    assert "no rows" in error.message


def test_decode_rejects_too_many_images() -> None:
    body = encode_request(np.zeros((3, 1, 16), np.uint8), np.zeros((3, 1), np.int64))
    error = _reject(body, max_images=2)
    assert (error.status, error.code) == (413, "too_many_images")
    assert "3 images" in error.message


def test_decode_rejects_unknown_protocol_version() -> None:
    columns = {
        "keep": pa.array([[0]], pa.list_(pa.int16())),
        "patches": pa.array([[0] * 16], pa.list_(pa.uint8())),
    }
    error = _reject(_stream(columns, {"protocol_version": "99"}))
    assert error.status == 422
    assert "'99'" in error.message


def test_decode_rejects_unknown_logits_dtype() -> None:
    columns = {
        "keep": pa.array([[0]], pa.list_(pa.int16())),
        "patches": pa.array([[0] * 16], pa.list_(pa.uint8())),
    }
    error = _reject(_stream(columns, {"logits_dtype": "int8"}))
    assert "logits_dtype 'int8'" in error.message


def test_decode_accepts_int32_keep_and_several_batches() -> None:
    schema = pa.schema([("keep", pa.list_(pa.int32())), ("patches", pa.list_(pa.uint8()))])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for index in (4, 9):
            writer.write_batch(
                pa.record_batch(
                    [pa.array([[index]], pa.list_(pa.int32())), pa.array([[index] * 16])],
                    schema=schema,
                )
            )
    decoded = decode_request(sink.getvalue().to_pybytes(), GRID)
    (group,) = decoded.groups
    np.testing.assert_array_equal(group.keep[:, 0], [4, 9])
    np.testing.assert_array_equal(group.pixels[:, 0, 0], [4, 9])


def test_response_round_trip_float16_and_float32() -> None:
    logits = np.linspace(-3, 3, 20, dtype=np.float32).reshape(2, 10)
    for dtype, tolerance in (("float16", 1e-2), ("float32", 0.0)):
        body = encode_response(
            logits, request_id="r", macs_spent=123, macs_saved=45, logits_dtype=dtype
        )
        response = decode_response(body)
        np.testing.assert_allclose(response.logits, logits, atol=tolerance)
        assert response.logits.dtype == np.float32
        assert response.request_id == "r"
        assert (response.macs_spent, response.macs_saved, response.images) == (123, 45, 2)
        assert response.protocol_version == PROTOCOL_VERSION
    table = pa.ipc.open_stream(encode_response(logits, request_id="r", macs_spent=1, macs_saved=0))
    assert table.schema.field("logits").type == pa.list_(pa.float16(), 10)


def test_decode_response_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a valid Arrow IPC stream"):
        decode_response(b"not arrow")


def test_protocol_error_json_and_reduce() -> None:
    error = ProtocolError(503, "overloaded", "busy", retry_after_s=2.0)
    assert error.to_json() == {"error": {"code": "overloaded", "message": "busy"}}
    rebuilt = type(error)(*error.__reduce__()[1])
    assert (rebuilt.status, rebuilt.code, rebuilt.message, rebuilt.retry_after_s) == (
        503,
        "overloaded",
        "busy",
        2.0,
    )


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_stream_is_rejected_before_inflating(compression: str) -> None:
    # 4 MB of zeros compress to a few kilobytes: the decoder must not inflate them.
    table = pa.table(
        {
            "keep": pa.array([[0]], type=pa.list_(pa.int16())),
            "patches": pa.array([np.zeros(4_000_000, np.uint8)], type=pa.list_(pa.uint8())),
        }
    )
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    body = sink.getvalue().to_pybytes()
    assert len(body) < 100_000
    error = _reject(body)
    assert error.status == 400
    assert error.code == "malformed_body"
    assert "compressed" in error.message


def test_more_indices_than_grid_is_422() -> None:
    keep = [np.concatenate([np.arange(49), [0]])]
    body = encode_request([np.zeros((50, GRID.patch_dim), np.uint8)], keep)
    error = _reject(body)
    assert error.status == 422
    assert "50 patch indices" in error.message
    assert "49 patches" in error.message
