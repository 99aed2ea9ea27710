"""Masked teacher forward for timm vision transformers (MaskedKD).

MaskedKD (Son et al., ECCV 2024) runs the teacher on the patches the student attended to
most and skips the rest. The dropped patch tokens never enter the transformer, so the cost
of the blocks falls almost in proportion to the number of kept patches.

`MaskedTeacher` wraps a timm `VisionTransformer` (or a subclass such as the distilled
DeiT) and reuses the model's own modules in `forward_features` order:

    kept-patch pixels -> normalise -> patch embedding as a linear map -> + position
    embedding of each kept patch -> prepend prefix tokens (class, distillation, registers)
    -> pos_drop, patch_drop, norm_pre -> blocks -> norm -> model.forward_head

Keeping every patch reproduces `model(normalised_images)` up to float rounding, because
a stride-equals-kernel convolution is the same linear map applied to each patch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from teacher_service.checkpoint import TeacherSpec, load_teacher

logger = logging.getLogger(__name__)

IndexInput = torch.Tensor | Sequence[torch.Tensor]
PatchInput = torch.Tensor | Sequence[torch.Tensor]

AMP_DTYPES = (torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8)
_PIXEL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MaskedTeacher:
    """A timm ViT teacher that runs on a subset of patch tokens.

    Inputs are raw pixels, uint8 in 0..255 or floating point in [0, 1], in [B, C, H, W]
    layout. The engine normalises them with the spec's mean and std. Patch indices refer to
    the row-major patch grid (index = row * grid_w + col). The model is put in eval mode,
    and every forward runs under `torch.inference_mode`.

    Args:
        model: A timm `VisionTransformer` or subclass with a fixed image size.
        spec: The teacher's spec, as returned by `load_teacher`.
        device: Device to run on. The model is moved there.
        amp_dtype: Autocast dtype on CUDA (torch.bfloat16 or torch.float16). None runs in
            float32, which is the only mode on CPU.

    Raises:
        ValueError: If the model is not a supported ViT, disagrees with the spec, or
            `amp_dtype` is not available on `device`.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: TeacherSpec,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device)
        check_supported(model, spec.arch)
        assert isinstance(model, VisionTransformer)  # narrowed by check_supported, for mypy
        _check_model_matches_spec(model, spec)
        if amp_dtype is not None and amp_dtype != torch.float32:
            if amp_dtype not in AMP_DTYPES:
                raise ValueError(
                    f"invalid amp_dtype {amp_dtype}; use torch.bfloat16, torch.float16 or None"
                )
            if self.device.type != "cuda":
                raise ValueError(
                    f"amp_dtype {amp_dtype} needs a CUDA device, got device {self.device}; "
                    f"use amp_dtype=None (float32) on {self.device.type}"
                )
        else:
            amp_dtype = None
        self.model: VisionTransformer = model.to(self.device).eval()
        self.spec = spec
        self.amp_dtype = amp_dtype

        patch_h, patch_w = spec.patch_size
        pixels_per_channel = patch_h * patch_w
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        # Per-pixel mean and std in (C, ph, pw) order, the layout of a flattened patch.
        self._pixel_mean = mean.repeat_interleave(pixels_per_channel)  # [patch_dim]
        self._pixel_std = std.repeat_interleave(pixels_per_channel)  # [patch_dim]
        self._flops = _FlopModel.from_model(self.model, self.num_patches)

    @classmethod
    def from_source(
        cls,
        source: str,
        *,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        **load_kwargs: Any,
    ) -> MaskedTeacher:
        """Load a teacher with `load_teacher` and wrap it.

        Args:
            source: Portable checkpoint path or timm model name.
            device: Device to load onto and run on.
            amp_dtype: Autocast dtype on CUDA, as in the constructor.
            **load_kwargs: `pretrained`, `random_init` or `model_kwargs` for `load_teacher`.
        """
        model, spec = load_teacher(source, device=device, **load_kwargs)
        return cls(model, spec, device=device, amp_dtype=amp_dtype)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return self.spec.grid_size

    @property
    def num_patches(self) -> int:
        """Number of patches on the grid."""
        return self.spec.num_patches

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size (height, width) in pixels."""
        return self.spec.patch_size

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return self.spec.in_chans

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return self.spec.num_classes

    @property
    def patch_dim(self) -> int:
        """Pixels in one flattened patch: C * ph * pw."""
        patch_h, patch_w = self.spec.patch_size
        return self.spec.in_chans * patch_h * patch_w

    @property
    def full_macs_per_image(self) -> int:
        """Multiply-accumulates for one image with every patch kept."""
        return self.macs_per_image(self.num_patches)

    def macs_per_image(self, keep_count: int) -> int:
        """Return the analytic multiply-accumulates for one image with `keep_count` patches.

        Counted, with tokens = prefix tokens + keep_count:

        - patch embedding: keep_count * patch_dim * embed_dim
        - every linear layer in the blocks (attention qkv and output projection, MLP
          layers): tokens * in_features * out_features
        - the two attention matmuls, q @ k^T and attn @ v: tokens^2 * attention width each
        - the classifier head, and the distillation head where there is one

        Not counted: layer norms, softmax, activations, bias adds, residual adds, the
        position-embedding add, pooling, input normalisation, and attention-pooling heads
        (global_pool="map").

        Raises:
            ValueError: If `keep_count` is not in 1..num_patches.
        """
        if isinstance(keep_count, bool) or not 1 <= int(keep_count) <= self.num_patches:
            raise ValueError(
                f"keep_count {keep_count} is out of range; use 1..{self.num_patches} "
                f"(the number of patches)"
            )
        return self._flops.macs(int(keep_count))

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Split images into flattened patches without normalising.

        Args:
            images: [B, C, H, W] pixels of any dtype, with the teacher's C, H and W.

        Returns:
            [B, num_patches, patch_dim] in the same dtype, patches in row-major grid order
            and each patch's pixels in (C, ph, pw) order.
        """
        self._check_image_shape(images)
        batch_size, channels, _, _ = images.shape
        grid_h, grid_w = self.grid_size
        patch_h, patch_w = self.patch_size
        patches = images.reshape(batch_size, channels, grid_h, patch_h, grid_w, patch_w)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, ph, pw]
        return patches.reshape(batch_size, grid_h * grid_w, self.patch_dim)

    def gather_patches(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Copy out the pixels of the kept patches without normalising.

        Args:
            images: [B, C, H, W] pixels of any dtype.
            keep: [B, K] patch indices (any integer dtype), on the images' device or CPU.

        Returns:
            [B, K, patch_dim] in the images' dtype, row b containing patches keep[b] in order.
        """
        self._check_image_shape(images)
        if not isinstance(keep, torch.Tensor):
            raise ValueError(
                f"keep must be a [B, K] integer tensor here, got {type(keep).__name__}; "
                f"convert it with torch.as_tensor"
            )
        self._keep_groups(keep, images.shape[0])  # validation only
        return self._gather(images, keep.to(images.device, torch.int64))

    def forward_images(self, images: torch.Tensor, keep: IndexInput | None = None) -> torch.Tensor:
        """Run the teacher on the kept patches of full images.

        Args:
            images: [B, C, H, W] uint8 pixels in 0..255 or floating pixels in [0, 1].
            keep: Kept patch indices per image: a [B, K] integer tensor, a sequence of B
                1-D tensors of any lengths, or None to keep every patch.

        Returns:
            float32 logits [B, num_classes] on the engine's device, rows in input order.

        Raises:
            ValueError: For a wrong image shape or dtype, non-finite or out-of-range pixels,
                or invalid indices.
        """
        self._check_image_shape(images)
        self._check_pixels(images)
        batch_size = images.shape[0]
        images = images.to(self.device, non_blocking=True)
        if keep is None:
            with torch.inference_mode():
                patches = self.patchify(images)  # [B, N, patch_dim]
                logits = self._forward_tokens(patches, None)
            return logits.clone()

        groups = self._keep_groups(keep, batch_size)
        with torch.inference_mode():
            logits = torch.empty(batch_size, self.num_classes, device=self.device)
            for group in groups:
                row_ids = group.row_ids.to(self.device)
                keep_group = group.sorted_keep.to(self.device)  # [G, K]
                group_images = images if len(groups) == 1 else images[row_ids]
                patches = self._gather(group_images, keep_group)  # [G, K, patch_dim]
                logits[row_ids] = self._forward_tokens(patches, keep_group)
        return logits.clone()

    def forward_patches(self, patches: PatchInput, keep: IndexInput) -> torch.Tensor:
        """Run the teacher on kept-patch pixels.

        Args:
            patches: Pixels of the kept patches, a [B, K, patch_dim] tensor or a sequence of
                B tensors [K_i, patch_dim]; uint8 in 0..255 or floating point in [0, 1].
            keep: Grid indices of those patches, [B, K] or a sequence of B tensors [K_i].

        Returns:
            float32 logits [B, num_classes] on the engine's device, rows in input order.

        Raises:
            ValueError: For mismatched shapes, wrong dtype, non-finite or out-of-range
                pixels, or invalid indices.
        """
        if isinstance(patches, torch.Tensor) and isinstance(keep, torch.Tensor):
            # Dense batch: validate and move the whole tensor at once.
            if patches.dim() != 3:
                self._check_patch_shape(patches, ("B", "K", self.patch_dim))
            batch_size = patches.shape[0]
            groups = self._keep_groups(keep, batch_size)
            self._check_patch_shape(patches, (batch_size, keep.shape[1], self.patch_dim))
            self._check_pixels(patches)
            dense_patches: torch.Tensor | None = patches
            patch_rows: list[torch.Tensor] = []
        else:
            dense_patches = None
            patch_rows = _as_rows(patches, "patches")
            batch_size = len(patch_rows)
            groups = self._keep_groups(keep, batch_size)
            counts = {
                int(row): group.sorted_keep.shape[1] for group in groups for row in group.row_ids
            }
            for row, row_patches in enumerate(patch_rows):
                self._check_patch_shape(row_patches, (counts[row], self.patch_dim), row=row)
                self._check_pixels(row_patches)

        with torch.inference_mode():
            logits = torch.empty(batch_size, self.num_classes, device=self.device)
            for group in groups:
                row_ids = group.row_ids.to(self.device)
                keep_group = group.sorted_keep.to(self.device)  # [G, K]
                if dense_patches is not None:
                    stacked = dense_patches
                else:
                    stacked = torch.stack([patch_rows[row] for row in group.row_ids.tolist()])
                stacked = stacked.to(self.device, non_blocking=True)  # [G, K, patch_dim]

                # Put each row's patches in the same (sorted) order as its indices.
                order = group.order.to(self.device).unsqueeze(-1)  # [G, K, 1]
                stacked = torch.gather(stacked, 1, order.expand(-1, -1, self.patch_dim))
                logits[row_ids] = self._forward_tokens(stacked, keep_group)
        return logits.clone()

    def __call__(self, images: torch.Tensor, keep: IndexInput | None = None) -> torch.Tensor:
        """Alias for `forward_images`."""
        return self.forward_images(images, keep)

    def _forward_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Run the model on raw patch pixels [B, K, patch_dim] at grid indices keep [B, K]."""
        model = self.model
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            pixels = patches.to(torch.float32)
            if patches.dtype == torch.uint8:
                pixels = pixels / 255.0
            pixels = (pixels - self._pixel_mean) / self._pixel_std  # [B, K, patch_dim]

            # A stride == kernel convolution is one linear map per patch.
            proj = model.patch_embed.proj
            weight = proj.weight.flatten(1)  # [D, C*ph*pw], (C, ph, pw) order
            tokens = F.linear(pixels, weight, proj.bias)  # [B, K, D]
            tokens = model.patch_embed.norm(tokens)

            # `_pos_embed` on zero patch tokens yields the prefix tokens (with their position
            # embedding where the model has one) followed by each patch's position embedding.
            # NOTE: `_pos_embed` is private timm API (checked against timm 1.0.x, including
            # the distilled subclass's override), so a timm upgrade can change it.
            num_prefix = model.num_prefix_tokens
            batch_size, keep_count, embed_dim = tokens.shape
            zeros = tokens.new_zeros(1, self.num_patches, embed_dim)
            table = model._pos_embed(zeros)  # [1, num_prefix + N, D]
            prefix = table[:, :num_prefix].expand(batch_size, -1, -1)  # [B, num_prefix, D]
            patch_pos = table[0, num_prefix:]  # [N, D]
            if keep is None:
                tokens = tokens + patch_pos
            else:
                tokens = tokens + patch_pos[keep]  # [B, K, D]
            x = torch.cat([prefix, tokens], dim=1)  # [B, num_prefix + K, D]

            x = model.patch_drop(x)
            x = model.norm_pre(x)
            x = model.blocks(x)
            x = model.norm(x)
            logits = model.forward_head(x)  # [B, num_classes]
        return logits.float()

    def _gather(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch_size, channels, _, _ = images.shape
        grid_h, grid_w = self.grid_size
        patch_h, patch_w = self.patch_size
        grid = images.reshape(batch_size, channels, grid_h, patch_h, grid_w, patch_w)
        batch_index = torch.arange(batch_size, device=images.device).unsqueeze(1)  # [B, 1]
        keep = keep.to(images.device)
        # Advanced indices on dims 0, 2 and 4 are not adjacent, so their broadcast shape
        # [B, K] comes first and the sliced dims follow: [B, K, C, ph, pw].
        kept = grid[batch_index, :, keep // grid_w, :, keep % grid_w, :]
        return kept.reshape(batch_size, keep.shape[1], self.patch_dim)

    def _keep_groups(self, keep: IndexInput, batch_size: int) -> list[_CountGroup]:
        """Validate kept indices and group the rows by kept count, indices sorted."""
        if isinstance(keep, torch.Tensor):
            if keep.dim() != 2 or keep.shape[0] != batch_size:
                raise ValueError(
                    f"keep has shape {tuple(keep.shape)}, expected ({batch_size}, K) for a "
                    f"batch of {batch_size}"
                )
            matrix = self._check_index_values(keep, torch.arange(batch_size))
            if batch_size == 0:
                return []
            sorted_keep, order = torch.sort(matrix, dim=1)
            groups = [_CountGroup(torch.arange(batch_size), sorted_keep, order)]
        else:
            rows = _as_rows(keep, "keep")
            if len(rows) != batch_size:
                raise ValueError(
                    f"keep has {len(rows)} rows for a batch of {batch_size}; pass one "
                    f"index tensor per image"
                )
            for row, row_keep in enumerate(rows):
                if row_keep.dim() != 1:
                    raise ValueError(
                        f"keep row {row} has shape {tuple(row_keep.shape)}; each row must be 1-D"
                    )
            checked = [
                self._check_index_values(row_keep.unsqueeze(0), torch.tensor([row]))[0]
                for row, row_keep in enumerate(rows)
            ]
            groups = _group_by_count(checked)
        for group in groups:
            self._check_no_duplicates(group)
        return groups

    def _check_index_values(self, keep: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Check dtype, count and range of a [R, K] index matrix; return it as CPU int64."""
        first_row = int(row_ids[0]) if row_ids.numel() else 0
        if keep.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"keep has dtype {keep.dtype} (row {first_row}); pass integer patch indices "
                f"(torch.long)"
            )
        if keep.shape[1] == 0 and keep.shape[0] > 0:
            raise ValueError(
                f"keep row {first_row} is empty; keep at least 1 patch per image "
                f"(or pass keep=None for all {self.num_patches})"
            )
        keep = keep.detach().to("cpu", torch.int64)
        invalid = (keep < 0) | (keep >= self.num_patches)  # [R, K]
        if bool(invalid.any()):
            row, column = (int(value) for value in invalid.nonzero()[0])
            grid_h, grid_w = self.grid_size
            raise ValueError(
                f"keep row {int(row_ids[row])} contains index {int(keep[row, column])}, "
                f"outside 0..{self.num_patches - 1}; indices are row * {grid_w} + col on "
                f"the {grid_h}x{grid_w} patch grid"
            )
        return keep

    @staticmethod
    def _check_no_duplicates(group: _CountGroup) -> None:
        sorted_keep = group.sorted_keep  # [G, K]
        repeated = sorted_keep[:, 1:] == sorted_keep[:, :-1]  # [G, K - 1]
        if bool(repeated.any()):
            row, column = (int(value) for value in repeated.nonzero()[0])
            raise ValueError(
                f"keep row {int(group.row_ids[row])} contains index "
                f"{int(sorted_keep[row, column])} more than once; pass each kept patch once"
            )

    def _check_patch_shape(
        self, patches: torch.Tensor, expected: tuple[int | str, ...], row: int | None = None
    ) -> None:
        if tuple(patches.shape) != expected:
            where = "patches" if row is None else f"patches row {row}"
            raise ValueError(
                f"{where} has shape {tuple(patches.shape)}, expected {expected}: one row of "
                f"C*ph*pw={self.patch_dim} pixels per kept index"
            )

    def _check_image_shape(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"images must be a torch.Tensor, got {type(images).__name__}; convert it "
                f"with torch.as_tensor"
            )
        expected = (self.in_chans, *self.spec.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images have shape {tuple(images.shape)}, expected (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}); resize to {expected[1]}x{expected[2]} "
                f"with {expected[0]} channel(s)"
            )

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dtype == torch.uint8:
            return
        if pixels.dtype not in _PIXEL_FLOAT_DTYPES:
            raise ValueError(
                f"pixels have dtype {pixels.dtype}; pass uint8 in 0..255 or floating point "
                f"in [0, 1]"
            )
        if pixels.numel() == 0:
            return
        if not bool(torch.isfinite(pixels).all()):
            bad = pixels[~torch.isfinite(pixels)].flatten()[0].item()
            raise ValueError(f"pixels contain {bad}; pass finite values in [0, 1]")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"floating pixels span [{low:.4g}, {high:.4g}], outside [0, 1]; pass raw "
                f"pixels scaled to [0, 1] (divide 0..255 values by 255) and do not normalise"
            )


def check_supported(model: nn.Module, name: str | None = None) -> None:
    """Check that the masked forward supports a model.

    Supported: timm `VisionTransformer` and its subclasses (such as the distilled DeiT),
    with a plain convolutional patch embedding (kernel == stride == patch size) and a
    fixed image size.

    Raises:
        ValueError: Naming the model and the reason it is not supported.
    """
    label = f"{name or type(model).__name__!r} ({type(model).__name__})"
    if not isinstance(model, VisionTransformer):
        missing = [attr for attr in ("patch_embed", "blocks") if not hasattr(model, attr)]
        if missing:
            reason = (
                f"it has no {' or '.join(missing)}, so it is not a plain ViT (convolutional "
                f"and windowed-attention models such as Swin need the full patch grid)"
            )
        else:
            reason = (
                f"{type(model).__name__} is not a timm VisionTransformer or subclass, the only "
                f"family whose token path the masked forward reproduces"
            )
        raise ValueError(
            f"model {label} is not supported by the masked teacher: {reason}; use a timm "
            f"VisionTransformer such as vit_* or deit_*"
        )
    if model.dynamic_img_size:
        raise ValueError(
            f"model {label} has dynamic_img_size=True, which the masked teacher does not "
            f"support; build it with dynamic_img_size=False and a fixed img_size"
        )
    patch_embed = model.patch_embed
    proj = getattr(patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d) or hasattr(patch_embed, "backbone"):
        raise ValueError(
            f"model {label} has a {type(patch_embed).__name__} patch embedding without a "
            f"single Conv2d projection (hybrid CNN stems are not supported)"
        )
    patch_size = tuple(getattr(patch_embed, "patch_size", ()))
    if (
        tuple(proj.kernel_size) != patch_size
        or tuple(proj.stride) != patch_size
        or proj.padding not in ((0, 0), 0)
        or proj.dilation != (1, 1)
        or proj.groups != 1
    ):
        raise ValueError(
            f"model {label} has a patch projection with kernel {proj.kernel_size}, stride "
            f"{proj.stride}, padding {proj.padding}; the masked teacher needs kernel == "
            f"stride == patch size {patch_size} with no padding"
        )
    if getattr(patch_embed, "img_size", None) is None or not getattr(patch_embed, "flatten", 1):
        raise ValueError(
            f"model {label} has a patch embedding without a fixed img_size or with "
            f"non-flattened output; build it with a fixed img_size"
        )
    if getattr(patch_embed, "dynamic_img_pad", False):
        raise ValueError(
            f"model {label} has dynamic_img_pad=True; build it with dynamic_img_pad=False"
        )


@dataclass
class _CountGroup:
    """Rows of a batch that keep the same number of patches."""

    row_ids: torch.Tensor  # [G] positions in the request batch
    sorted_keep: torch.Tensor  # [G, K] each row's indices in ascending order
    order: torch.Tensor  # [G, K] argsort: sorted_keep[g] == keep[row_ids[g]][order[g]]


def _group_by_count(rows: Sequence[torch.Tensor]) -> list[_CountGroup]:
    """Group rows by kept count and sort each row's indices.

    Sorting makes the result independent of the order of indices within a row, bit for bit,
    because the tokens then enter the blocks in the same order whatever the caller's order.
    """
    by_count: dict[int, list[int]] = {}
    for row, row_keep in enumerate(rows):
        by_count.setdefault(row_keep.numel(), []).append(row)
    groups = []
    for row_list in by_count.values():
        keep = torch.stack([rows[row] for row in row_list])  # [G, K]
        sorted_keep, order = torch.sort(keep, dim=1)
        row_ids = torch.tensor(row_list, dtype=torch.int64)
        groups.append(_CountGroup(row_ids=row_ids, sorted_keep=sorted_keep, order=order))
    return groups


def _as_rows(values: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        if values.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(values.shape)}; pass a batched tensor or a list "
                f"with one tensor per image"
            )
        return list(values.unbind(0))
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{name} must be a tensor or a sequence of tensors, got {type(values).__name__}"
        )
    rows = list(values)
    for row, item in enumerate(rows):
        if not isinstance(item, torch.Tensor):
            raise ValueError(
                f"{name} row {row} is a {type(item).__name__}; pass torch tensors "
                f"(torch.as_tensor converts numpy arrays)"
            )
    return rows


class _FlopModel:
    """Per-token and per-pair multiply-accumulate counts of a ViT, read from its modules."""

    def __init__(
        self,
        *,
        patch_macs: int,
        linear_macs_per_token: int,
        attention_width: int,
        head_macs: int,
        num_prefix: int,
    ) -> None:
        self.patch_macs = patch_macs
        self.linear_macs_per_token = linear_macs_per_token
        self.attention_width = attention_width
        self.head_macs = head_macs
        self.num_prefix = num_prefix

    @classmethod
    def from_model(cls, model: VisionTransformer, num_patches: int) -> _FlopModel:
        proj = model.patch_embed.proj
        patch_macs = proj.weight.numel()  # D * C * ph * pw per patch
        linear_macs = 0
        attention_width = 0
        for block in model.blocks:
            linear_macs += sum(
                module.in_features * module.out_features
                for module in block.modules()
                if isinstance(module, nn.Linear)
            )
            attention = getattr(block, "attn", block)
            num_heads = getattr(attention, "num_heads", None)
            head_dim = getattr(attention, "head_dim", None)
            if num_heads and head_dim:
                attention_width += int(num_heads) * int(head_dim)
            else:
                attention_width += model.embed_dim
        head_macs = sum(
            module.in_features * module.out_features
            for module in (getattr(model, "head", None), getattr(model, "head_dist", None))
            if isinstance(module, nn.Linear)
        )
        return cls(
            patch_macs=patch_macs,
            linear_macs_per_token=linear_macs,
            attention_width=attention_width,
            head_macs=head_macs,
            num_prefix=model.num_prefix_tokens,
        )

    def macs(self, keep_count: int) -> int:
        tokens = self.num_prefix + keep_count
        blocks = tokens * self.linear_macs_per_token + 2 * tokens * tokens * self.attention_width
        return keep_count * self.patch_macs + blocks + self.head_macs


def _check_model_matches_spec(model: VisionTransformer, spec: TeacherSpec) -> None:
    patch_embed: Any = model.patch_embed
    actual = {
        "img_size": tuple(patch_embed.img_size),
        "patch_size": tuple(patch_embed.patch_size),
        "in_chans": patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
    }
    for key, value in actual.items():
        if getattr(spec, key) != value:
            raise ValueError(
                f"spec {key}={getattr(spec, key)} does not match model {spec.arch!r} with "
                f"{key}={value}; build the spec with spec_from_model"
            )
