"""Supervision sources that need no service: Parquet logits, local teacher, none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from student_trainer.sources import (
    LocalTeacherSource,
    NoTeacherSource,
    ParquetLogitsSource,
    open_source,
    read_token,
    write_logits_parquet,
)
from teacher_service.engine import MaskedTeacher


def test_parquet_lookup_by_key(tmp_path: Path) -> None:
    logits = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    write_logits_parquet(
        tmp_path / "l.parquet", ["a", "b", "c", "d"], logits, teacher="t1", digest="abc"
    )
    source = ParquetLogitsSource(tmp_path / "l.parquet")
    assert len(source) == 4
    assert source.card is not None
    assert source.card.num_classes == 3
    assert source.card.name == "t1"
    assert source.card.digest == "abc"
    assert source.card.supports_masking is False
    result = source.submit(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1), ["c", "a"]).result()
    torch.testing.assert_close(result.logits, logits[[2, 0]])
    assert result.macs_spent == 0


def test_parquet_folder_and_float16(tmp_path: Path) -> None:
    folder = tmp_path / "logits"
    folder.mkdir()
    write_logits_parquet(folder / "part-0.parquet", ["a"], np.array([[1.0, 2.0]], np.float16))
    write_logits_parquet(folder / "part-1.parquet", ["b"], np.array([[3.0, 4.0]], np.float16))
    source = ParquetLogitsSource(folder)
    assert source.lookup(["b", "a"]).tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert source.lookup(["a"]).dtype == torch.float32


def test_parquet_missing_key_fails_clearly(tmp_path: Path) -> None:
    write_logits_parquet(tmp_path / "l.parquet", ["a"], torch.zeros(1, 2))
    source = ParquetLogitsSource(tmp_path / "l.parquet")
    future = source.submit(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1), ["a", "zz"])
    with pytest.raises(KeyError, match=r"1 of 2 keys have no precomputed logits.*'zz'"):
        future.result()


def test_parquet_duplicate_key_raises(tmp_path: Path) -> None:
    write_logits_parquet(tmp_path / "l.parquet", ["a", "a"], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="key 'a' appears twice"):
        ParquetLogitsSource(tmp_path / "l.parquet")


def test_parquet_ragged_rows_raise(tmp_path: Path) -> None:
    table = pa.table(
        {"key": ["a", "b"], "logits": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))}
    )
    pq.write_table(table, tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="different lengths"):
        ParquetLogitsSource(tmp_path / "l.parquet")


def test_parquet_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ParquetLogitsSource(tmp_path / "absent.parquet")


def test_local_teacher_source_counts_macs(teacher_file: Path) -> None:
    engine = MaskedTeacher.from_source(str(teacher_file))
    with LocalTeacherSource(engine) as source:
        images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
        keep = torch.tensor([[0, 5, 10, 15]]).expand(3, -1)
        result = source.submit(images, keep, ["a", "b", "c"]).result()
    torch.testing.assert_close(result.logits, engine.forward_images(images, keep))
    assert result.macs_spent == 3 * engine.macs_per_image(4)
    assert result.macs_saved == 3 * engine.full_macs_per_image - result.macs_spent
    assert source.card is not None
    assert source.card.grid_size == (4, 4)
    assert source.card.mean == (0.5,)


def test_no_teacher_source_has_no_card() -> None:
    source = open_source("none", None)
    assert isinstance(source, NoTeacherSource)
    assert source.card is None
    with pytest.raises(RuntimeError):
        source.submit(torch.zeros(1), torch.zeros(1), ["a"])


def test_unknown_source_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown supervision source 'ftp'"):
        open_source("ftp", "x")


def test_read_token_strips_first_line(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-value \nsecond line\n")
    assert read_token(str(tmp_path / "token")) == "secret-value"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(str(tmp_path / "empty"))
    assert read_token(None) is None


def test_parquet_topk_rows_expand_to_full_logits(tmp_path: Path) -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [-3.0, 1.0, 4.0, 0.5]])  # [N=2, classes=4]
    top_values, top_indices = logits.topk(2, dim=1)
    table = pa.table(
        {
            "key": ["a", "b"],
            "topk_logits": pa.array(top_values.tolist(), pa.list_(pa.float32())),
            "topk_indices": pa.array(top_indices.tolist(), pa.list_(pa.int16())),
            "logsumexp": pa.array(logits.logsumexp(dim=1).tolist(), pa.float32()),
        }
    ).replace_schema_metadata({b"num_classes": b"4", b"teacher_digest": b"abc"})
    pq.write_table(table, tmp_path / "topk.parquet")
    dense = ParquetLogitsSource(tmp_path / "topk.parquet").lookup(["b", "a"])
    expected = logits[[1, 0]]
    top = top_indices[[1, 0]]
    torch.testing.assert_close(dense.gather(1, top), expected.gather(1, top))
    torch.testing.assert_close(dense.softmax(1).gather(1, top), expected.softmax(1).gather(1, top))
    torch.testing.assert_close(dense.logsumexp(dim=1), expected.logsumexp(dim=1))


def test_parquet_expected_digest_mismatch_raises(tmp_path: Path) -> None:
    write_logits_parquet(tmp_path / "l.parquet", ["a"], torch.zeros(1, 2), digest="abc")
    assert ParquetLogitsSource(tmp_path / "l.parquet", expected_digest="abc").card is not None
    with pytest.raises(ValueError, match="not the expected def"):
        ParquetLogitsSource(tmp_path / "l.parquet", expected_digest="def")


def test_parquet_folder_of_two_teachers_raises(tmp_path: Path) -> None:
    write_logits_parquet(tmp_path / "a.parquet", ["a"], torch.zeros(1, 2), digest="abc")
    write_logits_parquet(tmp_path / "b.parquet", ["b"], torch.zeros(1, 2), digest="def")
    with pytest.raises(ValueError, match="different teachers"):
        ParquetLogitsSource(tmp_path)
