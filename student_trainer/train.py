"""The MaskedKD student training loop.

One step, with a teacher:

    1. student forward on [0, 1] pixels; the qkv hook records CLS-attention saliency
    2. select patches on the teacher grid and submit the teacher request (returns at once)
    3. task-loss backward, with the graph kept, while the teacher works
    4. wait for the teacher logits (the wait is recorded as `blocked_s`)
    5. distillation-loss backward, optimizer step, learning-rate update

The next batch is decoded in a background thread meanwhile. `train(config)` returns a
summary dict; `maskedkd train` is its command line. With `config.num_workers`, Ray Train
runs `run_training` on every worker (`student_trainer.distributed`); without it, this
process runs it and imports no Ray.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from student_trainer.checkpointing import POINTER_NAME, Checkpoint, load_checkpoint
from student_trainer.config import TrainConfig
from student_trainer.data import make_loader
from student_trainer.metrics import IntervalMeter, drop_metrics_after_step
from student_trainer.prefetch import BackgroundIterator
from student_trainer.run_output import (
    METRICS_NAME,
    RunFolderOutput,
    RunOutput,
    run_summary,
)
from student_trainer.trainer_setup import (
    RunState,
    Trainer,
    autocast,
    build_trainer,
    restore_rng,
)

__all__ = ["TrainConfig", "run_training", "train"]

logger = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a student as `config` describes and return a summary of the run.

    Validation of the options, the data and the teacher pairing happens before the first
    step and raises ValueError with the offending values.

    Returns:
        Steps, epochs, evaluation top-1, teacher cost, time blocked on the teacher, and
        the paths of the checkpoint, weights, metrics and plot.
    """
    config.validate()
    if config.num_workers is not None:
        from student_trainer.distributed import train_on_workers

        return train_on_workers(config)
    checkpoint = checkpoint_to_resume(config, Path(config.out))
    trainer = build_trainer(config, checkpoint.state if checkpoint else None)
    output = RunFolderOutput(config.out)
    try:
        return run_training(trainer, checkpoint, output)
    finally:
        output.close()
        trainer.close()


def run_training(
    trainer: Trainer, checkpoint: Checkpoint | None, output: RunOutput
) -> dict[str, Any]:
    """Run the epochs of a built trainer from `checkpoint` (None: step 0); return the summary.

    Single-process runs and every Ray Train worker run this same function. On workers,
    `trainer.world` connects the ranks and `output` reports rank 0's lines and files.
    """
    state = _start_state(trainer, checkpoint)
    start_record = {"kind": "start", "step": state.step, **trainer.describe()}
    output.write(start_record)
    logger.info("training on %s", _describe_parallel(start_record["parallel"]))
    with _stop_on_sigterm(trainer):
        _run_epochs(trainer, state, output)
    summary = run_summary(trainer, state)
    output.finish(trainer, state, summary)
    return summary


def _describe_parallel(parallel: dict[str, Any]) -> str:
    return (
        f"{parallel['world_size']} worker(s): batch {parallel['batch_size_per_worker']} per "
        f"worker, effective batch {parallel['effective_batch_size']}, lr {parallel['lr']:.4g} "
        f"(base lr {parallel['base_lr']:.4g}, {parallel['lr_scaling']} scaling)"
    )


def checkpoint_to_resume(config: TrainConfig, run_dir: Path) -> Checkpoint | None:
    """Return the run folder's checkpoint with `config.resume`, else check there is none."""
    has_checkpoint = (run_dir / POINTER_NAME).is_file()
    if not config.resume:
        if has_checkpoint:
            raise ValueError(
                f"{run_dir} already contains a checkpoint; pass --resume to continue it or "
                "choose a new --out folder"
            )
        return None
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        logger.warning("no checkpoint in %s to resume; starting at step 0", run_dir)
    # Steps after the checkpoint run again, so the lines a killed run wrote for them go.
    drop_metrics_after_step(run_dir / METRICS_NAME, checkpoint.state["step"] if checkpoint else 0)
    return checkpoint


def _start_state(trainer: Trainer, checkpoint: Checkpoint | None) -> RunState:
    if checkpoint is None:
        return RunState()
    saved_student = checkpoint.state.get("student")
    if saved_student != trainer.student_description():
        raise ValueError(
            f"the checkpoint's student {saved_student} differs from the configured student "
            f"{trainer.student_description()}; resume with the original student options"
        )
    trainer.vit.load_state_dict(checkpoint.model_state)
    trainer.optimizer.load_state_dict(checkpoint.optimizer_state)
    restore_rng(trainer, checkpoint.rng, checkpoint.state["numpy_rng"])
    state = RunState.from_json(checkpoint.state["run"])
    if trainer.world.rank:
        # The checkpoint contains rank 0's generators, so the other ranks reseed their own.
        seed = trainer.config.seed + trainer.world.rank + 1_000_003 * state.step
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        trainer.generator.manual_seed(seed + 1)
    trainer.scheduler.step_update(num_updates=state.step)
    logger.info(
        "resumed at step %d (epoch %d, batch %d)", state.step, state.epoch, state.step_in_epoch
    )
    return state


def _run_epochs(trainer: Trainer, state: RunState, output: RunOutput) -> None:
    config = trainer.config
    while state.epoch < config.epochs and not _reached_max_steps(config, state):
        epoch_meter = IntervalMeter()
        completed = _train_epoch(trainer, state, output, epoch_meter)
        # Taken before evaluation, so that the epoch's rates cover training only.
        training = _prefixed(epoch_meter.summary(), "train_")

        # Evaluate unless stopping on SIGTERM, where the grace period may be short.
        evaluation = {} if trainer.stop_requested else evaluate(trainer)
        epoch_record = {
            "kind": "epoch",
            "epoch": state.epoch,
            "step": state.step,
            "completed": completed,
            **training,
            **evaluation,
            **state.totals(),
        }
        output.write(epoch_record)
        logger.info("epoch %d: %s", state.epoch, _short(epoch_record))
        if evaluation:
            state.last_val_top1 = evaluation["val_top1"]
            state.best_val_top1 = max(state.best_val_top1 or 0.0, evaluation["val_top1"])
        if completed:
            state.epoch += 1
            state.step_in_epoch = 0
        output.save(trainer, state)
        if trainer.stop_requested:
            break


def _train_epoch(
    trainer: Trainer, state: RunState, output: RunOutput, epoch_meter: IntervalMeter
) -> bool:
    """Run the rest of the current epoch; return False when stopped before its end."""
    config = trainer.config
    world = trainer.world
    loader = make_loader(
        trainer.train_shards,
        config.batch_size,
        train=True,
        seed=config.seed,
        epoch=state.epoch,
        num_workers=config.loader_workers,
        rank=world.rank,
        world_size=world.world_size,
    )
    progress = tqdm(
        total=trainer.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch}",
        disable=not config.progress,
        leave=False,
    )
    interval = IntervalMeter()
    stopped_early = False
    with BackgroundIterator(loader, depth=2) as batches, progress:
        # A resumed epoch re-reads and skips the batches it had already trained on.
        for _ in zip(range(state.step_in_epoch), batches, strict=False):
            pass
        while state.step_in_epoch < trainer.steps_per_epoch:
            # Ranks whose shards hold fewer samples run out first, and all ranks must stop
            # together because every step all-reduces gradients.
            batch = next(batches, None)
            if not world.all_true(batch is not None, trainer.device) or batch is None:
                break
            if config.record_keys:
                output.add_keys(batch.keys)
            step = world.reduce_step(train_step(trainer, batch, state.step), trainer.device)
            state.add_step(step)
            interval.add(step)
            epoch_meter.add(step)
            progress.update(1)
            progress.set_postfix(loss=f"{step['loss']:.3f}", blocked=f"{step['blocked_s']:.3f}s")
            if state.step % config.log_every == 0:
                _log_interval(trainer, state, output, interval)
                interval = IntervalMeter()
            if trainer.stop_requested or _reached_max_steps(config, state):
                stopped_early = True
                break
    state.train_time_s += time.perf_counter() - epoch_meter.started_s
    # A stop on the epoch's last step still completes the epoch.
    return state.step_in_epoch >= trainer.steps_per_epoch or not stopped_early


def train_step(trainer: Trainer, batch: Any, step: int) -> dict[str, Any]:
    """Run one optimizer step on a batch (uint8 images, labels, keys); return its numbers."""
    images, labels, keys = batch
    B = images.shape[0]
    device = trainer.device
    pixels = images.to(device, non_blocking=True).float().div_(255.0)  # [B, C, H, W] in [0, 1]
    labels = labels.to(device, non_blocking=True)
    target = labels
    if trainer.mixup is not None:
        pixels, target = trainer.mixup(pixels, labels)  # target: [B, classes] soft labels

    # Student forward; the saliency hook records the CLS attention of the last block.
    trainer.student.train()
    model = trainer.forward_module
    with autocast(trainer), trainer.world.local_gradients(model):
        output = model(pixels)

    # Ask the teacher now, so that it works while the task-loss backward runs.
    future = _submit_teacher_request(trainer, images, pixels, keys)

    task_loss = trainer.task.task_loss(output, target)
    scaler = trainer.scaler
    blocked_s = 0.0
    macs_spent = macs_saved = 0
    teacher_correct = teacher_images = 0
    if future is None:
        scaler.scale(task_loss).backward()
        kd_loss = torch.zeros((), device=device)
    else:
        scaler.scale(task_loss).backward(retain_graph=True)

        # The only point where the trainer waits on the teacher.
        wait_started = time.perf_counter()
        result = future.result()
        blocked_s = time.perf_counter() - wait_started

        kd_loss = trainer.task.kd_loss(output, result.logits)
        scaler.scale(trainer.task.kd_weight * kd_loss).backward()
        macs_spent, macs_saved = result.macs_spent, result.macs_saved
        # How often the teacher, seeing only the kept patches, names the true class.
        teacher_correct = int((result.logits.argmax(dim=-1).to(device) == labels).sum())
        teacher_images = B

    _optimizer_step(trainer, step + 1)
    task_value, kd_value = float(task_loss.detach()), float(kd_loss.detach())
    return {
        "images": B,
        "loss": task_value + trainer.task.kd_weight * kd_value,
        "task_loss": task_value,
        "kd_loss": kd_value,
        "correct": int((output.detach().argmax(dim=-1) == labels).sum()),
        "blocked_s": blocked_s,
        "macs_spent": macs_spent,
        "macs_saved": macs_saved,
        "teacher_correct": teacher_correct,
        "teacher_images": teacher_images,
    }


def _submit_teacher_request(
    trainer: Trainer, images: torch.Tensor, pixels: torch.Tensor, keys: list[str]
) -> Any:
    if not trainer.uses_teacher:
        return None
    B = images.shape[0]
    if trainer.config.masking == "student":
        saliency = trainer.saliency.pop()  # [B, student patches]
    else:
        saliency = torch.zeros(B, trainer.saliency.num_patches)  # only the shape is used
    keep = trainer.select_patches(saliency).cpu()  # [B, K] teacher-grid indices
    # Without Mixup the teacher gets the original uint8 pixels, half the bytes of the float16
    # that float pixels travel as. With Mixup it must see the mixed images, as float in [0, 1].
    teacher_pixels = images if trainer.mixup is None else pixels.detach().cpu()
    return trainer.source.submit(teacher_pixels, keep, keys)


def _optimizer_step(trainer: Trainer, num_updates: int) -> None:
    scaler = trainer.scaler
    trainer.world.average_gradients(trainer.student)
    if trainer.config.clip_grad is not None:
        scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.student.parameters(), trainer.config.clip_grad)
    scaler.step(trainer.optimizer)
    scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step_update(num_updates=num_updates)


@torch.no_grad()
def evaluate(trainer: Trainer) -> dict[str, Any]:
    """Return top-1 accuracy and mean cross-entropy of the student on the evaluation set.

    On Ray Train workers each rank evaluates its own part of the evaluation shards, and the
    sums are all-reduced, so every rank returns the numbers of the whole set.
    """
    if not trainer.val_shards:
        return {}
    world = trainer.world
    loader = make_loader(
        trainer.val_shards,
        trainer.config.batch_size,
        train=False,
        rank=world.rank,
        world_size=world.world_size,
    )
    trainer.student.eval()
    trainer.saliency.enabled = False
    correct = images_seen = 0
    loss_sum = 0.0
    try:
        for images, labels, _ in loader:
            pixels = images.to(trainer.device).float().div_(255.0)
            labels = labels.to(trainer.device)
            with autocast(trainer):
                logits = trainer.student(pixels).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            images_seen += labels.numel()
    finally:
        trainer.student.train()
        trainer.saliency.enabled = trainer.needs_saliency
    totals = world.sum_values([loss_sum, correct, images_seen], trainer.device)
    loss_sum, correct, images_seen = totals[0], int(totals[1]), int(totals[2])
    if images_seen == 0:
        raise ValueError(f"evaluation shards {trainer.val_shards} yielded no images")
    return {
        "val_top1": correct / images_seen,
        "val_loss": loss_sum / images_seen,
        "val_images": images_seen,
    }


def _log_interval(
    trainer: Trainer, state: RunState, output: RunOutput, interval: IntervalMeter
) -> None:
    record = {
        "kind": "step",
        "step": state.step,
        "epoch": state.epoch,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        **interval.summary(),
        **state.totals(),
    }
    output.write(record)
    logger.debug("step %d: %s", state.step, _short(record))


def _reached_max_steps(config: TrainConfig, state: RunState) -> bool:
    return config.max_steps is not None and state.step >= config.max_steps


@contextlib.contextmanager
def _stop_on_sigterm(trainer: Trainer) -> Iterator[None]:
    """Turn SIGTERM into a request to checkpoint and stop after the current step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.warning("received signal %d: checkpointing after the current step", signum)
        trainer.stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prefixed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k if not k.startswith(prefix) else k: v for k, v in values.items()}


def _short(record: dict[str, Any]) -> str:
    keys = ("loss", "train_loss", "val_top1", "img_per_s", "train_img_per_s", "blocked_fraction")
    return ", ".join(f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), int | float))
