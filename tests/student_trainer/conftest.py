"""Session fixtures of the trainer tests: tiny shards and a small trained teacher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from teacher_service.checkpoint import TeacherSpec, save_teacher
from tests.student_trainer.helpers import (
    IMAGE_SIZE,
    NUM_CLASSES,
    TEACHER_KWARGS,
    TEST_COUNT,
    TRAIN_COUNT,
    one_torch_thread,
    train_tiny_teacher,
    write_shards,
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared-folder layout with 48 training and 16 test images."""
    return write_shards(
        tmp_path_factory.mktemp("shards"), {"train": TRAIN_COUNT, "test": TEST_COUNT}
    )


@pytest.fixture(scope="session")
def teacher_file(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Portable checkpoint of a small teacher trained on `tiny_data` (4x4 patch grid)."""
    model = train_tiny_teacher(tiny_data)
    spec = TeacherSpec(
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(TEACHER_KWARGS),
        img_size=(IMAGE_SIZE, IMAGE_SIZE),
        patch_size=(4, 4),
        in_chans=1,
        num_classes=NUM_CLASSES,
        class_names=[f"quadrant{i}" for i in range(NUM_CLASSES)],
        mean=(0.5,),
        std=(0.25,),
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_teacher(model, spec, path, dtype=torch.float32)
    return path


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run the trainer tests on one intra-op thread; the teacher thread runs beside it."""
    with one_torch_thread():
        yield
