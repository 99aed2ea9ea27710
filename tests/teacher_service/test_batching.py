"""Merging several decoded requests into one engine batch (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_service.batching import run_requests
from teacher_service.checkpoint import load_teacher
from teacher_service.engine import MaskedTeacher
from teacher_service.patches import PatchGrid, gather_patches
from teacher_service.protocol import (
    DecodedRequest,
    ProtocolError,
    RowGroup,
    decode_request,
    encode_request,
)

GRID = PatchGrid(img_size=(28, 28), patch_size=(4, 4), in_chans=1)
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def engine() -> MaskedTeacher:
    torch.manual_seed(0)
    model, spec = load_teacher(
        "vit_tiny_patch16_224",
        random_init=True,
        model_kwargs={
            "img_size": 28,
            "patch_size": 4,
            "in_chans": 1,
            "num_classes": 10,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
        },
    )
    return MaskedTeacher(model, spec)


def _images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 1, 28, 28), dtype=np.uint8)


def _keep_rows(counts: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(49)[:count] for count in counts]


def _patch_request(images: np.ndarray, keep: list[np.ndarray], dtype: str) -> DecodedRequest:
    pixels = [gather_patches(images[i : i + 1], row[None], GRID)[0] for i, row in enumerate(keep)]
    if dtype == "float16":
        pixels = [(row / 255.0).astype(np.float16) for row in pixels]
    return decode_request(encode_request(pixels, keep), GRID)


def test_merged_requests_match_separate_forwards(engine: MaskedTeacher) -> None:
    images_a, keep_a = _images(3, 1), _keep_rows([5, 10, 5], 1)
    images_b, keep_b = _images(2, 2), _keep_rows([10, 49], 2)
    images_c = _images(2, 3)
    requests = [
        _patch_request(images_a, keep_a, "uint8"),
        _patch_request(images_b, keep_b, "float16"),
        decode_request(encode_request(images_c, None, kind="image"), GRID),
        _patch_request(images_a, keep_a, "uint8"),  # same kept counts as the first
    ]
    outputs = run_requests(engine, requests)

    expected_a = engine.forward_images(
        torch.from_numpy(images_a), [torch.from_numpy(k) for k in keep_a]
    )
    pixels_b = torch.from_numpy((images_b / 255.0).astype(np.float16)).float()
    expected_b = engine.forward_images(pixels_b, [torch.from_numpy(k) for k in keep_b])
    expected_c = engine.forward_images(torch.from_numpy(images_c), None)
    for output, expected in zip(
        outputs, (expected_a, expected_b, expected_c, expected_a), strict=True
    ):
        assert isinstance(output, np.ndarray)
        assert output.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(output), expected, **TOLERANCE)


def test_engine_rejection_fails_only_its_request(engine: MaskedTeacher) -> None:
    good = _patch_request(_images(2, 4), _keep_rows([7, 7], 4), "uint8")
    # Built by hand, past the decoder's checks: index 60 is off the 7x7 grid.
    bad_group = RowGroup(
        rows=np.array([0]),
        keep=np.array([[1, 2, 3, 4, 5, 6, 60]]),
        pixels=np.zeros((1, 7, 16), np.uint8),
        kind="patches",
    )
    bad = DecodedRequest(
        groups=[bad_group], num_images=1, patches_kept=7, patches_total=49, request_id="bad"
    )
    outputs = run_requests(engine, [good, bad])
    assert isinstance(outputs[0], np.ndarray)
    assert isinstance(outputs[1], ProtocolError)
    assert outputs[1].status == 422
    assert "60" in outputs[1].message
