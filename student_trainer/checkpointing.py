"""Run checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint of step S is three files in the run folder:

    checkpoints/step-0000000S.model.safetensors      student weights (timm state_dict keys)
    checkpoints/step-0000000S.optimizer.safetensors  optimizer and RNG tensors; the
                                                     optimizer's param groups are JSON in
                                                     the file's metadata
    checkpoint.json                                  loop state, pointing at the two files

Each file is written under a temporary name and renamed into place, and checkpoint.json
is renamed last, so a reader sees either the previous checkpoint or the new one, never a
mix. Older step files are deleted after the pointer moves. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

logger = logging.getLogger(__name__)

POINTER_NAME = "checkpoint.json"
CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_STATE_PREFIX = "optimizer.state."
_RNG_PREFIX = "rng."


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        state: the JSON loop state saved with it (step, epoch, totals, ...).
        model_state: student state_dict.
        optimizer_state: optimizer state_dict, ready for `load_state_dict`.
        rng: named RNG state tensors.
    """

    state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, torch.Tensor]


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng: dict[str, torch.Tensor],
) -> Path:
    """Write a checkpoint atomically and return the pointer file's path.

    Args:
        run_dir: the run folder.
        model: the student (its state_dict keys are stored as they are).
        optimizer: the optimizer.
        state: JSON-serialisable loop state; must contain an integer `step`.
        rng: named RNG state tensors (CPU uint8), stored beside the optimizer state.
    """
    run_path = Path(run_dir)
    folder = run_path / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step-{int(state['step']):08d}"
    model_file = folder / f"{stem}.model.safetensors"
    optimizer_file = folder / f"{stem}.optimizer.safetensors"

    _save_tensors(model_file, _cpu_tensors(model.state_dict()), {})
    tensors, metadata = optimizer_to_tensors(optimizer)
    tensors.update({_RNG_PREFIX + name: value.cpu() for name, value in rng.items()})
    _save_tensors(optimizer_file, tensors, metadata)

    pointer = {
        "format_version": FORMAT_VERSION,
        "model_file": str(model_file.relative_to(run_path)),
        "optimizer_file": str(optimizer_file.relative_to(run_path)),
        "state": state,
    }
    pointer_path = run_path / POINTER_NAME
    write_json_atomic(pointer_path, pointer)
    _delete_other_steps(folder, keep={model_file.name, optimizer_file.name})
    logger.info("saved checkpoint at step %s to %s", state["step"], pointer_path)
    return pointer_path


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """Read the latest checkpoint of a run folder, or return None when there is none."""
    run_path = Path(run_dir)
    pointer_path = run_path / POINTER_NAME
    if not pointer_path.is_file():
        return None
    with open(pointer_path, encoding="utf-8") as f:
        pointer = json.load(f)
    if pointer.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{pointer_path} has format_version {pointer.get('format_version')!r}; this "
            f"version reads {FORMAT_VERSION}"
        )
    model_state = _load_tensors(run_path / pointer["model_file"], pointer_path)
    optimizer_path = run_path / pointer["optimizer_file"]
    tensors = _load_tensors(optimizer_path, pointer_path)
    with safetensors.safe_open(optimizer_path, framework="pt") as f:
        metadata = f.metadata() or {}
    rng = {k[len(_RNG_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_RNG_PREFIX)}
    return Checkpoint(
        state=pointer["state"],
        model_state=model_state,
        optimizer_state=optimizer_from_tensors(tensors, metadata),
        rng=rng,
    )


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split an optimizer state_dict into tensors and JSON metadata strings."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_STATE_PREFIX}{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {
        "param_groups": json.dumps(state_dict["param_groups"]),
        "state_scalars": json.dumps(scalars),
    }
    return tensors, metadata


def optimizer_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Rebuild an optimizer state_dict from `optimizer_to_tensors` output."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(_STATE_PREFIX):
            continue
        index, name = key[len(_STATE_PREFIX) :].split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata.get("state_scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
    param_groups = json.loads(metadata["param_groups"])
    for group in param_groups:
        # JSON turns tuples such as AdamW's betas into lists.
        for name, value in group.items():
            if name != "params" and isinstance(value, list):
                group[name] = tuple(value)
    return {"state": state, "param_groups": param_groups}


def save_student_weights(
    path: str | os.PathLike[str], model: nn.Module, metadata: dict[str, Any]
) -> None:
    """Write the student's weights as safetensors, with JSON `maskedkd_student` metadata."""
    _save_tensors(
        Path(path), _cpu_tensors(model.state_dict()), {"maskedkd_student": json.dumps(metadata)}
    )


def write_json_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file, flush it to disk and rename it over `path`."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.tmp")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)


def _load_tensors(path: Path, pointer_path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file named by a checkpoint pointer; never unpickle anything."""
    if not path.is_file():
        raise ValueError(
            f"{pointer_path} names {path}, which does not exist; the run folder is "
            "incomplete, so start a new run or restore the file"
        )
    try:
        return safetensors.torch.load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError type
        raise ValueError(
            f"{path} is not a safetensors file ({error}); checkpoints are read only as "
            "safetensors and are never unpickled"
        ) from None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)


def _cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone() so that no two entries share storage, which safetensors rejects.
    return {name: value.detach().cpu().contiguous().clone() for name, value in state_dict.items()}


def _delete_other_steps(folder: Path, keep: set[str]) -> None:
    for path in folder.glob("step-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
