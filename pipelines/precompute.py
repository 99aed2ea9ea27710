"""Offline teacher logits for a whole dataset: a resumable Ray Data job that writes Parquet.

The job reads WebDataset shards with `ray.data.read_webdataset`, runs the masked teacher
engine in a fixed pool of Ray actors through `map_batches` (one GPU per actor when the
device is CUDA), and writes Parquet part files through a Ray Data datasink. Each row has:

| column | type | present |
|---|---|---|
| `key` | string | always: the sample's WebDataset `__key__` |
| `logits` | list<float16 or float32> | without top-k: one value per class |
| `topk_logits` | list<float16 or float32> | with top-k: the k largest logits, descending |
| `topk_indices` | list<int16 or int32> | with top-k: their class indices |
| `logsumexp` | float32 | with top-k: log-sum-exp over all classes, from float32 logits |
| `keep` | list<int16> | with random masking: kept patch indices, ascending |

The schema metadata of every file names the teacher (`teacher`, `teacher_source`), the
SHA-256 of its weights (`teacher_digest`), the class count (`num_classes`) and, as JSON
under `maskedkd_precompute`, the settings that produced the rows. The trainer's
`--teacher-logits` option (`student_trainer.sources.ParquetLogitsSource`) reads the output.

Resume and atomicity: the job writes into a hidden staging folder next to the output,
`.NAME.partial`. Each part is written under a temporary name and renamed once complete,
so a part file that exists is whole. A rerun after a crash or kill keeps the committed
parts, reads their keys and computes only the missing keys. When every key is done, the
job writes `manifest.json` (settings and parts) and renames the staging folder to the
output name, so the output folder only ever exists complete.

On a cluster, run the command on a cluster node with `--address auto`. Every node must read
the shards at the same path (shared storage). Write tasks are pinned to the driver's node,
so the output folder only needs to be on the driver's file system. Ray Client addresses
(`ray://...`) are rejected, because Ray Data cannot pin tasks to a client's node.
NOTE: only a local Ray has run this job; the cluster path is untested.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.precompute_rows import (
    LOGITS_DTYPES,
    RowFormat,
    committed_parts,
    fsync_dir,
    write_part,
)
from student_trainer.data import count_samples, list_shards
from student_trainer.selection import keep_count_for
from student_trainer.sources import (
    PARQUET_CLASSES_KEY,
    PARQUET_DIGEST_KEY,
    PARQUET_SETTINGS_KEY,
    PARQUET_TEACHER_KEY,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
JOB_NAME = "job.json"
LOCK_NAME = ".lock"
MASKING_MODES = ("none", "random")
METADATA_SOURCE_KEY = b"teacher_source"


@dataclass(frozen=True)
class PrecomputeConfig:
    """Options of one precompute job.

    Attributes:
        teacher: portable teacher checkpoint (.safetensors) or timm model name with
            pretrained weights.
        data: shard folder written by `maskedkd prepare`, a .tar file or a brace pattern.
        out: output folder; it appears only when the job is complete.
        split: split to read when `data` is a folder.
        masking: "none" (full images) or "random" (a fixed random subset of patches per
            key, drawn from the key and `seed`).
        keep_ratio: fraction of teacher patches kept with random masking, in (0, 1].
        seed: seed of the random masks.
        top_k: store only the k largest logits, their indices and the log-sum-exp;
            None stores every logit.
        dtype: storage dtype of logit values, "float16" or "float32".
        batch_size: images per teacher forward in each actor.
        rows_per_part: minimum rows per Parquet part file (the unit of resume).
        num_actors: teacher actors; None means one per GPU with CUDA, else 1.
        cpus_per_actor: CPUs reserved per actor; on CPU also its torch thread count.
        device: "auto" (CUDA when the cluster has GPUs), "cpu" or "cuda".
        address: Ray cluster address, such as "auto" on a cluster node or "HOST:6379";
            None starts a local Ray.
        num_cpus: CPUs of the local Ray started without `address`; None uses all.
        progress_interval_s: seconds between progress lines.
        fail_after_parts: test hook: once this many parts are committed in this run, the
            next write raises `PrecomputeStopped` before committing anything.
    """

    teacher: str
    data: str
    out: Path
    split: str = "train"
    masking: str = "none"
    keep_ratio: float | None = None
    seed: int = 0
    top_k: int | None = None
    dtype: str = "float16"
    batch_size: int = 256
    rows_per_part: int = 8192
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    device: str = "auto"
    address: str | None = None
    num_cpus: int | None = None
    progress_interval_s: float = 10.0
    fail_after_parts: int | None = None

    def validate(self) -> None:
        """Raise ValueError for options that are invalid on their own or together."""
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        if self.masking == "random" and self.keep_ratio is None:
            raise ValueError("random masking needs a keep ratio; pass --keep-ratio, e.g. 0.5")
        if self.masking == "none" and self.keep_ratio is not None:
            raise ValueError(
                f"keep ratio {self.keep_ratio} applies only with random masking; pass "
                "--masking random or drop --keep-ratio"
            )
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {self.keep_ratio}")
        if self.dtype not in LOGITS_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(LOGITS_DTYPES)}, got {self.dtype!r}")
        if self.address and self.address.startswith("ray://"):
            raise ValueError(
                f"Ray Client address {self.address!r} is not supported, because part files "
                "are written on the driver's node; run on a cluster node with --address auto"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("batch_size", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("top_k", "num_actors", "num_cpus", "fail_after_parts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset), got {value}")
        if self.cpus_per_actor <= 0 or self.progress_interval_s <= 0:
            raise ValueError(
                f"cpus_per_actor ({self.cpus_per_actor}) and progress_interval_s "
                f"({self.progress_interval_s}) must be above 0"
            )


@dataclass(frozen=True)
class JobPlan:
    """Settings, row layout and file metadata of one job, fixed before it starts.

    Attributes:
        settings: JSON-serialisable settings; a resumed job must have equal settings.
        row_format: the output row layout.
        metadata: Parquet schema metadata of every part file.
        teacher: the teacher's architecture name.
        digest: SHA-256 of the teacher weights.
        macs_per_image: analytic teacher multiply-accumulates per image.
    """

    settings: dict[str, Any]
    row_format: RowFormat
    metadata: dict[bytes, bytes]
    teacher: str
    digest: str
    macs_per_image: int


def run_precompute(config: PrecomputeConfig) -> dict[str, Any]:
    """Compute teacher outputs for every sample of a split and write them as Parquet.

    Resumes an unfinished job with the same settings from its committed parts. An output
    folder that already exists with the same settings is left as it is.

    Args:
        config: the job's options.

    Returns:
        A summary: output folder, total rows, rows written by this run, rows kept from an
        earlier run, parts, seconds of the Ray Data job, images per second and teacher
        multiply-accumulates spent by this run.

    Raises:
        ValueError: For invalid options, an existing output or unfinished job with other
            settings, or a teacher the options do not fit.
        RuntimeError: When another job has locked the staging folder, or the finished job's
            row count disagrees with `dataset.json`.
    """
    config.validate()
    # Ray workers do not share the driver's working directory, so paths become absolute.
    out = Path(config.out).absolute()
    shards = [_absolute_if_local(shard) for shard in list_shards(config.data, config.split)]
    if Path(config.teacher).is_file():
        config = dataclasses.replace(config, teacher=str(Path(config.teacher).absolute()))
    expected_rows = count_samples(config.data, config.split)
    plan = plan_job(config, shards)
    if out.exists():
        return _existing_output_summary(out, plan)

    staging = staging_path(out)
    with _locked(staging):
        done_keys = _resume_state(staging, plan.settings)
        rows_before = len(done_keys)
        job_s = 0.0
        if expected_rows is None or rows_before < expected_rows:
            from pipelines.precompute_ray import run_ray_job

            job_s = run_ray_job(config, shards, plan, staging, done_keys, expected_rows)
        del done_keys
        parts = _dedupe_parts(staging)
        rows = sum(part["rows"] for part in parts)
        if expected_rows is not None and rows != expected_rows:
            raise RuntimeError(
                f"the job finished with {rows} rows but {config.data} lists {expected_rows} "
                f"samples in split {config.split!r}; the shards and dataset.json disagree"
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "settings": plan.settings,
            "rows": rows,
            "macs_per_image": plan.macs_per_image,
            "parts": parts,
        }
        _commit_output(staging, out, manifest)

    rows_written = rows - rows_before
    summary = _summary(out, plan, rows, rows_written, len(parts), job_s)
    logger.info(
        "precompute finished: %d rows written (%d kept from an earlier run), %.1f images/s, "
        "%.4g teacher MACs spent; output %s",
        rows_written,
        rows_before,
        summary["images_per_s"],
        summary["teacher_macs_spent"],
        out,
    )
    return summary


def plan_job(config: PrecomputeConfig, shards: list[str]) -> JobPlan:
    """Load the teacher once in the driver and fix the settings, row format and metadata."""
    from teacher_service.engine import MaskedTeacher

    engine = MaskedTeacher.from_source(config.teacher)
    spec = engine.spec
    masked = config.masking == "random"
    keep_count = spec.num_patches
    if masked:
        assert config.keep_ratio is not None  # checked by validate, narrowed for mypy
        keep_count = keep_count_for(spec.num_patches, config.keep_ratio)
        if spec.num_patches > np.iinfo(np.int16).max:
            raise ValueError(
                f"teacher {spec.arch} has {spec.num_patches} patches, more than the int16 "
                "`keep` column can index; precompute it without masking"
            )
    if config.top_k is not None and config.top_k > spec.num_classes:
        raise ValueError(
            f"top_k {config.top_k} exceeds the teacher's {spec.num_classes} classes; pass "
            f"--top-k between 1 and {spec.num_classes}"
        )
    row_format = RowFormat(
        num_classes=spec.num_classes,
        num_patches=spec.num_patches,
        keep_count=keep_count,
        masked=masked,
        seed=config.seed,
        top_k=config.top_k,
        dtype=config.dtype,
    )
    settings = {
        "format_version": FORMAT_VERSION,
        "teacher": spec.arch,
        "teacher_digest": spec.digest,
        "num_classes": spec.num_classes,
        "shards": [Path(shard).name for shard in shards],
        "masking": config.masking,
        "keep_ratio": config.keep_ratio,
        "keep_count": keep_count,
        "seed": config.seed if masked else None,
        "top_k": config.top_k,
        "dtype": config.dtype,
    }
    metadata = {
        PARQUET_TEACHER_KEY: spec.arch.encode(),
        PARQUET_DIGEST_KEY: spec.digest.encode(),
        METADATA_SOURCE_KEY: spec.source.encode(),
        PARQUET_CLASSES_KEY: str(spec.num_classes).encode(),
        PARQUET_SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode(),
    }
    return JobPlan(
        settings=settings,
        row_format=row_format,
        metadata=metadata,
        teacher=spec.arch,
        digest=spec.digest,
        macs_per_image=engine.macs_per_image(keep_count),
    )


def staging_path(out: Path) -> Path:
    """Return the hidden folder beside `out` that an unfinished job writes into."""
    return out.parent / f".{out.name}.partial"


def read_part_keys(path: Path) -> list[str]:
    """Return the keys of one committed part file."""
    try:
        keys: list[str] = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(
            f"part file {path} is unreadable ({error}); delete it and rerun to recompute its rows"
        ) from error
    return keys


@contextmanager
def _locked(staging: Path) -> Iterator[None]:
    """Hold an exclusive lock on the staging folder, creating it, for one job."""
    staging.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(staging / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RuntimeError(
                f"another precompute job is writing {staging}; wait for it to finish or stop it"
            ) from error
        yield
    finally:
        os.close(descriptor)


def _resume_state(staging: Path, settings: dict[str, Any]) -> set[str]:
    """Check an unfinished job's settings, drop half-written files and return its done keys."""
    job_file = staging / JOB_NAME
    parts = committed_parts(staging)
    if job_file.is_file():
        saved = json.loads(job_file.read_text(encoding="utf-8"))
        differences = _settings_diff(saved, settings)
        if differences:
            raise ValueError(
                f"{staging} contains an unfinished job with other settings "
                f"({'; '.join(differences)}); rerun with the same options to resume it, or "
                "delete that folder to start over"
            )
    elif parts:
        raise ValueError(f"{staging} has part files but no {JOB_NAME}; delete it to start over")
    else:
        _write_json_atomic(job_file, settings)

    # A killed run can leave temporary files of parts it never committed.
    for temp in staging.glob(".*.tmp"):
        temp.unlink()
    done: set[str] = set()
    for part in parts:
        done.update(read_part_keys(part))
    if parts:
        logger.info("resuming: %d rows in %d committed parts of %s", len(done), len(parts), staging)
    return done


def _dedupe_parts(staging: Path) -> list[dict[str, Any]]:
    """Make every key appear once across parts; return each part's file name and rows.

    Resumed runs skip committed keys. A repeat would come from a write task that Ray
    retried after its first attempt had committed a part with other row boundaries.
    """
    seen: set[str] = set()
    parts = []
    for path in committed_parts(staging):
        keys = read_part_keys(path)
        fresh = []
        for key in keys:
            fresh.append(key not in seen)
            seen.add(key)
        if not all(fresh):
            logger.warning(
                "%s repeats %d keys of other parts; dropping them", path, fresh.count(False)
            )
            table = pq.read_table(path).filter(pa.array(fresh))
            if table.num_rows == 0:
                path.unlink()
                continue
            write_part(path, table)
        parts.append({"file": path.name, "rows": fresh.count(True)})
    return parts


def _commit_output(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest and rename the finished staging folder to the output name."""
    _write_json_atomic(staging / MANIFEST_NAME, manifest)
    (staging / JOB_NAME).unlink(missing_ok=True)
    (staging / LOCK_NAME).unlink(missing_ok=True)
    fsync_dir(staging)
    os.rename(staging, out)
    fsync_dir(out.parent)


def _existing_output_summary(out: Path, plan: JobPlan) -> dict[str, Any]:
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"{out} exists but has no {MANIFEST_NAME}, so it is not a finished precompute "
            "output; choose another --out"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    differences = _settings_diff(manifest.get("settings", {}), plan.settings)
    if differences:
        raise ValueError(
            f"{out} contains outputs computed with other settings ({'; '.join(differences)}); "
            "choose another --out or delete it"
        )
    logger.info("%s is already complete with these settings; nothing to compute", out)
    return _summary(out, plan, int(manifest["rows"]), 0, len(manifest["parts"]), 0.0)


def _summary(
    out: Path, plan: JobPlan, rows: int, rows_written: int, parts: int, job_s: float
) -> dict[str, Any]:
    return {
        "out": str(out),
        "rows": rows,
        "rows_written": rows_written,
        "rows_resumed": rows - rows_written,
        "parts": parts,
        "job_s": round(job_s, 3),
        "images_per_s": rows_written / job_s if job_s > 0 else 0.0,
        "teacher_macs_spent": rows_written * plan.macs_per_image,
        "macs_per_image": plan.macs_per_image,
        "teacher": plan.teacher,
        "teacher_digest": plan.digest,
    }


def _absolute_if_local(path: str) -> str:
    return str(Path(path).absolute()) if os.path.exists(path) else path


def _settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    names = sorted(set(saved) | set(current))
    return [
        f"{name}: {saved.get(name)!r} then, {current.get(name)!r} now"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def _write_json_atomic(path: Path, value: Any) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, path)
