"""Client SDK for the teacher service: over HTTP, or over a Ray Serve deployment handle.

Both clients take images as torch tensors or numpy arrays, [B, C, H, W], uint8 in 0..255
or floating point in [0, 1], and send only the kept patches' pixels: uint8 stays uint8,
floating point goes as float16. The teacher normalises pixels itself.

Example:
    with TeacherClient("http://127.0.0.1:8000", run_id="student-a") as client:
        future = client.submit(images, keep)   # returns at once
        ...                                    # student backward pass
        teacher_logits = future.result().logits
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import torch

from teacher_service.patches import PatchGrid, gather_patches
from teacher_service.protocol import (
    CONTENT_TYPE,
    LOGITS_DTYPES,
    decode_response,
    encode_request,
)

logger = logging.getLogger(__name__)
# httpx logs every request at INFO, one line per teacher call in a trainer's log. Keep only
# its warnings, unless the application set a level for it already.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 5
DEFAULT_APP_NAME = "maskedkd-teacher"
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def _is_lost_replica(response: httpx.Response) -> bool:
    """Return whether a 500 came from Serve's proxy because the replica died mid-request.

    The service's own 500 is JSON (`internal_error`) and is not retried. The proxy's is plain
    text, and retrying it is safe because a logits request has no side effects.
    """
    content_type = response.headers.get("content-type", "")
    return response.status_code == 500 and not content_type.startswith("application/json")


ImageBatch = torch.Tensor | np.ndarray
KeepIndices = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]
_T = TypeVar("_T")


@dataclass
class TeacherResult:
    """Teacher logits for one request.

    Attributes:
        logits: float32 logits [B, num_classes], rows in request order.
        macs_spent: teacher multiply-accumulates spent on this request.
        macs_saved: multiply-accumulates saved against running the teacher on every patch.
        request_id: the request's id, as logged by the service.
    """

    logits: torch.Tensor
    macs_spent: int
    macs_saved: int
    request_id: str | None


class TeacherServiceError(Exception):
    """Base class of the errors raised by the teacher clients."""


class TeacherRequestError(TeacherServiceError):
    """The service rejected a request in a way that retrying cannot fix (4xx, 500).

    Attributes:
        status: HTTP status code.
        code: the service's error code, for example "invalid_content".
        message: the service's explanation.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"teacher service returned {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class TeacherUnavailableError(TeacherServiceError):
    """The service stayed unreachable or overloaded until the retries or deadline ran out.

    Attributes:
        status: the last HTTP status seen (429, 503, ...), or None after connection errors.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retry(Exception):
    """A failed attempt worth retrying, with the server's Retry-After when it sent one."""

    def __init__(self, reason: str, status: int | None, retry_after_s: float | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


def _to_numpy_images(images: ImageBatch) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"images must be uint8 (0..255) or floating point in [0, 1], got {array.dtype}; "
            "convert integer images with .astype(numpy.uint8)"
        )
    if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError(
            f"floating-point images must be unnormalised pixels in [0, 1], got values in "
            f"[{float(array.min())}, {float(array.max())}]; the teacher normalises them itself"
        )
    return array.astype(np.float16)


def _to_numpy_keep(keep: KeepIndices) -> np.ndarray | list[np.ndarray]:
    if isinstance(keep, torch.Tensor):
        return keep.detach().cpu().numpy().astype(np.int64)
    if isinstance(keep, np.ndarray) and keep.ndim == 2:
        return keep.astype(np.int64)
    rows = []
    for row in keep:
        row_array = row.detach().cpu().numpy() if isinstance(row, torch.Tensor) else row
        rows.append(np.asarray(row_array, dtype=np.int64).reshape(-1))
    return rows


def encode_images(
    images: ImageBatch,
    keep: KeepIndices,
    grid: PatchGrid,
    *,
    run_id: str | None = None,
    request_id: str | None = None,
    logits_dtype: str = "float16",
) -> bytes:
    """Encode images and kept indices as a request body that contains only the kept patches.

    Args:
        images: [B, C, H, W], uint8 in 0..255 or floating point in [0, 1].
        keep: kept patch indices, [B, K] or a list of B 1-D index arrays (ragged).
        grid: the teacher's patch grid.
        run_id: student run name for the service's metrics.
        request_id: id echoed by the service.
        logits_dtype: "float16" or "float32".

    Returns:
        The Arrow IPC request body.

    Raises:
        ValueError: shapes that do not match the grid, indices outside the grid, or
            pixels outside the allowed ranges.
    """
    pixels = _to_numpy_images(images)
    keep_array = _to_numpy_keep(keep)
    batch_size = pixels.shape[0] if pixels.ndim else 0
    if len(keep_array) != batch_size:
        raise ValueError(
            f"keep has {len(keep_array)} rows for {batch_size} images; pass one row per image"
        )
    if isinstance(keep_array, np.ndarray):
        patches: np.ndarray | list[np.ndarray] = gather_patches(pixels, keep_array, grid)
    else:
        patches = [
            gather_patches(pixels[index : index + 1], row[None, :], grid)[0]
            for index, row in enumerate(keep_array)
        ]
    return encode_request(
        patches,
        keep_array,
        kind="patches",
        run_id=run_id,
        request_id=request_id,
        logits_dtype=logits_dtype,
    )


class _ClientBase:
    """Encoding, retries, futures and result decoding shared by both transports."""

    def __init__(
        self,
        *,
        timeout_s: float,
        retries: int,
        run_id: str | None,
        logits_dtype: str,
        deadline_s: float | None,
        backoff_s: float,
        max_backoff_s: float,
        max_workers: int,
    ) -> None:
        if logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(
                f"timeout_s must be positive and retries non-negative, got {timeout_s}, {retries}"
            )
        self.timeout_s = timeout_s
        self.retries = retries
        self.run_id = run_id
        self.logits_dtype = logits_dtype
        self.deadline_s = deadline_s if deadline_s is not None else 2 * timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._card: dict[str, Any] | None = None
        self._grid: PatchGrid | None = None

    # Transport hooks.
    def _fetch_card_once(self, timeout_s: float) -> dict[str, Any]:
        raise NotImplementedError

    def _post_once(self, body: bytes, timeout_s: float) -> bytes:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Return the teacher's model card (`GET /v1/teacher`), fetched once and cached."""
        if self._card is None:
            card = self._with_retries(self._fetch_card_once, "GET /v1/teacher")
            self._grid = PatchGrid.from_card(card)
            self._card = card
        return self._card

    @property
    def grid(self) -> PatchGrid:
        """The teacher's patch grid, from the model card."""
        return PatchGrid.from_card(self.info()) if self._grid is None else self._grid

    def request(self, images: ImageBatch, keep: KeepIndices) -> TeacherResult:
        """Run the teacher on the kept patches of each image.

        Args:
            images: [B, C, H, W], uint8 in 0..255 or floating point in [0, 1].
            keep: kept patch indices on the teacher's grid, row-major: a [B, K] tensor or
                array, or a list of B 1-D index tensors of different lengths.

        Returns:
            Logits and the teacher cost of this request.

        Raises:
            ValueError: invalid images or indices (checked before sending).
            TeacherRequestError: the service rejected the request.
            TeacherUnavailableError: retries or the deadline ran out.
        """
        request_id = uuid.uuid4().hex
        body = encode_images(
            images,
            keep,
            self.grid,
            run_id=self.run_id,
            request_id=request_id,
            logits_dtype=self.logits_dtype,
        )
        payload = self._with_retries(
            lambda timeout_s: self._post_once(body, timeout_s), f"request {request_id}"
        )
        response = decode_response(payload)
        return TeacherResult(
            logits=torch.from_numpy(response.logits),
            macs_spent=response.macs_spent,
            macs_saved=response.macs_saved,
            request_id=response.request_id,
        )

    def logits(self, images: ImageBatch, keep: KeepIndices) -> torch.Tensor:
        """Return only the float32 logits [B, num_classes] of `request`."""
        return self.request(images, keep).logits

    def submit(
        self, images: ImageBatch, keep: KeepIndices
    ) -> concurrent.futures.Future[TeacherResult]:
        """Start `request` in a background thread and return its future at once.

        The images and indices are copied to numpy before this returns, so the caller may
        reuse its tensors.
        """
        pixels = _to_numpy_images(images).copy()
        keep_copy = _to_numpy_keep(keep)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="teacher-client"
            )
        return self._executor.submit(self.request, pixels, keep_copy)

    def close(self) -> None:
        """Wait for submitted requests and release the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_retries(self, attempt: Callable[[float], _T], description: str) -> _T:
        """Run `attempt(timeout_s)`, retrying `_Retry` failures with exponential backoff.

        Waits honour the server's Retry-After. No attempt or wait reaches past the deadline.
        """
        deadline = time.monotonic() + self.deadline_s
        last: _Retry | None = None
        attempts = 0
        while attempts <= self.retries:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            attempts += 1
            try:
                return attempt(min(self.timeout_s, remaining_s))
            except _Retry as retry:
                last = retry
            if attempts > self.retries:
                break
            delay_s = self._backoff_delay(attempts - 1, last.retry_after_s)
            if time.monotonic() + delay_s >= deadline:
                break
            logger.warning(
                "teacher %s failed (%s); retry %d of %d in %.2f s",
                description,
                last.reason,
                attempts,
                self.retries,
                delay_s,
            )
            time.sleep(delay_s)
        reason = last.reason if last else "the deadline passed before the first attempt"
        raise TeacherUnavailableError(
            f"teacher {description} failed after {attempts} attempt(s) ({self.retries} retries "
            f"allowed, {self.deadline_s:.1f} s deadline): {reason}",
            status=last.status if last else None,
        )

    def _backoff_delay(self, attempt_index: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_backoff_s)
        delay_s = min(self.backoff_s * (2**attempt_index), self.max_backoff_s)
        # Jitter spreads the retries of many students that failed at the same moment.
        return delay_s * (0.5 + 0.5 * random.random())


def _error_from_response(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:500]


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date; fall back to exponential backoff


class TeacherClient(_ClientBase):
    """HTTP client of `maskedkd serve`, safe to share between threads.

    Args:
        url: base URL of the service, for example "http://127.0.0.1:8000" (plus the
            route prefix when the app is not served at "/").
        token: bearer token, when the service was started with a token file.
        timeout_s: timeout of one HTTP attempt, in seconds.
        retries: retries after connection errors and 429, 502, 503 and 504 responses.
        run_id: student run name, recorded per request in the service's metrics.
        logits_dtype: "float16" (default, half the bytes) or "float32".
        deadline_s: overall time limit of one call including retries and waits, in
            seconds; defaults to 2 * timeout_s.
        backoff_s: first retry wait in seconds, doubled per retry (with jitter).
        max_backoff_s: maximum wait between retries, in seconds.
        max_workers: threads that run `submit` requests.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        run_id: str | None = None,
        logits_dtype: str = "float16",
        *,
        deadline_s: float | None = None,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        max_workers: int = 4,
    ) -> None:
        super().__init__(
            timeout_s=timeout_s,
            retries=retries,
            run_id=run_id,
            logits_dtype=logits_dtype,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_workers=max_workers,
        )
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"teacher URL {url!r} must start with http:// or https://, for example "
                "http://127.0.0.1:8000"
            )
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=max(8, 2 * max_workers))
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, limits=limits
        )

    def close(self) -> None:
        """Wait for submitted requests, then close the connection pool."""
        super().close()
        self._http.close()

    def _send(self, method: str, path: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, timeout=timeout_s, **kwargs)
        except httpx.ConnectError as err:
            hint = f"check that the teacher service runs at {self.url}"
            raise _Retry(f"ConnectError: {err}; {hint}", None, None) from None
        except httpx.TransportError as err:
            raise _Retry(f"{type(err).__name__}: {err}", None, None) from None
        if response.status_code in RETRYABLE_STATUSES or _is_lost_replica(response):
            code, message = _error_from_response(response)
            raise _Retry(
                f"{response.status_code} {code}: {message}",
                response.status_code,
                _retry_after_s(response),
            )
        if response.status_code >= 400:
            code, message = _error_from_response(response)
            raise TeacherRequestError(response.status_code, code, message)
        return response

    def _fetch_card_once(self, timeout_s: float) -> dict[str, Any]:
        card: dict[str, Any] = self._send("GET", "/v1/teacher", timeout_s).json()
        return card

    def _post_once(self, body: bytes, timeout_s: float) -> bytes:
        response = self._send(
            "POST",
            "/v1/logits",
            timeout_s,
            content=body,
            headers={"Content-Type": CONTENT_TYPE},
        )
        return response.content

    def runs(self) -> dict[str, Any]:
        """Return the service's usage per student run (`GET /v1/runs`)."""

        def fetch(timeout_s: float) -> dict[str, Any]:
            report: dict[str, Any] = self._send("GET", "/v1/runs", timeout_s).json()
            return report

        return self._with_retries(fetch, "GET /v1/runs")

    def health(self) -> bool:
        """Return whether `GET /v1/ready` succeeds (model loaded and returning logits)."""
        try:
            return self._http.get("/v1/ready", timeout=self.timeout_s).status_code == 200
        except httpx.TransportError:
            return False


class RayTeacherClient(_ClientBase):
    """Client of the teacher deployment over a Ray Serve handle, for code inside the cluster.

    It skips HTTP and the bearer token: any process connected to the Ray cluster may call
    the deployment. Call `ray.init(address=...)` first when not running in a Ray task.

    Args:
        app_name: name of the Serve application (`maskedkd serve --app-name`).
        timeout_s: timeout of one call, in seconds.
        retries: retries after overload (429, 503) and replica failures.
        run_id: student run name, recorded per request in the service's metrics.
        logits_dtype: "float16" or "float32".
        deadline_s: overall time limit of one call including retries, in seconds;
            defaults to 2 * timeout_s.
        backoff_s: first retry wait in seconds, doubled per retry (with jitter).
        max_backoff_s: maximum wait between retries, in seconds.
        max_workers: threads that run `submit` requests.
    """

    def __init__(
        self,
        app_name: str = DEFAULT_APP_NAME,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        run_id: str | None = None,
        logits_dtype: str = "float16",
        *,
        deadline_s: float | None = None,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        max_workers: int = 4,
    ) -> None:
        super().__init__(
            timeout_s=timeout_s,
            retries=retries,
            run_id=run_id,
            logits_dtype=logits_dtype,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_workers=max_workers,
        )
        from ray import serve

        self.app_name = app_name
        self._handle = serve.get_app_handle(app_name)

    def _call(self, method: str, timeout_s: float, *args: Any) -> Any:
        import ray.exceptions

        try:
            return getattr(self._handle, method).remote(*args).result(timeout_s=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise _Retry(f"replica unavailable: {type(err).__name__}", None, None) from None
        except TimeoutError as err:
            raise _Retry(f"timed out after {timeout_s:.1f} s: {err}", None, None) from None

    def _fetch_card_once(self, timeout_s: float) -> dict[str, Any]:
        card: dict[str, Any] = self._call("model_card", timeout_s)
        return card

    def _post_once(self, body: bytes, timeout_s: float) -> bytes:
        reply: dict[str, Any] = self._call("infer_arrow", timeout_s, body)
        status = int(reply["status"])
        if status == 200:
            payload: bytes = reply["body"]
            return payload
        reason = f"{status} {reply['code']}: {reply['message']}"
        if status in RETRYABLE_STATUSES:
            raise _Retry(reason, status, reply.get("retry_after_s"))
        raise TeacherRequestError(status, str(reply["code"]), str(reply["message"]))
