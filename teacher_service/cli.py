"""Subcommands owned by `teacher_service`.

Handlers turn the argparse namespace into a typed config at once and import torch and
timm lazily, so `maskedkd --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from teacher_service.serve_cli import (
    _positive_int,
    add_info_parser,
    add_runs_parser,
    add_serve_parser,
)

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("float16", "float32")
# Options of `export-teacher` passed to `timm.create_model` under the same name.
MODEL_KWARG_OPTIONS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depth",
    "num_heads",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `maskedkd` parser."""
    add_serve_parser(subparsers)
    add_info_parser(subparsers)
    add_runs_parser(subparsers)
    _add_export_teacher(subparsers)


@dataclass
class ExportTeacherConfig:
    """Settings of `maskedkd export-teacher`.

    Attributes:
        name: timm model name of the teacher architecture.
        out: Destination `.safetensors` file.
        pretrained: Download pretrained weights from the model hub; False keeps timm's
            random initialisation.
        model_kwargs: Keyword arguments for `timm.create_model` (only those given).
        class_names: One name per class, or None for "0", "1", ...
        mean: Per-channel input mean on the [0, 1] pixel scale, or None for the model's.
        std: Per-channel input std on the [0, 1] pixel scale, or None for the model's.
        dtype: Storage dtype of the weights, "float16" or "float32".
    """

    name: str
    out: str
    pretrained: bool
    model_kwargs: dict[str, Any]
    class_names: list[str] | None
    mean: list[float] | None
    std: list[float] | None
    dtype: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportTeacherConfig:
        """Build the config from parsed `export-teacher` arguments."""
        model_kwargs: dict[str, Any] = {}
        for key in MODEL_KWARG_OPTIONS:
            if getattr(args, key) is not None:
                model_kwargs[key] = getattr(args, key)
        class_names = args.class_names
        if class_names is not None and "num_classes" not in model_kwargs:
            model_kwargs["num_classes"] = len(class_names)
        return cls(
            name=args.name,
            out=args.out,
            pretrained=not args.random_init,
            model_kwargs=model_kwargs,
            class_names=class_names,
            mean=args.mean,
            std=args.std,
            dtype=args.dtype,
        )


def export_teacher(config: ExportTeacherConfig) -> int:
    """Build or download a teacher and write it as a portable checkpoint.

    Returns:
        0 on success, 2 for invalid settings, 1 when the pretrained weights could not be
        downloaded.
    """
    import dataclasses

    import torch

    from teacher_service.checkpoint import load_teacher, save_teacher
    from teacher_service.engine import check_supported

    try:
        model, spec = load_teacher(
            config.name,
            pretrained=config.pretrained,
            random_init=not config.pretrained,
            model_kwargs=config.model_kwargs,
        )
        check_supported(model, config.name)
        overrides: dict[str, Any] = {}
        if config.class_names is not None:
            overrides["class_names"] = list(config.class_names)
        if config.mean is not None:
            overrides["mean"] = tuple(config.mean)
        if config.std is not None:
            overrides["std"] = tuple(config.std)
        spec = dataclasses.replace(spec, **overrides)
        dtype = torch.float16 if config.dtype == "float16" else torch.float32
        saved = save_teacher(model, spec, config.out, dtype=dtype)
    except ValueError as error:
        logger.error("export-teacher failed: %s", error)
        return 2
    except OSError as error:
        # NOTE: the model hub was not reachable where this was written, so the download
        # path and the errors it raises (network and cache errors are OSError) are untested.
        logger.error(
            "export-teacher could not get pretrained weights for %s: %s; check the network "
            "or pass --random-init",
            config.name,
            error,
        )
        return 1

    grid_h, grid_w = saved.grid_size
    print(
        f"wrote {saved.source}: {saved.arch}, {saved.img_size[0]}x{saved.img_size[1]} px, "
        f"{grid_h}x{grid_w} patches of {saved.patch_size[0]}x{saved.patch_size[1]} px, "
        f"{saved.in_chans} channel(s), {saved.num_classes} classes, {config.dtype}, "
        f"sha256 {saved.digest}"
    )
    return 0


def _run_export_teacher(args: argparse.Namespace) -> int:
    return export_teacher(ExportTeacherConfig.from_args(args))


def _add_export_teacher(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-teacher",
        help="write a timm ViT teacher as a portable safetensors checkpoint",
        description=(
            "Build a timm VisionTransformer teacher (pretrained from the model hub, or with "
            "random weights) and write its weights, architecture and input normalisation to "
            "one safetensors file that `maskedkd serve` and the trainer load."
        ),
    )
    parser.add_argument("name", help="timm model name, for example vit_tiny_patch16_224")
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="path of the .safetensors file to write"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained",
        action="store_true",
        help="download pretrained weights from the model hub (the default; needs network)",
    )
    weights.add_argument(
        "--random-init",
        action="store_true",
        help="keep timm's random initialisation instead (for tests and benchmarks)",
    )
    _add_architecture_options(parser)
    _add_input_options(parser)
    parser.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default="float16",
        help="storage dtype of the weights in the file; loading always gives float32 "
        "(default: float16, half the size)",
    )
    parser.set_defaults(func=_run_export_teacher)


def _add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """Add the options passed to `timm.create_model`."""
    parser.add_argument(
        "--img-size",
        type=_int_or_pair,
        metavar="PIXELS",
        help="input image size in pixels: one number for square images or HEIGHT,WIDTH "
        "(default: the model's)",
    )
    parser.add_argument(
        "--patch-size",
        type=_int_or_pair,
        metavar="PIXELS",
        help="patch size in pixels: one number or HEIGHT,WIDTH (default: the model's)",
    )
    parser.add_argument(
        "--in-chans",
        type=_positive_int,
        metavar="N",
        help="number of input channels, 1 for grayscale (default: the model's, usually 3)",
    )
    parser.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="number of output classes (default: the number of --class-names, else the model's)",
    )
    parser.add_argument(
        "--embed-dim",
        type=_positive_int,
        metavar="N",
        help="token embedding width in channels (default: the model's)",
    )
    parser.add_argument(
        "--depth",
        type=_positive_int,
        metavar="N",
        help="number of transformer blocks (default: the model's)",
    )
    parser.add_argument(
        "--num-heads",
        type=_positive_int,
        metavar="N",
        help="attention heads per block; must divide --embed-dim (default: the model's)",
    )


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    """Add the options stored in the spec beside the weights: class names and normalisation."""
    parser.add_argument(
        "--class-names",
        type=_name_list,
        metavar="A,B,C",
        help="comma-separated class names, one per class (default: 0,1,2,...)",
    )
    parser.add_argument(
        "--mean",
        type=_float_list,
        metavar="M1,M2,...",
        help="per-channel input mean on the [0, 1] pixel scale, one value per channel "
        "(default: the model's pretrained config)",
    )
    parser.add_argument(
        "--std",
        type=_float_list,
        metavar="S1,S2,...",
        help="per-channel input standard deviation on the [0, 1] pixel scale, one value per "
        "channel (default: the model's pretrained config)",
    )


def _int_or_pair(text: str) -> int | list[int]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use N or HEIGHT,WIDTH")
    values = [_positive_int(part) for part in parts]
    return values[0] if len(values) == 1 else values


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number list {text!r}; use comma-separated numbers such as 0.5,0.5,0.5"
        ) from None


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"invalid class names {text!r}: a name is empty")
    return names
