"""Load the next batches in a background thread while the current step runs."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()


class BackgroundIterator(Generic[T]):
    """Iterate `source` in a daemon thread, holding up to `depth` items ready.

    An exception raised by `source` is raised again in the consuming thread. Call
    `close()` (or leave the `with` block) to stop the thread early.

    Args:
        source: any iterable, such as a WebDataset pipeline.
        depth: items read ahead.
    """

    def __init__(self, source: Iterable[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(source,), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        # Retry with a timeout so that close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._queue.put(item)  # later calls raise the same way
            if isinstance(item, BaseException):
                raise item
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the producer thread and drop the items it read ahead."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()

    def __enter__(self) -> BackgroundIterator[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
