"""Write image-classification datasets as WebDataset shards.

Each sample is a PNG image (`png`), an integer class (`cls`) and a stable `__key__`
without dots (`train_0000123`). Beside the shards, `dataset.json` records the classes,
the sample count and shard names of each split, the image size and the channel count.

Shards are written under a temporary name and renamed when complete, and
`dataset.json` is written last, so a folder with `dataset.json` is always complete and
an interrupted run leaves only whole shards, which a rerun keeps.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DATASET_INFO_NAME = "dataset.json"


class DatasetSourceError(ValueError):
    """A source dataset is missing, truncated or malformed."""


@dataclass(frozen=True)
class PrepareConfig:
    """Options shared by every `prepare` source.

    Attributes:
        out_dir: folder that receives the shards and `dataset.json`.
        samples_per_shard: samples in each tar file; more shards let more loader
            workers and cluster nodes read in parallel.
    """

    out_dir: Path
    samples_per_shard: int = 5000


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) into a uint8 array.

    Raises:
        DatasetSourceError: when the file is missing, truncated or not the expected
            IDX type.
    """
    if not path.is_file():
        raise DatasetSourceError(f"{path} not found")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetSourceError(f"{path} is not a readable gzip file: {err}") from err
    if len(data) < 8:
        raise DatasetSourceError(f"{path} is truncated: {len(data)} bytes, no IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DatasetSourceError(
            f"{path} has IDX magic {magic:#010x}, expected {expected_magic:#010x}"
        )
    num_dims = magic & 0xFF
    header_bytes = 4 + 4 * num_dims
    if len(data) < header_bytes:
        raise DatasetSourceError(f"{path} is truncated inside its IDX header")
    shape = struct.unpack(f">{num_dims}I", data[4:header_bytes])
    expected_bytes = header_bytes + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise DatasetSourceError(
            f"{path} contains {len(data)} bytes but its header {tuple(shape)} needs "
            f"{expected_bytes}; the file is truncated or corrupt, reinstall or re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode HW (grayscale) or HWC (RGB) uint8 pixels as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def shard_names(split: str, num_samples: int, samples_per_shard: int) -> list[str]:
    """Name the shards of a split: `train-000000.tar`, `train-000001.tar`, ..."""
    num_shards = max(1, -(-num_samples // samples_per_shard))
    return [f"{split}-{index:06d}.tar" for index in range(num_shards)]


def write_shard(path: Path, samples: Iterator[tuple[str, bytes, int]]) -> int:
    """Write one tar shard atomically and return the number of samples in it."""
    import webdataset as wds

    tmp_path = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp_path, "wb") as f:
        with wds.TarWriter(f) as writer:
            for key, png, label in samples:
                writer.write({"__key__": key, "png": png, "cls": str(label).encode("ascii")})
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    return count


def write_split(
    out_dir: Path,
    split: str,
    num_samples: int,
    load_sample: Any,
    samples_per_shard: int,
) -> dict[str, Any]:
    """Write the shards of one split, keeping shards that a previous run completed.

    Args:
        out_dir: output folder.
        split: split name, used in shard names and keys.
        num_samples: samples in the split.
        load_sample: function from a sample index to (png bytes, label).
        samples_per_shard: samples in each shard.

    Returns:
        The split's entry for `dataset.json`.
    """
    names = shard_names(split, num_samples, samples_per_shard)
    for shard_index, name in enumerate(names):
        path = out_dir / name
        if path.is_file():
            logger.info("keeping complete shard %s", path)
            continue
        start = shard_index * samples_per_shard
        stop = min(start + samples_per_shard, num_samples)

        def samples(start: int = start, stop: int = stop) -> Iterator[tuple[str, bytes, int]]:
            for index in range(start, stop):
                png, label = load_sample(index)
                yield f"{split}_{index:07d}", png, label

        count = write_shard(path, samples())
        logger.info("wrote %s (%d samples)", path, count)
    return {"count": num_samples, "shards": names}


def write_info(out_dir: Path, info: dict[str, Any]) -> Path:
    """Write `dataset.json` atomically; its presence marks the folder complete."""
    path = out_dir / DATASET_INFO_NAME
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    return path


def is_complete(out_dir: Path) -> bool:
    """Return whether `out_dir` contains a finished dataset: its info file and every shard."""
    info_path = out_dir / DATASET_INFO_NAME
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text(encoding="utf-8"))
    return all(
        (out_dir / name).is_file()
        for split in info.get("splits", {}).values()
        for name in split.get("shards", [])
    )


def prepare_fashion_mnist(source_dir: str | Path, config: PrepareConfig) -> dict[str, Any]:
    """Convert Fashion-MNIST IDX files into `train` and `test` WebDataset shards.

    Args:
        source_dir: folder holding the four gzip IDX files, as Debian's
            `dataset-fashion-mnist` package installs them.
        config: output folder and shard size.

    Returns:
        The contents of the written `dataset.json`.
    """
    source = Path(source_dir)
    out_dir = Path(config.out_dir)
    if is_complete(out_dir):
        logger.info("%s already contains a complete dataset; nothing to do", out_dir)
        return json.loads((out_dir / DATASET_INFO_NAME).read_text(encoding="utf-8"))
    if not source.is_dir():
        raise DatasetSourceError(
            f"Fashion-MNIST folder {source} not found; install Debian's "
            "dataset-fashion-mnist package or pass --source FOLDER with the four IDX .gz files"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    image_size: list[int] = []
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images = read_idx(source / images_name, IDX_IMAGES_MAGIC)
        labels = read_idx(source / labels_name, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DatasetSourceError(
                f"{source / images_name} has {len(images)} images but "
                f"{source / labels_name} has {len(labels)} labels"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DatasetSourceError(
                f"{source / labels_name} has label {int(labels.max())}; "
                f"Fashion-MNIST has {len(FASHION_MNIST_CLASSES)} classes"
            )
        image_size = [int(images.shape[1]), int(images.shape[2])]

        def load_sample(
            index: int, images: np.ndarray = images, labels: np.ndarray = labels
        ) -> tuple[bytes, int]:
            return encode_png(images[index]), int(labels[index])

        splits[split] = write_split(
            out_dir, split, len(images), load_sample, config.samples_per_shard
        )
    info = {
        "name": "fashion-mnist",
        "classes": FASHION_MNIST_CLASSES,
        "splits": splits,
        "image_size": image_size,
        "channels": 1,
    }
    write_info(out_dir, info)
    return info


def list_image_folder(source_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """List a class-per-folder tree as (sorted class names, [(image path, class index)])."""
    if not source_dir.is_dir():
        raise DatasetSourceError(f"image folder {source_dir} not found")
    classes = sorted(p.name for p in source_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetSourceError(
            f"{source_dir} has no class folders; expected SRC/CLASS_NAME/IMAGE files"
        )
    items = [
        (path, class_index)
        for class_index, name in enumerate(classes)
        for path in sorted((source_dir / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DatasetSourceError(f"no images ({sorted(IMAGE_SUFFIXES)}) under {source_dir}")
    return classes, items


def load_folder_image(path: Path, mode: str) -> np.ndarray:
    """Load an image file as uint8 pixels in `mode` ('L' or 'RGB')."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except OSError as err:
        raise DatasetSourceError(f"cannot read image {path}: {err}") from err


def prepare_image_folder(
    source_dir: str | Path,
    config: PrepareConfig,
    *,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert a class-per-folder image tree into WebDataset shards.

    Every image must have the size and mode of the first one, because the teacher and
    student take fixed-size input; resize the tree beforehand otherwise.

    Args:
        source_dir: folder with one subfolder of images per class.
        config: output folder and shard size.
        test_fraction: share of images (in [0, 1)) held out as the `test` split,
            chosen by a seeded shuffle.
        seed: seed for the train/test split.

    Returns:
        The contents of the written `dataset.json`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    source = Path(source_dir)
    out_dir = Path(config.out_dir)
    if is_complete(out_dir):
        logger.info("%s already contains a complete dataset; nothing to do", out_dir)
        return json.loads((out_dir / DATASET_INFO_NAME).read_text(encoding="utf-8"))
    classes, items = list_image_folder(source)
    with Image.open(items[0][0]) as first:
        mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
        size = first.size
    order = np.random.default_rng(seed).permutation(len(items))
    num_test = int(round(len(items) * test_fraction))
    split_items = {"train": [items[i] for i in sorted(order[num_test:])]}
    if num_test:
        split_items["test"] = [items[i] for i in sorted(order[:num_test])]
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, entries in split_items.items():

        def load_sample(index: int, entries: Sequence[tuple[Path, int]] = entries) -> Any:
            path, label = entries[index]
            pixels = load_folder_image(path, mode)
            if (pixels.shape[1], pixels.shape[0]) != size:
                raise DatasetSourceError(
                    f"{path} is {pixels.shape[1]}x{pixels.shape[0]} but the first image is "
                    f"{size[0]}x{size[1]}; resize the tree to one size first"
                )
            return encode_png(pixels), label

        splits[split] = write_split(
            out_dir, split, len(entries), load_sample, config.samples_per_shard
        )
    info = {
        "name": source.name,
        "classes": classes,
        "splits": splits,
        "image_size": [size[1], size[0]],
        "channels": 1 if mode == "L" else 3,
    }
    write_info(out_dir, info)
    return info
