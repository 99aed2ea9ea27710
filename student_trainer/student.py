"""The student: a timm VisionTransformer-family model that normalises its own input.

The trainer feeds the student raw pixels scaled to [0, 1]. `NormalizedStudent` applies the
per-channel mean and std before the timm model, so the same [0, 1] tensor can go to the
teacher, which applies its own normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)


class NormalizedStudent(nn.Module):
    """A timm model preceded by per-channel normalisation of [0, 1] pixels.

    Args:
        model: the timm VisionTransformer-family model.
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        timm_model: Any = model
        in_chans = int(timm_model.patch_embed.proj.in_channels)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(
                f"mean {tuple(mean)} and std {tuple(std)} need one value per input channel "
                f"({in_chans}); pass --student-mean/--student-std with {in_chans} values"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) pair, one value per channel."""
        mean = tuple(float(v) for v in self.mean.flatten())
        std = tuple(float(v) for v in self.std.flatten())
        return mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classify pixels in [0, 1], shape [B, C, H, W], and return logits [B, classes]."""
        return self.model((images - self.mean) / self.std)


def build_student(name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Create a randomly initialised timm VisionTransformer-family model.

    Args:
        name: timm model name, for example `vit_tiny_patch16_224`.
        model_kwargs: constructor overrides such as img_size, patch_size, in_chans,
            num_classes, embed_dim, depth and num_heads.

    Returns:
        The timm model.
    """
    kwargs = dict(model_kwargs or {})
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"timm has no model {name!r}: {error}") from error
    except (AssertionError, TypeError) as error:
        # timm checks sizes with asserts, for example that num_heads divides embed_dim.
        raise ValueError(
            f"timm cannot build student {name!r} with {kwargs}: {error or 'invalid sizes'}; "
            "check the size options: num_heads must divide embed_dim, and patch_size "
            "must divide img_size"
        ) from error
    for attribute in ("patch_embed", "blocks", "num_prefix_tokens"):
        if not hasattr(model, attribute):
            raise ValueError(
                f"student {name!r} ({type(model).__name__}) has no `{attribute}`; "
                "use a timm VisionTransformer-family model such as vit_tiny_patch16_224"
            )
    logger.info(
        "built student %s (%s parameters) with %s",
        name,
        f"{sum(p.numel() for p in model.parameters()):,}",
        kwargs,
    )
    return model


def student_geometry(model: nn.Module) -> dict[str, Any]:
    """Return the image size, patch size, grid, channels and classes of a timm ViT."""
    timm_model: Any = model
    patch_embed = timm_model.patch_embed
    img_size = tuple(int(v) for v in patch_embed.img_size)
    patch_size = tuple(int(v) for v in patch_embed.patch_size)
    grid_size = tuple(int(v) for v in patch_embed.grid_size)
    return {
        "img_size": img_size,
        "patch_size": patch_size,
        "grid_size": grid_size,
        "num_patches": grid_size[0] * grid_size[1],
        "in_chans": int(patch_embed.proj.in_channels),
        "num_classes": int(timm_model.num_classes),
    }


def estimate_mean_std(
    batches: Iterable[torch.Tensor], max_images: int = 2048
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Estimate per-channel mean and std on the [0, 1] scale from uint8 batches.

    Args:
        batches: uint8 image batches, each [B, C, H, W].
        max_images: stop after this many images.

    Returns:
        (mean, std), one value per channel.
    """
    total = None
    total_sq = None
    pixel_count = 0
    image_count = 0
    for images in batches:
        pixels = images.to(torch.float64) / 255.0  # [B, C, H, W]
        B, C = pixels.shape[:2]
        per_channel = pixels.transpose(0, 1).reshape(C, -1)  # [C, B*H*W]
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        squares = per_channel.square().sum(1)
        total_sq = squares if total_sq is None else total_sq + squares
        pixel_count += per_channel.shape[1]
        image_count += B
        if image_count >= max_images:
            break
    if total is None or total_sq is None or pixel_count == 0:
        raise ValueError("cannot estimate mean and std: the training data yielded no images")
    mean = total / pixel_count
    std = (total_sq / pixel_count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
