"""Short training runs of the MaskedKD trainer on tiny synthetic shards."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
import safetensors.torch
import torch

import student_trainer.trainer_setup as trainer_setup
from student_trainer.data import list_shards, make_loader
from student_trainer.metrics import read_metrics
from student_trainer.sources import LocalTeacherSource, ParquetLogitsSource, write_logits_parquet
from student_trainer.train import train
from teacher_service.client import TeacherResult
from teacher_service.engine import MaskedTeacher
from tests.student_trainer.helpers import (
    NUM_CLASSES,
    TRAIN_COUNT,
    loss_went_down,
    make_config,
    step_losses,
)


def test_local_teacher_run_reduces_loss(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    config = make_config(tiny_data, tmp_path / "run", teacher=str(teacher_file), keep_ratio=0.5)
    summary = train(config)
    losses = step_losses(tmp_path / "run")
    assert summary["steps"] == 3 * (TRAIN_COUNT // 8)
    assert len(losses) == summary["steps"]
    assert loss_went_down(losses)
    assert summary["teacher_macs_spent"] > 0
    assert summary["teacher_macs_saved"] > 0
    assert summary["final_val_top1"] is not None
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    start = records[0]
    assert start["kind"] == "start"
    assert start["teacher_keep_count"] == 8  # half of the teacher's 4x4 grid
    steps = [r for r in records if r["kind"] == "step"]
    assert all(r["kd_loss"] > 0 for r in steps)
    assert all(r["blocked_s"] >= 0 for r in steps)
    assert all(0.0 <= r["teacher_top1"] <= 1.0 for r in steps)
    assert Path(summary["plot"]).stat().st_size > 0
    assert Path(summary["student_weights"]).is_file()


def test_masking_halves_teacher_macs(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    masked = train(
        make_config(
            tiny_data, tmp_path / "masked", teacher=str(teacher_file), keep_ratio=0.5, max_steps=2
        )
    )
    full = train(
        make_config(
            tiny_data, tmp_path / "full", teacher=str(teacher_file), masking="none", max_steps=2
        )
    )
    assert full["teacher_macs_saved"] == 0
    assert masked["teacher_macs_spent"] < 0.6 * full["teacher_macs_spent"]
    assert masked["teacher_macs_spent"] + masked["teacher_macs_saved"] == full["teacher_macs_spent"]


def test_teacher_on_finer_grid(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    # Student patches of 8 pixels: each covers 2x2 of the teacher's 4-pixel patches.
    config = make_config(
        tiny_data,
        tmp_path / "run",
        teacher=str(teacher_file),
        keep_ratio=0.5,
        max_steps=3,
        student_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    )
    summary = train(config)
    start = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert start["teacher_keep_count"] == 8  # 2 of 4 student patches, 4 teacher patches each
    assert summary["steps"] == 3


def write_teacher_logits(data: Path, teacher_file: Path, path: Path) -> int:
    """Run the teacher on every training image and write its logits as Parquet."""
    teacher = MaskedTeacher.from_source(str(teacher_file))
    keys: list[str] = []
    rows: list[torch.Tensor] = []
    for images, _, batch_keys in make_loader(list_shards(data, "train"), 16, train=False):
        rows.append(teacher.forward_images(images, None))
        keys.extend(batch_keys)
    write_logits_parquet(
        path, keys, torch.cat(rows).half(), teacher="tiny", digest=teacher.spec.digest
    )
    return len(keys)


def test_parquet_logits_run_reduces_loss(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    logits_path = tmp_path / "logits.parquet"
    assert write_teacher_logits(tiny_data, teacher_file, logits_path) == TRAIN_COUNT
    config = make_config(
        tiny_data, tmp_path / "run", teacher_logits=str(logits_path), masking="none"
    )
    summary = train(config)
    assert loss_went_down(step_losses(tmp_path / "run"))
    assert summary["source"]["kind"] == "logits"
    assert summary["source"]["card"]["name"] == "tiny"
    assert summary["teacher_macs_spent"] == 0


def test_parquet_logits_match_in_process_teacher(
    tiny_data: Path, teacher_file: Path, tmp_path
) -> None:
    logits_path = tmp_path / "logits.parquet"
    write_teacher_logits(tiny_data, teacher_file, logits_path)
    source = ParquetLogitsSource(logits_path)
    teacher = MaskedTeacher.from_source(str(teacher_file))
    images, _, keys = next(iter(make_loader(list_shards(tiny_data, "train"), 4, train=False)))
    looked_up = source.submit(images, torch.zeros(4, 1, dtype=torch.long), keys).result()
    expected = teacher.forward_images(images, None)
    torch.testing.assert_close(looked_up.logits, expected, atol=2e-2, rtol=1e-2)


def test_no_teacher_run_is_repeatable(tiny_data: Path, tmp_path) -> None:
    first = train(make_config(tiny_data, tmp_path / "a", no_teacher=True, max_steps=5))
    second = train(make_config(tiny_data, tmp_path / "b", no_teacher=True, max_steps=5))
    first_losses = step_losses(tmp_path / "a")
    assert first_losses == step_losses(tmp_path / "b")
    assert first["final_val_top1"] == second["final_val_top1"]
    assert all(
        record["kd_loss"] == 0.0
        for record in read_metrics(tmp_path / "a" / "metrics.jsonl")
        if record["kind"] == "step"
    )
    assert all(
        record["teacher_top1"] is None
        for record in read_metrics(tmp_path / "a" / "metrics.jsonl")
        if record["kind"] == "step"
    )
    assert first["teacher_macs_spent"] == 0


def test_mixup_run_sends_mixed_float_pixels(
    tiny_data: Path, teacher_file: Path, tmp_path, monkeypatch
) -> None:
    seen_dtypes: list[torch.dtype] = []

    class RecordingTeacherSource(LocalTeacherSource):
        def submit(self, images, keep, keys):
            seen_dtypes.append(images.dtype)
            assert float(images.min()) >= 0.0
            assert float(images.max()) <= 1.0
            return super().submit(images, keep, keys)

    def open_recording_source(kind, target, **kwargs):
        assert kind == "file"
        return RecordingTeacherSource(MaskedTeacher.from_source(target))

    monkeypatch.setattr(trainer_setup, "open_source", open_recording_source)
    config = make_config(
        tiny_data,
        tmp_path / "run",
        teacher=str(teacher_file),
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        max_steps=3,
    )
    summary = train(config)
    assert summary["steps"] == 3
    assert seen_dtypes == [torch.float32] * 3


def test_resume_continues_step_count(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    common = {"teacher": str(teacher_file), "masking": "random", "keep_ratio": 0.5}
    straight = train(make_config(tiny_data, tmp_path / "straight", max_steps=8, **common))

    run_dir = tmp_path / "resumed"
    first = train(make_config(tiny_data, run_dir, max_steps=4, **common))
    pointer = json.loads((run_dir / "checkpoint.json").read_text())
    assert first["steps"] == 4
    assert pointer["state"]["run"]["step"] == 4
    assert pointer["state"]["run"]["step_in_epoch"] == 4  # mid-epoch: 6 steps per epoch

    second = train(make_config(tiny_data, run_dir, max_steps=8, resume=True, **common))
    assert second["steps"] == 8
    step_numbers = [
        r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"
    ]
    assert step_numbers == list(range(1, 9))
    assert step_losses(run_dir) == pytest.approx(step_losses(tmp_path / "straight"), rel=1e-5)
    resumed_weights = safetensors.torch.load_file(run_dir / "student.safetensors")
    straight_weights = safetensors.torch.load_file(tmp_path / "straight" / "student.safetensors")
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-5, rtol=1e-4)
    assert second["teacher_macs_spent"] == straight["teacher_macs_spent"]


class SigtermAfter(ParquetLogitsSource):
    """Parquet source that sends this process SIGTERM on its `after`-th request."""

    def __init__(self, path: Path, after: int) -> None:
        super().__init__(path)
        self.after = after
        self.requests = 0

    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        self.requests += 1
        if self.requests == self.after:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().submit(images, keep, keys)


def test_sigterm_checkpoints_and_stops(
    tiny_data: Path, teacher_file: Path, tmp_path, monkeypatch
) -> None:
    logits_path = tmp_path / "logits.parquet"
    write_teacher_logits(tiny_data, teacher_file, logits_path)
    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(
        trainer_setup, "open_source", lambda kind, target, **kwargs: SigtermAfter(Path(target), 2)
    )
    config = make_config(
        tiny_data, tmp_path / "run", teacher_logits=str(logits_path), masking="none"
    )
    summary = train(config)
    assert summary["stopped_by_signal"] is True
    assert summary["steps"] == 2
    pointer = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert pointer["state"]["run"]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == handler_before


@pytest.mark.parametrize("keep_ratio", [0.0, 1.5, -0.25])
def test_bad_keep_ratio_raises(tiny_data: Path, teacher_file: Path, tmp_path, keep_ratio) -> None:
    config = make_config(
        tiny_data, tmp_path / "run", teacher=str(teacher_file), keep_ratio=keep_ratio
    )
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\]"):
        train(config)
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_unmappable_grids_raise(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    # 5-pixel student patches give a 3x3 grid, and 3 and 4 do not divide each other.
    config = make_config(
        tiny_data,
        tmp_path / "run",
        teacher=str(teacher_file),
        student_kwargs={"patch_size": 5, "embed_dim": 16, "depth": 1, "num_heads": 2},
    )
    with pytest.raises(ValueError, match="cannot be mapped"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_teacher_class_count_mismatch_raises(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    config = make_config(tiny_data, tmp_path / "run", teacher=str(teacher_file))
    config.student_kwargs["num_classes"] = NUM_CLASSES + 1
    with pytest.raises(ValueError, match="classes"):
        train(config)


def test_teacher_class_mismatch_with_matching_dataset_raises(tiny_data, tmp_path) -> None:
    logits_path = tmp_path / "logits.parquet"
    keys = [f"train_{i:07d}" for i in range(TRAIN_COUNT)]
    write_logits_parquet(logits_path, keys, torch.zeros(TRAIN_COUNT, NUM_CLASSES + 2))
    config = make_config(
        tiny_data, tmp_path / "run", teacher_logits=str(logits_path), masking="none"
    )
    with pytest.raises(ValueError, match=f"has {NUM_CLASSES + 2} classes"):
        train(config)


def test_parquet_missing_rows_raise(tiny_data: Path, tmp_path) -> None:
    logits_path = tmp_path / "logits.parquet"
    keys = [f"train_{i:07d}" for i in range(TRAIN_COUNT // 2)]
    write_logits_parquet(logits_path, keys, torch.zeros(len(keys), NUM_CLASSES))
    config = make_config(
        tiny_data, tmp_path / "run", teacher_logits=str(logits_path), masking="none"
    )
    with pytest.raises(ValueError, match="precompute logits for the whole split"):
        train(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_logits": "x.parquet", "masking": "student"}, "full images only"),
        ({"no_teacher": True, "teacher": "t.safetensors"}, "exactly one supervision source"),
        ({}, "exactly one supervision source"),
        ({"no_teacher": True, "mixup": 0.8, "batch_size": 7}, "even batch size"),
        ({"no_teacher": True, "batch_size": 64}, "exceeds the 48 training samples"),
    ],
)
def test_invalid_options_raise(tiny_data: Path, tmp_path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(make_config(tiny_data, tmp_path / "run", **overrides))


def test_existing_run_needs_resume(tiny_data: Path, tmp_path) -> None:
    train(make_config(tiny_data, tmp_path / "run", no_teacher=True, max_steps=1))
    with pytest.raises(ValueError, match="pass --resume"):
        train(make_config(tiny_data, tmp_path / "run", no_teacher=True, max_steps=2))


def test_stop_at_epoch_end_completes_epoch(tiny_data: Path, tmp_path) -> None:
    run_dir = tmp_path / "run"
    train(make_config(tiny_data, run_dir, no_teacher=True, max_steps=6))  # 6 steps per epoch
    pointer = json.loads((run_dir / "checkpoint.json").read_text())
    assert pointer["state"]["run"]["epoch"] == 1
    assert pointer["state"]["run"]["step_in_epoch"] == 0

    train(make_config(tiny_data, run_dir, no_teacher=True, max_steps=8, resume=True))
    epochs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [6, 8]
    assert [r["completed"] for r in epochs] == [True, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_cuda_run(tiny_data: Path, teacher_file: Path, tmp_path) -> None:
    config = make_config(
        tiny_data, tmp_path / "run", teacher=str(teacher_file), device="cuda", amp=True
    )
    summary = train(config)
    losses = step_losses(tmp_path / "run")
    assert summary["steps"] == 18
    assert all(loss == loss for loss in losses)  # no NaN
    assert loss_went_down(losses)
