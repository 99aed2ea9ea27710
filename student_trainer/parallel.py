"""The training process's place among data-parallel ranks, and the collectives the loop uses.

A single-process run is rank 0 of a world of size 1, and every collective here is then a
plain return. On Ray Train workers, `torch.distributed` is initialised before the loop
starts, and these helpers all-reduce over the default process group (gloo on CPU, NCCL on
GPU). Every rank must call them at the same points of the loop, or the run hangs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Per-step counters that add up across ranks; the losses and the wait are averaged.
SUMMED_STEP_FIELDS = (
    "images",
    "correct",
    "macs_spent",
    "macs_saved",
    "teacher_correct",
    "teacher_images",
)
AVERAGED_STEP_FIELDS = ("loss", "task_loss", "kd_loss", "blocked_s")


@dataclass(frozen=True)
class World:
    """This process's data-parallel rank and the number of ranks.

    Attributes:
        rank: global rank, 0 for the process that writes metrics and checkpoints.
        world_size: number of training processes.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def is_main(self) -> bool:
        """Whether this process writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def uses_collectives(self) -> bool:
        """Whether a process group connects this process to other ranks."""
        return dist.is_available() and dist.is_initialized()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Return whether `flag` is true on every rank."""
        if not self.uses_collectives:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_values(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Return the element-wise sum of `values` over every rank, in float64."""
        if not self.uses_collectives:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.cpu()]

    def reduce_step(self, step: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Combine one `train_step` result over every rank: counters summed, losses averaged."""
        if not self.uses_collectives:
            return step
        names = SUMMED_STEP_FIELDS + AVERAGED_STEP_FIELDS
        totals = self.sum_values([float(step[name]) for name in names], device)
        combined = dict(step)
        for name, total in zip(names, totals, strict=True):
            if name in SUMMED_STEP_FIELDS:
                combined[name] = int(round(total))
            else:
                combined[name] = total / self.world_size
        return combined

    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients of `module` over every rank, in one flat all-reduce."""
        if not self.uses_collectives:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # [total parameters]
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    @contextlib.contextmanager
    def local_gradients(self, module: nn.Module) -> Iterator[None]:
        """Run a forward pass whose backward passes only accumulate local gradients.

        A training step runs two backward passes over one forward: the task loss while the
        teacher works, then the distillation loss. DDP synchronises gradients in the first
        backward after a forward, which would leave the distillation gradients unsynchronised.
        So the forward runs under DDP's `no_sync()`, and `average_gradients` synchronises the
        sum of both passes once, before the optimizer step.
        """
        no_sync = getattr(module, "no_sync", None)
        if no_sync is None:
            yield
            return
        with no_sync():
            yield
