"""Service metrics in the Prometheus text exposition format (version 0.0.4).

Each replica counts into its own `ReplicaMetrics` and periodically pushes a snapshot (plain
JSON-compatible data, cumulative since the replica started) to one `MetricsStore`, which
the deployment runs as a small Serve deployment of its own. `GET /metrics` on any replica
first pushes that replica's snapshot, then renders the store, so the page covers every
replica: counters and histograms are summed over all replicas that ever reported (a
stopped replica keeps its final counts, so totals never go down), and gauges are summed
over replicas that reported recently.

Per-run usage for `GET /v1/runs` comes from the same snapshots (see
`teacher_service.run_usage`).

This module has no Ray dependency, so it can be tested and reused on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from teacher_service.run_usage import (
    LATENCY_BUCKETS,
    Histogram,
    RecentWindow,
    add_histogram,
    runs_report,
)

# Label values that a client controls (run_id) are capped per replica, so a client that
# sends a fresh run_id per request cannot grow the page without bound.
DEFAULT_MAX_RUN_IDS = 256
OTHER_RUN_ID = "_other"

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricFamily:
    """One metric's name, type, help text, label names and (histograms) buckets."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        "maskedkd_teacher_requests_total",
        "counter",
        "Requests that returned logits, by student run and transport (http or handle).",
        ("run_id", "transport"),
    ),
    MetricFamily(
        "maskedkd_teacher_images_total",
        "counter",
        "Images that got logits.",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_patches_kept_total",
        "counter",
        "Patches the teacher ran on, summed over images.",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_patches_total",
        "counter",
        "Patches on the teacher's grid, summed over images (kept plus dropped).",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_macs_spent_total",
        "counter",
        "Teacher multiply-accumulates spent (analytic count).",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_macs_saved_total",
        "counter",
        "Teacher multiply-accumulates saved against running every patch (analytic count).",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_request_bytes_total",
        "counter",
        "Request body bytes of requests that returned logits.",
        ("run_id",),
    ),
    MetricFamily(
        "maskedkd_teacher_errors_total",
        "counter",
        "Rejected or failed requests, by HTTP status and error code.",
        ("status", "code", "run_id"),
    ),
    MetricFamily(
        "maskedkd_teacher_request_seconds",
        "histogram",
        "Time from a request's admission to its encoded response, by student run.",
        ("run_id",),
        LATENCY_BUCKETS,
    ),
    MetricFamily(
        "maskedkd_teacher_batch_images",
        "histogram",
        "Images per engine batch.",
        buckets=SIZE_BUCKETS,
    ),
    MetricFamily(
        "maskedkd_teacher_batch_requests",
        "histogram",
        "Requests merged into one engine batch.",
        buckets=SIZE_BUCKETS,
    ),
    MetricFamily(
        "maskedkd_teacher_queue_wait_seconds",
        "histogram",
        "Time from a request's admission to the start of its engine batch.",
        buckets=SECONDS_BUCKETS,
    ),
    MetricFamily(
        "maskedkd_teacher_compute_seconds",
        "histogram",
        "Engine time per batch (all kept-count groups of the batch).",
        buckets=SECONDS_BUCKETS,
    ),
    MetricFamily(
        "maskedkd_teacher_images_in_flight",
        "gauge",
        "Images admitted and not yet returned.",
    ),
    MetricFamily(
        "maskedkd_teacher_replicas",
        "gauge",
        "Replicas that reported metrics recently.",
    ),
)
_FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}

LabelKey = tuple[str, ...]


class ReplicaMetrics:
    """Counters, histograms and gauges of one replica, updated from its event loop.

    Args:
        max_run_ids: distinct run_id label values kept; later ones count as "_other".
    """

    def __init__(
        self, max_run_ids: int = DEFAULT_MAX_RUN_IDS, recent: RecentWindow | None = None
    ) -> None:
        self.max_run_ids = max_run_ids
        self._run_ids: set[str] = set()
        self._counters: dict[str, dict[LabelKey, float]] = {
            family.name: {} for family in FAMILIES if family.kind == "counter"
        }
        self._histograms = {
            family.name: Histogram(family.buckets)
            for family in FAMILIES
            if family.kind == "histogram" and not family.labels
        }
        self._labeled_histograms: dict[str, dict[LabelKey, Histogram]] = {
            family.name: {} for family in FAMILIES if family.kind == "histogram" and family.labels
        }
        self._gauges: dict[str, float] = {"maskedkd_teacher_images_in_flight": 0.0}
        self._recent = recent if recent is not None else RecentWindow()
        self._run_images_in_flight: dict[str, int] = {}

    def run_label(self, run_id: str | None) -> str:
        """Return the label that `run_id` is counted under: itself, or "_other" past the cap."""
        return self._run_label(run_id)

    def _run_label(self, run_id: str | None) -> str:
        label = run_id or ""
        if label in self._run_ids:
            return label
        if len(self._run_ids) >= self.max_run_ids:
            return OTHER_RUN_ID
        self._run_ids.add(label)
        return label

    def _add(self, name: str, labels: LabelKey, value: float) -> None:
        series = self._counters[name]
        series[labels] = series.get(labels, 0.0) + value

    def record_request(
        self,
        *,
        run_id: str | None,
        transport: str,
        images: int,
        patches_kept: int,
        patches_total: int,
        macs_spent: int,
        macs_saved: int,
        body_bytes: int,
        latency_s: float | None = None,
    ) -> None:
        """Count one request that returned logits, and its latency in seconds if given."""
        run = self._run_label(run_id)
        if latency_s is not None:
            series = self._labeled_histograms["maskedkd_teacher_request_seconds"]
            if (run,) not in series:
                series[(run,)] = Histogram(LATENCY_BUCKETS)
            series[(run,)].observe(latency_s)
        self._recent.add(
            run,
            latency_s,
            requests=1,
            images=images,
            patches_kept=patches_kept,
            macs_spent=macs_spent,
            macs_saved=macs_saved,
        )
        self._add("maskedkd_teacher_requests_total", (run, transport), 1)
        self._add("maskedkd_teacher_images_total", (run,), images)
        self._add("maskedkd_teacher_patches_kept_total", (run,), patches_kept)
        self._add("maskedkd_teacher_patches_total", (run,), patches_total)
        self._add("maskedkd_teacher_macs_spent_total", (run,), macs_spent)
        self._add("maskedkd_teacher_macs_saved_total", (run,), macs_saved)
        self._add("maskedkd_teacher_request_bytes_total", (run,), body_bytes)

    def record_error(self, *, status: int, code: str, run_id: str | None) -> None:
        """Count one rejected or failed request."""
        run = self._run_label(run_id)
        self._add("maskedkd_teacher_errors_total", (str(status), code, run), 1)
        self._recent.add(run, errors=1)

    def record_batch(self, *, requests: int, images: int, compute_s: float) -> None:
        """Record the size and engine time of one batch."""
        self._histograms["maskedkd_teacher_batch_requests"].observe(requests)
        self._histograms["maskedkd_teacher_batch_images"].observe(images)
        self._histograms["maskedkd_teacher_compute_seconds"].observe(compute_s)

    def record_queue_wait(self, seconds: float) -> None:
        """Record one request's wait between admission and its batch's start."""
        self._histograms["maskedkd_teacher_queue_wait_seconds"].observe(seconds)

    def set_images_in_flight(self, images: int) -> None:
        """Set the number of images admitted and not yet returned."""
        self._gauges["maskedkd_teacher_images_in_flight"] = float(images)

    def add_run_images_in_flight(self, run_id: str | None, images: int) -> None:
        """Add `images` (negative to remove) to the images in flight of run `run_id`."""
        run = self._run_label(run_id)
        count = self._run_images_in_flight.get(run, 0) + images
        if count:
            self._run_images_in_flight[run] = count
        else:
            self._run_images_in_flight.pop(run, None)

    def snapshot(self) -> dict[str, Any]:
        """Return the cumulative state as JSON-compatible data."""
        return {
            "counters": {
                name: [[list(labels), value] for labels, value in series.items()]
                for name, series in self._counters.items()
            },
            "histograms": {name: hist.to_json() for name, hist in self._histograms.items()},
            "labeled_histograms": {
                name: [[list(labels), hist.to_json()] for labels, hist in series.items()]
                for name, series in self._labeled_histograms.items()
            },
            "gauges": dict(self._gauges),
            # Per-run figures for /v1/runs that are not cumulative.
            "recent": self._recent.summary(),
            "run_images_in_flight": dict(self._run_images_in_flight),
        }


class MetricsStore:
    """Latest snapshot of every replica, merged and rendered on request.

    Args:
        stale_s: a replica whose last snapshot is older than this many seconds no longer
            counts towards gauges (its counters still count).
    """

    def __init__(self, stale_s: float = 30.0) -> None:
        self.stale_s = stale_s
        self._snapshots: dict[str, tuple[float, dict[str, Any]]] = {}

    def update(self, replica_id: str, snapshot: dict[str, Any], now_s: float) -> None:
        """Replace a replica's snapshot; `now_s` is a monotonic clock reading."""
        self._snapshots[replica_id] = (now_s, snapshot)

    def render(self, now_s: float) -> str:
        """Merge all snapshots and return the Prometheus text page."""
        fresh = [
            snapshot
            for seen_s, snapshot in self._snapshots.values()
            if now_s - seen_s <= self.stale_s
        ]
        merged = merge_snapshots([snapshot for _, snapshot in self._snapshots.values()])
        gauges = merge_snapshots(fresh)["gauges"]
        gauges["maskedkd_teacher_replicas"] = float(len(fresh))
        merged["gauges"] = gauges
        return render_prometheus(merged)

    def runs(self, now_s: float) -> dict[str, Any]:
        """Return the `GET /v1/runs` report over all replicas."""
        fresh = [
            snapshot
            for seen_s, snapshot in self._snapshots.values()
            if now_s - seen_s <= self.stale_s
        ]
        merged = merge_snapshots([snapshot for _, snapshot in self._snapshots.values()])
        return runs_report(merged, fresh)


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters, histograms and gauges of several snapshots."""
    counters: dict[str, dict[LabelKey, float]] = {}
    histograms: dict[str, dict[str, Any]] = {}
    labeled: dict[str, dict[LabelKey, dict[str, Any]]] = {}
    gauges: dict[str, float] = {}
    for snapshot in snapshots:
        for name, series in snapshot.get("counters", {}).items():
            merged_series = counters.setdefault(name, {})
            for labels, value in series:
                key = tuple(labels)
                merged_series[key] = merged_series.get(key, 0.0) + float(value)
        for name, hist in snapshot.get("histograms", {}).items():
            _merge_histogram(histograms, name, hist)
        for name, series in snapshot.get("labeled_histograms", {}).items():
            merged_hists = labeled.setdefault(name, {})
            for labels, hist in series:
                _merge_histogram(merged_hists, tuple(labels), hist)
        for name, value in snapshot.get("gauges", {}).items():
            gauges[name] = gauges.get(name, 0.0) + float(value)
    return {
        "counters": {
            name: [[list(labels), value] for labels, value in series.items()]
            for name, series in counters.items()
        },
        "histograms": histograms,
        "labeled_histograms": {
            name: [[list(labels), hist] for labels, hist in series.items()]
            for name, series in labeled.items()
        },
        "gauges": gauges,
    }


def _merge_histogram(target: dict[Any, dict[str, Any]], key: Any, hist: dict[str, Any]) -> None:
    if key not in target:
        target[key] = {
            "counts": list(hist["counts"]),
            "sum": float(hist["sum"]),
            "count": int(hist["count"]),
        }
    else:
        add_histogram(target[key], hist)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label(str(value))}"' for name, value in zip(names, values, strict=True)
    )
    return "{" + pairs + "}"


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render_prometheus(snapshot: dict[str, Any]) -> str:
    """Render a (merged) snapshot as Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for family in FAMILIES:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        if family.kind == "counter":
            series = snapshot.get("counters", {}).get(family.name, [])
            for labels, value in sorted(series, key=lambda item: list(item[0])):
                labels_text = _format_labels(family.labels, labels)
                lines.append(f"{family.name}{labels_text} {_format_value(value)}")
        elif family.kind == "gauge":
            value = snapshot.get("gauges", {}).get(family.name, 0.0)
            lines.append(f"{family.name} {_format_value(value)}")
        elif family.labels:
            series = snapshot.get("labeled_histograms", {}).get(family.name, [])
            for labels, hist in sorted(series, key=lambda item: list(item[0])):
                lines.extend(_render_histogram(family, hist, labels))
        else:
            hist = snapshot.get("histograms", {}).get(family.name)
            lines.extend(_render_histogram(family, hist, ()))
    return "\n".join(lines) + "\n"


def _render_histogram(
    family: MetricFamily, hist: dict[str, Any] | None, labels: Sequence[str]
) -> list[str]:
    counts = hist["counts"] if hist else [0] * (len(family.buckets) + 1)
    label_pairs = [
        f'{name}="{_escape_label(str(value))}"'
        for name, value in zip(family.labels, labels, strict=True)
    ]
    plain = "{" + ",".join(label_pairs) + "}" if label_pairs else ""
    lines = []
    cumulative = 0
    for bound, count in zip((*family.buckets, math.inf), counts, strict=True):
        cumulative += count
        le = "+Inf" if math.isinf(bound) else _format_value(float(bound))
        bucket_labels = ",".join([*label_pairs, f'le="{le}"'])
        lines.append(f"{family.name}_bucket{{{bucket_labels}}} {cumulative}")
    lines.append(f"{family.name}_sum{plain} {_format_value(float(hist['sum']) if hist else 0.0)}")
    lines.append(f"{family.name}_count{plain} {int(hist['count']) if hist else 0}")
    return lines


def family(name: str) -> MetricFamily:
    """Return the metric family called `name`."""
    return _FAMILIES_BY_NAME[name]
