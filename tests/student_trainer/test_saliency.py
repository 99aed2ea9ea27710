"""CLS-attention saliency from the qkv hook against timm's own attention matrix."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch

from student_trainer.saliency import CLSAttentionSaliency, cls_attention_from_qkv
from student_trainer.student import NormalizedStudent


def tiny_vit(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    # Spread the attention away from uniform so the comparison means something.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


def explicit_attention_row(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Take timm's unfused attention matrix of the last block and average the CLS row."""
    reference = copy.deepcopy(model)
    attn = reference.blocks[-1].attn
    attn.fused_attn = False
    captured: list[torch.Tensor] = []
    # In eval mode attn_drop is the identity and its input is softmax(q k^T * scale).
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        reference(images)
    handle.remove()
    matrix = captured[0]  # [B, num_heads, N, N]
    return matrix[:, :, 0, reference.num_prefix_tokens :].mean(dim=1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qk_norm": True},
        {"reg_tokens": 2},
        {"qkv_bias": False, "class_token": True, "no_embed_class": True},
    ],
    ids=["plain", "qk_norm", "registers", "no_embed_class"],
)
def test_saliency_matches_explicit_attention(overrides: dict) -> None:
    model = tiny_vit(**overrides)
    if overrides.get("qk_norm"):
        with torch.no_grad():
            for norm in (model.blocks[-1].attn.q_norm, model.blocks[-1].attn.k_norm):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-0.5, 0.5)
    assert model.blocks[-1].attn.fused_attn, "the student forward must keep fused attention"
    images = torch.rand(3, 1, 16, 16)
    recorder = CLSAttentionSaliency(model)
    with torch.no_grad():
        model(images)
    saliency = recorder.pop()
    expected = explicit_attention_row(model, images)
    assert saliency.dtype == torch.float32
    assert saliency.shape == (3, 16)
    torch.testing.assert_close(saliency, expected, atol=1e-6, rtol=1e-5)


def test_saliency_hook_leaves_output_unchanged() -> None:
    model = tiny_vit()
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before = model(images)
        recorder = CLSAttentionSaliency(model)
        after = model(images)
    recorder.remove()
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_saliency_through_normalizing_wrapper() -> None:
    model = tiny_vit()
    student = NormalizedStudent(model, mean=(0.3,), std=(0.2,))
    images = torch.rand(2, 1, 16, 16)
    recorder = CLSAttentionSaliency(student)
    with torch.no_grad():
        student(images)
    expected = explicit_attention_row(model, (images - 0.3) / 0.2)
    torch.testing.assert_close(recorder.pop(), expected, atol=1e-6, rtol=1e-5)


def test_saliency_is_float32_for_bfloat16_qkv() -> None:
    model = tiny_vit()
    attn = model.blocks[-1].attn
    qkv = torch.randn(2, 17, 3 * 16).bfloat16()
    saliency = cls_attention_from_qkv(qkv, attn, num_prefix_tokens=1)
    reference = cls_attention_from_qkv(qkv.float(), attn, num_prefix_tokens=1)
    assert saliency.dtype == torch.float32
    torch.testing.assert_close(saliency, reference)


def test_saliency_pop_without_forward_raises() -> None:
    recorder = CLSAttentionSaliency(tiny_vit())
    with pytest.raises(RuntimeError, match="no saliency recorded"):
        recorder.pop()


def test_saliency_disabled_records_nothing() -> None:
    model = tiny_vit()
    recorder = CLSAttentionSaliency(model)
    recorder.enabled = False
    with torch.no_grad():
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(RuntimeError):
        recorder.pop()


def test_saliency_rejects_model_without_class_token() -> None:
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        CLSAttentionSaliency(model)
