"""Training on Ray Train workers: real local Ray, real Serve teacher, real HTTP on 127.0.0.1.

Two CPU workers (gloo) train against the teacher service. Ray, the Serve application and the
first two-worker run start once for this module; on two busy cores that takes minutes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from student_trainer.checkpointing import load_checkpoint  # noqa: E402
from student_trainer.cli import EXIT_INVALID_INPUT  # noqa: E402
from student_trainer.metrics import read_metrics  # noqa: E402
from student_trainer.train import train  # noqa: E402
from teacher_service.deployment import build_app  # noqa: E402
from tests.student_trainer.helpers import STUDENT_KWARGS, TRAIN_COUNT, make_config  # noqa: E402

APP_NAME = "maskedkd-teacher"
TOKEN = "distributed-test-token"
BATCH_SIZE = 8


@dataclass
class FirstRun:
    """The two-worker run that the tests share, and what it wrote."""

    out: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    keys_by_rank: dict[int, list[str]]
    options: dict[str, Any]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service_url(teacher_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
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
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def first_run(
    service_url: str, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> FirstRun:
    token_file = tmp_path_factory.mktemp("client-token") / "token"
    token_file.write_text(TOKEN + "\n")
    out = tmp_path_factory.mktemp("distributed") / "run"
    options: dict[str, Any] = {
        "teacher_url": service_url,
        "token_file": str(token_file),
        "keep_ratio": 0.5,
        "num_workers": 2,
        "epochs": 1,
        "batch_size": BATCH_SIZE,
        "record_keys": True,
    }
    summary = train(make_config(tiny_data, out, **options))
    keys_by_rank = {
        rank: (out / "trained_keys" / f"rank{rank}.txt").read_text().split() for rank in (0, 1)
    }
    return FirstRun(out, summary, read_metrics(out / "metrics.jsonl"), keys_by_rank, options)


def test_workers_train_disjoint_samples(first_run: FirstRun) -> None:
    rank0, rank1 = first_run.keys_by_rank[0], first_run.keys_by_rank[1]
    assert rank0
    assert rank1
    assert not set(rank0) & set(rank1)
    assert len(set(rank0)) == len(rank0)
    assert len(set(rank1)) == len(rank1)
    # Every step trains one batch on each rank.
    assert len(rank0) == len(rank1) == first_run.summary["steps"] * BATCH_SIZE


def test_workers_ask_the_teacher(first_run: FirstRun) -> None:
    summary = first_run.summary
    assert summary["source"]["kind"] == "url"
    assert summary["steps"] >= 1
    assert summary["teacher_macs_spent"] > 0
    assert summary["teacher_macs_saved"] > 0
    assert summary["images_seen"] == summary["steps"] * BATCH_SIZE * 2


def test_start_record_states_batch_and_lr(first_run: FirstRun) -> None:
    start = first_run.records[0]
    assert start["kind"] == "start"
    parallel = start["parallel"]
    assert parallel["world_size"] == 2
    assert parallel["batch_size_per_worker"] == BATCH_SIZE
    assert parallel["effective_batch_size"] == 2 * BATCH_SIZE
    assert parallel["lr_scaling"] == "linear"
    assert parallel["lr"] == pytest.approx(2 * parallel["base_lr"])


def test_run_folder_has_single_process_layout(first_run: FirstRun) -> None:
    out = first_run.out
    kinds = [record["kind"] for record in first_run.records]
    assert kinds[0] == "start"
    assert kinds[-1] == "end"
    assert "step" in kinds
    assert "epoch" in kinds
    for name in ("checkpoint.json", "student.safetensors", "summary.json", "metrics.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["steps"] == first_run.summary["steps"]


def test_checkpoint_loads_into_student(first_run: FirstRun) -> None:
    import timm

    checkpoint = load_checkpoint(first_run.out)
    assert checkpoint is not None
    assert checkpoint.state["step"] == first_run.summary["steps"]
    kwargs = checkpoint.state["student"]["model_kwargs"]
    assert {k: kwargs[k] for k in STUDENT_KWARGS} == STUDENT_KWARGS
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    model.load_state_dict(checkpoint.model_state)
    logits = model(torch.zeros(1, 1, 16, 16))
    assert logits.shape == (1, 4)


def test_resume_continues_step_count(first_run: FirstRun, tiny_data: Path) -> None:
    first_steps = first_run.summary["steps"]
    options = {**first_run.options, "epochs": 2, "resume": True}

    summary = train(make_config(tiny_data, first_run.out, **options))

    assert summary["steps"] == 2 * first_steps
    assert summary["epochs_completed"] == 2
    starts = [r for r in read_metrics(first_run.out / "metrics.jsonl") if r["kind"] == "start"]
    assert [start["step"] for start in starts] == [0, first_steps]
    checkpoint = load_checkpoint(first_run.out)
    assert checkpoint is not None
    assert checkpoint.state["step"] == 2 * first_steps


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_workers": 0}, "num_workers must be at least 1, got 0"),
        ({"num_workers": -2}, "num_workers must be at least 1, got -2"),
        ({"use_gpu": True}, "--use-gpu applies to Ray Train workers"),
        ({"address": "auto"}, "--address applies to Ray Train workers"),
        ({"storage_path": "shared/ray"}, "--storage-path applies to Ray Train workers"),
        ({"lr_scaling": "none"}, "--lr-scaling none applies to Ray Train workers"),
        ({"num_workers": 2, "device": "cuda"}, "device 'cuda' applies to single-process runs"),
        ({"num_workers": 2, "lr_scaling": "sqrt"}, "lr_scaling must be one of"),
        ({"loader_workers": -1}, "loader_workers must be 0 or more, got -1"),
    ],
)
def test_bad_worker_options_raise(
    overrides: dict[str, Any], message: str, tiny_data: Path, tmp_path: Path
) -> None:
    config = make_config(tiny_data, tmp_path / "run", no_teacher=True, **overrides)
    with pytest.raises(ValueError, match=message):
        train(config)


def test_batch_larger_than_worker_share_raises(tiny_data: Path, tmp_path: Path) -> None:
    config = make_config(tiny_data, tmp_path / "run", no_teacher=True, num_workers=4, batch_size=16)
    with pytest.raises(ValueError, match=f"exceeds the {TRAIN_COUNT // 4} training samples"):
        train(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_use_gpu_without_gpus_raises(tiny_data: Path, tmp_path: Path) -> None:
    config = make_config(
        tiny_data, tmp_path / "run", no_teacher=True, num_workers=2, use_gpu=True, device="auto"
    )
    with pytest.raises(ValueError, match="gives each of 2 workers one GPU, but"):
        train(config)


def test_cli_rejects_zero_workers(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipelines.cli import main

    args = ["train", "--data", str(tiny_data), "--no-teacher", "--num-workers", "0"]
    args += ["--out", str(tmp_path / "run")]

    assert main(args) == EXIT_INVALID_INPUT
    assert "num_workers must be at least 1, got 0" in caplog.text


def test_single_process_run_imports_no_ray(tiny_data: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"code = main({_tiny_train_args(tiny_data, tmp_path / 'run')!r})\n"
        "assert code == 0, code\n"
        "assert 'ray' not in sys.modules, 'a single-process run imported ray'\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _tiny_train_args(data: Path, out: Path) -> list[str]:
    return [
        "train", "--data", str(data), "--patch-size", "4", "--embed-dim", "16",
        "--depth", "1", "--num-heads", "2", "--no-teacher", "--batch-size", "8",
        "--max-steps", "2", "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
