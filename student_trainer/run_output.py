"""Outputs of a training run: metrics lines, checkpoints and final files.

The training loop calls the same `RunOutput` methods in a single-process run and on every
Ray Train worker. `RunFolderOutput` writes straight into the run folder. The Ray Train
output (`student_trainer.distributed`) sends rank 0's lines and files through
`ray.train.report`, and the driver writes them into the same run folder layout:

    metrics.jsonl           one JSON object per line (start, step, epoch, end)
    checkpoint.json         the latest checkpoint's loop state, see `checkpointing`
    checkpoints/            that checkpoint's safetensors files
    student.safetensors     the final student weights
    summary.json            the end record
    metrics.png             the plot of metrics.jsonl
    trained_keys/rank0.txt  with record_keys: the sample keys each rank trained on
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from student_trainer.checkpointing import (
    POINTER_NAME,
    save_checkpoint,
    save_student_weights,
    write_json_atomic,
)
from student_trainer.metrics import MetricsWriter, plot_metrics
from student_trainer.trainer_setup import RunState, Trainer, capture_rng

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
SUMMARY_NAME = "summary.json"
STUDENT_WEIGHTS_NAME = "student.safetensors"
KEYS_DIR = "trained_keys"


class RunOutput(ABC):
    """Receiver of one run's metrics lines, checkpoints and final files.

    On Ray Train workers every rank calls every method at the same points of the loop, and
    only rank 0's records and files are kept.
    """

    @abstractmethod
    def write(self, record: dict[str, Any]) -> None:
        """Record one metrics line."""

    @abstractmethod
    def save(self, trainer: Trainer, state: RunState) -> None:
        """Save a checkpoint of the run at `state`."""

    @abstractmethod
    def finish(self, trainer: Trainer, state: RunState, summary: dict[str, Any]) -> None:
        """Write the final student weights, the end record and the summary."""

    @abstractmethod
    def add_keys(self, keys: Sequence[str]) -> None:
        """Record the sample keys of one training batch; only with `record_keys`."""

    @abstractmethod
    def close(self) -> None:
        """Release open files."""


class RunFolderOutput(RunOutput):
    """Writes a single-process run straight into its run folder.

    Args:
        run_dir: the run folder.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.writer = MetricsWriter(self.run_dir / METRICS_NAME)

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)

    def save(self, trainer: Trainer, state: RunState) -> None:
        save_run_checkpoint(self.run_dir, trainer, state)

    def finish(self, trainer: Trainer, state: RunState, summary: dict[str, Any]) -> None:
        write_student_weights(self.run_dir, trainer)
        self.writer.write({"kind": "end", **summary})
        plot_metrics(self.run_dir / METRICS_NAME, self.run_dir / PLOT_NAME)
        write_json_atomic(self.run_dir / SUMMARY_NAME, summary)

    def add_keys(self, keys: Sequence[str]) -> None:
        append_keys(self.run_dir, 0, keys)

    def close(self) -> None:
        self.writer.close()


def save_run_checkpoint(folder: str | os.PathLike[str], trainer: Trainer, state: RunState) -> None:
    """Write the checkpoint of `state` into `folder` (checkpoint.json and checkpoints/)."""
    rng, numpy_rng = capture_rng(trainer)
    save_checkpoint(
        folder,
        model=trainer.vit,
        optimizer=trainer.optimizer,
        state={
            "step": state.step,
            "run": state.to_json(),
            "student": trainer.student_description(),
            "numpy_rng": numpy_rng,
            "config": trainer.config.to_json(),
        },
        rng=rng,
    )


def write_student_weights(folder: str | os.PathLike[str], trainer: Trainer) -> None:
    """Write the final student weights into `folder`."""
    save_student_weights(
        Path(folder) / STUDENT_WEIGHTS_NAME, trainer.vit, trainer.student_description()
    )


def run_summary(trainer: Trainer, state: RunState) -> dict[str, Any]:
    """Return the end-of-run summary; its paths point into the configured run folder."""
    run_dir = Path(trainer.config.out)
    return {
        "run_dir": str(run_dir),
        "steps": state.step,
        "epochs_completed": state.epoch,
        "stopped_by_signal": trainer.stop_requested,
        "final_val_top1": state.last_val_top1,
        "best_val_top1": state.best_val_top1,
        **state.totals(),
        "train_time_s": state.train_time_s,
        "blocked_fraction": state.blocked_s / max(state.train_time_s, 1e-9),
        "source": trainer.source.describe(),
        "checkpoint": str(run_dir / POINTER_NAME),
        "student_weights": str(run_dir / STUDENT_WEIGHTS_NAME),
        "metrics": str(run_dir / METRICS_NAME),
        "plot": str(run_dir / PLOT_NAME),
    }


def append_keys(run_dir: str | os.PathLike[str], rank: int, keys: Sequence[str]) -> None:
    """Append sample keys, one per line, to the rank's file under trained_keys/."""
    folder = Path(run_dir) / KEYS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.txt", "a", encoding="utf-8") as f:
        f.writelines(f"{key}\n" for key in keys)
