"""Teacher loading and the portable teacher checkpoint.

A portable checkpoint is one safetensors file. Its header metadata key `maskedkd` contains
a JSON object with everything needed to rebuild and feed the teacher. That is the timm
architecture name and constructor kwargs, the image size, patch size and channel count,
the class count and class names, and the input normalisation (mean and std on the [0, 1]
pixel scale). Weights are stored as float16, bfloat16 or float32 and are always loaded
back as float32. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

METADATA_KEY = "maskedkd"
FORMAT_VERSION = 1
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_READ_CHUNK_BYTES = 1 << 20
# A safetensors header is small JSON, so a larger length means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class TeacherSpec:
    """Description of a teacher: how to build it and how to feed it.

    Attributes:
        arch: timm model name, for example "vit_tiny_patch16_224".
        model_kwargs: Keyword arguments passed to `timm.create_model` after the name.
        img_size: Input image size (height, width) in pixels.
        patch_size: Patch size (height, width) in pixels.
        in_chans: Number of input channels.
        num_classes: Number of output logits.
        class_names: One name per output logit.
        mean: Per-channel mean subtracted from pixels on the [0, 1] scale.
        std: Per-channel standard deviation that pixels are divided by, [0, 1] scale.
        digest: SHA-256 hex digest of the weights. For a file it is the digest of the
            file's bytes, and for a timm model it is `state_dict_digest` of its weights.
        source: Where the weights came from: a file path, "timm:NAME:pretrained" or
            "timm:NAME:random".
    """

    arch: str
    model_kwargs: dict[str, Any]
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    class_names: list[str] = field(repr=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    digest: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        _validate_spec(self)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        """Number of patches on the grid."""
        grid_h, grid_w = self.grid_size
        return grid_h * grid_w

    def to_metadata(self) -> dict[str, Any]:
        """Return the JSON-serialisable form stored in a portable file (no digest)."""
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "model_kwargs": dict(self.model_kwargs),
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
        }

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], *, digest: str = "", source: str = ""
    ) -> TeacherSpec:
        """Build a spec from `to_metadata` output.

        Args:
            metadata: The decoded JSON object.
            digest: Digest to record, since the metadata does not contain one.
            source: Source to record in place of the stored one; empty keeps the stored one.

        Raises:
            ValueError: If a key is missing or has the wrong type.
        """
        version = metadata.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported teacher metadata format_version {version!r}; this version of "
                f"maskedkd reads version {FORMAT_VERSION}"
            )
        required = ("arch", "img_size", "patch_size", "in_chans", "num_classes", "mean", "std")
        missing = [key for key in required if key not in metadata]
        if missing:
            raise ValueError(f"teacher metadata is missing keys {missing}; re-export the teacher")
        try:
            num_classes = int(metadata["num_classes"])
            class_names = metadata.get("class_names") or default_class_names(num_classes)
            return cls(
                arch=str(metadata["arch"]),
                model_kwargs=dict(metadata.get("model_kwargs") or {}),
                img_size=_pair(metadata["img_size"], "img_size"),
                patch_size=_pair(metadata["patch_size"], "patch_size"),
                in_chans=int(metadata["in_chans"]),
                num_classes=num_classes,
                class_names=[str(name) for name in class_names],
                mean=tuple(float(v) for v in metadata["mean"]),
                std=tuple(float(v) for v in metadata["std"]),
                digest=digest,
                source=source or str(metadata.get("source", "")),
            )
        except (TypeError, AttributeError) as error:
            raise ValueError(f"invalid teacher metadata: {error}") from error


def default_class_names(num_classes: int) -> list[str]:
    """Return placeholder class names "0", "1", ... for a model without names."""
    return [str(index) for index in range(num_classes)]


def load_teacher(
    source: str | os.PathLike[str],
    *,
    pretrained: bool | None = None,
    random_init: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, TeacherSpec]:
    """Load a teacher from a portable checkpoint or build it by timm model name.

    Args:
        source: Path to a portable `.safetensors` checkpoint, or a timm model name.
        pretrained: For a timm name, download the pretrained weights from the model hub.
            None means True unless `random_init` is set. Must be None for a file.
        random_init: For a timm name, keep timm's random initialisation (for tests and
            benchmarks; a warning is logged). Must be False for a file.
        model_kwargs: For a timm name, keyword arguments for `timm.create_model`
            (img_size, patch_size, in_chans, num_classes, embed_dim, ...).
        device: Device the model is moved to.

    Returns:
        The model in eval mode with float32 weights, and its spec.

    Raises:
        ValueError: If the file is not a valid portable checkpoint, the name is not a timm
            model, the options conflict, or the model has no patch embedding.
    """
    path = Path(source)
    if path.is_file() or str(source).endswith(".safetensors"):
        if pretrained or random_init or model_kwargs:
            raise ValueError(
                f"pretrained, random_init and model_kwargs apply to timm model names only, "
                f"but {str(source)!r} is a checkpoint file; drop those options"
            )
        return _load_file(path, device)
    return _load_timm(
        str(source),
        pretrained=pretrained,
        random_init=random_init,
        model_kwargs=dict(model_kwargs or {}),
        device=device,
    )


def save_teacher(
    model: nn.Module,
    spec: TeacherSpec,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float16,
) -> TeacherSpec:
    """Write a portable checkpoint atomically and return the spec that loading it gives.

    The file is written to a temporary file in the same folder and then moved over `path`
    with `os.replace`, so readers see either the old file or the complete new one.

    Args:
        model: The teacher whose `state_dict` is saved.
        spec: The teacher's spec; everything but the digest is stored in the metadata.
        path: Destination file, conventionally ending in `.safetensors`.
        dtype: Storage dtype of floating-point weights: float16, bfloat16 or float32.

    Returns:
        `spec` with `digest` set to the SHA-256 of the written file and `source` to `path`.

    Raises:
        ValueError: If `dtype` is not a storage dtype, a weight does not fit in float16,
            or `spec.model_kwargs` is not JSON-serialisable.
    """
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(
            f"invalid storage dtype {dtype}; use one of torch.{', torch.'.join(STORAGE_DTYPES)}"
        )
    try:
        metadata_json = json.dumps(spec.to_metadata(), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"teacher spec of {spec.arch!r} cannot be stored as JSON ({error}); pass only "
            f"numbers, strings, lists and dicts in model_kwargs"
        ) from error

    tensors = _storage_tensors(model, dtype)
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(file_descriptor)
    try:
        # One metadata key only: safetensors writes metadata in hash-map order, so a second
        # key would make the bytes, and the digest, differ between saves of equal weights.
        safetensors.torch.save_file(tensors, temp_name, metadata={METADATA_KEY: metadata_json})
        with open(temp_name, "rb") as stream:
            os.fsync(stream.fileno())
        digest = file_digest(temp_name)
        # mkstemp creates the file readable by its owner only. Replicas that run as other
        # users must read the checkpoint too, so it gets the usual 0644 mode.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.info(
        "saved teacher %s to %s (%s, sha256 %s)", spec.arch, destination, dtype, digest[:12]
    )
    return dataclasses.replace(spec, digest=digest, source=str(destination))


def file_digest(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def state_dict_digest(model: nn.Module) -> str:
    """Return a SHA-256 hex digest of a model's weights.

    The hash covers each `state_dict` entry in sorted key order: its name, dtype, shape
    and bytes. Equal weights in equal dtypes give equal digests on any device.
    """
    hasher = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{name}|{tensor.dtype}|{list(state[name].shape)}|".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the `maskedkd` metadata of a portable checkpoint without loading weights.

    Raises:
        ValueError: If the file is not a safetensors file or has no `maskedkd` metadata.
    """
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file: it is too short")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > _MAX_HEADER_BYTES:
            raise ValueError(
                f"{str(path)!r} is not a safetensors file: header length {header_bytes} bytes"
            )
        header = stream.read(header_bytes)
    return _parse_header(header, str(path))


def spec_from_model(
    model: nn.Module,
    *,
    arch: str,
    model_kwargs: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    digest: str = "",
    source: str = "",
) -> TeacherSpec:
    """Describe a timm model as a `TeacherSpec`.

    Image size, patch size and channel count come from `model.patch_embed`, the class
    count from `model.num_classes`. Mean and std default to the model's `pretrained_cfg`.
    When that config has a different channel count (an RGB config on a 1-channel model),
    the average over its channels is used for every channel.

    Raises:
        ValueError: If the model has no timm-style patch embedding.
    """
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if img_size is None or patch_size is None:
        raise ValueError(
            f"timm model {arch!r} ({type(model).__name__}) has no patch_embed with a fixed "
            f"img_size and patch_size, so it is not a supported ViT teacher"
        )
    proj = getattr(patch_embed, "proj", None)
    in_chans = int(getattr(model, "in_chans", 0) or getattr(proj, "in_channels", 0))
    num_classes = int(getattr(model, "num_classes", 0))
    config = getattr(model, "pretrained_cfg", None) or {}
    return TeacherSpec(
        arch=arch,
        model_kwargs=dict(model_kwargs),
        img_size=_pair(img_size, "img_size"),
        patch_size=_pair(patch_size, "patch_size"),
        in_chans=in_chans,
        num_classes=num_classes,
        class_names=list(class_names) if class_names else default_class_names(num_classes),
        mean=tuple(map(float, mean or _per_channel(config.get("mean", (0.5,)), in_chans))),
        std=tuple(map(float, std or _per_channel(config.get("std", (0.5,)), in_chans))),
        digest=digest,
        source=source,
    )


def _load_file(path: Path, device: str | torch.device) -> tuple[nn.Module, TeacherSpec]:
    if not path.is_file():
        raise ValueError(f"teacher checkpoint {str(path)!r} not found; check the path")

    # Read the bytes once, so the digest describes exactly the weights that get loaded.
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) < 8:
        raise ValueError(f"{str(path)!r} is not a safetensors file: it is too short")
    (header_bytes,) = struct.unpack("<Q", data[:8])
    if header_bytes > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"{str(path)!r} is not a safetensors file: header length {header_bytes}")
    metadata = _parse_header(data[8 : 8 + header_bytes], str(path))
    spec = TeacherSpec.from_metadata(metadata, digest=digest, source=str(path))
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own SafetensorError type
        raise ValueError(f"{str(path)!r} is not a valid safetensors file: {error}") from error
    del data

    model = _create_model(spec.arch, pretrained=False, model_kwargs=spec.model_kwargs)
    state = {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(path)!r} do not match timm model {spec.arch!r} with kwargs "
            f"{spec.model_kwargs}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    _check_spec_matches_model(spec, model)
    logger.info("loaded teacher %s from %s (sha256 %s)", spec.arch, path, digest[:12])
    return model.to(device).eval(), spec


def _load_timm(
    name: str,
    *,
    pretrained: bool | None,
    random_init: bool,
    model_kwargs: dict[str, Any],
    device: str | torch.device,
) -> tuple[nn.Module, TeacherSpec]:
    if pretrained and random_init:
        raise ValueError(f"pretrained=True and random_init=True conflict for {name!r}; pick one")
    use_pretrained = (not random_init) if pretrained is None else pretrained
    model = _create_model(name, pretrained=use_pretrained, model_kwargs=model_kwargs)
    if use_pretrained:
        source = f"timm:{name}:pretrained"
        logger.info("loaded teacher %s with pretrained weights from the model hub", name)
    else:
        source = f"timm:{name}:random"
        logger.warning(
            "teacher %s has random weights; its logits carry no knowledge (tests and "
            "benchmarks only)",
            name,
        )
    spec = spec_from_model(
        model,
        arch=name,
        model_kwargs=model_kwargs,
        class_names=_imagenet_class_names(model) if use_pretrained else None,
        digest=state_dict_digest(model),
        source=source,
    )
    return model.to(device).eval(), spec


def _create_model(name: str, *, pretrained: bool, model_kwargs: Mapping[str, Any]) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is neither an existing checkpoint file nor a timm model name; "
            f"check the path, or list names with timm.list_models()"
        )
    try:
        model: nn.Module = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except (AssertionError, TypeError) as error:
        # timm checks sizes with asserts, for example that num_heads divides embed_dim.
        raise ValueError(
            f"timm cannot build {name!r} with {dict(model_kwargs)}: {error or 'invalid sizes'}; "
            "check the size options: num_heads must divide embed_dim, and patch_size "
            "must divide img_size"
        ) from error
    return model.float()


def _imagenet_class_names(model: nn.Module) -> list[str] | None:
    """Return ImageNet class descriptions when the head matches a known ImageNet subset."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    names = ImageNetInfo(subset).label_descriptions()
    if not isinstance(names, list) or len(names) != getattr(model, "num_classes", -1):
        return None
    return [str(name) for name in names]


def _storage_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    dtype_max = torch.finfo(dtype).max
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            if dtype != torch.float32 and tensor.numel():
                largest = tensor.abs().max().item()
                if largest > dtype_max:
                    raise ValueError(
                        f"weight {name!r} has magnitude {largest:.4g}, above the {dtype} "
                        f"maximum {dtype_max:.4g}; save with dtype=torch.float32"
                    )
            tensor = tensor.to(dtype)
        # Clone so tensors that share storage in the model are written separately.
        tensors[name] = tensor.contiguous().clone()
    return tensors


def _parse_header(header: bytes, where: str) -> dict[str, Any]:
    try:
        decoded = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where!r} is not a safetensors file: bad header ({error})") from error
    if not isinstance(decoded, dict):
        raise ValueError(f"{where!r} is not a safetensors file: header is not a JSON object")
    stored = (decoded.get("__metadata__") or {}).get(METADATA_KEY)
    if stored is None:
        raise ValueError(
            f"{where!r} has no {METADATA_KEY!r} metadata, so it is not a portable teacher; "
            f"write one with `maskedkd export-teacher`"
        )
    try:
        metadata = json.loads(stored)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where!r} has invalid {METADATA_KEY!r} metadata: {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{where!r} has invalid {METADATA_KEY!r} metadata: not a JSON object")
    return metadata


def _check_spec_matches_model(spec: TeacherSpec, model: nn.Module) -> None:
    built = spec_from_model(model, arch=spec.arch, model_kwargs=spec.model_kwargs)
    for name in ("img_size", "patch_size", "in_chans", "num_classes"):
        stored, actual = getattr(spec, name), getattr(built, name)
        if stored != actual:
            raise ValueError(
                f"checkpoint metadata has {name}={stored} but timm builds {spec.arch!r} with "
                f"{name}={actual}; add {name} to model_kwargs when exporting"
            )


def _validate_spec(spec: TeacherSpec) -> None:
    if spec.in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {spec.in_chans}")
    if min(spec.img_size) < 1 or min(spec.patch_size) < 1:
        raise ValueError(
            f"img_size {spec.img_size} and patch_size {spec.patch_size} must be positive"
        )
    for axis, (size, patch) in enumerate(zip(spec.img_size, spec.patch_size, strict=True)):
        if size % patch:
            raise ValueError(
                f"img_size {spec.img_size} is not a multiple of patch_size {spec.patch_size} "
                f"on axis {axis}; pick an image size divisible by the patch size"
            )
    if spec.num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {spec.num_classes}")
    if len(spec.class_names) != spec.num_classes:
        raise ValueError(
            f"got {len(spec.class_names)} class names for num_classes={spec.num_classes}; "
            f"pass exactly one name per class"
        )
    for label, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) != spec.in_chans:
            raise ValueError(
                f"{label} {values} has {len(values)} values for in_chans={spec.in_chans}; "
                f"pass one value per channel"
            )
    if not all(math.isfinite(value) for value in (*spec.mean, *spec.std)):
        raise ValueError(f"mean {spec.mean} and std {spec.std} must be finite numbers")
    if any(not value > 0 for value in spec.std):
        raise ValueError(f"std {spec.std} must be positive in every channel")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    items = [int(item) for item in value]
    if len(items) != 2:
        raise ValueError(f"{name} must be one int or a (height, width) pair, got {value!r}")
    return (items[0], items[1])


def _per_channel(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    values = [float(value) for value in values]
    if len(values) == in_chans:
        return tuple(values)
    if len(values) == 1:
        return tuple(values * in_chans)
    average = sum(values) / len(values)
    return tuple([average] * in_chans)
