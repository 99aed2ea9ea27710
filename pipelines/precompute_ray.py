"""The Ray side of `maskedkd precompute`: shard reading, teacher actors and part writing.

`pipelines.precompute` plans the job and manages the output folder. This module runs the
Ray Data pipeline `read_webdataset -> map_batches(TeacherWorker) -> PartSink`, which
streams: the executor's backpressure bounds the rows in flight, whatever the dataset size.
Only the teacher actors import torch. Read tasks run Ray's own WebDataset decoder and write
tasks import only `pipelines.precompute_rows`, so their worker processes stay small.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Datasink
from ray.data.block import Block, BlockAccessor

from pipelines.precompute_rows import (
    PART_GLOB,
    PrecomputeStopped,
    RowFormat,
    part_name,
    write_part,
)

if TYPE_CHECKING:
    from pipelines.precompute import JobPlan, PrecomputeConfig

# Sample fields in the shards that `maskedkd prepare` writes.
IMAGE_FIELD = "png"
KEY_FIELD = "__key__"

logger = logging.getLogger(__name__)


def run_ray_job(
    config: PrecomputeConfig,
    shards: list[str],
    plan: JobPlan,
    staging: Path,
    done_keys: set[str],
    expected_rows: int | None,
) -> float:
    """Run the Ray Data job that writes the missing rows into `staging`.

    Connects to `config.address`, or starts a local Ray when Ray is not initialised, and
    shuts down only a Ray that it started.

    Returns:
        Seconds from the start of the Ray Data execution to its end.
    """
    started_ray = _init_ray(config)
    try:
        device, num_gpus, num_actors = _actor_pool(config)
        logger.info(
            "precompute: %d shards, %d teacher actors on %s, %d rows already done",
            len(shards),
            num_actors,
            device,
            len(done_keys),
        )
        # Read tasks decode the PNGs. The actors drop keys that committed parts contain.
        dataset = ray.data.read_webdataset(shards, suffixes=[IMAGE_FIELD])
        dataset = dataset.map_batches(
            TeacherWorker,
            batch_size=config.batch_size,
            compute=ActorPoolStrategy(size=num_actors),
            batch_format="numpy",
            num_cpus=config.cpus_per_actor if device == "cpu" else None,
            num_gpus=num_gpus or None,
            fn_constructor_kwargs={
                "teacher": config.teacher,
                "digest": plan.digest,
                "device": device,
                "threads": max(1, int(config.cpus_per_actor)),
                "row_format": plan.row_format,
                "done_keys": ray.put(frozenset(done_keys)),
            },
        )
        sink = PartSink(
            staging,
            plan.row_format.schema(plan.metadata),
            rows_per_part=config.rows_per_part,
            fail_after_parts=config.fail_after_parts,
        )
        started = time.perf_counter()
        with ProgressReporter(staging, expected_rows, config.progress_interval_s):
            dataset.write_datasink(sink)
        return time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()


def _init_ray(config: PrecomputeConfig) -> bool:
    """Connect to or start Ray unless it is initialised; return whether this call did."""
    if ray.is_initialized():
        return False
    if config.address:
        logger.info("connecting to the Ray cluster at %s", config.address)
        ray.init(address=config.address)
    else:
        logger.info("starting a local Ray (num_cpus=%s)", config.num_cpus or "all")
        ray.init(num_cpus=config.num_cpus, include_dashboard=False)
    # The progress reporter prints plain lines, so Ray Data's progress bars are off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def _actor_pool(config: PrecomputeConfig) -> tuple[str, float, int]:
    """Choose the actors' device, GPUs per actor and pool size from the cluster."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = config.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda":
        if not gpus:
            raise ValueError(
                "device cuda requested but the Ray cluster has no GPUs; use --device cpu"
            )
        return "cuda", 1.0, config.num_actors or gpus
    return "cpu", 0.0, config.num_actors or 1


class TeacherWorker:
    """Ray Data actor that runs the masked teacher engine on batches of decoded images.

    Args:
        teacher: checkpoint path or timm name, as in `PrecomputeConfig.teacher`.
        digest: expected SHA-256 of the teacher weights; other weights raise ValueError.
        device: torch device of this actor.
        threads: torch CPU threads.
        row_format: the output row layout.
        done_keys: keys that committed parts contain, or an object reference to them.
            Their rows are dropped instead of computed.
    """

    def __init__(
        self,
        teacher: str,
        digest: str,
        device: str,
        threads: int,
        row_format: RowFormat,
        done_keys: Any,
    ) -> None:
        import torch

        from teacher_service.engine import MaskedTeacher

        if device == "cpu":
            torch.set_num_threads(threads)
        self.engine = MaskedTeacher.from_source(teacher, device=device)
        if self.engine.spec.digest != digest:
            raise ValueError(
                f"teacher {teacher} has sha256 {self.engine.spec.digest[:12]} in this actor but "
                f"{digest[:12]} in the driver; the weights changed after the job started"
            )
        self.row_format = row_format
        if isinstance(done_keys, ray.ObjectRef):
            done_keys = ray.get(done_keys)
        self.done_keys: frozenset[str] = frozenset(done_keys)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        keys = [str(key) for key in batch[KEY_FIELD]]
        todo = [row for row, key in enumerate(keys) if key not in self.done_keys]
        if not todo:
            return self.row_format.schema().empty_table()
        keys = [keys[row] for row in todo]
        images = torch.from_numpy(pixels_chw(batch[IMAGE_FIELD], todo))  # [B, C, H, W]
        keep = self.row_format.keep_for(keys) if self.row_format.masked else None  # [B, K]
        keep_tensor = None if keep is None else torch.from_numpy(keep)
        logits = self.engine.forward_images(images, keep_tensor)  # [B, num_classes] float32
        return self.row_format.to_table(keys, logits.cpu().numpy(), keep)


def pixels_chw(images: np.ndarray, rows: list[int]) -> np.ndarray:
    """Stack decoded images ([H, W] gray or [H, W, C]) into uint8 [B, C, H, W]."""
    pixels = np.stack([np.asarray(images[row], dtype=np.uint8) for row in rows])
    if pixels.ndim == 3:
        return pixels[:, None]  # [B, H, W] -> [B, 1, H, W]
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # [B, H, W, C] -> [B, C, H, W]


class PartSink(Datasink[dict[str, Any]]):
    """Ray Data datasink that commits each write task's rows as one Parquet part file.

    `Dataset.write_parquet` writes its files in place (Ray 2.60), so a killed job could
    leave a truncated file under a final name. This sink writes each part under a temporary name
    and renames it when complete (`pipelines.precompute.write_part`).

    Args:
        staging: folder that receives the parts.
        schema: schema of the parts, with the teacher metadata.
        rows_per_part: minimum rows Ray Data bundles into one write task.
        fail_after_parts: test hook, see `PrecomputeConfig.fail_after_parts`.
    """

    def __init__(
        self,
        staging: Path,
        schema: pa.Schema,
        *,
        rows_per_part: int,
        fail_after_parts: int | None = None,
    ) -> None:
        self.staging = staging
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.fail_after_parts = fail_after_parts
        self.parts_at_start = len(list(staging.glob(PART_GLOB)))

    @property
    def supports_distributed_writes(self) -> bool:
        # Parts go to the driver node's file system, where the staging folder is.
        return False

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table.cast(self.schema) for table in tables if table.num_rows]
        if not tables:
            return {"file": None, "rows": 0}
        table = pa.concat_tables(tables).replace_schema_metadata(self.schema.metadata)
        if self.fail_after_parts is not None:
            committed = len(list(self.staging.glob(PART_GLOB))) - self.parts_at_start
            if committed >= self.fail_after_parts:
                raise PrecomputeStopped(
                    f"stopping after {committed} parts, as fail_after_parts requests"
                )
        name = part_name(table.column("key").to_pylist())
        write_part(self.staging / name, table)
        return {"file": name, "rows": table.num_rows}


class ProgressReporter:
    """Log committed rows, the rate and an estimate of the time left, every `interval_s`.

    Rows are counted from the footers of committed part files, so the numbers describe
    what a resumed job would keep, and they advance one part (`rows_per_part` rows or
    more) at a time.

    Args:
        staging: folder that receives the parts.
        total_rows: rows of the split, or None when unknown.
        interval_s: seconds between lines.
    """

    def __init__(self, staging: Path, total_rows: int | None, interval_s: float) -> None:
        self.staging = staging
        self.total_rows = total_rows
        self.interval_s = interval_s
        self._rows_of_part: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="precompute-progress", daemon=True)
        self.rows_at_start = self._count_rows()
        self._started = time.perf_counter()

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.report()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def report(self) -> None:
        """Log one progress line."""
        rows = self._count_rows()
        elapsed_s = time.perf_counter() - self._started
        rate = (rows - self.rows_at_start) / elapsed_s if elapsed_s > 0 else 0.0
        if self.total_rows:
            left = f"about {(self.total_rows - rows) / rate:.0f} s left" if rate > 0 else ""
            logger.info(
                "precompute: %d/%d rows committed (%.0f%%), %.1f images/s %s",
                rows,
                self.total_rows,
                100.0 * rows / self.total_rows,
                rate,
                left,
            )
        else:
            logger.info("precompute: %d rows committed, %.1f images/s", rows, rate)

    def _count_rows(self) -> int:
        for path in self.staging.glob(PART_GLOB):
            if path.name not in self._rows_of_part:
                try:
                    self._rows_of_part[path.name] = pq.read_metadata(path).num_rows
                except FileNotFoundError:
                    continue  # deleted by the final deduplication
        return sum(self._rows_of_part.values())
