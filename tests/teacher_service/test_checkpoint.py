"""Tests for teacher loading, the portable checkpoint and `maskedkd export-teacher`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from pipelines.cli import main
from teacher_service.checkpoint import (
    TeacherSpec,
    load_teacher,
    read_metadata,
    save_teacher,
    state_dict_digest,
)
from teacher_service.engine import MaskedTeacher

SMALL: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 3,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
CLASS_NAMES = ["shirt", "shoe", "bag"]


@pytest.fixture(scope="module")
def teacher() -> tuple[torch.nn.Module, TeacherSpec]:
    torch.manual_seed(0)
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=SMALL)
    spec = dataclasses.replace(spec, class_names=CLASS_NAMES, mean=(0.29,), std=(0.35,))
    return model, spec


def gray_images(batch_size: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=generator)


def test_round_trip_float32_same_logits(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    saved = save_teacher(model, spec, tmp_path / "teacher.safetensors", dtype=torch.float32)
    loaded_model, loaded_spec = load_teacher(saved.source)
    images = gray_images()
    expected = MaskedTeacher(model, spec).forward_images(images)
    assert torch.equal(MaskedTeacher(loaded_model, loaded_spec).forward_images(images), expected)


def test_round_trip_float16_loads_float32(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    save_teacher(model, spec, path)
    stored = safetensors.torch.load_file(path)
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.float16
    loaded_model, loaded_spec = load_teacher(path)
    assert all(param.dtype == torch.float32 for param in loaded_model.parameters())
    images = gray_images()
    expected = MaskedTeacher(model, spec).forward_images(images)
    logits = MaskedTeacher(loaded_model, loaded_spec).forward_images(images)
    assert (logits - expected).abs().max() < 1e-2


def test_round_trip_keeps_metadata(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    save_teacher(model, spec, path)
    _, loaded = load_teacher(path)
    assert loaded.arch == "vit_tiny_patch16_224"
    assert loaded.model_kwargs == SMALL
    assert loaded.img_size == (28, 28)
    assert loaded.patch_size == (4, 4)
    assert loaded.grid_size == (7, 7)
    assert loaded.num_patches == 49
    assert loaded.in_chans == 1
    assert loaded.num_classes == 3
    assert loaded.class_names == CLASS_NAMES
    assert loaded.mean == (0.29,)
    assert loaded.std == (0.35,)
    assert loaded.source == str(path)
    assert read_metadata(path)["arch"] == "vit_tiny_patch16_224"


def test_digest_is_file_sha256_and_stable(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    first = save_teacher(model, spec, tmp_path / "a.safetensors")
    second = save_teacher(model, spec, tmp_path / "b.safetensors")
    file_sha256 = hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    assert first.digest == file_sha256
    assert second.digest == first.digest
    assert load_teacher(tmp_path / "a.safetensors")[1].digest == first.digest
    assert load_teacher(tmp_path / "a.safetensors")[1].digest == first.digest


def test_digest_changes_with_weights(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    first = save_teacher(model, spec, tmp_path / "a.safetensors")
    changed = load_teacher(tmp_path / "a.safetensors")[0]
    with torch.no_grad():
        changed.get_parameter("head.bias").add_(1.0)
    second = save_teacher(changed, spec, tmp_path / "b.safetensors")
    assert second.digest != first.digest


def test_timm_digest_covers_weights(teacher) -> None:
    model, spec = teacher
    assert spec.digest == state_dict_digest(model)
    assert len(spec.digest) == 64


def test_save_replaces_file_and_leaves_no_temp_files(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"old contents")
    save_teacher(model, spec, path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["teacher.safetensors"]
    assert load_teacher(path)[1].arch == spec.arch


def test_save_rejects_float16_overflow(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    huge = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=SMALL)[0]
    with torch.no_grad():
        huge.get_parameter("head.weight")[0, 0] = 1e6
    with pytest.raises(ValueError, match="head.weight"):
        save_teacher(huge, spec, tmp_path / "teacher.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_rejects_unserialisable_kwargs(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    bad_spec = dataclasses.replace(spec, model_kwargs={"act_layer": torch.nn.GELU})
    with pytest.raises(ValueError, match="JSON"):
        save_teacher(model, bad_spec, tmp_path / "teacher.safetensors")


def test_load_rejects_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="export-teacher"):
        load_teacher(path)


def test_load_rejects_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_teacher(path)


def test_load_rejects_truncated_file(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    save_teacher(model, spec, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="safetensors"):
        load_teacher(path)


def test_load_rejects_weights_of_other_arch(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    wrong = dataclasses.replace(spec, model_kwargs={**SMALL, "depth": 3})
    save_teacher(model, wrong, path)
    with pytest.raises(ValueError, match=r"missing \['blocks\.2"):
        load_teacher(path)


def test_load_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_teacher(tmp_path / "absent.safetensors")


def test_load_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="no_such_model"):
        load_teacher("no_such_model", random_init=True)


def test_load_rejects_timm_options_for_file(teacher, tmp_path: Path) -> None:
    model, spec = teacher
    path = tmp_path / "teacher.safetensors"
    save_teacher(model, spec, path)
    with pytest.raises(ValueError, match="timm model names only"):
        load_teacher(path, random_init=True)


def test_load_rejects_conflicting_weight_options() -> None:
    with pytest.raises(ValueError, match="conflict"):
        load_teacher("vit_tiny_patch16_224", pretrained=True, random_init=True)


def test_random_init_logs_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="teacher_service.checkpoint"):
        _, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=SMALL)
    assert "random weights" in caplog.text
    assert spec.source == "timm:vit_tiny_patch16_224:random"


def test_spec_defaults_mean_std_per_channel() -> None:
    _, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=SMALL)
    assert len(spec.mean) == 1
    assert len(spec.std) == 1
    assert spec.class_names == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"class_names": ["a", "b"]}, "2 class names"),
        ({"mean": (0.5, 0.5)}, "one value per channel"),
        ({"std": (0.0,)}, "positive"),
        ({"std": (float("nan"),)}, "finite"),
        ({"img_size": (30, 28)}, "multiple of patch_size"),
    ],
    ids=["class_names", "mean_length", "zero_std", "nan_std", "img_size"],
)
def test_spec_rejects_invalid(teacher, changes: dict, pattern: str) -> None:
    _, spec = teacher
    with pytest.raises(ValueError, match=pattern):
        dataclasses.replace(spec, **changes)


def test_export_teacher_cli_writes_loadable_file(tmp_path: Path) -> None:
    path = tmp_path / "exported.safetensors"
    exit_code = main(
        [
            "export-teacher",
            "vit_tiny_patch16_224",
            "--random-init",
            "--out",
            str(path),
            "--img-size",
            "28",
            "--patch-size",
            "4",
            "--in-chans",
            "1",
            "--embed-dim",
            "32",
            "--depth",
            "1",
            "--num-heads",
            "2",
            "--class-names",
            "a,b,c,d",
            "--mean",
            "0.3",
            "--std",
            "0.4",
            "--dtype",
            "float32",
        ]
    )
    assert exit_code == 0
    engine = MaskedTeacher.from_source(str(path))
    assert engine.spec.class_names == ["a", "b", "c", "d"]
    assert engine.spec.mean == (0.3,)
    assert engine.spec.std == (0.4,)
    assert engine.grid_size == (7, 7)
    assert engine.forward_images(gray_images(2), torch.tensor([[0, 5], [48, 3]])).shape == (2, 4)
    metadata = json.loads(safetensors.safe_open(path, "pt").metadata()["maskedkd"])
    assert metadata["model_kwargs"]["depth"] == 1


def test_export_teacher_cli_rejects_bad_class_count(tmp_path: Path) -> None:
    path = tmp_path / "exported.safetensors"
    arguments = ["export-teacher", "vit_tiny_patch16_224", "--random-init", "--out", str(path)]
    arguments += ["--img-size", "28", "--patch-size", "4", "--in-chans", "1", "--depth", "1"]
    arguments += ["--num-classes", "5", "--class-names", "a,b"]
    assert main(arguments) == 2
    assert not path.exists()


def test_export_teacher_cli_rejects_unsupported_arch(tmp_path: Path) -> None:
    path = tmp_path / "exported.safetensors"
    arguments = ["export-teacher", "resnet18", "--random-init", "--out", str(path)]
    assert main(arguments) == 2
    assert not path.exists()


def test_load_teacher_bad_sizes_raise():
    kwargs = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 30, "num_heads": 4}
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=kwargs)


def test_saved_teacher_is_world_readable(tmp_path):
    kwargs = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}
    kwargs |= {"embed_dim": 32, "depth": 1, "num_heads": 2}
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=kwargs)
    path = tmp_path / "teacher.safetensors"

    save_teacher(model, spec, path)

    assert path.stat().st_mode & 0o777 == 0o644
