"""`maskedkd precompute`: Ray Data teacher logits as Parquet, checked against the engine.

One local Ray serves the whole module. The shards hold 36 training images in 4 shards and
the teacher is a one-block ViT with random weights, so each job is small.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

from pipelines.cli import main
from pipelines.precompute import MANIFEST_NAME, PrecomputeConfig, run_precompute, staging_path
from pipelines.precompute_ray import pixels_chw
from pipelines.precompute_rows import committed_parts, random_keep
from pipelines.prepare import PrepareConfig, prepare_fashion_mnist
from student_trainer.data import list_shards, make_loader
from student_trainer.selection import keep_count_for
from student_trainer.sources import ParquetLogitsSource, write_logits_parquet
from student_trainer.train import train
from teacher_service.checkpoint import save_teacher, spec_from_model
from teacher_service.engine import MaskedTeacher
from tests.pipelines.conftest import write_fashion_source
from tests.student_trainer.helpers import make_config

TRAIN_COUNT = 36
TEACHER_KWARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
}
NUM_PATCHES = 16  # 4x4 grid of 7x7 patches


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    # The raylet can take minutes to come up on a busy machine.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precompute-data")
    write_fashion_source(root / "source", num_train=TRAIN_COUNT, num_test=4)
    prepare_fashion_mnist(root / "source", PrepareConfig(root / "shards", samples_per_shard=10))
    return root / "shards"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TEACHER_KWARGS)
    spec = spec_from_model(model, arch="vit_tiny_patch16_224", model_kwargs=TEACHER_KWARGS)
    path = tmp_path_factory.mktemp("precompute-teacher") / "teacher.safetensors"
    save_teacher(model, spec, path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def engine(teacher_file: Path) -> MaskedTeacher:
    return MaskedTeacher.from_source(str(teacher_file))


@pytest.fixture(scope="module")
def images(shards: Path) -> dict[str, torch.Tensor]:
    """uint8 [1, 28, 28] pixels of every training image, by key."""
    by_key: dict[str, torch.Tensor] = {}
    for batch_images, _, keys in make_loader(list_shards(shards, "train"), 16, train=False):
        by_key.update(zip(keys, batch_images, strict=True))
    return by_key


@pytest.fixture(scope="module")
def full_output(
    ray_session: None, shards: Path, teacher_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """Full float16 logits written through the command line, as (folder, manifest)."""
    out = tmp_path_factory.mktemp("precompute-full") / "logits"
    argv = [
        "precompute",
        "--teacher",
        str(teacher_file),
        "--data",
        str(shards),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--rows-per-part",
        "10",
        "--progress-interval-s",
        "5",
    ]
    assert main(argv) == 0
    return out, json.loads((out / MANIFEST_NAME).read_text())


def make_precompute_config(
    shards: Path, teacher_file: Path, out: Path, **overrides: Any
) -> PrecomputeConfig:
    options: dict[str, Any] = {
        "teacher": str(teacher_file),
        "data": str(shards),
        "out": out,
        "batch_size": 8,
        "rows_per_part": 10,
        "progress_interval_s": 5.0,
    }
    options.update(overrides)
    return PrecomputeConfig(**options)


def read_rows(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in committed_parts(folder)])


def engine_logits(engine: MaskedTeacher, images: list[torch.Tensor], keep=None) -> np.ndarray:
    return engine.forward_images(torch.stack(images), keep).numpy()


def test_full_logits_match_engine(full_output, engine, images, teacher_file) -> None:
    out, manifest = full_output
    table = read_rows(out)
    keys = table.column("key").to_pylist()
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    expected = engine_logits(engine, [images[key] for key in keys])

    assert sorted(keys) == sorted(images)
    assert table.schema.field("logits").type == pa.list_(pa.float16())
    np.testing.assert_allclose(logits.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert manifest["rows"] == TRAIN_COUNT
    assert manifest["settings"]["teacher_digest"] == engine.spec.digest
    assert manifest["macs_per_image"] == engine.full_macs_per_image
    assert not staging_path(out).exists()


def test_full_output_metadata_names_teacher(full_output, engine) -> None:
    out, _ = full_output
    for path in committed_parts(out):
        metadata = pq.read_schema(path).metadata
        assert metadata[b"teacher_digest"] == engine.spec.digest.encode()
        assert metadata[b"teacher"] == b"vit_tiny_patch16_224"
        assert metadata[b"num_classes"] == b"10"


def test_masked_rows_store_keep_and_match_engine(
    ray_session, shards, teacher_file, engine, images, tmp_path, caplog
) -> None:
    config = make_precompute_config(
        shards,
        teacher_file,
        tmp_path / "masked",
        masking="random",
        keep_ratio=0.5,
        seed=3,
        dtype="float32",
    )
    summary = run_precompute(config)
    table = read_rows(tmp_path / "masked")
    keys = table.column("key").to_pylist()
    keep = np.stack(table.column("keep").to_numpy(zero_copy_only=False)).astype(np.int64)
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    expected = engine_logits(engine, [images[key] for key in keys], torch.from_numpy(keep))

    keep_count = keep_count_for(NUM_PATCHES, 0.5)
    assert keep.shape == (TRAIN_COUNT, keep_count)
    for key, row in zip(keys, keep, strict=True):
        np.testing.assert_array_equal(row, random_keep(key, 3, NUM_PATCHES, keep_count))
    assert len({tuple(row) for row in keep}) > 1
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert summary["teacher_macs_spent"] == TRAIN_COUNT * engine.macs_per_image(keep_count)
    with caplog.at_level(logging.WARNING, logger="student_trainer.sources"):
        ParquetLogitsSource(tmp_path / "masked")
    assert "masked images (random masking, keep ratio 0.5)" in caplog.text


def test_topk_rows_reconstruct_top_logits(
    ray_session, shards, teacher_file, engine, images, full_output, tmp_path
) -> None:
    out = tmp_path / "topk"
    run_precompute(make_precompute_config(shards, teacher_file, out, top_k=2))
    table = read_rows(out)
    keys = table.column("key").to_pylist()
    values = np.stack(table.column("topk_logits").to_numpy(zero_copy_only=False))
    indices = np.stack(table.column("topk_indices").to_numpy(zero_copy_only=False))
    expected = torch.from_numpy(engine_logits(engine, [images[key] for key in keys]))
    expected_values, expected_indices = expected.topk(2, dim=1)

    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_allclose(
        values.astype(np.float32), expected_values.numpy(), rtol=2e-3, atol=2e-3
    )
    np.testing.assert_allclose(
        table.column("logsumexp").to_numpy(), expected.logsumexp(dim=1).numpy(), rtol=1e-5
    )
    assert payload_bytes(out) < payload_bytes(full_output[0])


def payload_bytes(folder: Path) -> int:
    """Compressed bytes of every column but `key` in a folder's part files."""
    total = 0
    for path in committed_parts(folder):
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for column in range(row_group.num_columns):
                if row_group.column(column).path_in_schema != "key":
                    total += row_group.column(column).total_compressed_size
    return total


def test_topk_output_reads_as_full_rows(
    ray_session, shards, teacher_file, engine, images, tmp_path
) -> None:
    out = tmp_path / "topk"
    run_precompute(make_precompute_config(shards, teacher_file, out, top_k=3, dtype="float32"))
    source = ParquetLogitsSource(out, expected_digest=engine.spec.digest)
    keys = sorted(images)[:5]
    dense = source.lookup(keys)
    expected = torch.from_numpy(engine_logits(engine, [images[key] for key in keys]))
    top_values, top_indices = expected.topk(3, dim=1)

    torch.testing.assert_close(dense.gather(1, top_indices), top_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dense.softmax(dim=1).gather(1, top_indices),
        expected.softmax(dim=1).gather(1, top_indices),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        dense.logsumexp(dim=1), expected.logsumexp(dim=1), rtol=1e-5, atol=1e-5
    )


def test_resume_after_stop_computes_only_missing(
    ray_session, shards, teacher_file, engine, images, tmp_path
) -> None:
    out = tmp_path / "resumed"
    staging = staging_path(out)
    config = make_precompute_config(
        shards, teacher_file, out, batch_size=5, rows_per_part=5, dtype="float32"
    )
    with pytest.raises(Exception, match="fail_after_parts"):
        run_precompute(dataclasses.replace(config, fail_after_parts=2))

    assert not out.exists()
    first_parts = {path.name: path.stat() for path in committed_parts(staging)}
    done = sum(pq.read_metadata(staging / name).num_rows for name in first_parts)
    assert len(first_parts) >= 2
    assert 0 < done < TRAIN_COUNT
    (staging / ".part-killed.parquet.0123.tmp").write_bytes(b"PAR1 truncated")

    summary = run_precompute(config)
    table = read_rows(out)
    keys = table.column("key").to_pylist()

    assert sorted(keys) == sorted(images)
    assert summary["rows_resumed"] == done
    assert summary["rows_written"] == TRAIN_COUNT - done
    for name, stat in first_parts.items():
        assert (out / name).stat().st_ino == stat.st_ino
        assert (out / name).stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(out.glob("*.tmp"))
    assert not staging.exists()
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    expected = engine_logits(engine, [images[key] for key in keys])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_rerun_of_complete_output_writes_nothing(full_output, shards, teacher_file) -> None:
    out, _ = full_output
    before = sorted(path.name for path in committed_parts(out))
    summary = run_precompute(make_precompute_config(shards, teacher_file, out))
    assert summary["rows_written"] == 0
    assert summary["rows"] == TRAIN_COUNT
    assert sorted(path.name for path in committed_parts(out)) == before


def test_rerun_with_other_settings_raises(full_output, shards, teacher_file) -> None:
    out, _ = full_output
    config = make_precompute_config(shards, teacher_file, out, dtype="float32")
    with pytest.raises(ValueError, match="other settings.*dtype"):
        run_precompute(config)


def test_trainer_source_joins_on_key(full_output, engine, images) -> None:
    out, _ = full_output
    source = ParquetLogitsSource(out, expected_digest=engine.spec.digest)
    keys = sorted(images)[::-1][:6]
    expected = engine_logits(engine, [images[key] for key in keys])
    assert len(source) == TRAIN_COUNT
    assert source.card is not None
    assert source.card.digest == engine.spec.digest
    np.testing.assert_allclose(source.lookup(keys).numpy(), expected, rtol=2e-3, atol=2e-3)


def test_trainer_source_missing_key_raises(full_output) -> None:
    source = ParquetLogitsSource(full_output[0])
    with pytest.raises(KeyError, match=r"1 of 2 keys have no precomputed logits.*'absent'"):
        source.lookup(["train_0000000", "absent"])


def test_trainer_source_wrong_digest_raises(full_output) -> None:
    with pytest.raises(ValueError, match="not the expected 000000000000"):
        ParquetLogitsSource(full_output[0], expected_digest="0" * 64)


def test_trainer_source_mixed_teachers_raise(full_output, tmp_path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(full_output[0], mixed)
    write_logits_parquet(
        mixed / "part-other.parquet", ["extra"], torch.zeros(1, 10), teacher="t", digest="abc"
    )
    with pytest.raises(ValueError, match="different teachers"):
        ParquetLogitsSource(mixed)


def test_student_trains_from_precomputed_logits(full_output, shards, tmp_path) -> None:
    config = make_config(
        shards,
        tmp_path / "run",
        teacher_logits=str(full_output[0]),
        masking="none",
        val_data=None,
        max_steps=3,
    )
    summary = train(config)
    assert summary["steps"] == 3
    assert summary["source"]["kind"] == "logits"
    assert summary["source"]["card"]["name"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep_ratio": 0.5}, "only with random masking"),
        ({"masking": "random"}, "needs a keep ratio"),
        ({"masking": "random", "keep_ratio": 1.5}, r"must be in \(0, 1\]"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"top_k": 11}, "exceeds the teacher's 10 classes"),
        ({"rows_per_part": 0}, "rows_per_part must be at least 1"),
        ({"address": "ray://head:10001"}, "Ray Client address"),
    ],
)
def test_invalid_options_raise(shards, teacher_file, tmp_path, overrides, message) -> None:
    config = make_precompute_config(shards, teacher_file, tmp_path / "out", **overrides)
    with pytest.raises(ValueError, match=message):
        run_precompute(config)
    assert not (tmp_path / "out").exists()


def test_random_keep_depends_on_key_and_seed() -> None:
    first = random_keep("train_0000001", 0, NUM_PATCHES, 8)
    assert first.tolist() == sorted(set(first.tolist()))
    assert len(first) == 8
    np.testing.assert_array_equal(first, random_keep("train_0000001", 0, NUM_PATCHES, 8))
    others = [random_keep("train_0000001", seed, NUM_PATCHES, 8) for seed in range(1, 6)]
    assert any(not np.array_equal(first, other) for other in others)


def test_pixels_chw_handles_gray_and_rgb() -> None:
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)  # [B, H, W]
    rgb = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)  # [B, H, W, C]
    np.testing.assert_array_equal(pixels_chw(gray, [1]), gray[[1], None])
    np.testing.assert_array_equal(pixels_chw(rgb, [0, 1]), rgb.transpose(0, 3, 1, 2))
