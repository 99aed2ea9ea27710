"""Supervision sources: where a student run gets its teacher logits.

Every source has the same interface (`SupervisionSource`): a `card` that describes the
teacher (None when there is none), `describe()`, `submit(images, keep, keys)` that returns
a `Future[TeacherResult]` at once, and `close()`. The trainer submits right after the
student forward and collects the result after its task-loss backward.

| source | option | where the teacher runs |
|---|---|---|
| `ServiceSource` | `--teacher-url` | a `maskedkd serve` service over HTTP |
| `RayHandleSource` | `--teacher-app` | the same Serve app over a Ray handle |
| `LocalTeacherSource` | `--teacher FILE` | a `MaskedTeacher` in a worker thread here |
| `ParquetLogitsSource` | `--teacher-logits` | nowhere: full-image logits read from Parquet |
| `NoTeacherSource` | `--no-teacher` | nowhere: labels only |

Precomputed logits format (Parquet, one file or a folder of `*.parquet` files): column
`key` (string, the WebDataset `__key__`) and column `logits` (list<float16> or
list<float32>, one entry per class). Optional schema metadata: `teacher` (the teacher's
name or source) and `teacher_digest` (sha256 hex of its weights). `write_logits_parquet`
writes this format. In place of `logits`, a file may store the top k logits per row
(`topk_logits`, `topk_indices`, `logsumexp` and the `num_classes` metadata key), as
`maskedkd precompute --top-k` writes them. All files of a folder must name the same
teacher digest.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from teacher_service.client import RayTeacherClient, TeacherClient, TeacherResult
from teacher_service.engine import MaskedTeacher
from teacher_service.service_config import read_token

logger = logging.getLogger(__name__)

PARQUET_TEACHER_KEY = b"teacher"
PARQUET_DIGEST_KEY = b"teacher_digest"
PARQUET_CLASSES_KEY = b"num_classes"
PARQUET_SETTINGS_KEY = b"maskedkd_precompute"  # JSON settings of `maskedkd precompute`
TOPK_COLUMNS = ("topk_logits", "topk_indices", "logsumexp")


@dataclass(frozen=True)
class TeacherCard:
    """Facts about a teacher that the trainer checks before the first step.

    Attributes:
        name: architecture or source name, for logs.
        num_classes: number of logits.
        img_size: input (height, width) in pixels; None when unknown (precomputed logits).
        patch_size: patch (height, width) in pixels; None when unknown.
        in_chans: input channels; None when unknown.
        mean: per-channel normalisation mean on the [0, 1] scale; None when unknown.
        std: per-channel normalisation std on the [0, 1] scale; None when unknown.
        digest: sha256 hex of the teacher weights, "" when unknown.
        macs_per_image_full: teacher multiply-accumulates per full image, 0 when unknown.
        supports_masking: whether the source can run the teacher on kept patches only.
    """

    name: str
    num_classes: int
    img_size: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None
    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    digest: str = ""
    macs_per_image_full: int = 0
    supports_masking: bool = True

    @property
    def grid_size(self) -> tuple[int, int] | None:
        """Patch grid (rows, cols), or None when the geometry is unknown."""
        if self.img_size is None or self.patch_size is None:
            return None
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @classmethod
    def from_model_card(cls, card: dict[str, Any]) -> TeacherCard:
        """Build from the service's model card (`GET /v1/teacher`)."""
        return cls(
            name=str(card.get("arch", "teacher")),
            num_classes=int(card["num_classes"]),
            img_size=_pair(card["img_size"]),
            patch_size=_pair(card["patch_size"]),
            in_chans=int(card["in_chans"]),
            mean=tuple(float(v) for v in card["mean"]),
            std=tuple(float(v) for v in card["std"]),
            digest=str(card.get("digest", "")),
            macs_per_image_full=int(card.get("macs_per_image_full", 0)),
        )

    @classmethod
    def from_engine(cls, teacher: MaskedTeacher) -> TeacherCard:
        """Build from an in-process `MaskedTeacher`."""
        spec = teacher.spec
        return cls(
            name=spec.arch,
            num_classes=spec.num_classes,
            img_size=_pair(spec.img_size),
            patch_size=_pair(spec.patch_size),
            in_chans=spec.in_chans,
            mean=tuple(spec.mean),
            std=tuple(spec.std),
            digest=spec.digest,
            macs_per_image_full=teacher.full_macs_per_image,
        )


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


class SupervisionSource(ABC):
    """Source of teacher logits. The module docstring lists the implementations.

    Attributes:
        kind: short name of the source (url, app, file, logits, none).
        card: the teacher's card, or None when the source gives no logits.
    """

    kind = "abstract"
    card: TeacherCard | None = None

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable description for logs and metrics."""
        return {"kind": self.kind, "card": asdict(self.card) if self.card else None}

    @abstractmethod
    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        """Request teacher logits and return at once.

        Args:
            images: CPU pixels [B, C, H, W], uint8 in 0..255 or float in [0, 1]. The caller
                must not change them until the future is done.
            keep: CPU int64 kept patch indices [B, K] on the teacher grid, ascending.
            keys: the WebDataset key of each image.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads."""

    def __enter__(self) -> SupervisionSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ServiceSource(SupervisionSource):
    """The teacher service over HTTP, through `TeacherClient`.

    Args:
        url: base URL of the service.
        token: bearer token, or None.
        run_id: run name recorded by the service.
        timeout_s: timeout of one request, in seconds.
    """

    kind = "url"

    def __init__(
        self, url: str, token: str | None = None, run_id: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.client: TeacherClient | RayTeacherClient = TeacherClient(
            url, token=token, run_id=run_id, timeout_s=timeout_s, max_workers=2
        )
        self.card = TeacherCard.from_model_card(self.client.info())
        self.target = url

    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        return self.client.submit(images, keep)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.target}

    def close(self) -> None:
        self.client.close()


class RayHandleSource(ServiceSource):
    """The teacher Serve application over a Ray deployment handle.

    Args:
        app_name: Serve application name.
        ray_address: cluster address for `ray.init` when Ray is not initialised yet.
        run_id: run name recorded by the service.
        timeout_s: timeout of one request, in seconds.
    """

    kind = "app"

    def __init__(
        self,
        app_name: str,
        ray_address: str | None = "auto",
        run_id: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        import ray

        if not ray.is_initialized():
            logger.info("connecting to Ray at %s", ray_address)
            ray.init(address=ray_address, log_to_driver=False)
        self.client = RayTeacherClient(app_name, run_id=run_id, timeout_s=timeout_s, max_workers=2)
        self.card = TeacherCard.from_model_card(self.client.info())
        self.target = app_name


class LocalTeacherSource(SupervisionSource):
    """A `MaskedTeacher` in this process, run in one worker thread.

    Args:
        teacher: the loaded engine.
    """

    kind = "file"

    def __init__(self, teacher: MaskedTeacher) -> None:
        self.teacher = teacher
        self.card = TeacherCard.from_engine(teacher)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="local-teacher"
        )

    @classmethod
    def from_file(cls, path: str, device: str | torch.device = "cpu") -> LocalTeacherSource:
        """Load a portable teacher checkpoint onto `device`."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"teacher checkpoint {path} not found")
        return cls(MaskedTeacher.from_source(path, device=device))

    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        return self._executor.submit(self._run, images, keep)

    def _run(self, images: torch.Tensor, keep: torch.Tensor) -> TeacherResult:
        B, keep_count = keep.shape
        logits = self.teacher.forward_images(images, keep)
        spent = B * self.teacher.macs_per_image(keep_count)
        saved = B * self.teacher.full_macs_per_image - spent
        return TeacherResult(
            logits=logits.cpu(), macs_spent=spent, macs_saved=saved, request_id=None
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.teacher.spec.source}

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class ParquetLogitsSource(SupervisionSource):
    """Precomputed full-image teacher logits, looked up by WebDataset key.

    All rows are loaded into memory at start: N keys and an [N, classes] array in the
    file's dtype (float16 or float32). Top-k rows become full rows. The k stored logits
    keep their values, and every other class gets the logit that spreads the remaining
    probability mass evenly. So at temperature 1 the softmax matches the teacher's on the
    top k classes and on their total.

    Args:
        path: a Parquet file or a folder of `*.parquet` files.
        expected_digest: sha256 hex of the teacher the logits must come from; None
            accepts any teacher.

    Raises:
        ValueError: If the files are malformed, name different teachers, or name a
            teacher other than `expected_digest`.
    """

    kind = "logits"

    def __init__(self, path: str | os.PathLike[str], expected_digest: str | None = None) -> None:
        self.path = str(path)
        table, metadata = _read_logits_table(self.path)
        if "logits" in table.column_names:
            self.logits = _logits_matrix(table, self.path)  # [N, classes]
        else:
            self.logits = _dense_from_topk(table, metadata, self.path)  # [N, classes]
        keys = table.column("key").to_pylist()
        self.row_of_key = _index_keys(keys, self.path)

        teacher = metadata.get(PARQUET_TEACHER_KEY, b"precomputed").decode()
        digest = metadata.get(PARQUET_DIGEST_KEY, b"").decode()
        if expected_digest is not None and digest != expected_digest:
            raise ValueError(
                f"precomputed logits in {self.path} come from teacher {teacher} with sha256 "
                f"{digest[:12] or 'unknown'}, not the expected {expected_digest[:12]}; "
                "precompute them again with the expected teacher"
            )
        self.card = TeacherCard(
            name=teacher,
            num_classes=int(self.logits.shape[1]),
            digest=digest,
            supports_masking=False,
        )

        settings = json.loads(metadata.get(PARQUET_SETTINGS_KEY, b"{}"))
        if settings.get("masking", "none") != "none":
            logger.warning(
                "logits in %s come from the teacher on masked images (%s masking, keep ratio "
                "%s); they supervise the student as given",
                self.path,
                settings["masking"],
                settings.get("keep_ratio"),
            )
        logger.info(
            "loaded %d precomputed logits rows (%d classes, teacher %s) from %s",
            len(self.row_of_key),
            self.card.num_classes,
            teacher,
            self.path,
        )

    def __len__(self) -> int:
        return len(self.row_of_key)

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """Return float32 logits [len(keys), classes] for the keys, or raise KeyError."""
        missing = [key for key in keys if key not in self.row_of_key]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(keys)} keys have no precomputed logits in "
                f"{self.path} (first: {missing[:3]}); precompute logits for this dataset split"
            )
        rows = np.fromiter((self.row_of_key[key] for key in keys), dtype=np.int64, count=len(keys))
        return torch.from_numpy(self.logits[rows].astype(np.float32))

    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        future: concurrent.futures.Future[TeacherResult] = concurrent.futures.Future()
        try:
            logits = self.lookup(keys)
        except KeyError as error:
            future.set_exception(error)
        else:
            future.set_result(TeacherResult(logits, macs_spent=0, macs_saved=0, request_id=None))
        return future

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.path, "rows": len(self)}

    def close(self) -> None:
        """Nothing to release: the rows live in memory."""


class NoTeacherSource(SupervisionSource):
    """No teacher: the trainer uses the task loss alone."""

    kind = "none"

    def submit(
        self, images: torch.Tensor, keep: torch.Tensor, keys: Sequence[str]
    ) -> concurrent.futures.Future[TeacherResult]:
        raise RuntimeError("the no-teacher source gives no logits; do not submit requests to it")

    def close(self) -> None:
        """Nothing to release."""


def _read_logits_table(path: str) -> tuple[pa.Table, dict[bytes, bytes]]:
    target = Path(path)
    if target.is_dir():
        files = sorted(target.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files in {path}")
    elif target.is_file():
        files = [target]
    else:
        raise FileNotFoundError(f"precomputed logits {path} not found")
    schemas = [pq.read_schema(file) for file in files]
    digests = {(schema.metadata or {}).get(PARQUET_DIGEST_KEY, b"").decode() for schema in schemas}
    if len(digests) > 1:
        raise ValueError(
            f"Parquet files in {path} come from different teachers (sha256 "
            f"{sorted(digest[:12] or 'unknown' for digest in digests)}); keep the files of "
            "one teacher in a folder"
        )
    names = schemas[0].names
    if "logits" not in names and "topk_logits" in names:
        columns = ["key", *TOPK_COLUMNS]
    else:
        columns = ["key", "logits"]
    tables = [pq.read_table(file, columns=columns) for file in files]
    types = {str(table.schema.field(columns[1]).type) for table in tables}
    if len(types) > 1:
        raise ValueError(f"Parquet files in {path} mix {columns[1]} types {sorted(types)}")
    metadata = dict(schemas[0].metadata or {})
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables]), metadata


def _logits_matrix(table: pa.Table, path: str, name: str = "logits") -> np.ndarray:
    column = table.column(name).combine_chunks()
    value_type = column.type
    is_list = pa.types.is_list(value_type) or pa.types.is_large_list(value_type)
    if not (is_list or pa.types.is_fixed_size_list(value_type)):
        raise ValueError(f"column {name!r} in {path} has type {value_type}; expected list<float>")
    if column.null_count:
        raise ValueError(f"column {name!r} in {path} has {column.null_count} null rows")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.dtype not in (np.float16, np.float32):
        raise ValueError(f"logits in {path} are {values.dtype}; expected float16 or float32")
    rows = len(column)
    if rows == 0:
        raise ValueError(f"{path} contains no logits rows")
    lengths = np.diff(column.offsets.to_numpy()) if hasattr(column, "offsets") else None
    num_classes = values.size // rows
    if values.size != rows * num_classes or (
        lengths is not None and (lengths != num_classes).any()
    ):
        raise ValueError(f"logits rows in {path} have different lengths; expected one per class")
    return values.reshape(rows, num_classes)


def _dense_from_topk(table: pa.Table, metadata: dict[bytes, bytes], path: str) -> np.ndarray:
    """Expand top-k rows into [N, classes] logits; see `ParquetLogitsSource`."""
    if PARQUET_CLASSES_KEY not in metadata:
        raise ValueError(f"top-k logits in {path} lack the num_classes metadata key")
    num_classes = int(metadata[PARQUET_CLASSES_KEY])
    values = _logits_matrix(table, path, "topk_logits")  # [N, k]
    rows, top_k = values.shape
    flat_indices = table.column("topk_indices").combine_chunks().flatten()
    lse = table.column("logsumexp").to_numpy().astype(np.float64)  # [N]
    indices = flat_indices.to_numpy().astype(np.int64)
    if indices.size != rows * top_k or indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(
            f"topk_indices in {path} do not match topk_logits or lie outside 0..{num_classes - 1}"
        )
    indices = indices.reshape(rows, top_k)
    dense = np.empty((rows, num_classes), dtype=values.dtype)
    if top_k < num_classes:
        # Mass outside the top k, spread over the other classes: p = exp(logit - lse).
        top_mass = np.exp(values.astype(np.float64) - lse[:, None]).sum(axis=1)  # [N]
        rest = np.clip(1.0 - top_mass, np.finfo(np.float32).tiny, None) / (num_classes - top_k)
        dense[:] = (lse + np.log(rest))[:, None]
    np.put_along_axis(dense, indices, values, axis=1)
    return dense


def _index_keys(keys: list[str | None], path: str) -> dict[str, int]:
    row_of_key: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key is None:
            raise ValueError(f"row {row} of {path} has no key")
        if key in row_of_key:
            raise ValueError(f"key {key!r} appears twice in {path}; each key needs one row")
        row_of_key[key] = row
    return row_of_key


def write_logits_parquet(
    path: str | os.PathLike[str],
    keys: Sequence[str],
    logits: torch.Tensor | np.ndarray,
    *,
    teacher: str = "",
    digest: str = "",
) -> None:
    """Write precomputed logits in the format `ParquetLogitsSource` reads (atomic rename).

    Args:
        path: output `.parquet` file.
        keys: WebDataset key of each row.
        logits: [N, classes] float16 or float32 logits.
        teacher: teacher name or source, stored as schema metadata.
        digest: sha256 hex of the teacher weights, stored as schema metadata.
    """
    array = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
    if array.ndim != 2 or array.shape[0] != len(keys):
        raise ValueError(f"logits must be [len(keys)={len(keys)}, classes], got {array.shape}")
    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    flat = pa.array(array.reshape(-1))
    offsets = pa.array(np.arange(0, array.size + 1, array.shape[1], dtype=np.int32))
    table = pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "logits": pa.ListArray.from_arrays(offsets, flat),
        }
    )
    table = table.replace_schema_metadata(
        {PARQUET_TEACHER_KEY: teacher, PARQUET_DIGEST_KEY: digest}
    )
    target = Path(path)
    partial = target.with_name(target.name + ".tmp")
    pq.write_table(table, partial)
    os.replace(partial, target)


def open_source(
    kind: str,
    target: str | None,
    *,
    device: str | torch.device = "cpu",
    token_file: str | None = None,
    run_id: str | None = None,
    ray_address: str | None = "auto",
    timeout_s: float = 60.0,
) -> SupervisionSource:
    """Open the supervision source of one kind.

    Args:
        kind: url, app, file, logits or none.
        target: the URL, app name, checkpoint path or Parquet path (None for none).
        device: device of an in-process teacher.
        token_file: bearer token file for the HTTP service.
        run_id: run name sent to the service.
        ray_address: Ray address for the app source when Ray is not initialised.
        timeout_s: timeout of one service request, in seconds.
    """
    if kind == "none":
        return NoTeacherSource()
    if not target:
        raise ValueError(f"supervision source {kind!r} needs a target")
    if kind == "url":
        return ServiceSource(target, read_token(token_file or None), run_id, timeout_s)
    if kind == "app":
        return RayHandleSource(target, ray_address, run_id, timeout_s)
    if kind == "file":
        return LocalTeacherSource.from_file(target, device)
    if kind == "logits":
        return ParquetLogitsSource(target)
    raise ValueError(f"unknown supervision source {kind!r}; use url, app, file, logits or none")
