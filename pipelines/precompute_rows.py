"""Output rows and part files of `maskedkd precompute`.

This module imports no torch. The Ray workers that write parts import it, so they stay
small, and only the teacher actors load torch.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
LOGITS_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


class PrecomputeStopped(RuntimeError):
    """Raised by the `fail_after_parts` test hook to stop a job the way a crash would."""


@dataclass(frozen=True)
class RowFormat:
    """Layout of the output rows, shared by the driver and the teacher actors.

    Attributes:
        num_classes: logits per image.
        num_patches: patches on the teacher grid.
        keep_count: patches kept per image; `num_patches` without masking.
        masked: whether rows use a random mask (and store `keep`).
        seed: seed of the random masks.
        top_k: logits kept per row, or None for all.
        dtype: storage dtype name of logit values.
    """

    num_classes: int
    num_patches: int
    keep_count: int
    masked: bool
    seed: int
    top_k: int | None
    dtype: str

    def schema(self, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
        """Arrow schema of the output rows."""
        values = pa.list_(LOGITS_DTYPES[self.dtype])
        fields = [pa.field("key", pa.string())]
        if self.top_k is None:
            fields.append(pa.field("logits", values))
        else:
            fields += [
                pa.field("topk_logits", values),
                pa.field("topk_indices", pa.list_(pa.from_numpy_dtype(self.index_dtype))),
                pa.field("logsumexp", pa.float32()),
            ]
        if self.masked:
            fields.append(pa.field("keep", pa.list_(pa.int16())))
        return pa.schema(fields, metadata=metadata)

    @property
    def index_dtype(self) -> np.dtype:
        """Integer dtype of stored class indices: int16 when every class index fits."""
        return np.dtype(np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32)

    def keep_for(self, keys: list[str]) -> np.ndarray:
        """Return the kept patch indices [len(keys), keep_count], int64, rows ascending."""
        rows = [random_keep(key, self.seed, self.num_patches, self.keep_count) for key in keys]
        return np.stack(rows)

    def to_table(self, keys: list[str], logits: np.ndarray, keep: np.ndarray | None) -> pa.Table:
        """Build output rows from float32 logits [B, num_classes] and kept indices [B, K]."""
        value_dtype = np.dtype(self.dtype)
        columns: dict[str, pa.Array] = {"key": pa.array(keys, pa.string())}
        if self.top_k is None:
            columns["logits"] = _list_column(logits.astype(value_dtype))
        else:
            order = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]  # [B, k]
            top_values = np.take_along_axis(logits, order, axis=1)  # [B, k]
            peak = logits.max(axis=1, keepdims=True)  # [B, 1]
            lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))  # [B]
            columns["topk_logits"] = _list_column(top_values.astype(value_dtype))
            columns["topk_indices"] = _list_column(order.astype(self.index_dtype))
            columns["logsumexp"] = pa.array(lse.astype(np.float32))
        if keep is not None:
            columns["keep"] = _list_column(keep.astype(np.int16))
        return pa.Table.from_pydict(columns, schema=self.schema())


def random_keep(key: str, seed: int, num_patches: int, keep_count: int) -> np.ndarray:
    """Draw the kept patches of one sample: same key and seed, same indices.

    The generator is seeded from SHA-256 of the seed and key, so the draw does not depend on
    the order, batch or machine that processes the key. Indices are returned ascending as
    int64. NOTE: the draw uses numpy's `Generator.choice`, whose stream numpy may change
    between versions; the stored `keep` column, not a redraw, is the record.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.choice(num_patches, size=keep_count, replace=False)).astype(np.int64)


def _list_column(matrix: np.ndarray) -> pa.Array:
    """Build a list<...> array with one list per row of a 2-D array."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def part_name(keys: Iterable[str]) -> str:
    """Name a part file after its keys, so a retried write of the same rows replaces it."""
    hasher = hashlib.sha256()
    for key in keys:
        hasher.update(key.encode())
        hasher.update(b"\n")
    return f"part-{hasher.hexdigest()[:24]}.parquet"


def write_part(path: Path, table: pa.Table) -> None:
    """Write a Parquet file under a temporary name, flush it to disk and rename it."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def committed_parts(staging: Path) -> list[Path]:
    """Return the committed part files of a staging or output folder, sorted by name."""
    return sorted(staging.glob(PART_GLOB))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so a rename inside it survives a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
