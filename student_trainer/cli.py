"""Subcommands owned by `student_trainer`: `maskedkd train`.

The handler turns the argparse namespace into a `TrainConfig` at once and imports torch
and timm lazily, so `maskedkd --help` stays fast. Help texts come from the config's field
descriptions, so the command line and the Python API describe options the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from student_trainer.config import TrainConfig

logger = logging.getLogger(__name__)

# Options passed to `timm.create_model` for the student under the same name.
STUDENT_KWARG_OPTIONS = {
    "img_size": "input image size in pixels (default: the dataset's)",
    "patch_size": "patch size in pixels",
    "in_chans": "input channels (default: the dataset's)",
    "num_classes": "output classes (default: the dataset's)",
    "embed_dim": "token embedding width",
    "depth": "number of transformer blocks",
    "num_heads": "attention heads per block",
}
EXIT_INVALID_INPUT = 2
# 128 + SIGTERM, the status a shell reports for a process ended by SIGTERM.
EXIT_STOPPED_BY_SIGNAL = 143


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `maskedkd` parser."""
    parser = subparsers.add_parser(
        "train",
        help="train a student ViT with MaskedKD supervision",
        description=(
            "Train a student ViT on WebDataset shards, distilling from a teacher that sees "
            "only the patches the student attends to most."
        ),
    )
    _add_data_options(parser)
    _add_student_options(parser)
    _add_teacher_options(parser)
    _add_loss_options(parser)
    _add_run_options(parser)
    _add_cluster_options(parser)
    parser.set_defaults(func=run_train)


def _help(name: str) -> str:
    default = TrainConfig.__dataclass_fields__[name].default
    text = TrainConfig.help_for(name)
    return text if default in (None, "", False) else f"{text} (default: {default})"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, metavar="TRAIN_SHARDS", help=_help("data"))
    group.add_argument("--val-data", metavar="VAL_SHARDS", help=_help("val_data"))
    group.add_argument("--train-split", default="train", help=_help("train_split"))
    group.add_argument("--val-split", default="test", help=_help("val_split"))
    group.add_argument("--steps-per-epoch", type=int, help=_help("steps_per_epoch"))
    group.add_argument("--loader-workers", type=int, default=0, help=_help("loader_workers"))


def _add_student_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("student")
    group.add_argument("--student", default="vit_tiny_patch16_224", help=_help("student"))
    for name, text in STUDENT_KWARG_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name, help=text)
    group.add_argument(
        "--student-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="further timm constructor kwargs as a JSON object, e.g. '{\"qk_norm\": true}'",
    )
    group.add_argument("--student-mean", type=float, nargs="+", help=_help("student_mean"))
    group.add_argument("--student-std", type=float, nargs="+", help=_help("student_std"))


def _add_teacher_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument("--keep-ratio", type=float, default=0.5, help=_help("keep_ratio"))
    group.add_argument(
        "--masking", choices=("student", "random", "none"), default="student", help=_help("masking")
    )
    sources = group.add_mutually_exclusive_group(required=True)
    sources.add_argument("--teacher-url", metavar="URL", help=_help("teacher_url"))
    sources.add_argument("--teacher-app", metavar="NAME", help=_help("teacher_app"))
    sources.add_argument("--teacher", metavar="FILE", help=_help("teacher"))
    sources.add_argument("--teacher-logits", metavar="PATH", help=_help("teacher_logits"))
    sources.add_argument("--no-teacher", action="store_true", help=_help("no_teacher"))
    group.add_argument("--token-file", metavar="FILE", help=_help("token_file"))
    group.add_argument("--ray-address", default="auto", help=_help("ray_address"))
    group.add_argument(
        "--teacher-timeout", type=float, default=60.0, help=_help("teacher_timeout_s")
    )


def _add_loss_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loss and optimisation")
    group.add_argument("--kd-weight", type=float, default=1.0, help=_help("kd_weight"))
    group.add_argument("--tau", type=float, default=1.0, help=_help("tau"))
    group.add_argument("--kd-type", choices=("soft", "hard"), default="soft", help=_help("kd_type"))
    group.add_argument("--label-smoothing", type=float, default=0.0, help=_help("label_smoothing"))
    group.add_argument("--mixup", type=float, default=0.0, help=_help("mixup"))
    group.add_argument("--cutmix", type=float, default=0.0, help=_help("cutmix"))
    group.add_argument("--epochs", type=int, default=10, help=_help("epochs"))
    group.add_argument("--batch-size", type=int, default=128, help=_help("batch_size"))
    group.add_argument("--lr", type=float, default=1e-3, help=_help("lr"))
    group.add_argument("--min-lr", type=float, default=1e-6, help=_help("min_lr"))
    group.add_argument("--weight-decay", type=float, default=0.05, help=_help("weight_decay"))
    group.add_argument("--warmup-epochs", type=int, default=1, help=_help("warmup_epochs"))
    group.add_argument("--warmup-lr", type=float, default=1e-6, help=_help("warmup_lr"))
    group.add_argument("--clip-grad", type=float, help=_help("clip_grad"))


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", default="runs/student", metavar="RUN_DIR", help=_help("out"))
    group.add_argument("--seed", type=int, default=0, help=_help("seed"))
    group.add_argument("--max-steps", type=int, help=_help("max_steps"))
    group.add_argument("--log-every", type=int, default=50, help=_help("log_every"))
    group.add_argument("--amp", action="store_true", help=_help("amp"))
    group.add_argument("--device", default="auto", help=_help("device"))
    group.add_argument("--resume", action="store_true", help=_help("resume"))
    group.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    group.add_argument("--run-name", help=_help("run_name"))


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "training on a Ray cluster",
        "With --num-workers, Ray Train runs the same loop on N workers (PyTorch DDP), each "
        "reading its own share of the shards and asking the teacher for its own share of "
        "the batch; --batch-size is per worker.",
    )
    group.add_argument("--num-workers", type=int, metavar="N", help=_help("num_workers"))
    group.add_argument("--use-gpu", action="store_true", help=_help("use_gpu"))
    group.add_argument("--address", metavar="ADDR", help=_help("address"))
    group.add_argument(
        "--lr-scaling", choices=("linear", "none"), default="linear", help=_help("lr_scaling")
    )
    group.add_argument("--storage-path", metavar="PATH_OR_URI", help=_help("storage_path"))
    group.add_argument("--record-keys", action="store_true", help=_help("record_keys"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a `TrainConfig` from parsed `train` arguments."""
    student_kwargs: dict[str, Any] = dict(args.student_kwargs or {})
    for name in STUDENT_KWARG_OPTIONS:
        if getattr(args, name) is not None:
            student_kwargs[name] = getattr(args, name)
    copied = {
        name: getattr(args, name)
        for name in TrainConfig.__dataclass_fields__
        if name not in ("student_kwargs", "teacher_timeout_s") and hasattr(args, name)
    }
    return TrainConfig(
        **copied, student_kwargs=student_kwargs, teacher_timeout_s=args.teacher_timeout
    )


def run_train(args: argparse.Namespace) -> int:
    """Run `maskedkd train`; return 0, 2 for invalid input, or 143 after SIGTERM."""
    config = config_from_args(args)
    from student_trainer.train import train
    from teacher_service.client import TeacherServiceError

    try:
        summary = train(config)
    except (ValueError, FileNotFoundError) as error:
        logger.error("train failed: %s", error)
        return EXIT_INVALID_INPUT
    except TeacherServiceError as error:
        # The last epoch checkpoint stays in the run folder, so --resume continues from it.
        logger.error(
            "train failed: the teacher service did not answer: %s; check that it runs "
            "(`maskedkd info --url URL`), then rerun with --resume",
            error,
        )
        return 1
    logger.info(
        "trained %d steps: val top-1 %s, %.1f s blocked on the teacher; summary in %s",
        summary["steps"],
        summary["final_val_top1"],
        summary["blocked_s_total"],
        summary["run_dir"],
    )
    return EXIT_STOPPED_BY_SIGNAL if summary["stopped_by_signal"] else 0
