"""Ray Serve deployment of the masked teacher, with a FastAPI HTTP ingress.

HTTP API (see docs/protocol.md for the wire format):

    GET  /             status page for operators: model card, runs table, totals
    GET  /v1/health    the replica is alive
    GET  /v1/ready     the model is loaded and runs (a one-patch forward, run once)
    GET  /v1/teacher   JSON model card: grid, classes, normalisation, limits, protocol
    GET  /v1/runs      JSON usage per student run, over the service's lifetime and the
                       last minute, summed over every replica
    POST /v1/logits    Arrow IPC request -> Arrow IPC logits
    GET  /metrics      Prometheus text page covering every replica

In-cluster callers skip HTTP and call `infer_arrow(body)` and `model_card()` on the
application's handle (see `teacher_service.client.RayTeacherClient`).

Batching: each replica queues admitted requests per student run (`run_id`) and merges them
into engine batches of up to `max_batch_images` images, the runs taking turns by images, so
a run that sends large requests cannot starve one that sends small ones.
`teacher_service.batching` states the policy. A batch closes when it is full or
`batch_wait_ms` after its oldest request arrived. One request may hold at most
`max_images_per_request` (<= `max_batch_images`) images, so every request fits in a batch.
Inside a batch, rows of all requests are grouped by kept count and pixel type, one engine
forward per group, and each request gets its rows back in order.

Overload: each replica admits at most `max_run_images_in_flight` images per run and
`max_images_in_flight` images in all (admitted and not yet returned). Past the replica limit it
returns 503, else past the run limit 429, both with a Retry-After header, instead of
queueing without bound. The client SDK retries both with backoff. A client could spread
its requests over many run ids to pass the run limit, but the replica limit still holds.

Authentication: with a token file, every route except /v1/health and /v1/ready requires
`Authorization: Bearer <token>`, the status page included, because it shows run names and
usage. The page never contains the token.

A Serve config can build the application with
`import_path: teacher_service.deployment:build_app` and `args:` holding `ServiceConfig`
fields.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods'
# annotations at runtime to inject `Request`, and Serve's ingress wrapper hides the
# module globals those string annotations would need.
import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from teacher_service.batching import FairBatcher, run_requests
from teacher_service.engine import MaskedTeacher
from teacher_service.metrics import MetricsStore, ReplicaMetrics
from teacher_service.patches import PatchGrid
from teacher_service.protocol import (
    CONTENT_TYPE,
    LOGITS_DTYPES,
    PIXEL_DTYPES,
    PROTOCOL_VERSION,
    DecodedRequest,
    ProtocolError,
    decode_request,
    encode_response,
)
from teacher_service.service_config import ServiceConfig, read_token_digest
from teacher_service.status_page import render_status_page

logger = logging.getLogger(__name__)


def _route_logs_to_serve() -> None:
    """Send this package's INFO and higher lines to the replica's Serve log files.

    A replica process configures only the `ray.serve` logger. Without this, the package's
    lines fall through to the root logger at WARNING and the INFO lines are lost.
    """
    package_logger = logging.getLogger("teacher_service")
    serve_handlers = logging.getLogger("ray.serve").handlers
    if not serve_handlers or package_logger.handlers:
        return
    package_logger.setLevel(logging.INFO)
    for handler in serve_handlers:
        package_logger.addHandler(handler)
    package_logger.propagate = False


STATUS_REFRESH_S = 5
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_device(device: str, num_gpus: float) -> str:
    if device != "auto":
        return device
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


@dataclass
class _Work:
    """One admitted request waiting in the batch queue."""

    request: DecodedRequest
    admitted_s: float


def _batch_images(items: list[_Work]) -> int:
    return sum(item.request.num_images for item in items)


def _run_key(run_id: str | None) -> str:
    return run_id or ""


def _error_response(error: ProtocolError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


class _RejectionLog:
    """Log rejected requests, at most one line per (status, code) every `interval_s`.

    Clients can produce rejections at any rate, so repeats are counted and reported with
    the next line instead of each being logged. 5xx errors log at WARNING, others at INFO.
    """

    def __init__(self, replica_id: str, interval_s: float = 10.0) -> None:
        self.replica_id = replica_id
        self.interval_s = interval_s
        self._last_s: dict[tuple[int, str], float] = {}
        self._suppressed: dict[tuple[int, str], int] = {}

    def log(self, error: ProtocolError, run_id: str | None) -> None:
        key = (error.status, error.code)
        now_s = time.monotonic()
        if now_s - self._last_s.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_s[key] = now_s
        repeats = self._suppressed.pop(key, 0)
        logger.log(
            logging.WARNING if error.status >= 500 else logging.INFO,
            "replica %s rejected a request of run %r with %d %s: %s (%d more like it in the "
            "last %.0f s)",
            self.replica_id,
            run_id,
            error.status,
            error.code,
            error.message,
            repeats,
            self.interval_s,
        )


api = FastAPI(
    title="maskedkd teacher service",
    description="Teacher logits on the kept patches of each image (MaskedKD).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return _error_response(ProtocolError(error.status_code, code, str(error.detail)))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class MetricsCollector:
    """Store of each teacher replica's latest metrics, which renders the merged page."""

    def __init__(self, stale_s: float) -> None:
        self._store = MetricsStore(stale_s=stale_s)

    async def push(self, replica_id: str, snapshot: dict[str, Any]) -> None:
        """Store a replica's cumulative snapshot."""
        self._store.update(replica_id, snapshot, time.monotonic())

    async def render(self) -> str:
        """Return the Prometheus text page over all replicas."""
        return self._store.render(time.monotonic())

    async def runs(self) -> dict[str, Any]:
        """Return the per-run usage report over all replicas (the body of GET /v1/runs)."""
        return self._store.runs(time.monotonic())


@serve.deployment
@serve.ingress(api)
class TeacherDeployment:
    """One replica: the masked engine, its batch queue, admission control and metrics.

    Args:
        config: the application's settings as a dict (`ServiceConfig` fields).
        token_digest: SHA-256 of the bearer token, or None for no authentication.
        collector: handle of the `MetricsCollector` deployment, or None to serve
            this replica's metrics only.
    """

    def __init__(
        self,
        config: dict[str, Any],
        token_digest: bytes | None = None,
        collector: DeploymentHandle | None = None,
    ) -> None:
        _route_logs_to_serve()
        self.config = ServiceConfig.from_dict(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        device = _resolve_device(self.config.device, self.config.num_gpus)
        self.engine = MaskedTeacher.from_source(
            self.config.teacher,
            device=device,
            amp_dtype=AMP_DTYPES[self.config.amp],
            random_init=self.config.random_init,
            model_kwargs=self.config.model_kwargs,
        )
        self.grid = PatchGrid.from_spec(self.engine.spec)
        self._token_digest = token_digest
        self._replica_id = self._current_replica_id()
        self._collector = collector
        self._metrics = ReplicaMetrics(max_run_ids=self.config.max_run_ids)
        self._images_in_flight = 0
        self._max_images_in_flight = self.config.images_in_flight_limit
        self._run_images_in_flight: dict[str, int] = {}
        self._max_run_images_in_flight = self.config.run_images_in_flight_limit
        self._max_images_per_request = self.config.images_per_request_limit
        self._ready = False
        self._rejection_log = _RejectionLog(self._replica_id)
        self._flush_task: asyncio.Task[None] | None = None
        # One engine thread: the event loop keeps decoding and queueing requests, so the
        # next batch fills while this one computes.
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="teacher-engine"
        )
        self._batcher: FairBatcher[_Work, np.ndarray | ProtocolError] = FairBatcher(
            self._run_batch,
            max_batch_images=self.config.max_batch_images,
            batch_wait_s=self.config.batch_wait_ms / 1000.0,
        )
        self._card = self._build_card()
        spec = self.engine.spec
        logger.info(
            "teacher replica %s ready: %s on %s, grid %dx%d, batches of up to %d images",
            self._replica_id,
            spec.arch,
            device,
            *spec.grid_size,
            self.config.max_batch_images,
        )

    @staticmethod
    def _current_replica_id() -> str:
        try:
            return str(serve.get_replica_context().replica_tag)
        except Exception:  # outside a Serve replica, as in a plain Python test
            return uuid.uuid4().hex

    def _build_card(self) -> dict[str, Any]:
        spec = self.engine.spec
        return {
            "arch": spec.arch,
            "model_kwargs": dict(spec.model_kwargs),
            "img_size": list(spec.img_size),
            "patch_size": list(spec.patch_size),
            "grid_size": list(spec.grid_size),
            "num_patches": spec.num_patches,
            "in_chans": spec.in_chans,
            "num_classes": spec.num_classes,
            "class_names": list(spec.class_names),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "pixel_dtypes": list(PIXEL_DTYPES),
            "logits_dtypes": list(LOGITS_DTYPES),
            "max_images_per_request": self.config.max_images_per_request,
            "max_batch_images": self.config.max_batch_images,
            "max_run_images_in_flight": self.config.run_images_in_flight_limit,
            "max_body_bytes": self.config.max_body_bytes,
            "protocol_version": PROTOCOL_VERSION,
            "digest": spec.digest,
            "macs_per_image_full": self.engine.full_macs_per_image,
        }

    # -- HTTP routes ------------------------------------------------------------------

    @api.get("/v1/health")
    async def health(self) -> dict[str, str]:
        """Return 200 while the replica process is alive."""
        return {"status": "alive"}

    @api.get("/v1/ready")
    async def ready(self) -> Response:
        """Return 200 once a one-patch forward has succeeded on this replica."""
        if not self._ready:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._engine_thread, self._tiny_forward
                )
            except Exception as err:  # return 503 and keep the replica serving
                logger.exception("readiness forward failed on replica %s", self._replica_id)
                message = f"teacher forward failed: {type(err).__name__}: {err}"
                return _error_response(ProtocolError(503, "not_ready", message))
            self._ready = True
        return JSONResponse({"status": "ready", "arch": self.engine.spec.arch})

    @api.get("/v1/teacher")
    async def teacher(self, request: Request) -> Response:
        """Return the model card."""
        try:
            self._authorize(request)
        except ProtocolError as error:
            return self._reject(error, None)
        return JSONResponse(self._card)

    @api.post("/v1/logits")
    async def logits(self, request: Request) -> Response:
        """Run the teacher on an Arrow IPC request and return Arrow IPC logits."""
        run_id = None
        try:
            self._authorize(request)
            self._check_content_type(request)
            body = await self._read_body(request)
            start_s = time.monotonic()
            decoded = await asyncio.to_thread(
                decode_request, body, self.grid, max_images=self._max_images_per_request
            )
            run_id = decoded.run_id
            payload = await self._infer(decoded, len(body), transport="http", start_s=start_s)
        except ProtocolError as error:
            return self._reject(error, run_id)
        except Exception as err:  # a bug or a device failure: return 500, keep serving
            logger.exception("logits request failed on replica %s", self._replica_id)
            internal = ProtocolError(500, "internal_error", f"{type(err).__name__}: {err}")
            return self._reject(internal, run_id)
        return Response(content=payload, media_type=CONTENT_TYPE)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Return the Prometheus text page over every replica of this application."""
        try:
            self._authorize(request)
        except ProtocolError as error:
            return self._reject(error, None)
        text = await self._from_collector("render")
        if text is None:
            text = self._local_store().render(0.0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.get("/v1/runs")
    async def runs(self, request: Request) -> Response:
        """Return usage per student run over every replica, as JSON."""
        try:
            self._authorize(request)
        except ProtocolError as error:
            return self._reject(error, None)
        return JSONResponse(await self._runs_report())

    @api.get("/")
    async def status_page(self, request: Request) -> Response:
        """Return the operators' HTML status page: model card, runs and totals."""
        try:
            self._authorize(request)
        except ProtocolError as error:
            return self._reject(error, None)
        page = render_status_page(self._card, await self._runs_report(), STATUS_REFRESH_S)
        return HTMLResponse(page)

    # -- Handle methods (in-cluster callers) ----------------------------------------------

    async def infer_arrow(self, body: bytes) -> dict[str, Any]:
        """Run an Arrow IPC request body the way `POST /v1/logits` does.

        Errors come back as values rather than exceptions, so expected rejections do not
        fill the replica log with tracebacks.

        Returns:
            {"status": 200, "body": Arrow IPC response bytes} on success, else {"status",
            "code", "message", "retry_after_s"} with the HTTP route's status and code.
        """
        run_id = None
        try:
            if len(body) > self.config.max_body_bytes:
                raise self._too_large(len(body))
            start_s = time.monotonic()
            decoded = await asyncio.to_thread(
                decode_request, body, self.grid, max_images=self._max_images_per_request
            )
            run_id = decoded.run_id
            payload = await self._infer(decoded, len(body), transport="handle", start_s=start_s)
        except ProtocolError as error:
            self._record_rejection(error, run_id)
            return {
                "status": error.status,
                "code": error.code,
                "message": error.message,
                "retry_after_s": error.retry_after_s,
            }
        except Exception as err:  # a bug or a device failure: return 500, keep serving
            logger.exception("handle request failed on replica %s", self._replica_id)
            internal = ProtocolError(500, "internal_error", f"{type(err).__name__}: {err}")
            self._record_rejection(internal, run_id)
            return {"status": 500, "code": internal.code, "message": internal.message}
        return {"status": 200, "body": payload}

    async def model_card(self) -> dict[str, Any]:
        """Return the model card (the body of GET /v1/teacher)."""
        return dict(self._card)

    # -- Request path ----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._token_digest is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        presented = hashlib.sha256(token.strip().encode("utf-8")).digest()
        # Compare digests in constant time, and even when the scheme is wrong.
        matches = hmac.compare_digest(presented, self._token_digest)
        if scheme.lower() != "bearer" or not matches:
            message = (
                "missing bearer token; send 'Authorization: Bearer <token>'"
                if not header
                else "invalid bearer token"
            )
            raise ProtocolError(401, "unauthorized", message)

    def _check_content_type(self, request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != CONTENT_TYPE:
            raise ProtocolError(
                415,
                "unsupported_media_type",
                f"content type {content_type!r} is not supported; send an Arrow IPC stream "
                f"as {CONTENT_TYPE!r}",
            )

    def _too_large(self, size: int) -> ProtocolError:
        return ProtocolError(
            413,
            "body_too_large",
            f"request body of {size} bytes is larger than the {self.config.max_body_bytes} "
            "bytes allowed; send fewer images per request",
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise ProtocolError(
                    400, "malformed_body", f"invalid Content-Length {declared!r}"
                ) from None
            if declared_bytes > limit:
                raise self._too_large(declared_bytes)
        # Count what actually arrives too: chunked bodies carry no Content-Length.
        chunks = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise self._too_large(received)
            chunks.append(chunk)
        return b"".join(chunks)

    def _reject(self, error: ProtocolError, run_id: str | None) -> JSONResponse:
        self._record_rejection(error, run_id)
        return _error_response(error)

    def _record_rejection(self, error: ProtocolError, run_id: str | None) -> None:
        self._metrics.record_error(status=error.status, code=error.code, run_id=run_id)
        self._rejection_log.log(error, run_id)

    async def _infer(
        self, decoded: DecodedRequest, body_bytes: int, *, transport: str, start_s: float
    ) -> bytes:
        self._ensure_flush_task()
        num_images = decoded.num_images
        run_key = _run_key(decoded.run_id)
        self._admit(run_key, num_images)
        self._add_in_flight(run_key, decoded.run_id, num_images)
        try:
            # The batcher returns this request's logits, or an error to raise.
            result = await self._batcher.submit(
                run_key, _Work(decoded, time.monotonic()), num_images
            )
        finally:
            self._add_in_flight(run_key, decoded.run_id, -num_images)
        if isinstance(result, ProtocolError):
            raise result
        logits = result

        macs_spent = sum(self.engine.macs_per_image(count) for count in decoded.keep_counts)
        macs_saved = num_images * self.engine.full_macs_per_image - macs_spent
        payload = encode_response(
            logits,
            request_id=decoded.request_id,
            macs_spent=macs_spent,
            macs_saved=macs_saved,
            logits_dtype=decoded.logits_dtype,
        )
        self._metrics.record_request(
            run_id=decoded.run_id,
            transport=transport,
            images=num_images,
            patches_kept=decoded.patches_kept,
            patches_total=decoded.patches_total,
            macs_spent=macs_spent,
            macs_saved=macs_saved,
            body_bytes=body_bytes,
            latency_s=time.monotonic() - start_s,
        )
        return payload

    def _admit(self, run_key: str, num_images: int) -> None:
        """Raise 503 past the replica's image limit, else 429 past the run's."""
        retry_after_s = self.config.retry_after_s
        if self._images_in_flight + num_images > self._max_images_in_flight:
            raise ProtocolError(
                503,
                "overloaded",
                f"replica has {self._images_in_flight} images in flight and admits at most "
                f"{self._max_images_in_flight}; retry after {retry_after_s:g} s",
                retry_after_s=retry_after_s,
            )
        run_in_flight = self._run_images_in_flight.get(run_key, 0)
        run_limit = self._max_run_images_in_flight
        if run_in_flight + num_images > run_limit:
            raise ProtocolError(
                429,
                "run_overloaded",
                f"run {run_key!r} has {run_in_flight} images in flight on this replica and "
                f"may have at most {run_limit}; retry after {retry_after_s:g} s, or send "
                "fewer requests at once",
                retry_after_s=retry_after_s,
            )

    def _add_in_flight(self, run_key: str, run_id: str | None, images: int) -> None:
        self._images_in_flight += images
        count = self._run_images_in_flight.get(run_key, 0) + images
        if count:
            self._run_images_in_flight[run_key] = count
        else:
            del self._run_images_in_flight[run_key]
        self._metrics.set_images_in_flight(self._images_in_flight)
        self._metrics.add_run_images_in_flight(run_id, images)

    async def _run_batch(self, items: list[_Work]) -> list[np.ndarray | ProtocolError]:
        """Run one engine batch over several requests and return logits or an error for each."""
        start_s = time.monotonic()
        for item in items:
            self._metrics.record_queue_wait(start_s - item.admitted_s)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._engine_thread, run_requests, self.engine, [item.request for item in items]
            )
        except Exception as err:  # device failure or bug: fail this batch, keep serving
            logger.exception("engine batch of %d requests failed", len(items))
            error = ProtocolError(500, "internal_error", f"{type(err).__name__}: {err}")
            results = [error] * len(items)
        self._metrics.record_batch(
            requests=len(items),
            images=_batch_images(items),
            compute_s=time.monotonic() - start_s,
        )
        return results

    def _tiny_forward(self) -> None:
        patches = torch.zeros(1, 1, self.engine.patch_dim, dtype=torch.uint8)
        logits = self.engine.forward_patches(patches, torch.zeros(1, 1, dtype=torch.int64))
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the teacher returned non-finite logits for a blank patch")

    # -- Metrics ---------------------------------------------------------------------------

    async def _runs_report(self) -> dict[str, Any]:
        report = await self._from_collector("runs")
        if report is None:
            report = self._local_store().runs(0.0)
        return cast(dict[str, Any], report)

    def _local_store(self) -> MetricsStore:
        store = MetricsStore()
        store.update(self._replica_id, self._metrics.snapshot(), 0.0)
        return store

    async def _from_collector(self, method: str) -> Any:
        """Push this replica's snapshot, then call `method` on the collector.

        Returns None when there is no collector or it failed, so the caller can fall back
        to this replica's own numbers.
        """
        self._ensure_flush_task()
        if self._collector is None:
            return None
        try:
            await self._collector.push.remote(self._replica_id, self._metrics.snapshot())
            return await getattr(self._collector, method).remote()
        except Exception as err:  # serve this replica's numbers rather than nothing
            logger.warning(
                "metrics collector unavailable (%s); %s shows replica %s only",
                err,
                method,
                self._replica_id,
            )
            return None

    def _ensure_flush_task(self) -> None:
        if self._collector is not None and self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_metrics())

    async def _flush_metrics(self) -> None:
        collector = self._collector
        if collector is None:
            return
        while True:
            try:
                await collector.push.remote(self._replica_id, self._metrics.snapshot())
            except Exception:  # the collector restarts with its deployment; try again later
                logger.warning("metrics push from replica %s failed", self._replica_id)
            await asyncio.sleep(self.config.metrics_flush_s)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the teacher application from `ServiceConfig` fields.

    Usable as a Serve config `import_path` (`teacher_service.deployment:build_app`) with
    the fields under `args`. The token file is read here, where the application is
    built, and replicas receive only its SHA-256.
    """
    config = ServiceConfig.from_dict(dict(args))
    token_digest = read_token_digest(config.token_file)
    collector = cast(Deployment, MetricsCollector).options(name="MetricsCollector")
    teacher = cast(Deployment, TeacherDeployment).options(
        name="TeacherDeployment",
        # Fail fast on a missing or broken checkpoint instead of retrying the constructor.
        max_constructor_retry_count=3,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.ongoing_requests_limit,
        max_queued_requests=config.max_queued_requests,
    )
    autoscaling = config.autoscaling_config()
    if autoscaling is None:
        teacher = teacher.options(num_replicas=config.num_replicas or 1)
    else:
        teacher = teacher.options(autoscaling_config=autoscaling)
    collector_app = collector.bind(stale_s=max(30.0, 5 * config.metrics_flush_s))
    return teacher.bind(dataclasses.asdict(config), token_digest, collector_app)
