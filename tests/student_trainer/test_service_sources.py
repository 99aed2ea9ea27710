"""Training against the teacher service: real local Ray, real Serve, real HTTP on 127.0.0.1.

Ray and the Serve application start once for this module (tens of seconds on two cores).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from student_trainer.data import list_shards, make_loader  # noqa: E402
from student_trainer.sources import RayHandleSource, ServiceSource  # noqa: E402
from student_trainer.train import train  # noqa: E402
from teacher_service.client import TeacherRequestError  # noqa: E402
from teacher_service.deployment import build_app  # noqa: E402
from teacher_service.engine import MaskedTeacher  # noqa: E402
from tests.student_trainer.helpers import loss_went_down, make_config, step_losses  # noqa: E402

APP_NAME = "maskedkd-teacher"
TOKEN = "student-trainer-test-token"


@dataclass
class Service:
    url: str
    token_file: Path
    teacher_file: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(teacher_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "teacher": str(teacher_file),
                "num_cpus": 0,
                "max_batch_images": 64,
                "batch_wait_ms": 2.0,
                "token_file": str(token_file),
                "metrics_flush_s": 0.5,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield Service(f"http://127.0.0.1:{port}", token_file, teacher_file)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_http_service_run_reduces_loss(service: Service, tiny_data: Path, tmp_path) -> None:
    config = make_config(
        tiny_data,
        tmp_path / "run",
        teacher_url=service.url,
        token_file=str(service.token_file),
        keep_ratio=0.5,
    )
    summary = train(config)
    assert loss_went_down(step_losses(tmp_path / "run"))
    assert summary["source"]["kind"] == "url"
    assert summary["teacher_macs_spent"] > 0
    assert summary["teacher_macs_saved"] > 0
    assert summary["blocked_s_total"] >= 0


def test_ray_handle_run_trains(service: Service, tiny_data: Path, tmp_path) -> None:
    config = make_config(
        tiny_data, tmp_path / "run", teacher_app=APP_NAME, masking="random", max_steps=4
    )
    summary = train(config)
    assert summary["steps"] == 4
    assert summary["source"]["kind"] == "app"
    assert summary["teacher_macs_spent"] > 0


def test_service_logits_match_in_process_teacher(service: Service, tiny_data: Path) -> None:
    engine = MaskedTeacher.from_source(str(service.teacher_file))
    images, _, keys = next(iter(make_loader(list_shards(tiny_data, "train"), 4, train=False)))
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15]]).expand(4, -1)
    expected = engine.forward_images(images, keep)
    token = service.token_file.read_text().strip()
    for source in (ServiceSource(service.url, token=token), RayHandleSource(APP_NAME)):
        with source:
            assert source.card is not None
            assert source.card.grid_size == (4, 4)
            result = source.submit(images, keep, keys).result()
        # The service returns float16 logits by default.
        torch.testing.assert_close(result.logits, expected, atol=5e-3, rtol=5e-3)
        assert result.macs_spent == 4 * engine.macs_per_image(8)


def test_http_service_rejects_missing_token(service: Service, tiny_data: Path, tmp_path) -> None:
    config = make_config(tiny_data, tmp_path / "run", teacher_url=service.url, max_steps=1)
    with pytest.raises(TeacherRequestError, match="401 unauthorized"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
