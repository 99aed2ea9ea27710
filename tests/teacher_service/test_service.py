"""The teacher service end to end: real local Ray, real Serve, real HTTP on 127.0.0.1.

Ray starts once for this module (tens of seconds on two cores). Two applications run side
by side:

- "maskedkd-teacher" at "/": no token, small body limit, short batch wait.
- "guarded" at "/guarded": bearer token, batches of 8 images that wait up to a minute for
  company, and 8 images in flight per replica, so overload and batch merging can be
  produced on purpose, without timing.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from teacher_service.checkpoint import load_teacher, save_teacher  # noqa: E402
from teacher_service.client import (  # noqa: E402
    RayTeacherClient,
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailableError,
)
from teacher_service.deployment import build_app  # noqa: E402
from teacher_service.engine import MaskedTeacher  # noqa: E402
from teacher_service.patches import PatchGrid, gather_patches  # noqa: E402
from teacher_service.protocol import CONTENT_TYPE, encode_request  # noqa: E402
from teacher_service.serve_cli import InfoCommandConfig, show_info  # noqa: E402

TOKEN = "test-token-7f3a"
MAIN_APP = "maskedkd-teacher"
GUARDED_APP = "guarded"
MAX_BODY_BYTES = 256 * 1024
MAX_IMAGES_PER_REQUEST = 32
GUARDED_BATCH_IMAGES = 8
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


@dataclass
class Service:
    url: str
    guarded_url: str
    teacher_path: Path
    token_file: Path
    engine: MaskedTeacher
    gcs_address: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("service")
    torch.manual_seed(0)
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=TINY_VIT)
    teacher_path = folder / "tiny.safetensors"
    save_teacher(model, spec, teacher_path)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"teacher": str(teacher_path), "num_cpus": 0, "metrics_flush_s": 0.5}
        main = build_app(
            {
                **common,
                "max_batch_images": 64,
                "max_images_per_request": MAX_IMAGES_PER_REQUEST,
                "max_body_bytes": MAX_BODY_BYTES,
                "batch_wait_ms": 5.0,
            }
        )
        guarded = build_app(
            {
                **common,
                "max_batch_images": GUARDED_BATCH_IMAGES,
                "max_images_in_flight": GUARDED_BATCH_IMAGES,
                "batch_wait_ms": 60_000.0,
                "token_file": str(token_file),
                "retry_after_s": 1.0,
            }
        )
        serve.run_many(
            [
                serve.RunTarget(main, name=MAIN_APP, route_prefix="/"),
                serve.RunTarget(guarded, name=GUARDED_APP, route_prefix="/guarded"),
            ]
        )
        url = f"http://127.0.0.1:{port}"
        yield Service(
            url=url,
            guarded_url=f"{url}/guarded",
            teacher_path=teacher_path,
            token_file=token_file,
            engine=MaskedTeacher.from_source(str(teacher_path)),
            gcs_address=ray.get_runtime_context().gcs_address,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)


def _keep(count: int, keep_count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(49, generator=generator)[:keep_count] for _ in range(count)])


def _body(count: int, keep_count: int = 10, seed: int = 0, run_id: str | None = None) -> bytes:
    grid = PatchGrid((28, 28), (4, 4), 1)
    keep = _keep(count, keep_count, seed).numpy()
    images = _images(count, seed).numpy()
    return encode_request(gather_patches(images, keep, grid), keep, run_id=run_id)


def _post(url: str, body: bytes, **headers: str) -> httpx.Response:
    headers = {"content-type": CONTENT_TYPE, **headers}
    return httpx.post(f"{url}/v1/logits", content=body, headers=headers, timeout=60.0)


def _assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return str(error["message"])


def _assert_still_serving(service: Service) -> None:
    assert httpx.get(f"{service.url}/v1/health").status_code == 200
    response = _post(service.url, _body(2))
    assert response.status_code == 200, response.text


def _metrics(url: str, **headers: str) -> dict[str, float]:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30.0)
    assert response.status_code == 200, response.text
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _wait_for(condition: Callable[[], bool], description: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.05)


# -- Model card and readiness ----------------------------------------------------------


def test_health_and_ready(service: Service) -> None:
    assert httpx.get(f"{service.url}/v1/health").json() == {"status": "alive"}
    ready = httpx.get(f"{service.url}/v1/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_model_card_has_contract_keys(service: Service) -> None:
    card = httpx.get(f"{service.url}/v1/teacher").json()
    assert card["arch"] == "vit_tiny_patch16_224"
    assert card["img_size"] == [28, 28]
    assert card["patch_size"] == [4, 4]
    assert card["grid_size"] == [7, 7]
    assert card["num_patches"] == 49
    assert card["in_chans"] == 1
    assert card["num_classes"] == 10
    assert len(card["class_names"]) == 10
    assert card["pixel_dtypes"] == ["uint8", "float16"]
    assert card["max_images_per_request"] == MAX_IMAGES_PER_REQUEST
    assert card["max_body_bytes"] == MAX_BODY_BYTES
    assert card["protocol_version"] == "1"
    assert card["digest"] == service.engine.spec.digest
    assert card["macs_per_image_full"] == service.engine.full_macs_per_image
    for key in ("model_kwargs", "mean", "std"):
        assert key in card


def test_info_command_prints_card(service: Service) -> None:
    output = io.StringIO()
    with redirect_stdout(output):
        status = show_info(InfoCommandConfig(url=service.url))
    assert status == 0
    assert json.loads(output.getvalue())["grid_size"] == [7, 7]


def test_info_command_with_token_file(service: Service) -> None:
    output = io.StringIO()
    config = InfoCommandConfig(url=service.guarded_url, token_file=str(service.token_file))
    with redirect_stdout(output):
        assert show_info(config) == 0
    assert json.loads(output.getvalue())["num_classes"] == 10
    assert show_info(InfoCommandConfig(url=service.guarded_url)) == 1


# -- Logits ----------------------------------------------------------------------------


def test_http_client_matches_engine(service: Service) -> None:
    images, keep = _images(6, seed=1), _keep(6, 20, seed=1)
    expected = service.engine.forward_images(images, keep)
    with TeacherClient(service.url, run_id="equality") as client:
        result = client.request(images, keep)
    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)
    assert result.logits.dtype == torch.float32
    spent = 6 * service.engine.macs_per_image(20)
    assert result.macs_spent == spent
    assert result.macs_saved == 6 * service.engine.full_macs_per_image - spent
    assert result.request_id


def test_http_client_float_pixels_and_float32_logits(service: Service) -> None:
    images = _images(3, seed=2).float() / 255.0
    keep = [torch.tensor([0, 1, 2]), torch.arange(49), torch.tensor([48])]
    expected = service.engine.forward_images(images.half().float(), keep)
    with TeacherClient(service.url, logits_dtype="float32") as client:
        logits = client.logits(images, keep)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_ray_client_matches_engine(service: Service) -> None:
    images, keep = _images(4, seed=3), _keep(4, 30, seed=3)
    expected = service.engine.forward_images(images, keep)
    with RayTeacherClient(MAIN_APP, run_id="handle-run") as client:
        assert client.info()["grid_size"] == [7, 7]
        result = client.request(images, keep)
    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)
    assert result.macs_spent == 4 * service.engine.macs_per_image(30)


def test_ray_client_raises_request_error(service: Service) -> None:
    body_keep = torch.tensor([[3, 3]])
    with RayTeacherClient(MAIN_APP) as client, pytest.raises(TeacherRequestError) as caught:
        client.request(_images(1, seed=4), body_keep)
    assert caught.value.status == 422
    assert "more than once" in caught.value.message


def test_concurrent_requests_with_different_kept_counts(service: Service) -> None:
    cases = []
    for index, keep_count in enumerate((5, 49, 10, 5, 20, 1, 10, 33)):
        images = _images(3 + index % 3, seed=10 + index)
        keep: torch.Tensor | list[torch.Tensor] = _keep(len(images), keep_count, seed=10 + index)
        if index % 2:  # ragged rows inside one request too
            keep = [row[: max(1, keep_count - row_index)] for row_index, row in enumerate(keep)]
        cases.append((images, keep))

    with TeacherClient(service.url, run_id="concurrent", max_workers=8) as client:
        futures = [client.submit(images, keep) for images, keep in cases]
        results = [future.result(timeout=120) for future in futures]

    for (images, keep), result in zip(cases, results, strict=True):
        expected = service.engine.forward_images(images, keep)
        torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)


def test_whole_image_request_over_http(service: Service) -> None:
    images = _images(2, seed=5)
    body = encode_request(images.numpy(), None, kind="image", logits_dtype="float32")
    response = _post(service.url, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    table = pa.ipc.open_stream(response.content).read_all()
    logits = np.asarray(table.column("logits").combine_chunks().flatten()).reshape(2, 10)
    expected = service.engine.forward_images(images, None).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    metadata = table.schema.metadata
    assert int(metadata[b"macs_saved"]) == 0
    assert int(metadata[b"images"]) == 2


# -- Errors ------------------------------------------------------------------------------


def test_malformed_body_is_400(service: Service) -> None:
    message = _assert_error(_post(service.url, b"definitely not arrow"), 400, "malformed_body")
    assert "Arrow IPC" in message
    _assert_still_serving(service)


def test_wrong_content_type_is_415(service: Service) -> None:
    response = _post(service.url, _body(1), **{"content-type": "application/json"})
    _assert_error(response, 415, "unsupported_media_type")
    _assert_still_serving(service)


def test_declared_oversized_body_is_413(service: Service) -> None:
    response = _post(service.url, b"\0" * (MAX_BODY_BYTES + 1))
    message = _assert_error(response, 413, "body_too_large")
    assert str(MAX_BODY_BYTES) in message
    _assert_still_serving(service)


def test_chunked_oversized_body_is_413(service: Service) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(5):
            yield b"\0" * (MAX_BODY_BYTES // 4)

    response = httpx.post(
        f"{service.url}/v1/logits",
        content=chunks(),
        headers={"content-type": CONTENT_TYPE},
        timeout=60.0,
    )
    assert "content-length" not in response.request.headers
    _assert_error(response, 413, "body_too_large")
    _assert_still_serving(service)


def test_too_many_images_is_413(service: Service) -> None:
    response = _post(service.url, _body(MAX_IMAGES_PER_REQUEST + 1, keep_count=1))
    message = _assert_error(response, 413, "too_many_images")
    assert str(MAX_IMAGES_PER_REQUEST) in message
    _assert_still_serving(service)


def test_invalid_index_is_422_naming_column_row_value(service: Service) -> None:
    grid = PatchGrid((28, 28), (4, 4), 1)
    keep = [np.array([0, 1]), np.array([2, 77])]
    body = encode_request([np.zeros((2, grid.patch_dim), np.uint8)] * 2, keep)
    message = _assert_error(_post(service.url, body), 422, "invalid_content")
    assert "'keep'" in message
    assert "row 1" in message
    assert "77" in message
    _assert_still_serving(service)


def test_http_client_raises_request_error_for_422(service: Service) -> None:
    with TeacherClient(service.url) as client, pytest.raises(TeacherRequestError) as caught:
        client.request(_images(1, seed=6), [torch.tensor([4, 4])])
    assert caught.value.status == 422
    assert caught.value.code == "invalid_content"


def test_unknown_path_is_json_404(service: Service) -> None:
    _assert_error(httpx.get(f"{service.url}/v1/nothing"), 404, "not_found")


# -- Authentication ------------------------------------------------------------------------


def test_token_missing_wrong_and_right(service: Service) -> None:
    missing = httpx.get(f"{service.guarded_url}/v1/teacher")
    assert "missing bearer token" in _assert_error(missing, 401, "unauthorized")
    wrong = httpx.get(f"{service.guarded_url}/v1/teacher", headers={"authorization": "Bearer nope"})
    assert _assert_error(wrong, 401, "unauthorized") == "invalid bearer token"
    basic = httpx.get(f"{service.guarded_url}/v1/teacher", headers={"authorization": TOKEN})
    _assert_error(basic, 401, "unauthorized")
    right = httpx.get(
        f"{service.guarded_url}/v1/teacher", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert right.status_code == 200
    assert right.json()["num_patches"] == 49


def test_token_required_for_logits_not_for_health(service: Service) -> None:
    body = _body(GUARDED_BATCH_IMAGES)  # a full batch, so it runs without waiting
    _assert_error(_post(service.guarded_url, body), 401, "unauthorized")
    assert httpx.get(f"{service.guarded_url}/v1/health").status_code == 200
    assert httpx.get(f"{service.guarded_url}/v1/ready").status_code == 200
    with TeacherClient(service.guarded_url, token=TOKEN) as client:
        images, keep = _images(GUARDED_BATCH_IMAGES, 7), _keep(GUARDED_BATCH_IMAGES, 9, 7)
        result = client.request(images, keep)
    expected = service.engine.forward_images(images, keep)
    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)


# -- Overload and batch merging --------------------------------------------------------------


def test_overload_is_503_and_batches_merge(service: Service) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    url = service.guarded_url
    in_flight = "maskedkd_teacher_images_in_flight"
    merged_bucket = 'maskedkd_teacher_batch_requests_bucket{le="2"}'
    single_bucket = 'maskedkd_teacher_batch_requests_bucket{le="1"}'
    before = _metrics(url, **auth)
    rejected_before = before.get(
        'maskedkd_teacher_errors_total{status="503",code="overloaded",run_id=""}', 0.0
    )

    # Half a batch waits in the queue (the batch wait is a minute) and takes 4 of the 8
    # images this replica admits.
    half = GUARDED_BATCH_IMAGES // 2
    images_a, keep_a = _images(half, 20), _keep(half, 12, 20)
    with TeacherClient(url, token=TOKEN, max_workers=2) as client:
        future_a = client.submit(images_a, keep_a)
        _wait_for(lambda: _metrics(url, **auth)[in_flight] == half, "4 images in flight")

        # 5 more images do not fit: 503 with Retry-After, the replica keeps its state.
        response = _post(url, _body(half + 1, seed=21), **auth)
        assert "admits at most 8" in _assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"

        # The client retries 503 once, honouring Retry-After, then gives up.
        impatient = TeacherClient(url, token=TOKEN, retries=1, deadline_s=30.0)
        with impatient, pytest.raises(TeacherUnavailableError) as caught:
            impatient.request(_images(half + 1, 22), _keep(half + 1, 3, 22))
        assert caught.value.status == 503

        # The other half fills the batch: both requests run in one engine call.
        images_c, keep_c = _images(half, 23), _keep(half, 40, 23)
        result_c = client.request(images_c, keep_c)
        result_a = future_a.result(timeout=60)

    torch.testing.assert_close(
        result_a.logits, service.engine.forward_images(images_a, keep_a), **FLOAT16_TOLERANCE
    )
    torch.testing.assert_close(
        result_c.logits, service.engine.forward_images(images_c, keep_c), **FLOAT16_TOLERANCE
    )
    after = _metrics(url, **auth)
    rejected = after['maskedkd_teacher_errors_total{status="503",code="overloaded",run_id=""}']
    assert rejected - rejected_before == 3  # the raw request and the client's two attempts
    merged_batches = after[merged_bucket] - after[single_bucket]
    assert merged_batches - (before[merged_bucket] - before[single_bucket]) == 1
    assert after[in_flight] == 0


# -- Metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_per_run(service: Service) -> None:
    before = _metrics(service.url)
    with TeacherClient(service.url, run_id="metrics-run") as client:
        client.request(_images(3, 30), _keep(3, 7, 30))
        client.request(_images(2, 31), _keep(2, 49, 31))
    after = _metrics(service.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    label = '{run_id="metrics-run"}'
    assert delta('maskedkd_teacher_requests_total{run_id="metrics-run",transport="http"}') == 2
    assert delta(f"maskedkd_teacher_images_total{label}") == 5
    assert delta(f"maskedkd_teacher_patches_kept_total{label}") == 3 * 7 + 2 * 49
    assert delta(f"maskedkd_teacher_patches_total{label}") == 5 * 49
    spent = 3 * service.engine.macs_per_image(7) + 2 * service.engine.full_macs_per_image
    assert delta(f"maskedkd_teacher_macs_spent_total{label}") == spent
    assert delta(f"maskedkd_teacher_macs_saved_total{label}") == 3 * (
        service.engine.full_macs_per_image - service.engine.macs_per_image(7)
    )
    assert delta("maskedkd_teacher_batch_images_count") >= 1
    assert after["maskedkd_teacher_replicas"] == 1


def test_metrics_count_errors_by_code(service: Service) -> None:
    before = _metrics(service.url)
    _post(service.url, b"junk")
    after = _metrics(service.url)
    name = 'maskedkd_teacher_errors_total{status="400",code="malformed_body",run_id=""}'
    assert after[name] - before.get(name, 0.0) == 1


def test_metrics_require_token_when_set(service: Service) -> None:
    response = httpx.get(f"{service.guarded_url}/metrics")
    _assert_error(response, 401, "unauthorized")


# -- Command line ------------------------------------------------------------------------------


def test_serve_command_deploys_onto_running_cluster(service: Service) -> None:
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "serve",
        "--teacher",
        str(service.teacher_path),
        "--address",
        service.gcs_address,
        "--app-name",
        "from-cli",
        "--route-prefix",
        "/cli",
        "--num-cpus",
        "0",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read_log() -> None:  # drain stderr so the process never blocks on a full pipe
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "teacher service ready" in line:
                ready.set()
        ready.set()  # the process exited

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        ready.wait(timeout=300)
        ready_lines = [line for line in lines if "teacher service ready" in line]
        assert ready_lines, "serve did not become ready:\n" + "".join(lines[-30:])
        assert "'from-cli'" in ready_lines[0]
        assert "7x7 patches of 4x4 px" in ready_lines[0]
        card = httpx.get(f"{service.url}/cli/v1/teacher", timeout=30.0).json()
        assert card["digest"] == service.engine.spec.digest

        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
    assert "from-cli" not in serve.status().applications
    # The other applications on the cluster keep serving.
    _assert_still_serving(service)


def test_serve_command_rejects_missing_checkpoint(tmp_path: Path) -> None:
    from teacher_service.serve_cli import ServeCommandConfig, serve_teacher
    from teacher_service.service_config import ServiceConfig

    config = ServeCommandConfig(service=ServiceConfig(teacher=str(tmp_path / "none.safetensors")))
    assert serve_teacher(config) == 2


def test_submit_returns_future(service: Service) -> None:
    with TeacherClient(service.url) as client:
        future = client.submit(_images(1, 40), _keep(1, 5, 40))
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=60).logits.shape == (1, 10)
