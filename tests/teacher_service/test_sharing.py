"""One teacher shared by several student runs: fair batching, per-run limits and accounting.

Real local Ray, real Serve, real HTTP on 127.0.0.1. Ray starts once for this module (tens
of seconds on two cores). Two applications run side by side:

- "shared" at "/": no token, batches of up to 32 images that close after 5 ms, and an
  autoscaling config pinned to one replica.
- "limited" at "/limited": bearer token, batches of 8 images that wait up to a minute for
  company, and 4 images in flight per run, so that the per-run limit and its 429 can be
  produced on purpose, without timing.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from teacher_service.checkpoint import load_teacher, save_teacher  # noqa: E402
from teacher_service.client import TeacherClient  # noqa: E402
from teacher_service.deployment import build_app  # noqa: E402
from teacher_service.engine import MaskedTeacher  # noqa: E402
from teacher_service.patches import PatchGrid, gather_patches  # noqa: E402
from teacher_service.protocol import CONTENT_TYPE, encode_request  # noqa: E402
from teacher_service.serve_cli import (  # noqa: E402
    RunsCommandConfig,
    ServeCommandConfig,
    listeners_on_port,
    show_runs,
    warn_if_open,
)
from teacher_service.service_config import ServiceConfig  # noqa: E402

TOKEN = "sharing-token-51c2"
SHARED_APP = "shared"
LIMITED_APP = "limited"
LIMITED_BATCH_IMAGES = 8
LIMITED_RUN_IMAGES = 4
TINY_VIT = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
FLOAT16_TOLERANCE = {"atol": 3e-3, "rtol": 2e-3}
# A run id a client could send to break the status page if it were not escaped.
HOSTILE_RUN_ID = '<script>alert("run")</script>&co'
RAY_STARTUP_WAITS = {
    "RAY_raylet_start_wait_time_s": "300",
    "RAY_agent_register_timeout_ms": "300000",
}


@dataclass
class Service:
    url: str
    limited_url: str
    token_file: Path
    engine: MaskedTeacher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("sharing")
    torch.manual_seed(0)
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=TINY_VIT)
    teacher_path = folder / "tiny.safetensors"
    save_teacher(model, spec, teacher_path)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")

    saved_environment = {name: os.environ.get(name) for name in RAY_STARTUP_WAITS}
    os.environ.update(RAY_STARTUP_WAITS)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"teacher": str(teacher_path), "num_cpus": 0, "metrics_flush_s": 0.5}
        shared = build_app(
            {
                **common,
                "max_batch_images": 32,
                "max_images_per_request": 16,
                "max_images_in_flight": 128,
                "max_run_images_in_flight": 64,
                "batch_wait_ms": 5.0,
                "min_replicas": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 4,
            }
        )
        limited = build_app(
            {
                **common,
                "max_batch_images": LIMITED_BATCH_IMAGES,
                "max_images_per_request": LIMITED_RUN_IMAGES,
                "max_images_in_flight": LIMITED_BATCH_IMAGES,
                "max_run_images_in_flight": LIMITED_RUN_IMAGES,
                "batch_wait_ms": 60_000.0,
                "token_file": str(token_file),
                "retry_after_s": 1.0,
            }
        )
        serve.run_many(
            [
                serve.RunTarget(shared, name=SHARED_APP, route_prefix="/"),
                serve.RunTarget(limited, name=LIMITED_APP, route_prefix="/limited"),
            ]
        )
        url = f"http://127.0.0.1:{port}"
        yield Service(
            url=url,
            limited_url=f"{url}/limited",
            token_file=token_file,
            engine=MaskedTeacher.from_source(str(teacher_path)),
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)


def _keep(count: int, keep_count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(49, generator=generator)[:keep_count] for _ in range(count)])


def _body(count: int, run_id: str, seed: int = 0, keep_count: int = 10) -> bytes:
    grid = PatchGrid((28, 28), (4, 4), 1)
    keep = _keep(count, keep_count, seed).numpy()
    pixels = gather_patches(_images(count, seed).numpy(), keep, grid)
    return encode_request(pixels, keep, run_id=run_id)


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def _runs(url: str, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/runs", headers=headers, timeout=30.0)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def _run(report: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    matches = [run for run in report["runs"] if run["run_id"] == run_id]
    return matches[0] if matches else None


def _lifetime(url: str, run_id: str, field: str, **headers: str) -> int:
    run = _run(_runs(url, **headers), run_id)
    return 0 if run is None else int(run["lifetime"][field])


def _in_flight(url: str, run_id: str, **headers: str) -> int:
    run = _run(_runs(url, **headers), run_id)
    return 0 if run is None else int(run["images_in_flight"])


def _wait_for(condition: Callable[[], bool], description: str, timeout_s: float = 120.0) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.05)


# -- Fair sharing ------------------------------------------------------------------------


def test_flood_does_not_starve_small_run(service: Service) -> None:
    flood_images, trickle_images, trickle_requests = 16, 2, 6
    stop = threading.Event()
    flood_done: list[int] = []
    lock = threading.Lock()

    def flood(worker: int) -> None:
        with TeacherClient(service.url, run_id="flood") as client:
            index = 0
            while not stop.is_set():
                seed = 1000 * worker + index
                client.request(_images(flood_images, seed), _keep(flood_images, 8, seed))
                with lock:
                    flood_done.append(seed)
                index += 1

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        flooders = [pool.submit(flood, worker) for worker in range(4)]
        try:
            _wait_for(lambda: len(flood_done) >= 4, "the flood to get its first results")
            flood_before = len(flood_done)
            trickle_results = []
            with TeacherClient(service.url, run_id="trickle") as client:
                for index in range(trickle_requests):
                    images, keep = _images(trickle_images, index), _keep(trickle_images, 20, index)
                    result = client.request(images, keep)
                    expected = service.engine.forward_images(images, keep)
                    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)
                    trickle_results.append(result)
            flood_during = len(flood_done) - flood_before
        finally:
            stop.set()
            for flooder in flooders:
                flooder.result(timeout=300)

    # Every small request was served while the flood kept the replica busy.
    assert len(trickle_results) == trickle_requests
    assert flood_during >= 1
    report = _runs(service.url)
    trickle = _run(report, "trickle")
    flood_run = _run(report, "flood")
    assert trickle is not None
    assert flood_run is not None
    assert trickle["lifetime"]["requests"] == trickle_requests
    assert trickle["lifetime"]["images"] == trickle_requests * trickle_images
    assert flood_run["lifetime"]["requests"] == len(flood_done)
    assert flood_run["lifetime"]["images"] == len(flood_done) * flood_images


# -- Per-run limit -------------------------------------------------------------------------


def test_run_limit_is_429_and_client_retry_succeeds(service: Service) -> None:
    url, auth = service.limited_url, _auth()
    with TeacherClient(url, token=TOKEN, run_id="greedy", max_workers=2) as greedy:
        # The first request waits in the queue (the batch wait is a minute) and takes all
        # 4 images that the run may have in flight.
        first = greedy.submit(_images(LIMITED_RUN_IMAGES, 1), _keep(LIMITED_RUN_IMAGES, 5, 1))
        _wait_for(lambda: _in_flight(url, "greedy", **auth) == LIMITED_RUN_IMAGES, "4 images")

        # One more image of the same run: 429 with Retry-After and the JSON error shape.
        response = httpx.post(
            f"{url}/v1/logits",
            content=_body(1, "greedy", seed=2),
            headers={"content-type": CONTENT_TYPE, **auth},
            timeout=60.0,
        )
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "run_overloaded"
        assert "'greedy'" in error["message"]
        assert "at most 4" in error["message"]

        # The client's first attempt gets 429 too; it retries after Retry-After.
        images, keep = _images(2, 3), _keep(2, 7, 3)
        retried = greedy.submit(images, keep)
        _wait_for(lambda: _lifetime(url, "greedy", "errors", **auth) >= 2, "the client's 429")

        # Another run is not limited by "greedy": its 4 images fill the batch, which frees
        # greedy's images, and greedy's retry is admitted.
        with TeacherClient(url, token=TOKEN, run_id="polite") as polite:
            polite.request(_images(LIMITED_RUN_IMAGES, 4), _keep(LIMITED_RUN_IMAGES, 5, 4))
            assert first.result(timeout=120).logits.shape == (LIMITED_RUN_IMAGES, 10)
            _wait_for(lambda: _in_flight(url, "greedy", **auth) == 2, "the retry admitted")
            # Two more runs fill the batch that the retry waits in: 2 + 4 + 2 images.
            with TeacherClient(url, token=TOKEN, run_id="quiet") as quiet:
                filler = quiet.submit(_images(2, 5), _keep(2, 5, 5))
                polite.request(_images(4, 6), _keep(4, 5, 6))
                filler.result(timeout=120)
        result = retried.result(timeout=120)

    expected = service.engine.forward_images(images, keep)
    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)
    greedy_run = _run(_runs(url, **auth), "greedy")
    assert greedy_run is not None
    assert greedy_run["lifetime"]["requests"] == 2
    assert greedy_run["lifetime"]["images"] == LIMITED_RUN_IMAGES + 2
    assert greedy_run["lifetime"]["errors"] >= 2
    assert greedy_run["images_in_flight"] == 0


# -- Accounting ------------------------------------------------------------------------------


def test_runs_report_counts_what_was_sent(service: Service) -> None:
    sent = {"count-a": [(3, 7), (2, 49)], "count-b": [(5, 12)]}
    for run_id, requests in sent.items():
        with TeacherClient(service.url, run_id=run_id) as client:
            for index, (count, keep_count) in enumerate(requests):
                client.request(_images(count, index), _keep(count, keep_count, index))

    report = _runs(service.url)
    engine = service.engine
    assert report["window_s"] == 60
    assert report["replicas"] == 1
    for run_id, requests in sent.items():
        run = _run(report, run_id)
        assert run is not None, report
        spent = sum(count * engine.macs_per_image(keep) for count, keep in requests)
        full = sum(count for count, _ in requests) * engine.full_macs_per_image
        for period in ("lifetime", "last_minute"):
            usage = run[period]
            assert usage["requests"] == len(requests)
            assert usage["images"] == sum(count for count, _ in requests)
            assert usage["patches_kept"] == sum(count * keep for count, keep in requests)
            assert usage["macs_spent"] == spent
            assert usage["macs_saved"] == full - spent
            assert usage["errors"] == 0
            latency = usage["latency_s"]
            assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
        assert run["active"] is True
        assert run["images_in_flight"] == 0
    totals = report["totals"]["lifetime"]
    assert totals["images"] >= 10
    assert totals["macs_spent"] >= sum(
        count * engine.macs_per_image(keep)
        for requests in sent.values()
        for count, keep in requests
    )


def test_metrics_page_has_per_run_latency(service: Service) -> None:
    with TeacherClient(service.url, run_id="latency-run") as client:
        client.request(_images(2, 9), _keep(2, 9, 9))
    text = httpx.get(f"{service.url}/metrics", timeout=30.0).text
    assert 'maskedkd_teacher_request_seconds_count{run_id="latency-run"} 1' in text
    assert 'maskedkd_teacher_request_seconds_bucket{run_id="latency-run",le="+Inf"} 1' in text
    assert 'maskedkd_teacher_images_total{run_id="latency-run"} 2' in text


def test_runs_and_status_page_require_token(service: Service) -> None:
    for path in ("/v1/runs", "/"):
        response = httpx.get(f"{service.limited_url}{path}", timeout=30.0)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
        assert TOKEN not in response.text
    page = httpx.get(f"{service.limited_url}/", headers=_auth(), timeout=30.0)
    assert page.status_code == 200
    assert TOKEN not in page.text


def test_runs_command_prints_table(service: Service) -> None:
    with TeacherClient(service.url, run_id="table-run") as client:
        client.request(_images(3, 11), _keep(3, 4, 11))
    output = io.StringIO()
    with redirect_stdout(output):
        assert show_runs(RunsCommandConfig(url=service.url)) == 0
    lines = output.getvalue().splitlines()
    assert lines[0].split()[:3] == ["run", "in", "flight"]
    table_rows = [line.split() for line in lines if line.startswith("table-run ")]
    assert len(table_rows) == 1
    assert table_rows[0][1:4] == ["0", "1", "3"]  # in flight, requests, images
    assert any(line.startswith("total ") for line in lines)

    output = io.StringIO()
    config = RunsCommandConfig(url=service.limited_url, token_file=str(service.token_file))
    with redirect_stdout(output):
        assert show_runs(RunsCommandConfig(**{**config.__dict__, "as_json": True})) == 0
    assert "runs" in json.loads(output.getvalue())
    assert show_runs(RunsCommandConfig(url=service.limited_url)) == 1


# -- Status page -----------------------------------------------------------------------------


class _PageParser(HTMLParser):
    """Collect the text of table cells and headings, and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.headings: list[str] = []
        self.tags: list[str] = []
        self.refresh: str | None = None
        self._current: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("td", "h1", "h2"):
            self._current = []
        values = dict(attrs)
        if tag == "meta" and values.get("http-equiv") == "refresh":
            self.refresh = values.get("content")

    def handle_endtag(self, tag: str) -> None:
        if self._current is not None and tag in ("td", "h1", "h2"):
            text = "".join(self._current)
            (self.cells if tag == "td" else self.headings).append(text)
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._current.append(data)


def test_status_page_shows_card_runs_and_totals(service: Service) -> None:
    with TeacherClient(service.url, run_id=HOSTILE_RUN_ID) as client:
        client.request(_images(2, 12), _keep(2, 6, 12))
    response = httpx.get(f"{service.url}/", timeout=30.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # The raw run id never appears: it is escaped.
    assert HOSTILE_RUN_ID not in response.text
    assert "&lt;script&gt;" in response.text

    parser = _PageParser()
    parser.feed(response.text)
    assert "script" not in parser.tags
    assert parser.refresh is not None
    assert int(parser.refresh) > 0
    assert parser.headings == ["maskedkd teacher service", "Teacher", "Runs", "Totals"]
    assert "vit_tiny_patch16_224" in parser.cells
    assert service.engine.spec.digest in parser.cells
    assert HOSTILE_RUN_ID in parser.cells  # unescaped by the parser: shown as sent
    assert "teacher MACs spent" in parser.cells
    assert "teacher MACs saved" in parser.cells


# -- Settings ----------------------------------------------------------------------------------


def test_autoscaling_options_reach_serve(tmp_path: Path) -> None:
    args = {"teacher": "t.safetensors", "min_replicas": 0, "max_replicas": 3}
    app = build_app({**args, "target_ongoing_requests": 2.0})
    deployment_config = app._bound_deployment._deployment_config
    autoscaling = deployment_config.autoscaling_config
    assert autoscaling is not None
    assert autoscaling.min_replicas == 0
    assert autoscaling.max_replicas == 3
    assert autoscaling.target_ongoing_requests == 2.0
    fixed = build_app({"teacher": "t.safetensors", "num_replicas": 2})
    assert fixed._bound_deployment._deployment_config.autoscaling_config is None
    assert fixed._bound_deployment._deployment_config.num_replicas == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-run-images-in-flight", "-4"], "-4 must be at least 1"),
        (["--min-replicas", "-1", "--max-replicas", "2"], "-1 must be at least 0"),
        (["--target-ongoing-requests", "0", "--max-replicas", "2"], "positive finite number"),
        (["--max-replicas", "0"], "0 must be at least 1"),
    ],
)
def test_serve_options_reject_negative_values(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--teacher", "t.safetensors", *options])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-replicas", "3", "--max-replicas", "2"], "min_replicas 3 is greater than"),
        (["--replicas", "2", "--max-replicas", "4"], "num_replicas 2 fixes the replica count"),
        (["--min-replicas", "2"], "autoscaling needs max_replicas"),
        (
            ["--max-replicas", "2", "--target-ongoing-requests", "1000"],
            "target_ongoing_requests 1000.0 must be positive and at most",
        ),
        (["--max-run-images-in-flight", "2000"], "max_run_images_in_flight 2000 must be in"),
    ],
)
def test_serve_rejects_contradictory_options(options: list[str], message: str) -> None:
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve", "--teacher", "t.safetensors", *options])
    with pytest.raises(ValueError, match=message):
        ServeCommandConfig.from_args(args)
    assert args.func(args) == 2


def test_open_address_without_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="teacher_service.serve_cli"):
        assert warn_if_open("0.0.0.0", None)
        assert "0.0.0.0 without a bearer token" in caplog.text
        caplog.clear()
        assert not warn_if_open("0.0.0.0", "token")
        assert not warn_if_open("127.0.0.1", None)
        assert not warn_if_open("localhost", None)
        assert not warn_if_open("::1", None)
        assert caplog.text == ""


def test_serve_rejects_bad_checkpoint_before_ray(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipelines.cli import build_parser

    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    args = build_parser().parse_args(["serve", "--teacher", str(bad)])
    with caplog.at_level(logging.ERROR, logger="teacher_service.serve_cli"):
        status = args.func(args)
    assert status == 2
    assert "is not a safetensors file" in caplog.text
    assert "maskedkd export-teacher" in caplog.text


def test_serve_rejects_taken_or_invalid_port(caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.cli import build_parser

    teacher = "checkpoints/fashion_mnist_vit_teacher.safetensors"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(["serve", "--teacher", teacher, "--port", str(port)])
        with caplog.at_level(logging.ERROR, logger="teacher_service.serve_cli"):
            assert args.func(args) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "pass another --port" in caplog.text

    caplog.clear()
    args = build_parser().parse_args(["serve", "--teacher", teacher, "--port", "99999"])
    with caplog.at_level(logging.ERROR, logger="teacher_service.serve_cli"):
        assert args.func(args) == 2
    assert "--port must be in 1..65535, got 99999" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--token-file", "missing-token.txt"], "cannot read token file 'missing-token.txt'"),
        (["--app-name", ""], "--app-name must not be empty"),
        (["--route-prefix", "teacher"], "use '/teacher'"),
    ],
)
def test_serve_rejects_settings_before_ray(
    options: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pipelines.cli import build_parser

    teacher = "checkpoints/fashion_mnist_vit_teacher.safetensors"
    args = build_parser().parse_args(["serve", "--teacher", teacher, *options])
    with caplog.at_level(logging.ERROR, logger="teacher_service.serve_cli"):
        assert args.func(args) == 2
    assert message in caplog.text


def test_listeners_on_port_counts_shared_binds() -> None:
    with socket.socket() as first, socket.socket() as second:
        for sock in (first, second):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        assert listeners_on_port(port) == 1
        # A second SO_REUSEPORT listener, as a second Serve proxy on the port would be.
        second.bind(("127.0.0.1", port))
        second.listen()
        assert listeners_on_port(port) == 2


def test_serve_passes_queue_limit_to_serve() -> None:
    from pipelines.cli import build_parser

    parser = build_parser()
    default = ServeCommandConfig.from_args(parser.parse_args(["serve", "--teacher", "t"]))
    assert default.service.max_queued_requests == -1
    args = parser.parse_args(["serve", "--teacher", "t", "--max-queued-requests", "64"])
    assert ServeCommandConfig.from_args(args).service.max_queued_requests == 64
    assert default.service.max_run_ids == 256
    args = parser.parse_args(["serve", "--teacher", "t", "--max-run-ids", "4096"])
    assert ServeCommandConfig.from_args(args).service.max_run_ids == 4096
    args = parser.parse_args(["serve", "--teacher", "t", "--max-queued-requests", "0"])
    with pytest.raises(ValueError, match="max_queued_requests must be -1 .* got 0"):
        ServeCommandConfig.from_args(args)


def test_serve_binds_loopback_by_default() -> None:
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve", "--teacher", "t.safetensors"])
    config = ServeCommandConfig.from_args(args)
    assert config.host == "127.0.0.1"
    assert ServeCommandConfig(service=ServiceConfig(teacher="t")).host == "127.0.0.1"


def test_runs_table_escapes_control_characters() -> None:
    from teacher_service.metrics import MetricsStore, ReplicaMetrics
    from teacher_service.status_page import format_runs_table

    metrics = ReplicaMetrics()
    metrics.record_error(status=422, code="invalid_content", run_id="evil\x1b[2J\nrun")
    store = MetricsStore()
    store.update("replica", metrics.snapshot(), now_s=0.0)
    table = format_runs_table(store.runs(now_s=0.0))
    assert "\x1b" not in table
    assert "evil\\x1b[2J\\nrun" in table


def test_status_page_escapes_hostile_run_ids() -> None:
    from teacher_service.metrics import MetricsStore, ReplicaMetrics
    from teacher_service.status_page import format_runs_table, render_status_page

    metrics = ReplicaMetrics()
    metrics.record_error(status=422, code="invalid_content", run_id="rtl\u202erun\x00")
    metrics.record_error(status=422, code="invalid_content", run_id="long" * 60)
    store = MetricsStore()
    store.update("replica", metrics.snapshot(), now_s=0.0)
    report = store.runs(now_s=0.0)

    card = {
        "arch": "vit",
        "img_size": [28, 28],
        "in_chans": 1,
        "grid_size": [7, 7],
        "patch_size": [4, 4],
        "num_classes": 10,
        "macs_per_image_full": 62_924_032,
        "max_images_per_request": 256,
        "max_batch_images": 256,
    }
    page = render_status_page(card, report, refresh_s=5)
    assert "\u202e" not in page
    assert "\x00" not in page
    assert "rtl\\u202erun\\x00" in page
    table = format_runs_table(report)
    assert "long" * 60 not in table
    assert max(len(line) for line in table.splitlines()) < 240
