"""Settings of the teacher application, importable without torch or Ray.

`maskedkd serve` builds a `ServiceConfig` from its options; a Serve config file passes the
same fields as `args` to `teacher_service.deployment:build_app`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_APP_NAME = "maskedkd-teacher"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
AMP_CHOICES = ("none", "bf16", "fp16")


@dataclass
class ServiceConfig:
    """Settings of one teacher application.

    Attributes:
        teacher: portable checkpoint path (readable on every replica's node) or timm name.
        random_init: for a timm name, keep random weights instead of downloading pretrained
            ones (tests and benchmarks only).
        model_kwargs: for a timm name, keyword arguments of `timm.create_model`.
        device: "auto" (CUDA when the replica has a GPU, else CPU), "cpu", "cuda" or
            "cuda:N".
        amp: autocast dtype on CUDA: "none" (float32), "bf16" or "fp16".
        num_replicas: fixed number of replicas; None means 1 without autoscaling. Not
            allowed together with the autoscaling fields.
        min_replicas: with autoscaling, the minimum replicas (0 lets Serve stop them all
            when idle); None means 1.
        max_replicas: with autoscaling, the maximum replicas. Setting it, or min_replicas or
            target_ongoing_requests, turns autoscaling on, and then it is required.
        target_ongoing_requests: with autoscaling, the requests in progress per replica
            that Serve's autoscaler aims for; None keeps Serve's default.
        num_gpus: GPUs per replica (fractions share a GPU).
        num_cpus: CPUs per replica. Ray sets OMP_NUM_THREADS, and so torch's CPU threads,
            to this (1 when it is below 1).
        torch_threads: torch CPU threads per replica, overriding the one Ray derives from
            num_cpus; None keeps Ray's.
        max_batch_images: maximum images in one engine batch, summed over requests.
        batch_wait_ms: how long a batch waits for more requests after its first, in ms.
        max_images_per_request: maximum images in one request; None means
            max_batch_images.
        max_images_in_flight: maximum images a replica admits at once, past which it returns 503;
            None means 4 * max_batch_images.
        max_run_images_in_flight: maximum images one run (one `run_id`) may have admitted on
            a replica at once, past which its requests get 429; None means the smaller of
            2 * max_batch_images and max_images_in_flight.
        max_ongoing_requests: concurrent requests Serve routes to one replica; None means
            2 * max_batch_images, enough for a batch of one-image requests to fill while
            the previous batch computes.
        max_queued_requests: requests Serve queues per caller when every replica is full
            (-1: no limit). Serve returns 503 past it.
        max_body_bytes: largest request body in bytes.
        token_file: file whose first line is the bearer token every /v1 request except
            health and ready must carry; None disables authentication.
        retry_after_s: Retry-After seconds sent with 503 overload responses.
        metrics_flush_s: seconds between metric snapshots pushed by each replica.
        max_run_ids: distinct run_id label values per replica in /metrics.
    """

    teacher: str
    random_init: bool = False
    model_kwargs: dict[str, Any] | None = None
    device: str = "auto"
    amp: str = "none"
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    torch_threads: int | None = None
    max_batch_images: int = 256
    batch_wait_ms: float = 5.0
    max_images_per_request: int | None = None
    max_images_in_flight: int | None = None
    max_run_images_in_flight: int | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int = -1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    token_file: str | None = None
    retry_after_s: float = 1.0
    metrics_flush_s: float = 2.0
    max_run_ids: int = 256

    def __post_init__(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        for name in ("max_batch_images", "max_body_bytes", "max_run_ids"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(
                "batch_wait_ms, num_gpus and num_cpus must not be negative, got "
                f"{self.batch_wait_ms}, {self.num_gpus}, {self.num_cpus}"
            )
        if self.max_queued_requests != -1 and self.max_queued_requests < 1:
            raise ValueError(
                f"max_queued_requests must be -1 (no limit) or at least 1, got "
                f"{self.max_queued_requests}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1 or None, got {self.torch_threads}")
        if self.max_images_per_request is None:
            self.max_images_per_request = self.max_batch_images
        if not 1 <= self.max_images_per_request <= self.max_batch_images:
            raise ValueError(
                f"max_images_per_request {self.max_images_per_request} must be in "
                f"1..max_batch_images ({self.max_batch_images}), because one request must "
                "fit in one batch"
            )
        if self.max_images_in_flight is None:
            self.max_images_in_flight = 4 * self.max_batch_images
        if self.max_images_in_flight < self.max_images_per_request:
            raise ValueError(
                f"max_images_in_flight {self.max_images_in_flight} is below "
                f"max_images_per_request {self.max_images_per_request}; no full-size request "
                "could ever be admitted"
            )
        self._check_run_limit()
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 2 * self.max_batch_images
        self._check_replicas()

    def _check_run_limit(self) -> None:
        in_flight = self.images_in_flight_limit
        if self.max_run_images_in_flight is None:
            self.max_run_images_in_flight = min(2 * self.max_batch_images, in_flight)
        if not self.images_per_request_limit <= self.max_run_images_in_flight <= in_flight:
            raise ValueError(
                f"max_run_images_in_flight {self.max_run_images_in_flight} must be in "
                f"max_images_per_request..max_images_in_flight ({self.images_per_request_limit}"
                f"..{in_flight}): below, no full-size request could be admitted; above, the "
                "replica limit applies first"
            )

    def _check_replicas(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if not self.autoscaling:
            return
        if self.num_replicas is not None:
            raise ValueError(
                f"num_replicas {self.num_replicas} fixes the replica count, so it cannot be "
                "combined with min_replicas, max_replicas or target_ongoing_requests; set "
                "either the fixed count or the autoscaling bounds"
            )
        if self.max_replicas is None:
            raise ValueError(
                "autoscaling needs max_replicas: set it along with min_replicas or "
                "target_ongoing_requests"
            )
        min_replicas = 1 if self.min_replicas is None else self.min_replicas
        if min_replicas < 0 or self.max_replicas < 1:
            raise ValueError(
                f"min_replicas must be at least 0 and max_replicas at least 1, got "
                f"{min_replicas} and {self.max_replicas}"
            )
        if min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {min_replicas} is greater than max_replicas {self.max_replicas}; "
                "raise max_replicas or lower min_replicas"
            )
        target = self.target_ongoing_requests
        if target is not None and not 0 < target <= self.ongoing_requests_limit:
            raise ValueError(
                f"target_ongoing_requests {target} must be positive and at most "
                f"max_ongoing_requests ({self.ongoing_requests_limit}), because a replica "
                "never has more requests in progress than that"
            )

    @property
    def autoscaling(self) -> bool:
        """Whether any autoscaling field is set."""
        fields = (self.min_replicas, self.max_replicas, self.target_ongoing_requests)
        return any(value is not None for value in fields)

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Return Serve's `autoscaling_config` for these settings, or None without autoscaling."""
        if not self.autoscaling:
            return None
        config: dict[str, Any] = {
            "min_replicas": 1 if self.min_replicas is None else self.min_replicas,
            "max_replicas": self.max_replicas,
        }
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return config

    @property
    def replicas_description(self) -> str:
        """The replica count, or the autoscaling bounds, for log lines."""
        autoscaling = self.autoscaling_config()
        if autoscaling is None:
            return f"{self.num_replicas or 1} replica(s)"
        return f"{autoscaling['min_replicas']} to {autoscaling['max_replicas']} replicas"

    @property
    def images_per_request_limit(self) -> int:
        """`max_images_per_request` with its default applied."""
        return int(self.max_images_per_request or self.max_batch_images)

    @property
    def images_in_flight_limit(self) -> int:
        """`max_images_in_flight` with its default applied."""
        return int(self.max_images_in_flight or 4 * self.max_batch_images)

    @property
    def run_images_in_flight_limit(self) -> int:
        """`max_run_images_in_flight` with its default applied."""
        if self.max_run_images_in_flight is None:
            return min(2 * self.max_batch_images, self.images_in_flight_limit)
        return int(self.max_run_images_in_flight)

    @property
    def ongoing_requests_limit(self) -> int:
        """`max_ongoing_requests` with its default applied."""
        return int(self.max_ongoing_requests or 2 * self.max_batch_images)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServiceConfig:
        """Build a config from a Serve config's `args`, rejecting unknown keys."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown teacher service settings {unknown}; known: {sorted(known)}")
        return cls(**args)


def read_token(token_file: str | None) -> str | None:
    """Return the bearer token in `token_file` (its first line, stripped), or None.

    The service, `maskedkd train`, `info` and `runs` all read token files through this.
    """
    if token_file is None:
        return None
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read token file {token_file!r}: {err}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"token file {token_file!r} is empty; write the token on its first line")
    return token


def read_token_digest(token_file: str | None) -> bytes | None:
    """Return the SHA-256 of the token in `token_file` (first line, stripped), or None.

    Replicas receive only this digest, never the token.
    """
    token = read_token(token_file)
    return None if token is None else hashlib.sha256(token.encode("utf-8")).digest()
