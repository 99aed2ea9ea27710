"""The typed configuration of a student training run.

`TrainConfig` is what `train()` takes; the `maskedkd train` command line parses its options
into one and nothing below the command line sees argparse. Each field's `help` metadata is
the description that the command line shows. This module imports no torch, so building a
config stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MASKING_POLICIES = ("student", "random", "none")
KD_TYPES = ("soft", "hard")
LR_SCALING_RULES = ("linear", "none")
SOURCE_FIELDS = ("teacher_url", "teacher_app", "teacher", "teacher_logits")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Options of one student training run. Each field's help text describes it."""

    # Data.
    data: str = _field(
        "",
        "training shards: a folder written by `maskedkd prepare` (its train split), one .tar "
        "file or a brace pattern",
    )
    val_data: str | None = _field(
        None,
        "evaluation shards, same forms as data (a folder's test split); None skips evaluation",
    )
    train_split: str = _field("train", "split read from a data folder")
    val_split: str = _field("test", "split read from a val_data folder")
    steps_per_epoch: int | None = _field(
        None,
        "optimizer steps per epoch; None derives it from dataset.json as train count // "
        "batch size (needed when data is a pattern without dataset.json)",
    )
    loader_workers: int = _field(
        0, "DataLoader worker processes that decode shards, per training process (0: none)"
    )
    out: str = _field("runs/student", "run folder for checkpoints, metrics.jsonl and plots")

    # Student.
    student: str = _field("vit_tiny_patch16_224", "timm model name of the student")
    student_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "timm constructor kwargs (img_size, patch_size, in_chans, num_classes, "
            "embed_dim, depth, num_heads); img_size, in_chans and num_classes default to the "
            "dataset's"
        },
    )
    student_mean: tuple[float, ...] | None = _field(
        None,
        "per-channel mean on the [0, 1] scale that the student subtracts; None takes the "
        "teacher's mean, or estimates it from up to 2048 training images without a teacher",
    )
    student_std: tuple[float, ...] | None = _field(
        None, "per-channel std on the [0, 1] scale; None is chosen like student_mean"
    )

    # Teacher masking and supervision source (exactly one source).
    keep_ratio: float = _field(0.5, "fraction of teacher patches kept, in (0, 1]")
    masking: str = _field(
        "student",
        "patch selection: student (top CLS attention), random, or none (full image)",
    )
    teacher_url: str | None = _field(None, "base URL of a `maskedkd serve` teacher service")
    teacher_app: str | None = _field(None, "Ray Serve application name of the teacher")
    teacher: str | None = _field(
        None, "portable teacher checkpoint (.safetensors) run in this process"
    )
    teacher_logits: str | None = _field(
        None, "Parquet file or folder of precomputed full-image teacher logits"
    )
    no_teacher: bool = _field(False, "train on labels only (the no-distillation baseline)")
    token_file: str | None = _field(
        None, "file whose first line is the bearer token of the teacher service"
    )
    ray_address: str | None = _field(
        "auto", "Ray cluster address used with teacher_app when Ray is not yet initialised"
    )
    teacher_timeout_s: float = _field(60.0, "timeout of one teacher request, in seconds")

    # Loss.
    kd_weight: float = _field(1.0, "weight of the distillation loss, 0 or more")
    tau: float = _field(1.0, "softmax temperature of soft distillation, above 0")
    kd_type: str = _field("soft", "soft (temperature KL) or hard (teacher argmax CE)")
    label_smoothing: float = _field(0.0, "label smoothing of the task loss, in [0, 1)")
    mixup: float = _field(0.0, "Mixup beta-distribution alpha; 0 disables Mixup")
    cutmix: float = _field(0.0, "CutMix beta-distribution alpha; 0 disables CutMix")

    # Optimisation.
    epochs: int = _field(10, "training epochs")
    batch_size: int = _field(128, "images per optimizer step")
    lr: float = _field(1e-3, "peak AdamW learning rate")
    min_lr: float = _field(1e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = _field(0.05, "AdamW decoupled weight decay")
    warmup_epochs: int = _field(1, "epochs of linear learning-rate warm-up")
    warmup_lr: float = _field(1e-6, "learning rate at the start of warm-up")
    clip_grad: float | None = _field(None, "clip the gradient norm to this value; None: off")

    # Run control.
    seed: int = _field(0, "seed of model init, data order, Mixup and random masking")
    max_steps: int | None = _field(None, "stop after this many optimizer steps in total")
    log_every: int = _field(50, "optimizer steps between metrics.jsonl lines")
    amp: bool = _field(False, "mixed precision (bfloat16, else float16) on CUDA")
    device: str = _field("auto", "torch device: auto (CUDA when available), cpu, cuda, cuda:1")
    resume: bool = _field(False, "continue from the run folder's latest checkpoint")
    progress: bool = _field(True, "show a tqdm progress bar")
    run_name: str | None = _field(
        None, "name sent to the teacher service with each request; default: run folder name"
    )

    # Training on a Ray cluster (Ray Train, one DDP process per worker).
    num_workers: int | None = _field(
        None, "Ray Train worker processes, one DDP rank each; None: a plain single-process run"
    )
    use_gpu: bool = _field(False, "give each Ray Train worker one GPU (NCCL); else CPU (gloo)")
    address: str | None = _field(
        None,
        "Ray cluster address for the workers (auto: the local node's cluster); None "
        "starts a local Ray",
    )
    lr_scaling: str = _field(
        "linear",
        "how lr follows the worker count: linear (lr x workers, as the effective batch grows "
        "with the workers) or none",
    )
    storage_path: str | None = _field(
        None,
        "Ray Train storage for reported checkpoints, reachable from every node (a shared "
        "folder or a cloud URI); None: ray_train inside the run folder",
    )
    record_keys: bool = _field(
        False, "write the sample keys each rank trained on to trained_keys/rank<k>.txt (debug)"
    )

    def __post_init__(self) -> None:
        self.student_kwargs = dict(self.student_kwargs or {})
        if self.student_mean is not None:
            self.student_mean = tuple(float(v) for v in self.student_mean)
        if self.student_std is not None:
            self.student_std = tuple(float(v) for v in self.student_std)

    @property
    def source_kind(self) -> str:
        """The chosen supervision source: url, app, file, logits or none."""
        chosen = [name for name in SOURCE_FIELDS if getattr(self, name)]
        if self.no_teacher:
            chosen.append("no_teacher")
        if len(chosen) != 1:
            raise ValueError(
                "choose exactly one supervision source (teacher_url, teacher_app, teacher, "
                f"teacher_logits or no_teacher); got {chosen or 'none'}"
            )
        kinds = {
            "teacher_url": "url",
            "teacher_app": "app",
            "teacher": "file",
            "teacher_logits": "logits",
            "no_teacher": "none",
        }
        return kinds[chosen[0]]

    def validate(self) -> None:
        """Raise ValueError for options that are invalid on their own or together."""
        if not self.data:
            raise ValueError("data is required: pass the training shard folder or pattern")
        if not (isinstance(self.keep_ratio, int | float) and 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(
                f"keep ratio must be in (0, 1], got {self.keep_ratio!r}; 0.5 keeps half the patches"
            )
        if self.masking not in MASKING_POLICIES:
            raise ValueError(f"masking must be one of {MASKING_POLICIES}, got {self.masking!r}")
        if self.kd_type not in KD_TYPES:
            raise ValueError(f"kd_type must be one of {KD_TYPES}, got {self.kd_type!r}")
        if (self.student_mean is None) != (self.student_std is None):
            raise ValueError("pass student_mean and student_std together, or neither")

        self._validate_source_options()
        self._validate_numbers()
        self._validate_workers()

    def _validate_source_options(self) -> None:
        if self.source_kind != "logits":
            return
        if self.masking != "none":
            raise ValueError(
                "precomputed teacher logits cover full images only, so patch masking cannot "
                f"apply; pass --masking none with --teacher-logits (got {self.masking!r})"
            )
        if self.mixup > 0 or self.cutmix > 0:
            raise ValueError(
                "precomputed teacher logits describe the unmixed images, so they cannot "
                "supervise Mixup/CutMix batches; drop --mixup/--cutmix or use a live teacher"
            )

    def _validate_numbers(self) -> None:
        _check_positive(self, ("epochs", "batch_size", "log_every"))
        _check_positive_float(self, ("lr", "tau"))
        for name in ("max_steps", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

        for name in ("kd_weight", "weight_decay", "mixup", "cutmix", "warmup_epochs", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(
                f"Mixup/CutMix needs an even batch size, got {self.batch_size}; "
                "use an even --batch-size"
            )

    def _validate_workers(self) -> None:
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be 0 or more, got {self.loader_workers}")
        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(
                f"lr_scaling must be one of {LR_SCALING_RULES}, got {self.lr_scaling!r}"
            )
        if self.num_workers is None:
            for name, flag in (
                ("use_gpu", "--use-gpu"),
                ("address", "--address"),
                ("storage_path", "--storage-path"),
            ):
                if getattr(self, name):
                    raise ValueError(
                        f"{flag} applies to Ray Train workers; add --num-workers N, or drop "
                        f"{flag} for a single-process run"
                    )
            if self.lr_scaling != "linear":
                raise ValueError(
                    f"--lr-scaling {self.lr_scaling} applies to Ray Train workers; add "
                    "--num-workers N, or drop it for a single-process run"
                )
            return
        if self.num_workers < 1:
            raise ValueError(
                f"num_workers must be at least 1, got {self.num_workers}; omit --num-workers "
                "for a single-process run"
            )
        if self.device not in ("auto", "cpu") or (self.device == "cpu" and self.use_gpu):
            raise ValueError(
                f"device {self.device!r} applies to single-process runs; with --num-workers, "
                "pass --use-gpu for one GPU per worker or leave --device at auto"
            )

    @property
    def world_lr(self) -> float:
        """Return the peak learning rate of a run on `num_workers` workers."""
        return self.lr * self.lr_scale

    @property
    def lr_scale(self) -> float:
        """Return the factor applied to `lr`: the worker count under linear scaling, else 1."""
        if self.lr_scaling == "linear" and self.num_workers:
            return float(self.num_workers)
        return 1.0

    @property
    def effective_keep_ratio(self) -> float:
        """The keep ratio actually used: 1.0 when masking is none."""
        return 1.0 if self.masking == "none" else float(self.keep_ratio)

    def to_json(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def help_for(cls, name: str) -> str:
        """Return the description of field `name`."""
        return str(FIELDS[name].metadata["help"])


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_positive(config: TrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _check_positive_float(config: TrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value}")
