"""Security properties of the teacher service and of every file reader.

- The HTTP server binds 127.0.0.1 unless `--host` names another address.
- Tokens never reach a log file, right or wrong.
- The body limit is enforced before the body has arrived whole (a chunked upload).
- Nothing from the network or a data file is unpickled: WebDataset members other than
  images, labels and JSON are never decoded, and checkpoints load as safetensors only.
"""

from __future__ import annotations

import argparse
import io
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from teacher_service.engine import MaskedTeacher
from teacher_service.protocol import CONTENT_TYPE
from teacher_service.serve_cli import ServeCommandConfig, add_serve_parser
from tests.reliability.helpers import (
    TOKEN,
    DeployedApp,
    LocalServe,
    arrow_headers,
    deployed_app,
    valid_body,
    wait_for,
    write_teacher,
    write_token,
)
from tests.student_trainer.helpers import IMAGE_SIZE, NUM_CLASSES, write_shards

APP = "security"
MAX_BODY_BYTES = 64 * 1024
WRONG_TOKEN = "wrong-token-d41f8a2b7c"


@dataclass
class Guarded:
    app: DeployedApp
    folder: Path
    teacher_path: Path


@pytest.fixture(scope="module")
def guarded(
    shared_serve: LocalServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guarded]:
    folder = tmp_path_factory.mktemp("security")
    teacher_path = write_teacher(folder)
    args = {
        "teacher": str(teacher_path),
        "num_cpus": 0,
        "token_file": str(write_token(folder)),
        "max_body_bytes": MAX_BODY_BYTES,
    }
    with deployed_app(shared_serve, APP, args) as app:
        yield Guarded(app=app, folder=folder, teacher_path=teacher_path)


class _Canary:
    """Creates `path` when unpickled, so a test can tell whether anything unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


# -- Tokens and logs ---------------------------------------------------------------------------


def _log_text(session_dir: Path) -> str:
    parts = []
    for path in sorted((session_dir / "logs").rglob("*")):
        if path.is_file():
            parts.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(parts)


def test_tokens_never_reach_the_logs(guarded: Guarded) -> None:
    url = guarded.app.url
    wrong = httpx.post(
        f"{url}/v1/logits", content=valid_body(), headers=arrow_headers(WRONG_TOKEN), timeout=60
    )
    assert wrong.status_code == 401
    assert WRONG_TOKEN not in wrong.text
    right = httpx.post(
        f"{url}/v1/logits", content=valid_body(), headers=arrow_headers(), timeout=60
    )
    assert right.status_code == 200, right.text

    # Wait until the replica's access log shows the rejected request, so the search below
    # covers the files that request was logged to.
    access_line = f"POST /{APP}/v1/logits 401"
    wait_for(
        lambda: access_line in _log_text(guarded.app.serve.session_dir),
        "the replica's access log line of the rejected request",
    )
    logs = _log_text(guarded.app.serve.session_dir)
    # The service's own INFO lines reach these files too, so the search covers them.
    assert "teacher replica" in logs
    assert WRONG_TOKEN not in logs
    assert TOKEN not in logs


# -- Binding -----------------------------------------------------------------------------------


def test_serve_command_binds_loopback_by_default() -> None:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--teacher", "teacher.safetensors"])
    assert args.host == "127.0.0.1"
    assert ServeCommandConfig.from_args(args).host == "127.0.0.1"


def test_service_listens_on_loopback_only(guarded: Guarded) -> None:
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

    listening = [
        connection.laddr.ip
        for connection in psutil.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
        and connection.laddr.port == guarded.app.serve.port
    ]
    assert listening == ["127.0.0.1"]


# -- Body limit --------------------------------------------------------------------------------


def test_body_limit_holds_before_the_body_is_whole(guarded: Guarded) -> None:
    """Send a chunked body past the limit without ending it: the 413 must still come."""
    chunk = b"\0" * 16 * 1024
    head = (
        f"POST /{APP}/v1/logits HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{guarded.app.serve.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", guarded.app.serve.port), timeout=120) as sock:
        sock.sendall(head.encode("ascii"))
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        # No terminating zero-size chunk: the server cannot have read the body whole.
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(4096)
            assert data, f"connection closed before a response: {response!r}"
            response += data
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 413"), response[:500]


# -- No unpickling -----------------------------------------------------------------------------


def _shard_with_pickles(folder: Path, canary: Path) -> Path:
    """Write shards like `maskedkd prepare`, plus a `.pickle` and a `.pyd` member per sample."""
    data = write_shards(folder, {"train": 16})
    shard = data / "train-000000.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(shard)) as writer:
        for index in range(16):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            payload = pickle.dumps(_Canary(canary))
            writer.write(
                {
                    "__key__": f"train_{index:07d}",
                    "png": buffer.getvalue(),
                    "cls": str(index % NUM_CLASSES).encode(),
                    "pickle": payload,
                    "pyd": payload,
                }
            )
    return data


def test_trainer_loader_never_unpickles_shard_members(tmp_path: Path) -> None:
    from student_trainer.data import list_shards, make_loader

    canary = tmp_path / "unpickled"
    data = _shard_with_pickles(tmp_path / "data", canary)
    batches = list(make_loader(list_shards(data, "train"), 8, train=True, seed=0))
    assert [batch.images.shape[0] for batch in batches] == [8, 8]
    assert not canary.exists()


def test_precompute_never_unpickles_shard_members(guarded: Guarded, tmp_path: Path) -> None:
    from pipelines.cli import main

    canary = tmp_path / "unpickled"
    data = _shard_with_pickles(tmp_path / "data", canary)
    argv = [
        "precompute",
        "--teacher", str(guarded.teacher_path),
        "--data", str(data),
        "--split", "train",
        "--out", str(tmp_path / "logits"),
        "--batch-size", "8",
    ]  # fmt: skip
    assert main(argv) == 0
    assert not canary.exists()
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(path).num_rows for path in (tmp_path / "logits").glob("*.parquet"))
    assert rows == 16


def test_pickled_teacher_is_rejected(tmp_path: Path) -> None:
    canary = tmp_path / "unpickled"
    for name in ("teacher.pt", "teacher.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": _Canary(canary)}))
        with pytest.raises(ValueError, match="not a safetensors file"):
            MaskedTeacher.from_source(str(path))
    assert not canary.exists()


def test_pickled_student_checkpoint_is_rejected(tmp_path: Path) -> None:
    import torch

    from student_trainer.checkpointing import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state={"step": 1}, rng={})
    canary = tmp_path / "unpickled"
    for path in (tmp_path / "checkpoints").glob("*.optimizer.safetensors"):
        path.write_bytes(pickle.dumps(_Canary(canary)))
    with pytest.raises(ValueError, match="never unpickled"):
        load_checkpoint(tmp_path)
    assert not canary.exists()
