"""The background batch iterator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from student_trainer.prefetch import BackgroundIterator


def test_prefetch_keeps_order() -> None:
    with BackgroundIterator(range(10), depth=2) as items:
        assert list(items) == list(range(10))


def test_prefetch_stays_exhausted() -> None:
    items = BackgroundIterator(iter([1]), depth=1)
    assert list(items) == [1]
    assert list(items) == []
    items.close()


def failing_source() -> Iterator[int]:
    yield 1
    raise OSError("shard truncated")


def test_prefetch_reraises_source_error() -> None:
    items = BackgroundIterator(failing_source(), depth=1)
    assert next(items) == 1
    with pytest.raises(OSError, match="shard truncated"):
        next(items)
    items.close()


def test_prefetch_close_stops_endless_source() -> None:
    def endless() -> Iterator[int]:
        value = 0
        while True:
            yield value
            value += 1

    items = BackgroundIterator(endless(), depth=2)
    assert next(items) == 0
    items.close()
    assert not items._thread.is_alive()


def test_prefetch_rejects_zero_depth() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1"):
        BackgroundIterator([], depth=0)
