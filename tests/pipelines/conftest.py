import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipelines.prepare import FASHION_MNIST_FILES


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` as a gzip IDX file, the format Fashion-MNIST ships in."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_source(root: Path, num_train: int = 36, num_test: int = 12) -> dict:
    """Write a small Fashion-MNIST-shaped IDX source with random pixels and cycling labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(root / images_name, images)
        write_idx(root / labels_name, labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def fashion_source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    write_fashion_source(source)
    return source
