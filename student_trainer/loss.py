"""The MaskedKD training task: task loss plus weighted logit distillation.

    loss = task_loss + kd_weight * kd_loss

`task_loss` is cross-entropy on the labels (with optional label smoothing), or soft-target
cross-entropy when Mixup/CutMix turns the labels into distributions. `kd_loss` is either

- soft: KL(softmax(teacher / tau) || softmax(student / tau)) * tau ** 2, batch mean, or
- hard: cross-entropy of the student against the teacher's argmax class.

The teacher logits come from a masked teacher that saw only the kept patches, but the loss
does not depend on how they were produced. Like the tasks in `timm.task`, the module's
`forward(input, target)` returns a dict with `loss`, `output`, `task_loss` and `kd_loss`.
The trainer also calls `task_loss` and `kd_loss` separately, to run the task-loss backward
while the teacher request is in flight.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.loss import create_classification_loss
from timm.task import TrainingTask
from torch import nn

logger = logging.getLogger(__name__)

KD_TYPES = ("soft", "hard")


def soft_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> torch.Tensor:
    """Return KL(softmax(teacher / tau) || softmax(student / tau)) * tau ** 2, batch mean.

    Args:
        student_logits: [B, classes]; gradients flow through these.
        teacher_logits: [B, classes]; treated as constants.
        tau: softmax temperature, above 0.
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * tau**2


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of the student against the teacher's argmax class."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))


class MaskedKDTask(TrainingTask):
    """Classification with distillation from precomputed or remote teacher logits.

    Args:
        model: the student; maps [B, C, H, W] input to logits [B, classes].
        kd_weight: weight of the distillation term, 0 or more (0 trains on labels only).
        tau: softmax temperature of the soft distillation term, above 0.
        kd_type: `soft` (temperature-scaled KL) or `hard` (teacher argmax cross-entropy).
        label_smoothing: label smoothing of the task cross-entropy, in [0, 1). With soft
            targets it is ignored here because Mixup applies it while mixing.
        soft_targets: targets are [B, classes] distributions from Mixup/CutMix.
        device: device for task buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kd_weight: float = 1.0,
        tau: float = 1.0,
        kd_type: str = "soft",
        label_smoothing: float = 0.0,
        soft_targets: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(device=device, verbose=False)
        validate_loss_options(kd_weight, tau, kd_type, label_smoothing)
        self.trainable_module = model
        self.criterion = create_classification_loss(
            smoothing=label_smoothing, soft_targets=soft_targets
        )
        self.kd_weight = float(kd_weight)
        self.tau = float(tau)
        self.kd_type = kd_type

    def task_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the label loss of student logits [B, classes] against the targets."""
        return self.criterion(output.float(), target)

    def kd_loss(self, output: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Return the unweighted distillation loss of student logits against teacher logits."""
        if teacher_logits.shape != output.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but the student "
                f"output has {tuple(output.shape)}; the teacher and student must agree on "
                "batch size and number of classes"
            )
        teacher_logits = teacher_logits.to(output.device)
        if self.kd_type == "hard":
            return hard_kd_loss(output, teacher_logits)
        return soft_kd_loss(output, teacher_logits, self.tau)

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the student and return `loss`, `output`, `task_loss` and `kd_loss`.

        Args:
            input: student input [B, C, H, W].
            target: class indices [B], or [B, classes] soft targets.
            teacher_logits: [B, classes]; None gives a zero distillation term.
        """
        output = self.trainable_module(input)
        task_loss = self.task_loss(output, target)
        if teacher_logits is None:
            kd_loss = torch.zeros((), device=task_loss.device)
        else:
            kd_loss = self.kd_loss(output, teacher_logits)
        return {
            "loss": task_loss + self.kd_weight * kd_loss,
            "output": output,
            "task_loss": task_loss,
            "kd_loss": kd_loss,
        }


def validate_loss_options(
    kd_weight: float, tau: float, kd_type: str, label_smoothing: float
) -> None:
    """Raise ValueError for a distillation weight, temperature or type out of range."""
    if kd_type not in KD_TYPES:
        raise ValueError(f"kd_type must be one of {KD_TYPES}, got {kd_type!r}")
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be 0 or more, got {kd_weight}")
    if tau <= 0:
        raise ValueError(f"tau (distillation temperature) must be above 0, got {tau}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
