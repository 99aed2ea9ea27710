"""Per-run usage of the teacher for `GET /v1/runs`: sliding windows and the report.

Lifetime figures come from the cumulative counters and the per-run latency histogram of
`teacher_service.metrics`. Last-minute figures come from a `RecentWindow` that each replica
sums whenever it takes a snapshot, so the collector only adds the replicas' sums. Latency
percentiles are estimated from histogram buckets by linear interpolation inside a bucket.

This module has no Ray dependency.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

# Request latency buckets in seconds, fine enough to read percentiles from.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
)  # fmt: skip
RECENT_WINDOW_S = 60.0
RECENT_SLOT_S = 5.0
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


class Histogram:
    """Observation counts per bucket, plus their sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last slot: above the largest bucket
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total, "count": self.count}


USAGE_FIELDS = ("requests", "images", "patches_kept", "macs_spent", "macs_saved", "errors")


class _Usage:
    """One run's totals in one slot of a `RecentWindow`."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(USAGE_FIELDS, 0.0)
        self.latency = Histogram(LATENCY_BUCKETS)


class RecentWindow:
    """Per-run totals over the last `window_s` seconds, in slots of `slot_s` seconds.

    The window moves one slot at a time, so a summary covers between `window_s - slot_s`
    and `window_s` seconds.

    Args:
        window_s: length of the window in seconds.
        slot_s: length of one slot in seconds.
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        window_s: float = RECENT_WINDOW_S,
        slot_s: float = RECENT_SLOT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.slot_s = slot_s
        self._clock = clock
        self._num_slots = max(1, math.ceil(window_s / slot_s))
        self._slots: deque[tuple[int, dict[str, _Usage]]] = deque()

    def _slot(self) -> dict[str, _Usage]:
        index = int(self._clock() // self.slot_s)
        self._drop_old(index)
        if not self._slots or self._slots[-1][0] != index:
            self._slots.append((index, {}))
        return self._slots[-1][1]

    def _drop_old(self, index: int) -> None:
        while self._slots and self._slots[0][0] <= index - self._num_slots:
            self._slots.popleft()

    def add(self, run_id: str, latency_s: float | None = None, **values: float) -> None:
        """Add `values` (names from USAGE_FIELDS) and one latency to run `run_id`."""
        slot = self._slot()
        usage = slot.get(run_id)
        if usage is None:
            usage = slot[run_id] = _Usage()
        for name, value in values.items():
            usage.values[name] += value
        if latency_s is not None:
            usage.latency.observe(latency_s)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Return, per run, the window's totals and latency histogram (JSON-compatible)."""
        self._drop_old(int(self._clock() // self.slot_s))
        totals: dict[str, dict[str, Any]] = {}
        for _, slot in self._slots:
            for run_id, usage in slot.items():
                merged = totals.setdefault(run_id, empty_usage())
                add_usage(merged, {**usage.values, "latency": usage.latency.to_json()})
        return totals


def empty_usage() -> dict[str, Any]:
    latency = {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}
    return {**dict.fromkeys(USAGE_FIELDS, 0.0), "latency": latency}


def add_usage(target: dict[str, Any], usage: dict[str, Any]) -> None:
    for name in USAGE_FIELDS:
        target[name] += float(usage.get(name, 0.0))
    add_histogram(target["latency"], usage["latency"])


def add_histogram(target: dict[str, Any], hist: dict[str, Any]) -> None:
    target["counts"] = [a + b for a, b in zip(target["counts"], hist["counts"], strict=True)]
    target["sum"] += float(hist["sum"])
    target["count"] += int(hist["count"])


# Counter families that make up a run's lifetime usage, and where the run_id label sits.
_USAGE_COUNTERS = {
    "requests": ("maskedkd_teacher_requests_total", 0),
    "images": ("maskedkd_teacher_images_total", 0),
    "patches_kept": ("maskedkd_teacher_patches_kept_total", 0),
    "macs_spent": ("maskedkd_teacher_macs_spent_total", 0),
    "macs_saved": ("maskedkd_teacher_macs_saved_total", 0),
    "errors": ("maskedkd_teacher_errors_total", 2),
}


def runs_report(merged: dict[str, Any], fresh: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Build the `GET /v1/runs` report.

    Args:
        merged: all replicas' snapshots merged by `merge_snapshots` (lifetime figures).
        fresh: the snapshots of replicas that reported recently (last-minute figures and
            images in flight).

    Returns:
        {"window_s", "replicas", "runs": [...], "totals": {...}}. Each run has "run_id",
        "active", "images_in_flight", "lifetime" and "last_minute". A run is active after a
        request, served or rejected, in the last minute, or with images in flight. The two
        usage dicts contain requests, images, patches_kept, macs_spent, macs_saved, errors
        and latency_s (p50, p95 and p99 in seconds, or None without requests). Active runs
        come first, then by lifetime images, most first.
    """
    lifetime: dict[str, dict[str, Any]] = {}
    counters = merged.get("counters", {})
    for field_name, (family_name, run_position) in _USAGE_COUNTERS.items():
        for labels, value in counters.get(family_name, []):
            usage = lifetime.setdefault(labels[run_position], empty_usage())
            usage[field_name] += float(value)
    latency_series = merged.get("labeled_histograms", {}).get(
        "maskedkd_teacher_request_seconds", []
    )
    for labels, hist in latency_series:
        add_histogram(lifetime.setdefault(labels[0], empty_usage())["latency"], hist)

    recent: dict[str, dict[str, Any]] = {}
    in_flight: dict[str, int] = {}
    for snapshot in fresh:
        for run_id, usage in snapshot.get("recent", {}).items():
            add_usage(recent.setdefault(run_id, empty_usage()), usage)
        for run_id, images in snapshot.get("run_images_in_flight", {}).items():
            in_flight[run_id] = in_flight.get(run_id, 0) + int(images)

    runs: list[dict[str, Any]] = []
    total_lifetime, total_recent = empty_usage(), empty_usage()
    for run_id in set(lifetime) | set(recent) | set(in_flight):
        run_lifetime = lifetime.get(run_id, empty_usage())
        run_recent = recent.get(run_id, empty_usage())
        add_usage(total_lifetime, run_lifetime)
        add_usage(total_recent, run_recent)
        images_in_flight = in_flight.get(run_id, 0)
        runs.append(
            {
                "run_id": run_id,
                # Rejected requests count too: a run whose requests all fail is still sending.
                "active": run_recent["requests"] + run_recent["errors"] > 0 or images_in_flight > 0,
                "images_in_flight": images_in_flight,
                "lifetime": _usage_view(run_lifetime),
                "last_minute": _usage_view(run_recent),
            }
        )
    runs.sort(key=lambda run: (not run["active"], -run["lifetime"]["images"], run["run_id"]))
    return {
        "window_s": RECENT_WINDOW_S,
        "replicas": len(fresh),
        "runs": runs,
        "totals": {
            "images_in_flight": sum(in_flight.values()),
            "lifetime": _usage_view(total_lifetime),
            "last_minute": _usage_view(total_recent),
        },
    }


def _usage_view(usage: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {name: int(usage[name]) for name in USAGE_FIELDS}
    latency = usage["latency"]
    view["latency_s"] = (
        {
            name: histogram_quantile(LATENCY_BUCKETS, latency["counts"], quantile)
            for name, quantile in QUANTILES
        }
        if latency["count"]
        else None
    )
    return view


def histogram_quantile(
    buckets: Sequence[float], counts: Sequence[int], quantile: float
) -> float | None:
    """Estimate a quantile from histogram counts, interpolating linearly inside a bucket.

    Args:
        buckets: upper bounds of the buckets, ascending; the first bucket starts at 0.
        counts: observations per bucket (not cumulative), plus one above the last bound.
        quantile: in [0, 1].

    Returns:
        The estimate, the last bound for observations above it, or None without any.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = quantile * total
    cumulative = 0
    for index, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if index == len(buckets):
                return float(buckets[-1])
            lower = float(buckets[index - 1]) if index else 0.0
            upper = float(buckets[index])
            return lower + (upper - lower) * max(0.0, rank - cumulative) / count
        cumulative += count
    return float(buckets[-1])
