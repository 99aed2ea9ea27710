"""A student run against a live teacher service survives a killed replica, and fails
cleanly, with its checkpoint intact, when the whole service stops.

Both tests run a real `maskedkd train` process against one local Serve application. The
replica test runs first: the stop test shuts the service down for good.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from student_trainer.checkpointing import load_checkpoint
from teacher_service.client import TeacherClient
from teacher_service.engine import MaskedTeacher
from tests.reliability.helpers import (
    FLOAT16_TOLERANCE,
    TOKEN,
    DeployedApp,
    LocalServe,
    deployed_app,
    images,
    keep_rows,
    latest_step,
    read_metrics_lines,
    replica_pids,
    wait_for,
    write_teacher,
    write_token,
)
from tests.student_trainer.helpers import write_shards

APP = "failures"
BATCH_SIZE = 8


@dataclass
class Service:
    app: DeployedApp
    token_file: Path
    data: Path
    engine: MaskedTeacher


@pytest.fixture(scope="module")
def service(
    shared_serve: LocalServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("failures")
    token_file = write_token(folder)
    teacher_path = write_teacher(folder)
    args = {
        "teacher": str(teacher_path),
        "num_cpus": 0,
        "token_file": str(token_file),
        # Training requests hold a full batch of 8 images and run at once. A lone 1-image
        # request waits in the replica's queue, so a test can kill the replica under it.
        "max_batch_images": BATCH_SIZE,
        "batch_wait_ms": 30_000.0,
    }
    data = write_shards(folder / "data", {"train": BATCH_SIZE * 24, "test": 16})
    with deployed_app(shared_serve, APP, args) as app:
        yield Service(
            app=app,
            token_file=token_file,
            data=data,
            engine=MaskedTeacher.from_source(str(teacher_path)),
        )


def _start_training(
    service: Service, out: Path, *, epochs: int, steps_per_epoch: int, timeout_s: float
) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "train",
        "--data", str(service.data),
        "--out", str(out),
        "--teacher-url", service.app.url,
        "--token-file", str(service.token_file),
        "--masking", "student",
        "--keep-ratio", "0.5",
        "--patch-size", "4",
        "--embed-dim", "16",
        "--depth", "1",
        "--num-heads", "2",
        "--batch-size", str(BATCH_SIZE),
        "--steps-per-epoch", str(steps_per_epoch),
        "--epochs", str(epochs),
        "--log-every", "1",
        "--teacher-timeout", str(timeout_s),
        "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=environment, text=True
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _images_in_flight(service: Service) -> float:
    response = httpx.get(
        f"{service.app.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=60
    )
    for line in response.text.splitlines():
        if line.startswith("maskedkd_teacher_images_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_request_in_flight_survives_a_killed_replica(service: Service) -> None:
    pixels, keep = torch.as_tensor(images(1, 5)), torch.as_tensor(keep_rows(1, 6, 5))
    with TeacherClient(service.app.url, token=TOKEN, timeout_s=120) as client:
        client.info()
        future = client.submit(pixels, keep)
        # The lone image waits in the replica's batch queue when the replica dies.
        wait_for(lambda: _images_in_flight(service) == 1, "the request to reach the replica")
        (old_pid,) = replica_pids(APP)
        os.kill(old_pid, signal.SIGKILL)
        result = future.result(timeout=600)
    expected = service.engine.forward_images(pixels, keep)
    torch.testing.assert_close(result.logits, expected, **FLOAT16_TOLERANCE)


def test_run_survives_a_killed_replica(service: Service, tmp_path: Path) -> None:
    epochs, steps_per_epoch = 2, 24
    out = tmp_path / "run"
    process = _start_training(
        service, out, epochs=epochs, steps_per_epoch=steps_per_epoch, timeout_s=120
    )
    try:
        wait_for(
            lambda: latest_step(out / "metrics.jsonl") >= 4 or process.poll() is not None,
            "the fourth training step",
            timeout_s=600,
        )
        assert process.poll() is None, out.with_suffix(".log").read_text()[-3000:]
        (old_pid,) = replica_pids(APP)
        killed_at_step = latest_step(out / "metrics.jsonl")
        os.kill(old_pid, signal.SIGKILL)
        killed_s = time.monotonic()
        restart_s = wait_for(
            lambda: bool(replica_pids(APP)) and replica_pids(APP) != [old_pid],
            "Serve to start a new replica",
        )
        status = process.wait(timeout=900)
    finally:
        _stop(process)
    log = out.with_suffix(".log").read_text()
    assert status == 0, log[-3000:]

    # Every step ran exactly once, and the run ended normally.
    records = read_metrics_lines(out / "metrics.jsonl")
    steps = [r["step"] for r in records if r.get("kind") == "step"]
    assert steps == list(range(1, epochs * steps_per_epoch + 1))
    assert [r["step"] for r in records if r.get("kind") == "epoch"] == [
        steps_per_epoch * (epoch + 1) for epoch in range(epochs)
    ]
    assert records[-1]["kind"] == "end"
    assert records[-1]["steps"] == epochs * steps_per_epoch
    assert records[-1]["teacher_macs_spent"] > 0
    retries = log.count("; retry ")
    print(
        "replica kill:",
        json.dumps(
            {
                "killed_at_step": killed_at_step,
                "new_replica_after_s": round(restart_s, 1),
                "run_finished_after_kill_s": round(time.monotonic() - killed_s, 1),
                "client_retries": retries,
                "max_blocked_s": max(r["blocked_s"] for r in records if r.get("kind") == "step"),
            }
        ),
    )


def test_stopped_service_fails_run_with_checkpoint_intact(service: Service, tmp_path: Path) -> None:
    from ray import serve

    epochs, steps_per_epoch = 3, 12
    out = tmp_path / "run"
    process = _start_training(
        service, out, epochs=epochs, steps_per_epoch=steps_per_epoch, timeout_s=10
    )
    try:
        wait_for(
            lambda: (
                latest_step(out / "metrics.jsonl") >= steps_per_epoch + 2
                or process.poll() is not None
            ),
            "two steps past the first checkpoint",
            timeout_s=600,
        )
        assert process.poll() is None, out.with_suffix(".log").read_text()[-3000:]
        stopped_at_step = latest_step(out / "metrics.jsonl")
        stopped_s = time.monotonic()
        serve.shutdown()
        status = process.wait(timeout=600)
        failed_after_s = time.monotonic() - stopped_s
    finally:
        _stop(process)
    log = out.with_suffix(".log").read_text()

    # The run stops with a message that names the failure and how to continue.
    assert status == 1, log[-3000:]
    assert "the teacher service did not answer" in log
    assert "failed after" in log
    assert "--resume" in log
    assert "Traceback" not in log

    # The checkpoint of the first epoch is intact and consistent with the metrics.
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None
    assert checkpoint.state["step"] == steps_per_epoch
    assert checkpoint.state["run"]["epoch"] == 1
    assert checkpoint.model_state
    epochs_logged = [
        r["step"] for r in read_metrics_lines(out / "metrics.jsonl") if r.get("kind") == "epoch"
    ]
    assert epochs_logged == [steps_per_epoch]
    assert not (out / "student.safetensors").exists()
    print(
        "service stop:",
        json.dumps(
            {
                "stopped_at_step": stopped_at_step,
                "run_failed_after_s": round(failed_after_s, 1),
                "client_retries": log.count("; retry "),
            }
        ),
    )
