"""Train a ViT teacher on prepared WebDataset shards and write a portable checkpoint.

The default recipe is the one behind the teacher shipped in `checkpoints/`: a timm
ViT (28x28 input, 4x4 patches, one channel, 6 blocks of width 128, 4 heads), AdamW
with one warm-up epoch and cosine decay, label smoothing 0.1, stochastic depth 0.1, and
random 2-pixel shifts plus horizontal flips as augmentation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from student_trainer.data import count_samples, list_shards, make_loader, read_dataset_info

logger = logging.getLogger(__name__)

# Fashion-MNIST pixel statistics on the [0, 1] scale, over the 60k training images.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


# Regularisers that act only in training; the written checkpoint leaves them out.
TRAINING_ONLY_KWARGS = ("drop_path_rate", "patch_drop_rate")


@dataclass
class TeacherTrainConfig:
    """Recipe for `maskedkd train-teacher`.

    Attributes:
        data: folder written by `maskedkd prepare` (with `train` and `test` splits).
        out: path of the portable teacher checkpoint (.safetensors) to write.
        arch: timm model name the teacher is built from.
        model_kwargs: timm constructor arguments that override the named model's.
        epochs: passes over the training split.
        batch_size: images per optimizer step.
        lr: peak learning rate after warm-up.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warm-up.
        label_smoothing: cross-entropy label smoothing.
        shift_px: maximum random translation in pixels (zero padding), 0 to disable.
        hflip: flip images horizontally with probability 0.5.
        mean: per-channel input mean on the [0, 1] scale; None reads Fashion-MNIST's.
        std: per-channel input standard deviation on the [0, 1] scale.
        seed: seed for weights, data order and augmentation.
        num_workers: data-loading worker processes.
        max_steps: stop after this many optimizer steps (for smoke tests); None runs
            every epoch.
        save_dtype: weight dtype in the written file, float16 or float32.
        threads: torch CPU threads; None leaves torch's default.
        init_from: portable teacher checkpoint whose weights start the run (a second
            stage of a recipe); None starts from random weights.
    """

    data: Path
    out: Path
    arch: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: {
            "img_size": 28,
            "patch_size": 4,
            "in_chans": 1,
            "embed_dim": 128,
            "depth": 6,
            "num_heads": 4,
            "drop_path_rate": 0.1,
        }
    )
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift_px: int = 2
    hflip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = 0
    num_workers: int = 0
    max_steps: int | None = None
    save_dtype: str = "float16"
    threads: int | None = None
    init_from: Path | None = None


def augment(images: torch.Tensor, shift_px: int, hflip: bool, generator: torch.Generator) -> Any:
    """Shift each image by up to `shift_px` pixels and flip half of them horizontally.

    Args:
        images: float pixels, shape [B, C, H, W].
        shift_px: maximum shift in each direction, with zero padding.
        hflip: whether to flip with probability 0.5.
        generator: random source, so runs repeat.

    Returns:
        Augmented pixels, same shape.
    """
    B, C, H, W = images.shape
    if shift_px > 0:
        padded = F.pad(images, (shift_px,) * 4)  # [B, C, H + 2s, W + 2s]
        offsets = torch.randint(0, 2 * shift_px + 1, (B, 2), generator=generator)
        images = torch.stack(
            [padded[i, :, y : y + H, x : x + W] for i, (y, x) in enumerate(offsets.tolist())]
        )
    if hflip:
        flip = torch.rand(B, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def evaluate(model: torch.nn.Module, shards: list[str], mean: Any, std: Any) -> float:
    """Return the model's top-1 accuracy (a fraction) over the given shards."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels, _ in make_loader(shards, 256, train=False):
            x = (images.float() / 255.0 - mean) / std
            correct += int((model(x).argmax(-1) == labels).sum())
            total += len(labels)
    model.train()
    return correct / max(total, 1)


def init_weights(model: torch.nn.Module, path: Path, classes: list[str]) -> None:
    """Copy the weights of a portable teacher checkpoint into `model`.

    Raises:
        ValueError: when the checkpoint's classes or parameter shapes differ from the model's.
    """
    from teacher_service.checkpoint import load_teacher

    source, spec = load_teacher(str(path))
    if list(spec.class_names) != classes:
        raise ValueError(
            f"{path} was trained on classes {spec.class_names}, but the data has {classes}; "
            "start from a checkpoint of the same dataset or drop --init-from"
        )
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"{path} ({spec.arch}, {spec.model_kwargs}) does not fit the configured model: "
            f"{err}; pass the same --arch and size options it was trained with"
        ) from err
    logger.info("starting from the weights in %s (sha256 %s)", path, spec.digest[:12])


def train_teacher(config: TeacherTrainConfig) -> dict[str, Any]:
    """Train the teacher, write its portable checkpoint, and return a summary.

    The summary contains the test top-1 of the written weights, the epochs, the steps and
    the wall time; it is also written beside the checkpoint as `<out>.json`.
    """
    import timm
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from teacher_service.checkpoint import save_teacher, spec_from_model

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    info = read_dataset_info(config.data)
    classes = list(info["classes"])
    train_shards = list_shards(config.data, "train")
    test_shards = list_shards(config.data, "test")
    num_train = count_samples(config.data, "train") or 0
    steps_per_epoch = max(1, num_train // config.batch_size)
    mean = config.mean or FASHION_MNIST_MEAN
    std = config.std or FASHION_MNIST_STD
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)

    model_kwargs = dict(config.model_kwargs, num_classes=len(classes))
    model = timm.create_model(config.arch, pretrained=False, **model_kwargs)
    if config.init_from is not None:
        init_weights(model, config.init_from, classes)
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.epochs,
        warmup_epochs=math.ceil(config.warmup_epochs),
        warmup_lr=config.lr * 1e-3,
        min_lr=config.lr * 1e-2,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    generator = torch.Generator().manual_seed(config.seed)
    logger.info(
        "training %s %s: %d params, %d train images, %d steps per epoch",
        config.arch,
        model_kwargs,
        sum(p.numel() for p in model.parameters()),
        num_train,
        steps_per_epoch,
    )

    step = 0
    start_s = time.perf_counter()
    top1 = 0.0
    metrics_path = Path(str(config.out) + ".metrics.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(config.epochs):
        loader = make_loader(
            train_shards,
            config.batch_size,
            train=True,
            seed=config.seed,
            epoch=epoch,
            num_workers=config.num_workers,
        )
        epoch_loss = 0.0
        epoch_steps = 0
        for images, labels, _ in loader:
            # Augment on the [0, 1] scale, then normalise like the engine does.
            x = augment(images.float() / 255.0, config.shift_px, config.hflip, generator)
            x = (x - mean_t) / std_t
            loss = F.cross_entropy(model(x), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_steps += 1
            epoch_loss += loss.item()
            scheduler.step_update(num_updates=step)
            if step % 50 == 0:
                logger.info("epoch %d step %d loss %.4f", epoch, step, loss.item())
            if config.max_steps is not None and step >= config.max_steps:
                break

        # Evaluate and write the checkpoint every epoch, so a long run can stop early.
        top1 = evaluate(model, test_shards, mean_t, std_t)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": epoch_loss / max(epoch_steps, 1),
            "test_top1": top1,
            "elapsed_s": time.perf_counter() - start_s,
        }
        logger.info("epoch %s", json.dumps(record))
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        spec = spec_from_model(
            model,
            arch=config.arch,
            model_kwargs={k: v for k, v in model_kwargs.items() if k not in TRAINING_ONLY_KWARGS},
            mean=tuple(mean),
            std=tuple(std),
            class_names=classes,
        )
        save_teacher(model.eval(), spec, config.out, dtype=getattr(torch, config.save_dtype))
        model.train()
        if config.max_steps is not None and step >= config.max_steps:
            break

    summary = {
        "checkpoint": str(config.out),
        "test_top1": top1,
        "epochs": config.epochs,
        "steps": step,
        "wall_s": time.perf_counter() - start_s,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }
    Path(str(config.out) + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
