"""Checkpoint files: safetensors and JSON round trips, atomic pointer, pruning."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from student_trainer.checkpointing import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from student_trainer.metrics import drop_metrics_after_step, read_metrics


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


def test_pickled_model_file_is_rejected(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state={"step": 1}, rng={})
    model_file = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["model_file"]
    # A pickle whose loading would create a file: it must never be unpickled.
    canary = tmp_path / "unpickled"
    model_file.write_bytes(pickle.dumps(_Canary(str(canary))))
    with pytest.raises(ValueError, match="not a safetensors file.*never unpickled"):
        load_checkpoint(tmp_path)
    assert not canary.exists()


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state={"step": 1}, rng={})
    for path in (tmp_path / "checkpoints").glob("*.model.safetensors"):
        path.unlink()
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path)


class _Canary:
    """Creates `path` when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def _write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_drop_metrics_after_step_keeps_checkpointed_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "start", "step": 0},
        {"kind": "step", "step": 2},
        {"kind": "epoch", "step": 4},
        {"kind": "step", "step": 5},
        {"kind": "step", "step": 6},
        {"kind": "note"},
    ]
    _write_lines(path, records)
    with open(path, "a") as f:
        f.write('{"kind": "step", "st')  # a line cut short by SIGKILL
    assert drop_metrics_after_step(path, 4) == 3
    assert read_metrics(path) == [records[0], records[1], records[2], records[5]]
    assert not list(tmp_path.glob(".*.tmp"))


def test_drop_metrics_after_step_leaves_clean_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"kind": "start", "step": 0}, {"kind": "epoch", "step": 4}])
    before = path.stat().st_mtime_ns
    assert drop_metrics_after_step(path, 4) == 0
    assert path.stat().st_mtime_ns == before
    assert drop_metrics_after_step(tmp_path / "absent.jsonl", 4) == 0
