"""Training metrics: running sums per log interval, metrics.jsonl lines and the PNG plot."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class IntervalMeter:
    """Sums over the steps since the last log line.

    Attributes:
        steps: optimizer steps.
        images: training images.
        loss_sum, task_loss_sum, kd_loss_sum: per-step losses, summed.
        correct: images whose top-1 prediction equals the (unmixed) label.
        teacher_correct: images whose teacher top-1, on the kept patches, equals the label.
        teacher_images: images the teacher labelled.
        blocked_s: seconds the trainer waited on teacher results.
        teacher_macs_spent: teacher multiply-accumulates spent.
        teacher_macs_saved: multiply-accumulates saved against full images.
        started_s: `time.perf_counter()` when the interval began.
    """

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    task_loss_sum: float = 0.0
    kd_loss_sum: float = 0.0
    correct: int = 0
    teacher_correct: int = 0
    teacher_images: int = 0
    blocked_s: float = 0.0
    teacher_macs_spent: int = 0
    teacher_macs_saved: int = 0
    started_s: float = field(default_factory=time.perf_counter)

    def add(self, step: dict[str, Any]) -> None:
        """Add one step's `train_step` result."""
        self.steps += 1
        self.images += int(step["images"])
        self.loss_sum += float(step["loss"])
        self.task_loss_sum += float(step["task_loss"])
        self.kd_loss_sum += float(step["kd_loss"])
        self.correct += int(step["correct"])
        self.teacher_correct += int(step.get("teacher_correct", 0))
        self.teacher_images += int(step.get("teacher_images", 0))
        self.blocked_s += float(step["blocked_s"])
        self.teacher_macs_spent += int(step["macs_spent"])
        self.teacher_macs_saved += int(step["macs_saved"])

    def summary(self) -> dict[str, Any]:
        """Return means and rates over the interval (wall time includes data loading)."""
        elapsed_s = max(time.perf_counter() - self.started_s, 1e-9)
        steps = max(self.steps, 1)
        return {
            "loss": self.loss_sum / steps,
            "task_loss": self.task_loss_sum / steps,
            "kd_loss": self.kd_loss_sum / steps,
            "train_top1": self.correct / max(self.images, 1),
            # None without a teacher; with Mixup the label is the unmixed one.
            "teacher_top1": (
                self.teacher_correct / self.teacher_images if self.teacher_images else None
            ),
            "img_per_s": self.images / elapsed_s,
            "interval_s": elapsed_s,
            "blocked_s": self.blocked_s,
            "blocked_fraction": self.blocked_s / elapsed_s,
            "interval_macs_spent": self.teacher_macs_spent,
            "interval_macs_saved": self.teacher_macs_saved,
        }


class MetricsWriter:
    """Appends one JSON object per line to a metrics file, flushing each line.

    Args:
        path: the metrics.jsonl file; lines are appended to an existing file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        """Write one record, replacing non-finite floats by null so every line is JSON."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def drop_metrics_after_step(path: str | os.PathLike[str], step: int) -> int:
    """Remove the records of steps after `step` from a metrics file, atomically.

    A run killed between checkpoints has written lines for steps that its resumed run
    trains again. Resuming from the checkpoint of `step` calls this first, so that every
    step appears once. Records without a `step` are kept, and a line cut short by the kill
    is dropped.

    Returns:
        The number of lines removed.
    """
    source = Path(path)
    if not source.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    with open(source, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            record_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(record_step, int) and record_step > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped == 0:
        return 0
    partial = source.with_name(f".{source.name}.tmp")
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, source)
    logger.info(
        "removed %d metrics lines written after the checkpoint of step %d from %s",
        dropped,
        step,
        source,
    )
    return dropped


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """Plot loss parts, evaluation top-1 and time blocked on the teacher into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    figure, (loss_axes, accuracy_axes, blocked_axes) = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("loss", "task_loss", "kd_loss"):
        loss_axes.plot([r["step"] for r in steps], [r[name] for r in steps], label=name)
    loss_axes.set(xlabel="step", ylabel="loss", title="training loss")
    loss_axes.legend()
    evaluated = [r for r in epochs if r.get("val_top1") is not None]
    accuracy_axes.plot(
        [r["step"] for r in evaluated], [r["val_top1"] for r in evaluated], marker="o", label="val"
    )
    accuracy_axes.plot(
        [r["step"] for r in steps], [r["train_top1"] for r in steps], alpha=0.6, label="train"
    )
    accuracy_axes.set(xlabel="step", ylabel="top-1", title="accuracy")
    accuracy_axes.legend()
    blocked_axes.plot([r["step"] for r in steps], [r["blocked_fraction"] for r in steps])
    blocked_axes.set(xlabel="step", ylabel="fraction of wall time", title="blocked on teacher")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    logger.info("wrote %s", png_path)
