"""Patch selection policies and the mapping from the student grid to the teacher grid.

A policy is a function `(saliency [B, N], keep_count, generator) -> keep [B, keep_count]`
that returns row-major patch indices, sorted ascending in each row:

- `student`: the keep_count patches with the highest saliency (the MaskedKD default).
- `random`: keep_count patches drawn uniformly without replacement from `generator`.
- `none`: every patch (plain logit distillation), whatever keep_count is.

`GridMap` turns a selection on the student's patch grid into teacher-grid indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SelectionPolicy = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]


def keep_count_for(num_patches: int, keep_ratio: float) -> int:
    """Return how many of `num_patches` patches a keep ratio keeps (at least one).

    Args:
        num_patches: patches on the grid the selection runs on.
        keep_ratio: fraction of patches to keep, in (0, 1].
    """
    validate_keep_ratio(keep_ratio)
    return max(1, min(num_patches, round(keep_ratio * num_patches)))


def validate_keep_ratio(keep_ratio: float) -> None:
    """Raise ValueError unless the keep ratio lies in (0, 1]."""
    if not (isinstance(keep_ratio, int | float) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(
            f"keep ratio must be in (0, 1], got {keep_ratio!r}; 0.5 keeps half the patches, "
            "1.0 keeps all of them"
        )


def select_top_saliency(
    saliency: torch.Tensor, keep_count: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep the `keep_count` patches with the highest saliency in each row.

    Args:
        saliency: [B, N] scores, higher means more important.
        keep_count: patches to keep per image, 1..N.
        generator: unused, accepted so that every policy has the same signature.

    Returns:
        int64 indices [B, keep_count], ascending in each row.
    """
    _check_keep_count(saliency, keep_count)
    top = saliency.topk(keep_count, dim=1, largest=True, sorted=False).indices  # [B, K]
    return top.sort(dim=1).values


def select_random(
    saliency: torch.Tensor, keep_count: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep `keep_count` patches per image, drawn uniformly without replacement.

    Args:
        saliency: [B, N] scores; only the shape and device are used.
        keep_count: patches to keep per image, 1..N.
        generator: CPU generator that makes the draw repeatable.

    Returns:
        int64 indices [B, keep_count], ascending in each row.
    """
    _check_keep_count(saliency, keep_count)
    B, N = saliency.shape
    noise = torch.rand(B, N, generator=generator)  # CPU, so a CPU generator works everywhere
    chosen = noise.argsort(dim=1)[:, :keep_count]  # [B, K]
    return chosen.sort(dim=1).values.to(saliency.device)


def select_all(
    saliency: torch.Tensor, keep_count: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep every patch, so the teacher sees the whole image; keep_count is ignored.

    Returns:
        int64 indices [B, N], each row 0..N-1.
    """
    B, N = saliency.shape
    return torch.arange(N, device=saliency.device).expand(B, N).clone()


SELECTION_POLICIES: dict[str, SelectionPolicy] = {
    "student": select_top_saliency,
    "random": select_random,
    "none": select_all,
}


def get_policy(name: str) -> SelectionPolicy:
    """Return the selection policy called `name` (student, random or none)."""
    if name not in SELECTION_POLICIES:
        raise ValueError(
            f"unknown masking policy {name!r}; choose one of {sorted(SELECTION_POLICIES)}"
        )
    return SELECTION_POLICIES[name]


def _check_keep_count(saliency: torch.Tensor, keep_count: int) -> None:
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be [B, N], got shape {tuple(saliency.shape)}")
    if not 1 <= keep_count <= saliency.shape[1]:
        raise ValueError(f"keep_count must be in 1..{saliency.shape[1]}, got {keep_count}")


@dataclass(frozen=True)
class GridMap:
    """Maps a patch selection on the student grid onto the teacher grid.

    The two grids must cover the same image. When the teacher grid is finer by integer
    factors, selection runs on the student grid and each kept student patch expands to
    the teacher patches it covers. When it is coarser by integer factors, saliency is
    summed over each teacher patch and selection runs on the teacher grid.

    Attributes:
        student_grid: (rows, cols) of the student's patch grid.
        teacher_grid: (rows, cols) of the teacher's patch grid.
    """

    student_grid: tuple[int, int]
    teacher_grid: tuple[int, int]

    def __post_init__(self) -> None:
        student, teacher = self.student_grid, self.teacher_grid
        finer = all(t % s == 0 for s, t in zip(student, teacher, strict=True))
        coarser = all(s % t == 0 for s, t in zip(student, teacher, strict=True))
        if not (finer or coarser):
            raise ValueError(
                f"student patch grid {student} and teacher patch grid {teacher} cannot be "
                "mapped: one must be an integer multiple of the other on both axes; choose "
                "a student patch size that divides or is a multiple of the teacher's"
            )

    @property
    def teacher_is_finer(self) -> bool:
        """Whether each student patch covers one or more whole teacher patches."""
        return all(t % s == 0 for s, t in zip(self.student_grid, self.teacher_grid, strict=True))

    @property
    def teacher_num_patches(self) -> int:
        """Number of patches on the teacher grid."""
        return self.teacher_grid[0] * self.teacher_grid[1]

    def teacher_keep_count(self, keep_ratio: float) -> int:
        """Return how many teacher patches a selection with this keep ratio sends."""
        if self.teacher_is_finer:
            factor = self.teacher_num_patches // math.prod(self.student_grid)
            return keep_count_for(math.prod(self.student_grid), keep_ratio) * factor
        return keep_count_for(self.teacher_num_patches, keep_ratio)

    def select(
        self,
        saliency: torch.Tensor,
        keep_ratio: float,
        policy: SelectionPolicy,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Select patches with `policy` and return teacher-grid indices [B, K], ascending.

        Args:
            saliency: student-grid saliency [B, student rows * cols].
            keep_ratio: fraction of patches to keep, in (0, 1].
            policy: one of `SELECTION_POLICIES`.
            generator: passed to the policy.
        """
        if self.teacher_is_finer:
            num_student = math.prod(self.student_grid)
            keep = policy(saliency, keep_count_for(num_student, keep_ratio), generator)
            return self.expand_to_teacher(keep)
        pooled = self.pool_to_teacher(saliency)
        return policy(pooled, keep_count_for(self.teacher_num_patches, keep_ratio), generator)

    def expand_to_teacher(self, keep: torch.Tensor) -> torch.Tensor:
        """Replace each student patch index by the teacher patch indices it covers."""
        (student_rows, student_cols), (teacher_rows, teacher_cols) = (
            self.student_grid,
            self.teacher_grid,
        )
        factor_h, factor_w = teacher_rows // student_rows, teacher_cols // student_cols
        if factor_h == factor_w == 1:
            return keep
        row, col = keep // student_cols, keep % student_cols  # [B, K] each
        offset_h = torch.arange(factor_h, device=keep.device).view(1, 1, -1, 1)
        offset_w = torch.arange(factor_w, device=keep.device).view(1, 1, 1, -1)
        teacher_row = row[..., None, None] * factor_h + offset_h  # [B, K, fh, 1]
        teacher_col = col[..., None, None] * factor_w + offset_w  # [B, K, 1, fw]
        index = teacher_row * teacher_cols + teacher_col  # [B, K, fh, fw]
        return index.flatten(1).sort(dim=1).values  # [B, K * fh * fw]

    def pool_to_teacher(self, saliency: torch.Tensor) -> torch.Tensor:
        """Sum student-grid saliency [B, Ns] over each teacher patch, giving [B, Nt]."""
        (student_rows, student_cols), (teacher_rows, teacher_cols) = (
            self.student_grid,
            self.teacher_grid,
        )
        if (student_rows, student_cols) == (teacher_rows, teacher_cols):
            return saliency
        B = saliency.shape[0]
        factor_h, factor_w = student_rows // teacher_rows, student_cols // teacher_cols
        grid = saliency.reshape(B, teacher_rows, factor_h, teacher_cols, factor_w)
        return grid.sum(dim=(2, 4)).reshape(B, teacher_rows * teacher_cols)
