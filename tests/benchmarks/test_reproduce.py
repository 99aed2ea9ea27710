"""The reproduction study's runner and summary, on a tiny Fashion-MNIST-shaped dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.prepare import PrepareConfig, prepare_fashion_mnist
from tests.pipelines.conftest import write_fashion_source

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "reproduce.py"
FULL_IMAGE_MACS = 62_924_032  # the shipped teacher on all 49 patches, as the engine counts


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_study_runs_and_summarises(tmp_path: Path) -> None:
    write_fashion_source(tmp_path / "source", num_train=32, num_test=16)
    prepare_fashion_mnist(tmp_path / "source", PrepareConfig(out_dir=tmp_path / "shards"))
    study = [
        "run",
        "--data",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "runs"),
        "--arms",
        "no_teacher",
        "maskedkd_50",
        "--seeds",
        "3",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--log-every",
        "1",
    ]

    first = run_script(*study)
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.count("started") == 2
    rerun = run_script(*study)
    assert rerun.returncode == 0, rerun.stderr
    assert "started" not in rerun.stdout  # finished runs are skipped

    json_path = tmp_path / "reproduction.json"
    summary = run_script(
        "summarise",
        "--runs",
        str(tmp_path / "runs"),
        "--json",
        str(json_path),
        "--plots-dir",
        str(tmp_path / "plots"),
    )
    assert summary.returncode == 0, summary.stderr
    assert "| maskedkd_50 | 50% |" in summary.stdout
    result = json.loads(json_path.read_text())
    assert set(result["arms"]) == {"no_teacher", "maskedkd_50"}
    masked = result["arms"]["maskedkd_50"]
    assert masked["keep_ratio"] == 0.5
    assert masked["seeds"] == [3]
    assert len(masked["top1"]) == 1
    assert masked["top1_std"] == 0.0
    assert all(0.0 <= top1 <= 1.0 for top1 in masked["top1"])
    assert 0.4 * FULL_IMAGE_MACS < masked["teacher_macs_per_image"] < 0.6 * FULL_IMAGE_MACS
    assert len(masked["teacher_top1_by_step"]) == 2
    assert result["arms"]["no_teacher"]["teacher_macs_per_image"] == 0
    assert result["arms"]["no_teacher"]["teacher_top1_by_step"] == []
    assert (tmp_path / "plots" / "reproduction_accuracy.png").stat().st_size > 0
    assert (tmp_path / "plots" / "reproduction_curriculum.png").stat().st_size > 0


def test_unknown_arm_is_rejected(tmp_path: Path) -> None:
    result = run_script("run", "--data", str(tmp_path), "--arms", "maskedkd_60")

    assert result.returncode != 0
    assert "maskedkd_60" in result.stderr
    assert "maskedkd_50" in result.stderr  # the message lists the valid names


def test_summary_without_runs_fails_clearly(tmp_path: Path) -> None:
    result = run_script("summarise", "--runs", str(tmp_path / "empty"))

    assert result.returncode != 0
    assert "no finished runs" in result.stderr
