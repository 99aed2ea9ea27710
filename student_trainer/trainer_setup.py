"""Building a training run: data, supervision source, student, checks and optimizer.

`build_trainer` checks everything that can be checked before the first step (options,
dataset geometry, teacher classes and patch grids) and raises ValueError naming the values.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from student_trainer.config import TrainConfig
from student_trainer.data import count_samples, list_shards, make_loader, read_dataset_info
from student_trainer.loss import MaskedKDTask
from student_trainer.parallel import World
from student_trainer.saliency import CLSAttentionSaliency
from student_trainer.selection import GridMap, get_policy, keep_count_for
from student_trainer.sources import (
    ParquetLogitsSource,
    SupervisionSource,
    TeacherCard,
    open_source,
)
from student_trainer.student import (
    NormalizedStudent,
    build_student,
    estimate_mean_std,
    student_geometry,
)

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Loop position and running totals, saved in every checkpoint.

    Attributes:
        step: optimizer steps done in total.
        epoch: current epoch (0-based).
        step_in_epoch: steps done in the current epoch.
        images_seen: training images consumed.
        teacher_macs_spent: teacher multiply-accumulates spent on this run.
        teacher_macs_saved: multiply-accumulates saved against full-image teacher calls.
        blocked_s: seconds the trainer waited on teacher results.
        train_time_s: seconds spent in training epochs (not evaluation).
        last_val_top1: evaluation top-1 of the latest evaluation, or None.
        best_val_top1: best evaluation top-1 so far, or None.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    images_seen: int = 0
    teacher_macs_spent: int = 0
    teacher_macs_saved: int = 0
    blocked_s: float = 0.0
    train_time_s: float = 0.0
    last_val_top1: float | None = None
    best_val_top1: float | None = None

    def add_step(self, step: dict[str, Any]) -> None:
        """Count one `train_step` result."""
        self.step += 1
        self.step_in_epoch += 1
        self.images_seen += int(step["images"])
        self.teacher_macs_spent += int(step["macs_spent"])
        self.teacher_macs_saved += int(step["macs_saved"])
        self.blocked_s += float(step["blocked_s"])

    def totals(self) -> dict[str, Any]:
        """Return the running totals for metrics lines."""
        return {
            "images_seen": self.images_seen,
            "teacher_macs_spent": self.teacher_macs_spent,
            "teacher_macs_saved": self.teacher_macs_saved,
            "blocked_s_total": self.blocked_s,
        }

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunState:
        """Rebuild from `to_json` output."""
        return cls(**values)


@dataclass
class Trainer:
    """Everything the loop uses, built once by `build_trainer`."""

    config: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    train_shards: list[str]
    val_shards: list[str]
    steps_per_epoch: int
    vit: nn.Module
    student: NormalizedStudent
    saliency: CLSAttentionSaliency
    task: MaskedKDTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    mixup: Mixup | None
    source: SupervisionSource
    grid_map: GridMap | None
    generator: torch.Generator
    student_kwargs: dict[str, Any]
    geometry: dict[str, Any]
    world: World = field(default_factory=World)
    train_module: nn.Module | None = None
    stop_requested: bool = False

    @property
    def forward_module(self) -> nn.Module:
        """The module of the training forward: the DDP wrapper on workers, else the student."""
        return self.train_module if self.train_module is not None else self.student

    @property
    def uses_teacher(self) -> bool:
        """Whether steps request teacher logits (a source with logits and kd_weight > 0)."""
        return self.source.card is not None and self.task.kd_weight > 0

    @property
    def needs_saliency(self) -> bool:
        """Whether the student forward must record saliency."""
        return self.uses_teacher and self.config.masking == "student"

    def select_patches(self, saliency: torch.Tensor) -> torch.Tensor:
        """Return the kept teacher-grid indices [B, K] for student saliency [B, N]."""
        policy = get_policy(self.config.masking)
        if self.grid_map is None:  # full-image source: every student patch
            return get_policy("none")(saliency, saliency.shape[1], None)
        return self.grid_map.select(
            saliency, self.config.effective_keep_ratio, policy, self.generator
        )

    def student_description(self) -> dict[str, Any]:
        """Return the student's timm name, kwargs and normalisation (JSON)."""
        mean, std = self.student.normalization
        return {
            "arch": self.config.student,
            "model_kwargs": self.student_kwargs,
            "mean": list(mean),
            "std": list(std),
        }

    def describe(self) -> dict[str, Any]:
        """Return the run description written as the first metrics line."""
        keep_count = None
        if self.grid_map is not None:
            keep_count = self.grid_map.teacher_keep_count(self.config.effective_keep_ratio)
        return {
            "config": self.config.to_json(),
            "student": self.student_description(),
            "geometry": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.geometry.items()
            },
            "source": self.source.describe(),
            "teacher_keep_count": keep_count,
            "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype) if self.amp_dtype else None,
            "parallel": self.describe_parallel(),
        }

    def describe_parallel(self) -> dict[str, Any]:
        """Return the worker count, the effective batch size and the learning-rate scaling."""
        world_size = self.world.world_size
        return {
            "world_size": world_size,
            "batch_size_per_worker": self.config.batch_size,
            "effective_batch_size": self.config.batch_size * world_size,
            "lr_scaling": self.config.lr_scaling if self.config.num_workers else "none",
            "base_lr": self.config.lr,
            "lr": self.config.world_lr,
        }

    def close(self) -> None:
        """Close the source and remove the saliency hook."""
        self.source.close()
        self.saliency.remove()


def build_trainer(
    config: TrainConfig, saved_state: dict[str, Any] | None = None, world: World | None = None
) -> Trainer:
    """Build and check every part of a run before its first step.

    Args:
        config: the validated run options.
        saved_state: the state of a checkpoint being resumed, whose student
            normalisation is reused.
        world: this process's data-parallel rank; None for a single-process run.
    """
    world = world or World()
    device = resolve_device(config.device)
    amp_dtype = resolve_amp_dtype(config.amp, device)
    seed_everything(config.seed)
    info = _dataset_info(config.data)
    train_shards = list_shards(config.data, config.train_split)
    val_shards = list_shards(config.val_data, config.val_split) if config.val_data else []
    steps_per_epoch = resolve_steps_per_epoch(config, world.world_size)

    source = _open_source(config, device, world)
    try:
        trainer = _build_with_source(
            config, source, info, saved_state, device, amp_dtype, train_shards, steps_per_epoch
        )
    except BaseException:
        source.close()
        raise
    trainer.val_shards = val_shards
    trainer.world = world
    if world.rank:
        # Same initial weights on every rank, but each rank draws its own dropout, Mixup
        # and random masks.
        torch.manual_seed(config.seed + world.rank)
        np.random.seed(config.seed + world.rank)
        trainer.generator.manual_seed(config.seed + 1 + world.rank)
    if source.card is not None and not trainer.uses_teacher:
        logger.warning("kd_weight is 0: the teacher is never called")
    return trainer


def _build_with_source(
    config: TrainConfig,
    source: SupervisionSource,
    info: dict[str, Any] | None,
    saved_state: dict[str, Any] | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    train_shards: list[str],
    steps_per_epoch: int,
) -> Trainer:
    student_kwargs = resolve_student_kwargs(config, info)
    torch.manual_seed(config.seed)  # same initial weights whatever the source loaded
    vit = build_student(config.student, student_kwargs).to(device)
    geometry = student_geometry(vit)
    grid_map = check_pairing(geometry, source.card, info, config)
    mean, std = _resolve_normalization(config, source.card, train_shards, saved_state)
    student = NormalizedStudent(vit, mean, std).to(device)
    saliency = CLSAttentionSaliency(student)
    task, mixup = _build_task(config, student, source, device)
    optimizer = create_optimizer_v2(
        vit, opt="adamw", lr=config.world_lr, weight_decay=config.weight_decay
    )
    trainer = Trainer(
        config=config,
        device=device,
        amp_dtype=amp_dtype,
        train_shards=train_shards,
        val_shards=[],
        steps_per_epoch=steps_per_epoch,
        vit=vit,
        student=student,
        saliency=saliency,
        task=task,
        optimizer=optimizer,
        scheduler=_build_scheduler(config, optimizer, steps_per_epoch),
        # Only float16 autocast needs a gradient scaler. A disabled scaler passes values through.
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        mixup=mixup,
        source=source,
        grid_map=grid_map,
        generator=torch.Generator().manual_seed(config.seed + 1),
        student_kwargs=student_kwargs,
        geometry=geometry,
    )
    saliency.enabled = trainer.needs_saliency
    return trainer


def _build_task(
    config: TrainConfig,
    student: NormalizedStudent,
    source: SupervisionSource,
    device: torch.device,
) -> tuple[MaskedKDTask, Mixup | None]:
    mixing = config.mixup > 0 or config.cutmix > 0
    task = MaskedKDTask(
        student,
        kd_weight=config.kd_weight if source.card is not None else 0.0,
        tau=config.tau,
        kd_type=config.kd_type,
        label_smoothing=config.label_smoothing,
        soft_targets=mixing,
        device=device,
    )
    if not mixing:
        return task, None
    mixup = Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        label_smoothing=config.label_smoothing,
        num_classes=int(student_geometry(student.model)["num_classes"]),
    )
    return task, mixup


def _build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps,
    )
    return scheduler


def check_pairing(
    geometry: dict[str, Any],
    card: TeacherCard | None,
    info: dict[str, Any] | None,
    config: TrainConfig,
) -> GridMap | None:
    """Check that data, student and teacher fit together; return the grid mapping.

    Returns:
        The student-to-teacher grid mapping, or None when the source has no patch grid.

    Raises:
        ValueError: different class counts, channels or image sizes, unmappable grids or
            an invalid keep ratio.
    """
    if info is not None:
        _check_dataset_fits(geometry, info)
    if card is None:
        return None
    if card.num_classes != geometry["num_classes"]:
        raise ValueError(
            f"the teacher ({card.name}) has {card.num_classes} classes but the student has "
            f"{geometry['num_classes']}; train the student on the teacher's label set"
        )
    if not card.supports_masking or card.grid_size is None:
        return None
    if card.in_chans != geometry["in_chans"] or card.img_size != geometry["img_size"]:
        raise ValueError(
            f"the teacher expects {card.in_chans}-channel {card.img_size} images but the "
            f"student gets {geometry['in_chans']}-channel {geometry['img_size']} images; the "
            "teacher sees the student's pixels, so both need the same size and channels"
        )
    grid_map = GridMap(geometry["grid_size"], card.grid_size)
    keep_count_for(grid_map.teacher_num_patches, config.effective_keep_ratio)
    return grid_map


def _check_dataset_fits(geometry: dict[str, Any], info: dict[str, Any]) -> None:
    classes = info.get("classes")
    if classes is not None and len(classes) != geometry["num_classes"]:
        raise ValueError(
            f"the dataset has {len(classes)} classes but the student has "
            f"{geometry['num_classes']}; set --num-classes {len(classes)}"
        )
    channels = info.get("channels")
    if channels is not None and int(channels) != geometry["in_chans"]:
        raise ValueError(
            f"the dataset has {channels}-channel images but the student takes "
            f"{geometry['in_chans']}; set --in-chans {channels}"
        )
    image_size = info.get("image_size")
    if image_size is not None and tuple(int(v) for v in image_size) != geometry["img_size"]:
        raise ValueError(
            f"the dataset's images are {tuple(image_size)} but the student takes "
            f"{geometry['img_size']}; set --img-size to the dataset's size (no resizing is done)"
        )


def resolve_student_kwargs(config: TrainConfig, info: dict[str, Any] | None) -> dict[str, Any]:
    """Fill img_size, in_chans and num_classes from dataset.json where not given."""
    kwargs = dict(config.student_kwargs)
    if info is None:
        return kwargs
    defaults = {
        "img_size": info.get("image_size") and list(info["image_size"]),
        "in_chans": info.get("channels"),
        "num_classes": len(info["classes"]) if info.get("classes") else None,
    }
    for name, value in defaults.items():
        if name not in kwargs and value is not None:
            kwargs[name] = value
            logger.info("student %s=%s taken from dataset.json", name, value)
    return kwargs


def resolve_steps_per_epoch(config: TrainConfig, world_size: int = 1) -> int:
    """Return the configured steps per epoch, or the steps one rank's share allows.

    Without `steps_per_epoch`, a rank's share is train count // world_size samples from
    dataset.json, and an epoch is that share // batch size steps.
    """
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    count = count_samples(config.data, config.train_split)
    if count is None:
        raise ValueError(
            f"cannot tell the size of {config.data}: WebDataset streams have no length; "
            "pass a folder with dataset.json or set --steps-per-epoch"
        )
    share = count // world_size
    steps = share // config.batch_size
    if steps < 1 and world_size > 1:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {share} training samples of each of "
            f"{world_size} workers, and the last partial batch is dropped; use a smaller "
            "--batch-size or fewer workers"
        )
    if steps < 1:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {count} training samples, and the "
            "last partial batch is dropped; use a smaller --batch-size"
        )
    return steps


def _resolve_normalization(
    config: TrainConfig,
    card: TeacherCard | None,
    train_shards: list[str],
    saved_state: dict[str, Any] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if config.student_mean is not None and config.student_std is not None:
        return config.student_mean, config.student_std
    if saved_state is not None and "student" in saved_state:
        saved = saved_state["student"]
        return tuple(saved["mean"]), tuple(saved["std"])
    if card is not None and card.mean is not None and card.std is not None:
        logger.info("student normalisation from the teacher: mean %s std %s", card.mean, card.std)
        return card.mean, card.std
    loader = make_loader(train_shards, config.batch_size, train=False)
    mean, std = estimate_mean_std(images for images, _, _ in loader)
    logger.info("student normalisation estimated from training images: mean %s std %s", mean, std)
    return mean, std


def _open_source(config: TrainConfig, device: torch.device, world: World) -> SupervisionSource:
    kind = config.source_kind
    targets = {
        "url": config.teacher_url,
        "app": config.teacher_app,
        "file": config.teacher,
        "logits": config.teacher_logits,
        "none": None,
    }
    source = open_source(
        kind,
        targets[kind],
        device=device,
        token_file=config.token_file,
        run_id=run_id_for(config, world),
        ray_address=config.ray_address,
        timeout_s=config.teacher_timeout_s,
    )
    _check_logits_cover_data(source, config)
    return source


def run_id_for(config: TrainConfig, world: World) -> str:
    """Return the run name sent to the teacher: `<run name>/rank<k>` on Ray Train workers."""
    name = config.run_name or Path(config.out).name
    return name if config.num_workers is None else f"{name}/rank{world.rank}"


def _check_logits_cover_data(source: SupervisionSource, config: TrainConfig) -> None:
    count = count_samples(config.data, config.train_split)
    if not isinstance(source, ParquetLogitsSource) or count is None:
        return
    rows = len(source)
    if rows < count:
        source.close()
        raise ValueError(
            f"the precomputed logits contain {rows} rows but the training split has {count} "
            "samples; precompute logits for the whole split"
        )


def _dataset_info(data: str) -> dict[str, Any] | None:
    path = Path(data)
    if path.is_dir() and (path / "dataset.json").is_file():
        return read_dataset_info(path)
    return None


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `auto`, `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype: bfloat16 (or float16) on CUDA with amp, else None."""
    # NOTE: the CUDA autocast and float16 GradScaler paths run only in the `gpu`-marked
    # test, which skips on machines without CUDA.
    if not amp:
        return None
    if device.type != "cuda":
        logger.warning("--amp applies on CUDA only; training in float32 on %s", device)
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(trainer: Trainer) -> Iterator[None]:
    """Run the block under CUDA autocast when the run uses mixed precision."""
    if trainer.amp_dtype is None:
        yield
        return
    with torch.autocast(trainer.device.type, dtype=trainer.amp_dtype):
        yield


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng(trainer: Trainer) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Return RNG state tensors and numpy's global state as JSON."""
    rng = {"torch": torch.get_rng_state(), "selection": trainer.generator.get_state()}
    if trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return rng, [name, np.asarray(keys).tolist(), position, has_gauss, cached_gaussian]


def restore_rng(trainer: Trainer, rng: dict[str, torch.Tensor], numpy_rng: list[Any]) -> None:
    """Restore what `capture_rng` returned."""
    torch.set_rng_state(rng["torch"])
    trainer.generator.set_state(rng["selection"])
    if "cuda" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], trainer.device)
    name, keys, position, has_gauss, cached_gaussian = numpy_rng
    np.random.set_state(
        (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
    )
