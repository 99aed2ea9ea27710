"""Prometheus rendering and cross-replica merging of the service metrics."""

from __future__ import annotations

from teacher_service.metrics import (
    FAMILIES,
    OTHER_RUN_ID,
    MetricsStore,
    ReplicaMetrics,
    merge_snapshots,
    render_prometheus,
)


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _record(metrics: ReplicaMetrics, run_id: str | None, images: int) -> None:
    metrics.record_request(
        run_id=run_id,
        transport="http",
        images=images,
        patches_kept=images * 10,
        patches_total=images * 49,
        macs_spent=images * 100,
        macs_saved=images * 50,
        body_bytes=images * 1000,
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
