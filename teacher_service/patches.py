"""The teacher's patch grid and patch cutting in numpy, shared by client and service.

A patch index is row * grid_w + col on the teacher's patch grid (row-major), and one
patch's pixels are flattened in (C, ph, pw) order, the layout of the patch-embedding
convolution's weight. `MaskedTeacher.patchify` in the engine uses the same layout in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class GridLike(Protocol):
    """Anything with a teacher's image size, patch size and channel count."""

    @property
    def img_size(self) -> tuple[int, int]: ...

    @property
    def patch_size(self) -> tuple[int, int]: ...

    @property
    def in_chans(self) -> int: ...


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of the teacher's input: image size, patch size and channels.

    Attributes:
        img_size: image height and width in pixels.
        patch_size: patch height and width in pixels.
        in_chans: number of image channels.
    """

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int

    def __post_init__(self) -> None:
        height, width = self.img_size
        patch_h, patch_w = self.patch_size
        if patch_h <= 0 or patch_w <= 0 or height % patch_h or width % patch_w:
            raise ValueError(
                f"image size {self.img_size} is not a whole number of patches of size "
                f"{self.patch_size}; pick a patch size that divides the image size"
            )

    @classmethod
    def from_spec(cls, spec: GridLike) -> PatchGrid:
        """Build the grid of a `TeacherSpec` (or anything with the same three fields)."""
        return cls(
            img_size=(int(spec.img_size[0]), int(spec.img_size[1])),
            patch_size=(int(spec.patch_size[0]), int(spec.patch_size[1])),
            in_chans=int(spec.in_chans),
        )

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> PatchGrid:
        """Build the grid from a `GET /v1/teacher` model card."""
        return cls(
            img_size=(int(card["img_size"][0]), int(card["img_size"][1])),
            patch_size=(int(card["patch_size"][0]), int(card["patch_size"][1])),
            in_chans=int(card["in_chans"]),
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Number of patch rows and columns."""
        return (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )

    @property
    def num_patches(self) -> int:
        """Number of patches per image."""
        grid_h, grid_w = self.grid_size
        return grid_h * grid_w

    @property
    def patch_dim(self) -> int:
        """Pixels per patch, C * ph * pw."""
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    @property
    def image_dim(self) -> int:
        """Pixels per image, C * H * W."""
        return self.in_chans * self.img_size[0] * self.img_size[1]


def patchify(images: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Split images into patches in row-major grid order.

    Args:
        images: pixels [B, C, H, W] of any dtype.
        grid: the teacher's patch grid.

    Returns:
        Patches [B, N, C*ph*pw] with each patch in (C, ph, pw) order, same dtype.
    """
    _check_image_shape(images, grid)
    B, C, H, W = images.shape
    patch_h, patch_w = grid.patch_size
    grid_h, grid_w = grid.grid_size
    x = images.reshape(B, C, grid_h, patch_h, grid_w, patch_w)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, ph, pw]
    return x.reshape(B, grid_h * grid_w, C * patch_h * patch_w)


def gather_patches(images: np.ndarray, keep: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Return the kept patches' pixels, [B, K, C*ph*pw], for keep indices [B, K]."""
    keep = np.asarray(keep)
    if keep.ndim != 2 or keep.shape[0] != images.shape[0]:
        raise ValueError(
            f"keep must have shape [B, K] with B = {images.shape[0]} images, "
            f"got shape {tuple(keep.shape)}"
        )
    _check_keep_range(keep, grid.num_patches)
    patches = patchify(images, grid)  # [B, N, P]
    return np.take_along_axis(patches, keep[:, :, None].astype(np.int64), axis=1)


def _check_image_shape(images: np.ndarray, grid: PatchGrid) -> None:
    expected = (grid.in_chans, *grid.img_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
            f"for this teacher, got {tuple(images.shape)}"
        )


def _check_keep_range(keep: np.ndarray, num_patches: int) -> None:
    if keep.size == 0:
        return
    low, high = int(keep.min()), int(keep.max())
    if low < 0 or high >= num_patches:
        bad = low if low < 0 else high
        raise ValueError(
            f"patch index {bad} is outside the teacher's grid of {num_patches} patches "
            f"(valid: 0..{num_patches - 1})"
        )
