"""Fair batching of many student runs' requests, and the engine call for one batch.

Fairness policy. Each replica keeps one queue per run (the request's `run_id`; requests
without one share the run ""). When a batch is formed, the runs take turns in a fixed ring
(deficit round robin, counted in images). On each turn a run is credited the image count
of the smallest request then waiting in any run, and sends requests from the head of its
queue while its credit covers them. So the run with the smallest requests sends about one
request per turn, and a run whose requests are k times larger sends one about every k
turns. Runs that keep requests waiting get equal images over time, whatever their request
sizes. A request is never split. When the next request of a run is larger than the room
left in the batch, the batch takes smaller requests of other runs, and the next batch
starts with that run. A run's unused credit is dropped when its queue empties.

A batch closes when the waiting requests fill `max_batch_images`, or `batch_wait_s` after
the oldest waiting request arrived. One batch computes at a time, and the next one fills
while it runs.

Engine step. Rows of all requests in a batch are grouped by (pixel column, kept count,
pixel dtype), each group runs as one engine forward, and every request gets its rows back
in its own order. This module needs torch but not Ray, so the merging can be tested
without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from teacher_service.engine import MaskedTeacher
from teacher_service.protocol import DecodedRequest, ProtocolError, RowGroup

logger = logging.getLogger(__name__)

GroupKey = tuple[str, int, str]
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def run_requests(
    engine: MaskedTeacher, requests: Sequence[DecodedRequest]
) -> list[np.ndarray | ProtocolError]:
    """Run the teacher on every row of several requests, with one forward per row group.

    Args:
        engine: the masked teacher.
        requests: decoded, validated requests.

    Returns:
        Per request, float32 logits [num_images, num_classes] in request row order, or
        a 422 `ProtocolError` when the engine rejected that request's rows.
    """
    outputs: list[np.ndarray | ProtocolError] = [
        np.empty((request.num_images, engine.num_classes), dtype=np.float32) for request in requests
    ]
    buckets: dict[GroupKey, list[tuple[int, RowGroup]]] = {}
    for request_index, request in enumerate(requests):
        for group in request.groups:
            key = (group.kind, group.keep_count, str(group.pixels.dtype))
            buckets.setdefault(key, []).append((request_index, group))

    for members in buckets.values():
        try:
            logits: np.ndarray | None = forward_groups(engine, [group for _, group in members])
        except ValueError as err:
            # The decoder validated every row, so this is not expected. Retry each request
            # alone, so that one bad request cannot fail the others in its batch.
            logger.warning("merged forward of %d requests failed: %s", len(members), err)
            logits = None
        offset = 0
        for request_index, group in members:
            output = outputs[request_index]
            count = len(group.rows)
            if isinstance(output, ProtocolError):
                pass
            elif logits is not None:
                output[group.rows] = logits[offset : offset + count]
            else:
                try:
                    output[group.rows] = forward_groups(engine, [group])
                except ValueError as err:
                    outputs[request_index] = ProtocolError(422, "invalid_content", str(err))
            offset += count
    return outputs


def forward_groups(engine: MaskedTeacher, groups: Sequence[RowGroup]) -> np.ndarray:
    """Run the engine on row groups that share pixel column, kept count and dtype.

    Returns:
        float32 logits [sum of group sizes, num_classes], groups in the given order.
    """
    pixels = torch.from_numpy(np.concatenate([group.pixels for group in groups]))
    keep = torch.from_numpy(np.concatenate([group.keep for group in groups]))  # [n, K]
    if groups[0].kind == "patches":
        logits = engine.forward_patches(pixels, keep)  # pixels [n, K, C*ph*pw]
    else:
        logits = engine.forward_images(pixels, keep)  # pixels [n, C, H, W]
    return logits.cpu().numpy()


@dataclass
class _Waiting(Generic[_Item]):
    item: _Item
    images: int


@dataclass
class _RunQueue(Generic[_Item]):
    waiting: deque[_Waiting[_Item]] = field(default_factory=deque)
    credit_images: int = 0


class FairQueue(Generic[_Item]):
    """Requests of several runs, taken out in batches by deficit round robin over runs.

    The module docstring states the policy. The queue is not thread-safe; the replica uses
    it from its event loop only.
    """

    def __init__(self) -> None:
        self._runs: dict[str, _RunQueue[_Item]] = {}
        self._ring: deque[str] = deque()  # runs with waiting requests, the next turn first
        self._images = 0

    def __len__(self) -> int:
        return sum(len(run.waiting) for run in self._runs.values())

    @property
    def images(self) -> int:
        """Images in all waiting requests."""
        return self._images

    def run_ids(self) -> list[str]:
        """Return the runs with waiting requests, in the order of their next turns."""
        return list(self._ring)

    def heads(self) -> list[_Item]:
        """Return the oldest waiting request of each run."""
        return [run.waiting[0].item for run in self._runs.values()]

    def put(self, run_id: str, item: _Item, images: int) -> None:
        """Append a request of `images` images to the queue of run `run_id`."""
        if images < 1:
            raise ValueError(f"a queued request must hold at least 1 image, got {images}")
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = _RunQueue()
            self._ring.append(run_id)  # a new run takes its first turn after the others
        run.waiting.append(_Waiting(item, images))
        self._images += images

    def take(self, max_images: int) -> list[_Item]:
        """Remove and return up to `max_images` images of requests, the runs taking turns.

        Returns:
            The requests in the order they were taken; empty when nothing is waiting.
        """
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        taken: list[_Item] = []
        room = max_images
        first_blocked: str | None = None
        while self._ring and room > 0:
            credit_images = min(run.waiting[0].images for run in self._runs.values())
            took_any = False
            all_blocked = True
            # One pass: every run with waiting requests gets one turn.
            for _ in range(len(self._ring)):
                run_id = self._ring[0]
                run = self._runs[run_id]
                if run.waiting[0].images > run.credit_images:
                    run.credit_images += credit_images
                while run.waiting and run.waiting[0].images <= min(run.credit_images, room):
                    waiting = run.waiting.popleft()
                    run.credit_images -= waiting.images
                    room -= waiting.images
                    self._images -= waiting.images
                    taken.append(waiting.item)
                    took_any = True
                if not run.waiting:
                    del self._runs[run_id]
                    self._ring.popleft()
                    continue
                head_images = run.waiting[0].images
                if head_images <= run.credit_images and head_images > room:
                    # Credit is there but the batch is full for this request: it goes first
                    # in the next batch.
                    first_blocked = first_blocked or run_id
                else:
                    all_blocked = False
                self._ring.rotate(-1)
            if not took_any and all_blocked:
                break
        if first_blocked is not None and first_blocked in self._runs:
            while self._ring[0] != first_blocked:
                self._ring.rotate(-1)
        return taken


@dataclass
class _Pending(Generic[_Item, _Result]):
    item: _Item
    future: asyncio.Future[_Result]
    arrived_s: float


class FairBatcher(Generic[_Item, _Result]):
    """Merge requests of many runs into engine batches, fairly, on one event loop.

    `submit` queues a request in its run's queue and waits for its result. One background
    task forms batches from the `FairQueue` (see the module docstring) and runs them one at
    a time with `run_batch`, which returns one result per request, in order.

    Args:
        run_batch: coroutine function that computes a batch of requests.
        max_batch_images: images at which a batch closes without waiting.
        batch_wait_s: seconds a batch waits for more requests after its oldest arrived.
    """

    def __init__(
        self,
        run_batch: Callable[[list[_Item]], Awaitable[Sequence[_Result]]],
        *,
        max_batch_images: int,
        batch_wait_s: float,
    ) -> None:
        if max_batch_images < 1 or batch_wait_s < 0:
            raise ValueError(
                "max_batch_images must be at least 1 and batch_wait_s not negative, got "
                f"{max_batch_images} and {batch_wait_s}"
            )
        self._run_batch = run_batch
        self.max_batch_images = max_batch_images
        self.batch_wait_s = batch_wait_s
        self._queue: FairQueue[_Pending[_Item, _Result]] = FairQueue()
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (not counting the batch computing now)."""
        return self._queue.images

    async def submit(self, run_id: str, item: _Item, images: int) -> _Result:
        """Queue one request of `images` images for run `run_id` and return its result."""
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._form_batches())
        future: asyncio.Future[_Result] = loop.create_future()
        self._queue.put(run_id, _Pending(item, future, time.monotonic()), images)
        self._changed.set()
        return await future

    async def _form_batches(self) -> None:
        assert self._changed is not None
        while True:
            await self._wait_for_batch()
            pending = self._queue.take(self.max_batch_images)
            # Callers that went away (a closed connection) need no compute.
            live = [p for p in pending if not p.future.done()]
            if not live:
                continue
            try:
                results = list(await self._run_batch([p.item for p in live]))
                if len(results) != len(live):
                    raise RuntimeError(
                        f"run_batch returned {len(results)} results for {len(live)} requests"
                    )
            except Exception as err:  # pass the failure to every caller, keep batching
                logger.exception("batch of %d requests failed", len(live))
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, result in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)

    async def _wait_for_batch(self) -> None:
        """Return when a batch should close: it is full, or its oldest request waited enough."""
        assert self._changed is not None
        while True:
            self._changed.clear()
            if self._queue.images >= self.max_batch_images:
                return
            oldest_s = self._oldest_arrival_s()
            if oldest_s is None:
                await self._changed.wait()
                continue
            remaining_s = oldest_s + self.batch_wait_s - time.monotonic()
            if remaining_s <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining_s)
            except TimeoutError:
                return

    def _oldest_arrival_s(self) -> float | None:
        arrivals = [pending.arrived_s for pending in self._queue.heads()]
        return min(arrivals) if arrivals else None
