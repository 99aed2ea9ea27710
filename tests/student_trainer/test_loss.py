"""The MaskedKD task loss: KL distillation, hard distillation and the task term."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from student_trainer.loss import MaskedKDTask, hard_kd_loss, soft_kd_loss


def hand_kl(student: list[list[float]], teacher: list[list[float]], tau: float) -> float:
    """KL(p_teacher || p_student) at temperature tau, times tau^2, averaged over rows."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        s_exp = [math.exp(v / tau) for v in s_row]
        t_exp = [math.exp(v / tau) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        total += sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    return total / len(student) * tau**2


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 2.5]]


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_kd_matches_hand_computed_kl(tau: float) -> None:
    loss = soft_kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), tau)
    assert loss.item() == pytest.approx(hand_kl(STUDENT, TEACHER, tau), rel=1e-5)


def test_soft_kd_is_zero_for_equal_logits() -> None:
    logits = torch.tensor(STUDENT)
    assert soft_kd_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_kd_uses_teacher_argmax() -> None:
    student = torch.tensor(STUDENT)
    expected = nn.functional.cross_entropy(student, torch.tensor([0, 2]))
    torch.testing.assert_close(hard_kd_loss(student, torch.tensor(TEACHER)), expected)


class FixedLogits(nn.Module):
    """Returns the input unchanged, so the task sees chosen logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_task_combines_losses_with_weight() -> None:
    task = MaskedKDTask(FixedLogits(), kd_weight=0.7, tau=2.0)
    student = torch.tensor(STUDENT, requires_grad=True)
    target = torch.tensor([1, 2])
    result = task(student, target, torch.tensor(TEACHER))
    ce = nn.functional.cross_entropy(student, target)
    kd = hand_kl(STUDENT, TEACHER, 2.0)
    assert set(result) == {"loss", "output", "task_loss", "kd_loss"}
    assert result["task_loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert result["kd_loss"].item() == pytest.approx(kd, rel=1e-5)
    assert result["loss"].item() == pytest.approx(ce.item() + 0.7 * kd, rel=1e-5)
    assert result["output"] is student


def test_zero_kd_weight_gives_pure_task_loss() -> None:
    task = MaskedKDTask(FixedLogits(), kd_weight=0.0, tau=1.0)
    student = torch.tensor(STUDENT, requires_grad=True)
    target = torch.tensor([0, 1])
    result = task(student, target, torch.tensor(TEACHER))
    ce = nn.functional.cross_entropy(student, target)
    assert result["loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    result["loss"].backward()
    student_ref = torch.tensor(STUDENT, requires_grad=True)
    nn.functional.cross_entropy(student_ref, target).backward()
    torch.testing.assert_close(student.grad, student_ref.grad)


def test_hard_kd_type_in_task() -> None:
    task = MaskedKDTask(FixedLogits(), kd_weight=1.0, kd_type="hard")
    student = torch.tensor(STUDENT)
    result = task(student, torch.tensor([1, 1]), torch.tensor(TEACHER))
    torch.testing.assert_close(result["kd_loss"], hard_kd_loss(student, torch.tensor(TEACHER)))


def test_task_without_teacher_has_zero_kd() -> None:
    result = MaskedKDTask(FixedLogits())(torch.tensor(STUDENT), torch.tensor([0, 0]))
    assert result["kd_loss"].item() == 0.0
    assert result["loss"].item() == pytest.approx(result["task_loss"].item())


def test_label_smoothing_and_soft_targets() -> None:
    student = torch.tensor(STUDENT)
    smoothed = MaskedKDTask(FixedLogits(), label_smoothing=0.1)
    expected = nn.functional.cross_entropy(student, torch.tensor([1, 2]), label_smoothing=0.1)
    torch.testing.assert_close(smoothed.task_loss(student, torch.tensor([1, 2])), expected)
    soft = MaskedKDTask(FixedLogits(), soft_targets=True)
    target = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.5, 0.5]])
    expected_soft = -(target * student.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(soft.task_loss(student, target), expected_soft)


def test_split_backward_equals_joint_backward() -> None:
    task = MaskedKDTask(FixedLogits(), kd_weight=0.5, tau=3.0)
    target = torch.tensor([2, 0])
    joint = torch.tensor(STUDENT, requires_grad=True)
    task(joint, target, torch.tensor(TEACHER))["loss"].backward()
    split = torch.tensor(STUDENT, requires_grad=True)
    task.task_loss(split, target).backward(retain_graph=True)
    (task.kd_weight * task.kd_loss(split, torch.tensor(TEACHER))).backward()
    torch.testing.assert_close(split.grad, joint.grad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kd_type": "feature"}, "kd_type must be one of"),
        ({"kd_weight": -1.0}, "kd_weight must be 0 or more"),
        ({"tau": 0.0}, "tau"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_task_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskedKDTask(FixedLogits(), **options)


def test_kd_rejects_mismatched_class_count() -> None:
    task = MaskedKDTask(FixedLogits())
    with pytest.raises(ValueError, match="number of classes"):
        task.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
