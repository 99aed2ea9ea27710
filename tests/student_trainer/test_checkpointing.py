"""Checkpoint files: safetensors and JSON round trips, atomic pointer, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_trainer.checkpointing import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)


def trained_pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_optimizer_state_round_trip() -> None:
    _, optimizer = trained_pair()
    tensors, metadata = optimizer_to_tensors(optimizer)
    rebuilt = optimizer_from_tensors(tensors, metadata)
    original = optimizer.state_dict()
    assert rebuilt["param_groups"][0]["betas"] == (0.8, 0.95)
    assert rebuilt["param_groups"][0]["params"] == original["param_groups"][0]["params"]
    for index, values in original["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(rebuilt["state"][index][name], value)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    rng = {"torch": torch.get_rng_state()}
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state={"step": 3}, rng=rng)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.state == {"step": 3}
    assert torch.equal(loaded.rng["torch"], rng["torch"])
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], value)

    fresh_model, fresh_optimizer = trained_pair()
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    for group in fresh_optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95)


def test_checkpoint_keeps_only_latest_step(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    for step in (1, 2):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, state={"step": step}, rng={})
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step-00000002.model.safetensors", "step-00000002.optimizer.safetensors"]
    pointer = json.loads((tmp_path / "checkpoint.json").read_text())
    assert pointer["state"]["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_unknown_checkpoint_format_raises(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(tmp_path)
