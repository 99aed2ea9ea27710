"""Prometheus rendering, cross-replica merging and the per-run usage report."""

from __future__ import annotations

import pytest

from teacher_service.metrics import (
    FAMILIES,
    OTHER_RUN_ID,
    MetricsStore,
    ReplicaMetrics,
    merge_snapshots,
    render_prometheus,
)
from teacher_service.run_usage import LATENCY_BUCKETS, RecentWindow, histogram_quantile


class _Clock:
    """A settable monotonic clock for `RecentWindow`."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _record(
    metrics: ReplicaMetrics, run_id: str | None, images: int, latency_s: float | None = None
) -> None:
    metrics.record_request(
        run_id=run_id,
        transport="http",
        images=images,
        patches_kept=images * 10,
        patches_total=images * 49,
        macs_spent=images * 100,
        macs_saved=images * 50,
        body_bytes=images * 1000,
        latency_s=latency_s,
    )


def test_render_has_help_and_type_for_every_family() -> None:
    text = render_prometheus(ReplicaMetrics().snapshot())
    for family in FAMILIES:
        assert f"# HELP {family.name} " in text
        assert f"# TYPE {family.name} {family.kind}" in text


def test_counters_by_run_id() -> None:
    metrics = ReplicaMetrics()
    _record(metrics, "run-a", 3)
    _record(metrics, "run-a", 2)
    _record(metrics, None, 1)
    samples = _samples(render_prometheus(metrics.snapshot()))
    assert samples['maskedkd_teacher_requests_total{run_id="run-a",transport="http"}'] == 2
    assert samples['maskedkd_teacher_images_total{run_id="run-a"}'] == 5
    assert samples['maskedkd_teacher_patches_kept_total{run_id="run-a"}'] == 50
    assert samples['maskedkd_teacher_macs_saved_total{run_id="run-a"}'] == 250
    assert samples['maskedkd_teacher_images_total{run_id=""}'] == 1


def test_histogram_buckets_are_cumulative() -> None:
    metrics = ReplicaMetrics()
    for images in (1, 3, 300):
        metrics.record_batch(requests=1, images=images, compute_s=0.02)
    samples = _samples(render_prometheus(metrics.snapshot()))
    assert samples['maskedkd_teacher_batch_images_bucket{le="1"}'] == 1
    assert samples['maskedkd_teacher_batch_images_bucket{le="4"}'] == 2
    assert samples['maskedkd_teacher_batch_images_bucket{le="256"}'] == 2
    assert samples['maskedkd_teacher_batch_images_bucket{le="512"}'] == 3
    assert samples['maskedkd_teacher_batch_images_bucket{le="+Inf"}'] == 3
    assert samples["maskedkd_teacher_batch_images_sum"] == 304
    assert samples["maskedkd_teacher_batch_images_count"] == 3
    assert samples['maskedkd_teacher_compute_seconds_bucket{le="0.025"}'] == 3


def test_run_ids_are_capped() -> None:
    metrics = ReplicaMetrics(max_run_ids=2)
    for run_id in ("a", "b", "c", "d"):
        _record(metrics, run_id, 1)
    samples = _samples(render_prometheus(metrics.snapshot()))
    assert samples['maskedkd_teacher_images_total{run_id="a"}'] == 1
    assert samples['maskedkd_teacher_images_total{run_id="b"}'] == 1
    assert samples[f'maskedkd_teacher_images_total{{run_id="{OTHER_RUN_ID}"}}'] == 2
    assert 'run_id="c"' not in render_prometheus(metrics.snapshot())


def test_label_values_are_escaped() -> None:
    metrics = ReplicaMetrics()
    _record(metrics, 'odd"run\\\nid', 1)
    text = render_prometheus(metrics.snapshot())
    assert 'maskedkd_teacher_images_total{run_id="odd\\"run\\\\\\nid"} 1' in text


def test_errors_by_status_and_code() -> None:
    metrics = ReplicaMetrics()
    metrics.record_error(status=422, code="invalid_content", run_id="a")
    metrics.record_error(status=422, code="invalid_content", run_id="a")
    samples = _samples(render_prometheus(metrics.snapshot()))
    name = 'maskedkd_teacher_errors_total{status="422",code="invalid_content",run_id="a"}'
    assert samples[name] == 2


def test_merge_sums_replicas() -> None:
    first, second = ReplicaMetrics(), ReplicaMetrics()
    _record(first, "a", 3)
    _record(second, "a", 4)
    first.record_batch(requests=2, images=3, compute_s=0.1)
    second.record_batch(requests=1, images=4, compute_s=0.2)
    first.set_images_in_flight(5)
    second.set_images_in_flight(6)
    merged = merge_snapshots([first.snapshot(), second.snapshot()])
    samples = _samples(render_prometheus(merged))
    assert samples['maskedkd_teacher_images_total{run_id="a"}'] == 7
    assert samples["maskedkd_teacher_batch_requests_count"] == 2
    assert samples["maskedkd_teacher_batch_requests_sum"] == 3
    assert samples["maskedkd_teacher_images_in_flight"] == 11


def test_store_keeps_counters_of_stale_replicas() -> None:
    store = MetricsStore(stale_s=10.0)
    old, live = ReplicaMetrics(), ReplicaMetrics()
    _record(old, "a", 2)
    old.set_images_in_flight(8)
    _record(live, "a", 1)
    live.set_images_in_flight(3)
    store.update("old", old.snapshot(), now_s=0.0)
    store.update("live", live.snapshot(), now_s=95.0)
    samples = _samples(store.render(now_s=100.0))
    assert samples['maskedkd_teacher_images_total{run_id="a"}'] == 3
    assert samples["maskedkd_teacher_images_in_flight"] == 3
    assert samples["maskedkd_teacher_replicas"] == 1


def test_store_replaces_a_replicas_snapshot() -> None:
    store = MetricsStore()
    metrics = ReplicaMetrics()
    _record(metrics, "a", 1)
    store.update("r", metrics.snapshot(), now_s=0.0)
    _record(metrics, "a", 1)
    store.update("r", metrics.snapshot(), now_s=1.0)
    samples = _samples(store.render(now_s=1.0))
    assert samples['maskedkd_teacher_images_total{run_id="a"}'] == 2


# -- Per-run usage -----------------------------------------------------------------------------


def test_latency_histogram_per_run_on_page() -> None:
    metrics = ReplicaMetrics()
    _record(metrics, "a", 1, latency_s=0.004)
    _record(metrics, "a", 1, latency_s=0.04)
    _record(metrics, 'b"x', 1, latency_s=0.5)
    samples = _samples(render_prometheus(metrics.snapshot()))
    assert samples['maskedkd_teacher_request_seconds_bucket{run_id="a",le="0.005"}'] == 1
    assert samples['maskedkd_teacher_request_seconds_bucket{run_id="a",le="0.05"}'] == 2
    assert samples['maskedkd_teacher_request_seconds_bucket{run_id="a",le="+Inf"}'] == 2
    assert samples['maskedkd_teacher_request_seconds_count{run_id="a"}'] == 2
    assert samples['maskedkd_teacher_request_seconds_sum{run_id="a"}'] == pytest.approx(0.044)
    assert samples['maskedkd_teacher_request_seconds_count{run_id="b\\"x"}'] == 1


def test_histogram_quantile_interpolates() -> None:
    buckets = (1.0, 2.0, 4.0)
    assert histogram_quantile(buckets, [0, 0, 0, 0], 0.5) is None
    assert histogram_quantile(buckets, [2, 2, 0, 0], 0.5) == 1.0
    assert histogram_quantile(buckets, [2, 2, 0, 0], 0.75) == 1.5
    assert histogram_quantile(buckets, [0, 0, 4, 0], 0.5) == 3.0
    assert histogram_quantile(buckets, [1, 0, 0, 3], 0.99) == 4.0  # above the last bound


def test_recent_window_forgets_old_slots() -> None:
    clock = _Clock()
    window = RecentWindow(window_s=60.0, slot_s=5.0, clock=clock)
    window.add("a", 0.01, requests=1, images=4)
    clock.now_s = 30.0
    window.add("a", 0.02, requests=1, images=2)
    window.add("b", errors=1)
    summary = window.summary()
    assert summary["a"]["requests"] == 2
    assert summary["a"]["images"] == 6
    assert summary["a"]["latency"]["count"] == 2
    assert summary["b"]["errors"] == 1
    clock.now_s = 62.0  # the slot of t=0 has left the window, the one of t=30 has not
    summary = window.summary()
    assert summary["a"]["images"] == 2
    clock.now_s = 95.0
    assert window.summary() == {}


def test_runs_report_merges_replicas() -> None:
    clock = _Clock()
    first = ReplicaMetrics(recent=RecentWindow(clock=clock))
    second = ReplicaMetrics(recent=RecentWindow(clock=clock))
    _record(first, "a", 3, latency_s=0.01)
    _record(second, "a", 2, latency_s=0.03)
    second.record_error(status=429, code="run_overloaded", run_id="a")
    _record(second, "b", 1, latency_s=0.2)
    first.add_run_images_in_flight("b", 4)
    store = MetricsStore(stale_s=30.0)
    store.update("r1", first.snapshot(), now_s=0.0)
    store.update("r2", second.snapshot(), now_s=0.0)
    report = store.runs(now_s=1.0)

    assert report["replicas"] == 2
    assert [run["run_id"] for run in report["runs"]] == ["a", "b"]
    run_a, run_b = report["runs"]
    for period in ("lifetime", "last_minute"):
        assert run_a[period]["requests"] == 2
        assert run_a[period]["images"] == 5
        assert run_a[period]["patches_kept"] == 50
        assert run_a[period]["macs_spent"] == 500
        assert run_a[period]["macs_saved"] == 250
        assert run_a[period]["errors"] == 1
    latency = run_a["lifetime"]["latency_s"]
    assert 0.0075 <= latency["p50"] <= 0.03
    assert latency["p50"] <= latency["p95"] <= latency["p99"] <= 0.03
    assert run_b["images_in_flight"] == 4
    assert report["totals"]["lifetime"]["images"] == 6
    assert report["totals"]["images_in_flight"] == 4

    # A stale replica keeps its lifetime counts but leaves the last minute.
    later = store.runs(now_s=100.0)
    stale_a = later["runs"][0]
    assert stale_a["lifetime"]["images"] == 5
    assert stale_a["last_minute"]["requests"] == 0
    assert stale_a["last_minute"]["latency_s"] is None
    assert stale_a["active"] is False
    assert later["replicas"] == 0


def test_latency_buckets_ascend() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_run_with_only_rejections_is_active() -> None:
    metrics = ReplicaMetrics()
    metrics.record_error(status=422, code="invalid_content", run_id="failing")
    store = MetricsStore()
    store.update("replica", metrics.snapshot(), now_s=0.0)
    (run,) = store.runs(now_s=0.0)["runs"]
    assert run["run_id"] == "failing"
    assert run["last_minute"]["requests"] == 0
    assert run["last_minute"]["errors"] == 1
    assert run["active"] is True
