"""Patch saliency from the student's last-layer CLS attention.

MaskedKD ranks image patches by the attention that the class token pays to each patch in
the student's last block, averaged over heads. timm's `Attention` computes that matrix
inside `scaled_dot_product_attention` when fused attention is on, so it never exists as a
tensor. A forward hook on the last block's `attn.qkv` projection takes its output and
recomputes only the class-token row, in float32:

    scores = (q_cls * head_dim ** -0.5) @ k.T     # [B, num_heads, N], N includes prefix tokens
    saliency = softmax(scores).mean(heads)[:, num_prefix_tokens:]

`q_norm` and `k_norm` are applied as timm applies them. The hook costs O(B * N * dim)
extra work and leaves the block's own (fused) forward unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from timm.layers import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)


def find_timm_vit(model: nn.Module) -> Any:
    """Return the timm ViT inside `model` (itself, or the `.model` of a wrapper)."""
    inner: Any = model
    while not hasattr(inner, "blocks") and isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    if not hasattr(inner, "blocks"):
        raise ValueError(
            f"{type(model).__name__} has no transformer `blocks`; saliency needs a timm "
            "VisionTransformer-family model"
        )
    return inner


def last_block_attention(vit: Any) -> Attention:
    """Return the last block's `Attention` module, or raise if saliency cannot use it."""
    if getattr(vit, "cls_token", None) is None:
        raise ValueError(
            f"{type(vit).__name__} has no class token; CLS-attention saliency needs "
            "class_token=True (the timm ViT default)"
        )
    block = vit.blocks[-1]
    attn = getattr(block, "attn", None)
    if not isinstance(attn, Attention):
        raise ValueError(
            f"the last block ({type(block).__name__}) has attention "
            f"{type(attn).__name__}; saliency supports timm.layers.Attention with a fused "
            "qkv projection (ViT, DeiT and their register variants)"
        )
    return attn


def cls_attention_from_qkv(
    qkv: torch.Tensor, attn: Attention, num_prefix_tokens: int
) -> torch.Tensor:
    """Compute the head-averaged class-token attention to each patch from a qkv output.

    Args:
        qkv: output of `attn.qkv`, shape [B, N, 3 * num_heads * head_dim], where N counts
            the prefix tokens (class token first) and the patches.
        attn: the timm `Attention` module that produced `qkv`.
        num_prefix_tokens: class, register and distillation tokens before the patches.

    Returns:
        float32 saliency [B, N - num_prefix_tokens]. Each row's entries are the softmax
        weights of the patch keys, so a row sums to at most 1.
    """
    B, N, _ = qkv.shape
    num_heads, head_dim = attn.num_heads, attn.head_dim
    with torch.autocast(qkv.device.type, enabled=False):
        qkv = qkv.detach().float().reshape(B, N, 3, num_heads, head_dim)
        q_cls = qkv[:, 0, 0]  # [B, num_heads, head_dim], class token is token 0
        k = qkv[:, :, 1].transpose(1, 2)  # [B, num_heads, N, head_dim]
        q_cls = _apply_norm_float32(attn.q_norm, q_cls)
        k = _apply_norm_float32(attn.k_norm, k)
        scores = torch.einsum("bhd,bhnd->bhn", q_cls * attn.scale, k)  # [B, num_heads, N]
        weights = scores.softmax(dim=-1).mean(dim=1)  # [B, N]
    return weights[:, num_prefix_tokens:]  # [B, num_patches]


def _apply_norm_float32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Run q_norm/k_norm on float32 input with float32 parameters, whatever the model dtype.
    if isinstance(norm, nn.Identity):
        return x
    params = dict(norm.named_parameters(recurse=False))
    if all(p.dtype == torch.float32 for p in params.values()):
        return norm(x)
    return torch.func.functional_call(norm, {k: v.float() for k, v in params.items()}, (x,))


class CLSAttentionSaliency:
    """Recorder of the CLS-to-patch attention of the student's last block on every forward.

    Use `pop()` after a forward to take the saliency of that batch. Set `enabled` to
    False (for example during evaluation) to skip the extra work.

    Args:
        model: the student, a timm ViT or a wrapper whose `.model` is one.
    """

    def __init__(self, model: nn.Module) -> None:
        vit = find_timm_vit(model)
        self.attn = last_block_attention(vit)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        grid_rows, grid_cols = vit.patch_embed.grid_size
        self.grid_size = (int(grid_rows), int(grid_cols))
        self.enabled = True
        self._saliency: torch.Tensor | None = None
        self._handle: RemovableHandle | None = self.attn.qkv.register_forward_hook(self._hook)

    @property
    def num_patches(self) -> int:
        """Number of patches on the student grid."""
        return self.grid_size[0] * self.grid_size[1]

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.enabled:
            self._saliency = cls_attention_from_qkv(output, self.attn, self.num_prefix_tokens)

    def pop(self) -> torch.Tensor:
        """Return the saliency [B, num_patches] of the latest forward and clear it."""
        if self._saliency is None:
            raise RuntimeError(
                "no saliency recorded: run the student forward with the recorder enabled first"
            )
        saliency, self._saliency = self._saliency, None
        return saliency

    def remove(self) -> None:
        """Remove the forward hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> CLSAttentionSaliency:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
