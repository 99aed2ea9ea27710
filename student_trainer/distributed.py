"""Training a student on Ray Train workers, one PyTorch DDP rank each.

`train_on_workers` starts a `TorchTrainer` whose workers each build the same trainer as a
single-process run and run the same loop (`train.run_training`). Each worker:

- reads its own part of the shards (see `student_trainer.data`);
- computes its own saliency and sends its own teacher requests, through its own source,
  under the run name `<run name>/rank<k>`;
- joins the others in one gradient all-reduce per step, so every rank takes the same step.

Rank 0 sends its metrics lines, checkpoints and final files through `ray.train.report`.
A `UserCallback` runs on the Ray Train controller, which Ray places on the driver's node,
and writes what arrives into the run folder in the single-process layout, so `--resume`
continues a Ray Train run too. Ray Train also keeps the reported checkpoints in its storage
(`storage_path`, by default `ray_train/` in the run folder). That storage must be reachable
from every node, for example a shared folder or a cloud URI.

The learning rate follows `config.lr_scaling`: linear multiplies `lr` by the number of
workers, because the effective batch is `batch_size` x workers (Goyal et al., 2017,
"Accurate, Large Minibatch SGD"). The warm-up start and the final learning rate stay as
configured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint as RayCheckpoint
from torch.nn.parallel import DistributedDataParallel

from student_trainer.checkpointing import CHECKPOINT_DIR, POINTER_NAME, Checkpoint, load_checkpoint
from student_trainer.config import TrainConfig
from student_trainer.data import list_shards
from student_trainer.metrics import MetricsWriter, plot_metrics
from student_trainer.parallel import World
from student_trainer.run_output import (
    METRICS_NAME,
    PLOT_NAME,
    SUMMARY_NAME,
    RunOutput,
    append_keys,
    save_run_checkpoint,
    write_student_weights,
)
from student_trainer.train import checkpoint_to_resume, run_training
from student_trainer.trainer_setup import RunState, Trainer, build_trainer, resolve_steps_per_epoch
from teacher_service.client import TeacherServiceError

logger = logging.getLogger(__name__)

RECORDS_FIELD = "records"
KEYS_FIELD = "trained_keys"
DEFAULT_STORAGE_NAME = "ray_train"
# Errors that a worker raises for bad input or a missing teacher. The driver re-raises them
# unchanged, so the command line reports them as it does for a single-process run.
PASSED_ON_ERRORS = (ValueError, FileNotFoundError, TeacherServiceError)


def train_on_workers(config: TrainConfig) -> dict[str, Any]:
    """Train on `config.num_workers` Ray Train workers and return the run's summary.

    Connects to the Ray cluster at `config.address`, or starts a local Ray when it is None
    and Ray is not running in this process yet.

    NOTE: SIGTERM does not checkpoint and stop after the current step here, as it does in a
    single-process run. The run folder keeps the checkpoint of the last finished epoch.

    Raises:
        ValueError: invalid options, a checkpoint in the run folder without `resume`, or
            fewer GPUs than workers with `use_gpu`.
    """
    config = _with_absolute_paths(config)
    run_dir = Path(config.out)
    checkpoint = checkpoint_to_resume(config, run_dir)
    list_shards(config.data, config.train_split)
    resolve_steps_per_epoch(config, int(config.num_workers or 1))
    _check_local_gpus(config)

    started_ray = not ray.is_initialized()
    if started_ray:
        logger.info("connecting to Ray at %s", config.address or "a new local cluster")
        ray.init(address=config.address)
    try:
        _check_cluster_gpus(config)
        return _fit(config, run_dir, checkpoint)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(config: TrainConfig, run_dir: Path, checkpoint: Checkpoint | None) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    storage_path = config.storage_path or str(run_dir / DEFAULT_STORAGE_NAME)
    name = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_from = None
    if checkpoint is not None:
        resume_from = _stage_checkpoint(
            run_dir, storage_path, f"{name}/resume-step-{int(checkpoint.state['step'])}"
        )
    workers = int(config.num_workers or 1)
    logger.info(
        "training on %d Ray Train workers (%s): batch %d per worker, effective batch %d, "
        "lr %.4g (base lr %.4g, %s scaling)",
        workers,
        "one GPU each" if config.use_gpu else "CPU",
        config.batch_size,
        config.batch_size * workers,
        config.world_lr,
        config.lr,
        config.lr_scaling,
    )
    trainer = ray.train.torch.TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            # mypy reads Ray Train v1's RunConfig type; Ray 2.60 exports v2's, which takes this.
            callbacks=[RunFolderWriter(str(run_dir))],  # type: ignore[list-item]
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as error:
        _raise_worker_error(error)
        raise
    plot_metrics(run_dir / METRICS_NAME, run_dir / PLOT_NAME)
    with open(run_dir / SUMMARY_NAME, encoding="utf-8") as f:
        summary: dict[str, Any] = json.load(f)
    if config.storage_path is None:
        # The run folder now contains the final checkpoint, so Ray Train's copies can go.
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
    return summary


def _with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Resolve local paths against this directory, because Ray Train workers run elsewhere."""
    changes: dict[str, Any] = {"out": os.path.abspath(config.out)}
    for name in ("data", "val_data", "teacher", "teacher_logits", "token_file"):
        value = getattr(config, name)
        if value and "://" not in value:
            changes[name] = os.path.abspath(value)
    if config.storage_path and "://" not in config.storage_path:
        changes["storage_path"] = os.path.abspath(config.storage_path)
    return dataclasses.replace(config, **changes)


def _check_local_gpus(config: TrainConfig) -> None:
    if not config.use_gpu or config.address is not None or ray.is_initialized():
        return
    available = torch.cuda.device_count()
    if available < int(config.num_workers or 1):
        raise ValueError(
            f"--use-gpu gives each of {config.num_workers} workers one GPU, but this machine "
            f"has {available}; drop --use-gpu to train on CPU workers, use fewer workers, or "
            "pass --address of a Ray cluster with GPUs"
        )


def _check_cluster_gpus(config: TrainConfig) -> None:
    if not config.use_gpu:
        return
    available = int(ray.cluster_resources().get("GPU", 0))
    if available < int(config.num_workers or 1):
        raise ValueError(
            f"--use-gpu gives each of {config.num_workers} workers one GPU, but the Ray "
            f"cluster ({config.address or 'local'}) has {available}; drop --use-gpu to train "
            "on CPU workers or use fewer workers"
        )


def _raise_worker_error(error: Any) -> None:
    """Raise the first worker's error when it is bad input or a teacher failure."""
    for rank in sorted(error.worker_failures):
        failure = error.worker_failures[rank]
        cause = getattr(failure, "cause", failure)  # a RayTaskError wraps the original error
        if isinstance(cause, PASSED_ON_ERRORS):
            raise cause from error


def _stage_checkpoint(run_dir: Path, storage_path: str, relative: str) -> RayCheckpoint:
    """Copy the run folder's checkpoint into Ray Train storage, where every worker reads it."""
    with open(run_dir / POINTER_NAME, encoding="utf-8") as f:
        pointer = json.load(f)
    filesystem, root = pyarrow.fs.FileSystem.from_uri(_as_uri(storage_path))
    destination = f"{root}/{relative}"
    with tempfile.TemporaryDirectory(prefix="maskedkd-resume-") as staging:
        for name in (POINTER_NAME, pointer["model_file"], pointer["optimizer_file"]):
            target = Path(staging) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, target)
        filesystem.create_dir(destination, recursive=True)
        pyarrow.fs.copy_files(
            staging,
            destination,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=filesystem,
        )
    logger.info("resuming from step %s, staged in %s", pointer["state"]["step"], destination)
    return RayCheckpoint(destination, filesystem=filesystem)


def _as_uri(storage_path: str) -> str:
    return storage_path if "://" in storage_path else Path(storage_path).as_uri()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Run the training loop as one Ray Train worker."""
    config: TrainConfig = loop_config["config"]
    context = ray.train.get_context()
    world = World(rank=context.get_world_rank(), world_size=context.get_world_size())
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    config = dataclasses.replace(
        config, device=str(device), progress=config.progress and world.is_main
    )
    checkpoint = _checkpoint_to_start_from(loop_config["resume_from"])
    trainer = build_trainer(config, checkpoint.state if checkpoint else None, world)
    output = RayReportOutput(world)
    try:
        # The saliency hook sits on the student's last block, inside the DDP wrapper.
        device_ids = [device.index] if device.type == "cuda" else None
        trainer.train_module = DistributedDataParallel(trainer.student, device_ids=device_ids)
        run_training(trainer, checkpoint, output)
    finally:
        output.close()
        trainer.close()


def _checkpoint_to_start_from(resume_from: RayCheckpoint | None) -> Checkpoint | None:
    """Return this run's latest reported checkpoint (after a worker restart), else `resume_from`."""
    for candidate in (ray.train.get_checkpoint(), resume_from):
        if candidate is None:
            continue
        with candidate.as_directory() as folder:
            # The final report carries the student weights but no checkpoint.json.
            checkpoint = load_checkpoint(folder)
        if checkpoint is not None:
            return checkpoint
    return None


class RayReportOutput(RunOutput):
    """Sends rank 0's metrics lines and files through `ray.train.report`.

    Every rank reports at the same points, as Ray Train requires, and the other ranks
    report only the sample keys they trained on (with `record_keys`).

    Args:
        world: this worker's rank.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.staging = Path(tempfile.mkdtemp(prefix="maskedkd-report-"))
        self.keys: list[str] = []

    def write(self, record: dict[str, Any]) -> None:
        self._report({RECORDS_FIELD: [record] if self.world.is_main else []})

    def save(self, trainer: Trainer, state: RunState) -> None:
        folder = self.staging / f"step-{state.step}"
        if self.world.is_main:
            save_run_checkpoint(folder, trainer, state)
        self._report({}, folder if self.world.is_main else None)

    def finish(self, trainer: Trainer, state: RunState, summary: dict[str, Any]) -> None:
        folder = self.staging / "final"
        records = []
        if self.world.is_main:
            folder.mkdir()
            write_student_weights(folder, trainer)
            with open(folder / SUMMARY_NAME, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
            records = [{"kind": "end", **summary}]
        self._report({RECORDS_FIELD: records}, folder if self.world.is_main else None)

    def add_keys(self, keys: Sequence[str]) -> None:
        self.keys.extend(keys)

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _report(self, metrics: dict[str, Any], folder: Path | None = None) -> None:
        if self.keys:
            metrics[KEYS_FIELD] = self.keys
            self.keys = []
        checkpoint = RayCheckpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class RunFolderWriter(ray.train.UserCallback):
    """Writes what the workers report into the run folder, on the Ray Train controller.

    Metrics lines are appended to metrics.jsonl, sample keys to trained_keys/rank<k>.txt,
    and a reported checkpoint's files are copied in with checkpoint.json last, so the run
    folder always contains one complete checkpoint.

    Args:
        run_dir: the run folder, on the driver's node.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: RayCheckpoint | None,
    ) -> None:
        run_dir = Path(self.run_dir)
        records = metrics[0].get(RECORDS_FIELD, []) if metrics else []
        if records:
            writer = MetricsWriter(run_dir / METRICS_NAME)
            try:
                for record in records:
                    writer.write(record)
            finally:
                writer.close()
        for rank, worker_metrics in enumerate(metrics):
            keys = worker_metrics.get(KEYS_FIELD)
            if keys:
                append_keys(run_dir, rank, keys)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                install_files(Path(folder), run_dir)


def install_files(source: Path, run_dir: Path) -> None:
    """Copy a reported folder into the run folder, each file by an atomic rename.

    checkpoint.json is renamed into place last. Step files of older checkpoints are then
    deleted, as `checkpointing.save_checkpoint` does.
    """
    files = sorted(p for p in source.rglob("*") if p.is_file())
    pointer = source / POINTER_NAME
    for path in [p for p in files if p != pointer] + ([pointer] if pointer in files else []):
        target = run_dir / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, partial)
        os.replace(partial, target)
    if pointer not in files:
        return
    kept = {p.name for p in files if p.parent.name == CHECKPOINT_DIR}
    for old in (run_dir / CHECKPOINT_DIR).glob("step-*.safetensors"):
        if old.name not in kept:
            old.unlink(missing_ok=True)
