"""Shared pieces of the reliability tests: a tiny teacher, a local Serve instance, Arrow
bodies, replica processes and a small training run.

Every service here is a real local Ray with Serve, with HTTP on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from teacher_service.checkpoint import load_teacher, save_teacher
from teacher_service.patches import PatchGrid, gather_patches
from teacher_service.protocol import CONTENT_TYPE, encode_request
from tests.student_trainer.helpers import IMAGE_SIZE, NUM_CLASSES, TEACHER_KWARGS

TOKEN = "reliability-token-5c1e9"
GRID = PatchGrid(img_size=(IMAGE_SIZE, IMAGE_SIZE), patch_size=(4, 4), in_chans=1)
logger = logging.getLogger(__name__)
FLOAT16_TOLERANCE = {"atol": 3e-3, "rtol": 2e-3}
# Ray's agent registration wait; the default is too short on a busy two-core machine.
RAY_STARTUP_ENV = {"RAY_agent_register_timeout_ms": "300000"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_teacher(folder: Path) -> Path:
    """Write a random-weight teacher for the 16x16 test images (4x4 grid, 4 classes)."""
    torch.manual_seed(0)
    model, spec = load_teacher(
        "vit_tiny_patch16_224", random_init=True, model_kwargs=dict(TEACHER_KWARGS)
    )
    assert spec.num_classes == NUM_CLASSES
    path = folder / "teacher.safetensors"
    save_teacher(model, spec, path)
    return path


def write_token(folder: Path) -> Path:
    """Write the bearer token file the guarded services read."""
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    return path


@dataclass
class LocalServe:
    """A local Ray with Serve listening on 127.0.0.1, shared by the package's tests."""

    url: str
    port: int
    session_dir: Path


@dataclass
class DeployedApp:
    """One teacher application deployed on the shared Serve instance."""

    name: str
    url: str
    serve: LocalServe


@contextlib.contextmanager
def local_ray_serve() -> Iterator[LocalServe]:
    """Start a local Ray whose Serve listens on 127.0.0.1, and stop both at the end."""
    import os

    import ray
    from ray import serve

    for name, value in RAY_STARTUP_ENV.items():
        os.environ.setdefault(name, value)
    port = free_port()
    start_local_ray()
    try:
        start_serve(port)
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        yield LocalServe(url=f"http://127.0.0.1:{port}", port=port, session_dir=session_dir)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def deployed_app(shared: LocalServe, name: str, args: dict[str, Any]) -> Iterator[DeployedApp]:
    """Deploy a teacher application at route prefix `/name`, and delete it at the end.

    Starts Serve again first when a test has shut it down.
    """
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from teacher_service.deployment import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": shared.port})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        yield DeployedApp(name=name, url=f"{shared.url}/{name}", serve=shared)
    finally:
        try:
            serve.delete(name)
        except RayServeException:  # a test stopped Serve already
            logger.info("Serve is not running; application %s is gone with it", name)


def start_serve(port: int, attempts: int = 3) -> None:
    """Start Serve's HTTP proxy on 127.0.0.1:`port`, trying again when it starts too slowly.

    Serve kills a proxy that is not ready within 60 s, which happens on a loaded machine.
    """
    from ray import serve

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return
        except Exception as error:  # Ray raises ActorDiedError or GetTimeoutError here
            serve.shutdown()
            if attempt == attempts:
                raise
            logger.warning("Serve start %d of %d failed (%s); retrying", attempt, attempts, error)


def start_local_ray(attempts: int = 5) -> None:
    """Start a local Ray for the tests, trying again when its startup times out.

    Ray 2.60 gives its raylet a fixed 30 s to register, which a loaded two-core machine
    can miss; a later attempt usually succeeds.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:  # Ray raises a plain Exception for the startup timeout
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(error):
                raise
            logger.warning("local Ray start %d of %d timed out; retrying", attempt, attempts)


def actor_pids(class_name: str) -> list[int]:
    """Return the PIDs of the live Ray actors of one class, such as "ProxyActor".

    Reads the GCS actor table. `ray.util.state.list_actors` needs the dashboard's API
    server, which these tests do not start.
    """
    import ray

    return sorted(
        int(actor["Pid"])
        for actor in ray._private.state.actors().values()
        if actor["State"] == "ALIVE" and actor["ActorClassName"] == class_name
    )


def replica_pids(app_name: str, deployment: str = "TeacherDeployment") -> list[int]:
    """Return the PIDs of the live replicas of one Serve deployment."""
    return actor_pids(f"ServeReplica:{app_name}:{deployment}")


def rss_bytes(pid: int) -> int:
    """Return a process's resident set size, read with psutil (vendored by Ray)."""
    import psutil
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

    return int(psutil.Process(pid).memory_info().rss)


def wait_for(condition: Callable[[], bool], description: str, timeout_s: float = 180.0) -> float:
    """Poll `condition` until it returns True; return the seconds taken, raise on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.1)
    return time.monotonic() - started


# -- Request bodies -------------------------------------------------------------------------


def images(count: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images [count, 1, 16, 16]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)


def keep_rows(count: int, keep_count: int, seed: int = 0) -> np.ndarray:
    """Distinct random patch indices [count, keep_count] on the 4x4 grid."""
    rng = np.random.default_rng(seed + 1000)
    return np.stack([rng.permutation(GRID.num_patches)[:keep_count] for _ in range(count)])


def valid_body(count: int = 2, keep_count: int = 6, seed: int = 0, **metadata: str) -> bytes:
    """A valid request body of `count` images with `keep_count` kept patches each."""
    keep = keep_rows(count, keep_count, seed)
    return encode_request(gather_patches(images(count, seed), keep, GRID), keep, **metadata)


def arrow_stream(
    columns: dict[str, pa.Array],
    metadata: dict[str, str] | dict[bytes, bytes] | None = None,
    *,
    batches: int = 1,
) -> bytes:
    """Write `columns` as an Arrow IPC stream with `batches` copies of one record batch."""
    schema = pa.schema([(name, array.type) for name, array in columns.items()], metadata=metadata)
    batch = pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for _ in range(batches):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def arrow_headers(token: str | None = TOKEN) -> dict[str, str]:
    """Headers of a logits request: Arrow content type and, when given, the bearer token."""
    headers = {"content-type": CONTENT_TYPE}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers


def decode_logits(content: bytes) -> np.ndarray:
    """Return the float32 logits [B, classes] of a response body."""
    table = pa.ipc.open_stream(content).read_all()
    column = table.column("logits").combine_chunks()
    values = np.asarray(column.flatten(), dtype=np.float32)
    return values.reshape(len(column), column.type.list_size)


def read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """Read every JSON line of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_step(metrics: Path) -> int:
    """Return the highest step of the `step` lines in a metrics.jsonl file (0 when none)."""
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if record.get("kind") == "step":
            steps.append(int(record["step"]))
    return max(steps)
