"""Helpers of the trainer tests: synthetic shards, a tiny teacher and fast configs."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import webdataset as wds
from PIL import Image

from student_trainer.config import TrainConfig

IMAGE_SIZE = 16
NUM_CLASSES = 4
TRAIN_COUNT = 48
TEST_COUNT = 16
TEACHER_KWARGS: dict[str, Any] = {
    "img_size": IMAGE_SIZE,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": NUM_CLASSES,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
STUDENT_KWARGS = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}


def synthetic_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a noisy 16x16 image whose brightness and bright quadrant both encode the label."""
    pixels = rng.integers(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    pixels += np.uint8(40 * label)
    row, col = divmod(label, 2)
    pixels[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 80
    return pixels


def write_shards(root: Path, counts: dict[str, int], per_shard: int = 16) -> Path:
    """Write `split-NNNNNN.tar` shards and dataset.json the way `maskedkd prepare` does."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits: dict[str, Any] = {}
    for split, count in counts.items():
        shards = []
        for start in range(0, count, per_shard):
            name = f"{split}-{start // per_shard:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for index in range(start, min(start + per_shard, count)):
                    label = index % NUM_CLASSES
                    buffer = io.BytesIO()
                    Image.fromarray(synthetic_image(label, rng)).save(buffer, format="PNG")
                    writer.write(
                        {
                            "__key__": f"{split}_{index:07d}",
                            "png": buffer.getvalue(),
                            "cls": str(label).encode(),
                        }
                    )
            shards.append(name)
        splits[split] = {"count": count, "shards": shards}
    info = {
        "name": "quadrants",
        "classes": [f"quadrant{i}" for i in range(NUM_CLASSES)],
        "splits": splits,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "channels": 1,
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the count.

    The test models are too small to gain from several threads, and on a busy machine extra
    OpenMP threads spin against other processes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_tiny_teacher(data: Path, steps: int = 30) -> torch.nn.Module:
    """Fit a small ViT on the synthetic shards so that its logits carry information."""
    with one_torch_thread():
        return _fit_teacher(data, steps)


def _fit_teacher(data: Path, steps: int) -> torch.nn.Module:
    from student_trainer.data import list_shards, make_loader

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TEACHER_KWARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    shards = list_shards(data, "train")
    done = 0
    epoch = 0
    while done < steps:
        for images, labels, _ in make_loader(shards, 16, train=True, seed=1, epoch=epoch):
            logits = model((images.float() / 255.0 - 0.5) / 0.25)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return model.eval()


def make_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """A fast config: tiny student, 8 images per step, a metrics line every step."""
    options: dict[str, Any] = {
        "data": str(data),
        "val_data": str(data),
        "out": str(out),
        "student": "vit_tiny_patch16_224",
        "student_kwargs": dict(STUDENT_KWARGS),
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_epochs": 0,
        "weight_decay": 0.0,
        "log_every": 1,
        "device": "cpu",
        "progress": False,
        "seed": 0,
    }
    options.update(overrides)
    return TrainConfig(**options)


def step_losses(run_dir: Path) -> list[float]:
    """Return the `loss` of every step line in a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r["kind"] == "step"]


def loss_went_down(losses: list[float], window: int = 4) -> bool:
    """Whether the mean of the last `window` losses is below the mean of the first."""
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return last < first
