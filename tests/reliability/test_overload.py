"""Overload: a burst far past a replica's capacity is shed, memory stays bounded, and the
service recovers.

The application admits 16 images in flight per replica (`max_images_in_flight`), Serve
routes at most 16 concurrent requests to it (`max_ongoing_requests`) and queues at most 16
more (`max_queued_requests`). The burst sends 240 concurrent 4-image requests at once.
Shed requests get 429 or 503. The service's own JSON errors carry `Retry-After`. Serve's
proxy rejects requests past its queue with a plain-text 503 of its own, without
`Retry-After`. The client SDK retries those with exponential backoff instead.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import torch

from teacher_service.engine import MaskedTeacher
from tests.reliability.helpers import (
    FLOAT16_TOLERANCE,
    DeployedApp,
    LocalServe,
    actor_pids,
    arrow_headers,
    decode_logits,
    deployed_app,
    images,
    keep_rows,
    replica_pids,
    rss_bytes,
    valid_body,
    write_teacher,
    write_token,
)

APP = "overload"
BURST_REQUESTS = 240
IMAGES_PER_REQUEST = 4
SHED_STATUSES = (429, 503)
# Generous on purpose: the point is that memory does not grow with the burst's size. The
# burst's 240 bodies and responses are a few hundred kilobytes in all.
MAX_RSS_GROWTH_BYTES = 256 * 1024 * 1024


@dataclass
class Overloaded:
    app: DeployedApp
    engine: MaskedTeacher


@dataclass
class BurstResult:
    statuses: Counter[int] = field(default_factory=Counter)
    shed_with_retry_after: int = 0
    shed_json: int = 0
    shed_total: int = 0
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def overloaded(
    shared_serve: LocalServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Overloaded]:
    folder = tmp_path_factory.mktemp("overload")
    teacher_path = write_teacher(folder)
    args = {
        "teacher": str(teacher_path),
        "num_cpus": 0,
        "token_file": str(write_token(folder)),
        "max_batch_images": 8,
        "max_images_per_request": 8,
        "max_images_in_flight": 16,
        "max_ongoing_requests": 16,
        "max_queued_requests": 16,
        "batch_wait_ms": 20.0,
        "retry_after_s": 1.0,
    }
    with deployed_app(shared_serve, APP, args) as app:
        yield Overloaded(app=app, engine=MaskedTeacher.from_source(str(teacher_path)))


async def _burst(url: str, count: int) -> BurstResult:
    result = BurstResult()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=300.0) as client:
        bodies = [valid_body(IMAGES_PER_REQUEST, 6, seed) for seed in range(count)]
        start = asyncio.Event()

        async def send(body: bytes) -> None:
            await start.wait()
            try:
                response = await client.post(
                    f"{url}/v1/logits", content=body, headers=arrow_headers()
                )
            except httpx.TransportError as error:
                result.errors.append(f"{type(error).__name__}: {error}")
                return
            result.statuses[response.status_code] += 1
            if response.status_code in SHED_STATUSES:
                result.shed_total += 1
                result.shed_with_retry_after += "retry-after" in response.headers
                if response.headers.get("content-type", "").startswith("application/json"):
                    result.shed_json += 1
                    assert "retry-after" in response.headers, response.text

        tasks = [asyncio.create_task(send(body)) for body in bodies]
        start.set()
        await asyncio.gather(*tasks)
    return result


def _assert_correct_sequence(overloaded: Overloaded, count: int) -> None:
    for seed in range(count):
        response = httpx.post(
            f"{overloaded.app.url}/v1/logits",
            content=valid_body(2, 5, 1000 + seed, logits_dtype="float32"),
            headers=arrow_headers(),
            timeout=120.0,
        )
        assert response.status_code == 200, response.text
        expected = overloaded.engine.forward_images(
            torch.as_tensor(images(2, 1000 + seed)), torch.as_tensor(keep_rows(2, 5, 1000 + seed))
        )
        np.testing.assert_allclose(
            decode_logits(response.content), expected.numpy(), **FLOAT16_TOLERANCE
        )


def test_burst_is_shed_then_recovers(overloaded: Overloaded) -> None:
    # Warm up, so that the "before" size includes the allocator's steady state.
    _assert_correct_sequence(overloaded, 5)
    (pid,) = replica_pids(APP)
    (proxy_pid,) = actor_pids("ProxyActor")
    rss_before, proxy_rss_before = rss_bytes(pid), rss_bytes(proxy_pid)

    result = asyncio.run(_burst(overloaded.app.url, BURST_REQUESTS))

    assert not result.errors, result.errors[:5]
    assert set(result.statuses) <= {200, *SHED_STATUSES}, result.statuses
    assert sum(result.statuses.values()) == BURST_REQUESTS
    assert result.shed_total > 0, f"nothing was shed: {result.statuses}"
    assert result.statuses[200] > 0
    assert replica_pids(APP) == [pid], "the replica restarted under load"
    rss_after, proxy_rss_after = rss_bytes(pid), rss_bytes(proxy_pid)
    assert rss_after - rss_before < MAX_RSS_GROWTH_BYTES
    assert proxy_rss_after - proxy_rss_before < MAX_RSS_GROWTH_BYTES

    # Recovery: a normal sequence afterwards all succeeds, with correct logits.
    _assert_correct_sequence(overloaded, 20)
    measured = {
        "burst_requests": BURST_REQUESTS,
        "statuses": {str(status): n for status, n in sorted(result.statuses.items())},
        "shed_as_json_with_retry_after": result.shed_json,
        "shed_with_retry_after": result.shed_with_retry_after,
        "shed_total": result.shed_total,
        "replica_rss_mib": [round(rss_before / 2**20, 1), round(rss_after / 2**20, 1)],
        "proxy_rss_mib": [round(proxy_rss_before / 2**20, 1), round(proxy_rss_after / 2**20, 1)],
    }
    print("overload:", json.dumps(measured))  # shown with pytest -s; docs/reliability.md
