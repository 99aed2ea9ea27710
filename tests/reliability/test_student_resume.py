"""A student run killed with SIGKILL mid-epoch and resumed matches an uninterrupted run.

Both runs are real `maskedkd train` processes on the CPU with the same seed. The teacher
runs in the trainer's process, patches are masked at random and Mixup is on. So every
random stream of the loop (torch, numpy, the patch selection generator and the data
order) must resume exactly where the checkpoint left it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from tests.reliability.helpers import latest_step, read_metrics_lines, wait_for, write_teacher
from tests.student_trainer.helpers import write_shards

STEPS_PER_EPOCH = 12
# Steps take milliseconds on an idle machine, so the kill can land a few epochs after
# KILL_AT_STEP. The spare epochs keep the run from ending before it.
EPOCHS = 6
KILL_AT_STEP = STEPS_PER_EPOCH + 2  # two steps into the second epoch at the earliest


def _train_command(data: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "train",
        "--data", str(data),
        "--out", str(out),
        "--teacher", str(teacher),
        "--masking", "random",
        "--keep-ratio", "0.5",
        "--mixup", "0.2",
        "--patch-size", "4",
        "--embed-dim", "16",
        "--depth", "1",
        "--num-heads", "2",
        "--batch-size", "8",
        "--steps-per-epoch", str(STEPS_PER_EPOCH),
        "--epochs", str(EPOCHS),
        "--warmup-epochs", "1",
        "--log-every", "1",
        "--seed", "7",
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    # One torch thread: the result must not depend on how work is split between threads.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(command: list[str], log: Path) -> None:
    with open(log, "w") as stream:
        status = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=_environment(), timeout=900
        ).returncode
    assert status == 0, log.read_text()[-3000:]


def _step_lines(out: Path) -> list[dict]:
    return [r for r in read_metrics_lines(out / "metrics.jsonl") if r.get("kind") == "step"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("resume")
    data = write_shards(folder / "data", {"train": 8 * STEPS_PER_EPOCH, "test": 16})
    return data, write_teacher(folder)


def test_killed_run_resumes_to_identical_weights(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    data, teacher = inputs

    # The reference: one uninterrupted run.
    reference = tmp_path / "reference"
    _run(_train_command(data, teacher, reference), tmp_path / "reference.log")

    # The same run, killed two steps after its first checkpoint.
    resumed = tmp_path / "resumed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            _train_command(data, teacher, resumed),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
        try:
            wait_for(
                lambda: (
                    latest_step(resumed / "metrics.jsonl") >= KILL_AT_STEP
                    or process.poll() is not None
                ),
                f"step {KILL_AT_STEP} of the run to kill",
                timeout_s=600,
            )
            os.kill(process.pid, signal.SIGKILL)
        finally:
            status = process.wait(timeout=60)
    assert status == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    killed_at = latest_step(resumed / "metrics.jsonl")
    assert STEPS_PER_EPOCH < killed_at < EPOCHS * STEPS_PER_EPOCH
    assert not (resumed / "student.safetensors").exists()

    # The latest epoch checkpoint before the kill is intact.
    pointer = json.loads((resumed / "checkpoint.json").read_text())
    checkpoint_step = pointer["state"]["step"]
    assert checkpoint_step % STEPS_PER_EPOCH == 0
    assert STEPS_PER_EPOCH <= checkpoint_step <= killed_at
    assert safetensors.torch.load_file(resumed / pointer["model_file"])
    lines_before_resume = len(read_metrics_lines(resumed / "metrics.jsonl"))
    _run(_train_command(data, teacher, resumed, "--resume"), tmp_path / "resumed.log")

    # Every step appears once, and each step's loss equals the reference's.
    reference_steps = _step_lines(reference)
    resumed_steps = _step_lines(resumed)
    assert [r["step"] for r in resumed_steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [r["step"] for r in reference_steps] == [r["step"] for r in resumed_steps]
    assert [r["loss"] for r in resumed_steps] == [r["loss"] for r in reference_steps]
    records = read_metrics_lines(resumed / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("kind") == "epoch"] == [
        STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)
    ]
    assert [r["step"] for r in records if r.get("kind") == "start"] == [0, checkpoint_step]

    # The final weights are bit-identical.
    expected = safetensors.torch.load_file(reference / "student.safetensors")
    actual = safetensors.torch.load_file(resumed / "student.safetensors")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].equal(tensor), name
    print(
        "student resume:",
        json.dumps(
            {
                "killed_after_step": killed_at,
                "checkpoint_step": checkpoint_step,
                "metrics_lines_before_resume": lines_before_resume,
                "steps_logged": len(resumed_steps),
                "tensors_compared": len(expected),
            }
        ),
    )
