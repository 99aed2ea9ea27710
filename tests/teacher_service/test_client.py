"""Client SDK behaviour that needs no running service: encoding, input checks, retries.

The client against a real service (HTTP and Ray handle) is tested in test_service.py,
which starts Ray once for all service tests.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from teacher_service.checkpoint import load_teacher
from teacher_service.client import (
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailableError,
    encode_images,
)
from teacher_service.engine import MaskedTeacher
from teacher_service.patches import PatchGrid
from teacher_service.protocol import decode_request

GRID = PatchGrid(img_size=(28, 28), patch_size=(4, 4), in_chans=1)
RGB_GRID = PatchGrid(img_size=(16, 16), patch_size=(8, 8), in_chans=3)


@pytest.fixture(scope="module")
def rgb_engine() -> MaskedTeacher:
    model, spec = load_teacher(
        "vit_tiny_patch16_224",
        random_init=True,
        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 1},
    )
    return MaskedTeacher(model, spec)


def _closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket closes


def test_encode_images_sends_engine_patches(rgb_engine: MaskedTeacher) -> None:
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    keep = torch.tensor([[0, 3], [2, 1], [3, 0]])
    decoded = decode_request(encode_images(images, keep, RGB_GRID), RGB_GRID)
    (group,) = decoded.groups
    assert group.pixels.dtype == np.uint8
    expected = rgb_engine.gather_patches(images, keep).numpy()
    np.testing.assert_array_equal(group.pixels, expected)
    np.testing.assert_array_equal(group.keep, keep.numpy())


def test_encode_images_ragged_keep_rows(rgb_engine: MaskedTeacher) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    keep = [np.array([3]), torch.tensor([0, 1, 2])]
    decoded = decode_request(encode_images(images, keep, RGB_GRID), RGB_GRID)
    assert decoded.keep_counts == [1, 3]
    for group in decoded.groups:
        row = int(group.rows[0])
        row_keep = torch.as_tensor(keep[row]).reshape(1, -1)
        expected = rgb_engine.gather_patches(torch.from_numpy(images[row : row + 1]), row_keep)
        np.testing.assert_array_equal(group.pixels, expected.numpy())


def test_encode_images_float_goes_as_float16() -> None:
    images = torch.rand(2, 1, 28, 28)
    decoded = decode_request(encode_images(images, torch.tensor([[0], [48]]), GRID), GRID)
    assert decoded.pixel_dtype == "float16"
    (group,) = decoded.groups
    expected = images[1, 0, 24:28, 24:28].reshape(-1).half().numpy()
    np.testing.assert_array_equal(group.pixels[1, 0], expected)


def test_encode_images_accepts_bfloat16_tensors() -> None:
    images = torch.rand(1, 1, 28, 28).bfloat16()
    decoded = decode_request(encode_images(images, torch.tensor([[5]]), GRID), GRID)
    assert decoded.pixel_dtype == "float16"


def test_encode_images_rejects_normalised_floats() -> None:
    images = torch.randn(1, 1, 28, 28) * 3
    with pytest.raises(ValueError, match="unnormalised pixels in \\[0, 1\\]"):
        encode_images(images, torch.tensor([[0]]), GRID)


def test_encode_images_rejects_int32_pixels() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_images(np.zeros((1, 1, 28, 28), np.int32), np.array([[0]]), GRID)


def test_encode_images_rejects_wrong_image_shape() -> None:
    with pytest.raises(ValueError, match="shape \\[B, 1, 28, 28\\]"):
        encode_images(np.zeros((1, 3, 28, 28), np.uint8), np.array([[0]]), GRID)


def test_encode_images_rejects_out_of_grid_index() -> None:
    with pytest.raises(ValueError, match="patch index 49"):
        encode_images(np.zeros((1, 1, 28, 28), np.uint8), np.array([[49]]), GRID)


def test_encode_images_rejects_keep_row_count_mismatch() -> None:
    with pytest.raises(ValueError, match="keep has 2 rows for 1 images"):
        encode_images(np.zeros((1, 1, 28, 28), np.uint8), np.array([[0], [1]]), GRID)


def test_client_rejects_invalid_settings() -> None:
    with pytest.raises(ValueError, match="logits_dtype"):
        TeacherClient("http://127.0.0.1:1", logits_dtype="int8")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        TeacherClient("http://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        TeacherClient("127.0.0.1:8000")


def test_connection_refused_raises_unavailable_after_retries() -> None:
    client = TeacherClient(_closed_port_url(), retries=2, backoff_s=0.01, timeout_s=5.0)
    with client, pytest.raises(TeacherUnavailableError) as caught:
        client.info()
    assert caught.value.status is None
    assert "after 3 attempt(s)" in str(caught.value)
    assert "ConnectError" in str(caught.value)
    assert "check that the teacher service runs at" in str(caught.value)


def test_deadline_stops_retries_early() -> None:
    # The first wait (20-40 s of backoff) would end after the deadline, so it is not taken.
    client = TeacherClient(
        _closed_port_url(), retries=5, backoff_s=40.0, max_backoff_s=40.0, deadline_s=5.0
    )
    with client, pytest.raises(TeacherUnavailableError) as caught:
        client.info()
    assert "after 1 attempt(s)" in str(caught.value)


def test_backoff_honours_retry_after_and_cap() -> None:
    client = TeacherClient("http://127.0.0.1:1", backoff_s=0.1, max_backoff_s=5.0)
    with client:
        assert client._backoff_delay(0, retry_after_s=2.0) == 2.0
        assert client._backoff_delay(0, retry_after_s=60.0) == 5.0
        for attempt in range(8):
            delay = client._backoff_delay(attempt, retry_after_s=None)
            full = min(0.1 * 2**attempt, 5.0)
            assert full / 2 <= delay <= full


def test_request_error_carries_status_code_message() -> None:
    error = TeacherRequestError(422, "invalid_content", "column 'keep' row 2 ...")
    assert (error.status, error.code) == (422, "invalid_content")
    assert "422 invalid_content" in str(error)
