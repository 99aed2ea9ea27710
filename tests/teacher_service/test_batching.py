"""Fair batching over runs and merging decoded requests into one engine batch (no Ray)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
import torch

from teacher_service.batching import FairBatcher, FairQueue, run_requests
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


# -- Fair queue ----------------------------------------------------------------------------


def _queue(*runs: tuple[str, int, int]) -> FairQueue[str]:
    """Fill a queue; each run is (name, request count, images per request), run by run."""
    queue: FairQueue[str] = FairQueue()
    for name, count, images in runs:
        for index in range(count):
            queue.put(name, f"{name}{index}", images)
    return queue


def _drain(queue: FairQueue[str], max_images: int) -> list[list[str]]:
    batches = []
    while len(queue):
        batches.append(queue.take(max_images))
    return batches


def test_fair_queue_small_run_not_starved_by_flood() -> None:
    # The flooding run queued all its large requests first; FIFO would serve them first.
    queue = _queue(("big", 6, 64), ("small", 6, 8))
    batches = _drain(queue, 128)
    assert batches == [
        ["small0", "small1", "small2", "small3", "small4", "small5", "big0"],
        ["big1", "big2"],
        ["big3", "big4"],
        ["big5"],
    ]


def test_fair_queue_interleaves_by_images() -> None:
    # Both runs stay backlogged: per batch, each gets half of the images.
    queue = _queue(("big", 8, 16), ("small", 32, 4))
    first = queue.take(64)
    assert first[:4] == ["small0", "small1", "small2", "big0"]
    for _ in range(3):
        batch = queue.take(64)
        images: Counter[str] = Counter()
        for item in batch:
            images[item.rstrip("0123456789")] += 16 if item.startswith("big") else 4
        assert images["big"] == 32, batch
        assert images["small"] == 32, batch


def test_fair_queue_equal_images_for_three_sizes() -> None:
    sizes = {"one": 1, "eight": 8, "thirty-two": 32}
    queue = _queue(*((name, 2048 // size, size) for name, size in sizes.items()))
    served: Counter[str] = Counter()
    for _ in range(40):  # 40 batches of 64: every run stays backlogged throughout
        for item in queue.take(64):
            name = item.rstrip("0123456789")
            served[name] += sizes[name]
    total = sum(served.values())
    assert total == 40 * 64
    for name, size in sizes.items():
        # Deficit round robin keeps each run within about one request of an equal share.
        assert abs(served[name] - total / 3) <= 32 + size, served


def test_fair_queue_single_run_is_fifo() -> None:
    queue = _queue(("only", 5, 3))
    assert queue.take(9) == ["only0", "only1", "only2"]
    assert queue.images == 6
    assert queue.take(100) == ["only3", "only4"]
    assert len(queue) == 0
    assert queue.take(10) == []


def test_fair_queue_blocked_request_goes_first_next_batch() -> None:
    queue = _queue(("a", 1, 6), ("b", 5, 2))
    # By the time "a" has earned credit for its 6 images, only 2 images of room are left,
    # so b2 fills them, and the next batch starts with "a".
    assert queue.take(6) == ["b0", "b1", "b2"]
    assert queue.run_ids() == ["a", "b"]
    assert queue.take(6) == ["a0"]
    assert queue.take(6) == ["b3", "b4"]


def test_fair_queue_new_run_waits_one_turn() -> None:
    queue = _queue(("a", 3, 2), ("b", 3, 2))
    assert queue.take(2) == ["a0"]
    queue.put("c", "c0", 2)
    assert queue.run_ids() == ["b", "a", "c"]
    assert queue.take(6) == ["b0", "a1", "c0"]


def test_fair_queue_rejects_invalid_sizes() -> None:
    queue: FairQueue[str] = FairQueue()
    with pytest.raises(ValueError, match="at least 1 image, got 0"):
        queue.put("a", "x", 0)
    with pytest.raises(ValueError, match="max_images must be at least 1, got 0"):
        queue.take(0)


# -- Fair batcher ----------------------------------------------------------------------------


def test_fair_batcher_merges_runs_fairly() -> None:
    batches: list[list[str]] = []

    async def run_batch(items: list[str]) -> list[str]:
        batches.append(items)
        return [f"logits of {item}" for item in items]

    async def main() -> list[str]:
        batcher: FairBatcher[str, str] = FairBatcher(
            run_batch, max_batch_images=32, batch_wait_s=60.0
        )
        # Every request is queued before the batching task first runs, so the batches do
        # not depend on timing: they close because they are full, never on the wait.
        calls = [batcher.submit("flood", f"f{index}", 16) for index in range(4)]
        calls += [batcher.submit("trickle", f"t{index}", 4) for index in range(4)]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    assert results == [f"logits of {item}" for item in ("f0", "f1", "f2", "f3")] + [
        f"logits of {item}" for item in ("t0", "t1", "t2", "t3")
    ]
    # The trickle run's requests all run in the first batch, beside one flood request.
    assert batches[0] == ["t0", "t1", "t2", "f0", "t3"]
    assert [item for batch in batches[1:] for item in batch] == ["f1", "f2", "f3"]


def test_fair_batcher_passes_batch_failure_to_callers() -> None:
    async def run_batch(items: list[str]) -> list[str]:
        if "bad" in items:
            raise RuntimeError("device lost")
        return items

    async def main() -> tuple[BaseException | str, str]:
        batcher: FairBatcher[str, str] = FairBatcher(
            run_batch, max_batch_images=1, batch_wait_s=0.0
        )
        failed = await asyncio.gather(batcher.submit("a", "bad", 1), return_exceptions=True)
        return failed[0], await batcher.submit("a", "good", 1)

    failure, result = asyncio.run(main())
    assert isinstance(failure, RuntimeError)
    assert str(failure) == "device lost"
    assert result == "good"


def test_fair_batcher_rejects_invalid_settings() -> None:
    async def run_batch(items: list[str]) -> list[str]:
        return items

    with pytest.raises(ValueError, match="max_batch_images must be at least 1"):
        FairBatcher(run_batch, max_batch_images=0, batch_wait_s=0.0)
    with pytest.raises(ValueError, match="batch_wait_s not negative"):
        FairBatcher(run_batch, max_batch_images=1, batch_wait_s=-1.0)
