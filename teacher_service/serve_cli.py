"""`maskedkd serve`, `maskedkd info` and `maskedkd runs`.

`serve` starts a local Ray (no dashboard) unless `--address` names a running cluster,
deploys the teacher application, logs its URL, and serves until SIGINT or SIGTERM.
`info` prints a running service's model card, `runs` its usage per student run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teacher_service.service_config import (
    AMP_CHOICES,
    DEFAULT_APP_NAME,
    DEFAULT_MAX_BODY_BYTES,
    ServiceConfig,
    read_token,
    read_token_digest,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class ServeCommandConfig:
    """Settings of `maskedkd serve`.

    Attributes:
        service: the application's settings.
        host: address the HTTP proxy listens on.
        port: TCP port of the HTTP proxy.
        address: Ray cluster address ("auto" or "HOST:PORT"), or None to start a local Ray.
        ray_num_cpus: CPUs a local Ray may use, or None for all of this machine's.
        app_name: Serve application name, which `RayTeacherClient` uses.
        route_prefix: URL path prefix of the application.
        detach: with `address`, exit after deploying and leave the application running.
    """

    service: ServiceConfig
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    ray_num_cpus: int | None = None
    app_name: str = DEFAULT_APP_NAME
    route_prefix: str = "/"
    detach: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeCommandConfig:
        """Build the config from parsed `serve` arguments."""
        service = ServiceConfig(
            teacher=args.teacher,
            random_init=args.random_init,
            device=args.device,
            amp=args.amp,
            num_replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            num_gpus=args.num_gpus,
            num_cpus=args.num_cpus,
            torch_threads=args.torch_threads,
            max_batch_images=args.max_batch_images,
            batch_wait_ms=args.batch_wait_ms,
            max_images_per_request=args.max_images_per_request,
            max_images_in_flight=args.max_images_in_flight,
            max_run_images_in_flight=args.max_run_images_in_flight,
            max_queued_requests=args.max_queued_requests,
            max_run_ids=args.max_run_ids,
            max_body_bytes=int(args.max_body_mib * MIB),
            token_file=args.token_file,
        )
        return cls(
            service=service,
            host=args.host,
            port=args.port,
            address=args.address,
            ray_num_cpus=args.ray_num_cpus,
            app_name=args.app_name,
            route_prefix=args.route_prefix,
            detach=args.detach,
        )


def _check_teacher_source(teacher: str) -> None:
    hub_name = teacher.startswith(("hf-hub:", "hf_hub:"))  # timm names may contain "/"
    looks_like_path = teacher.endswith(".safetensors") or (os.sep in teacher and not hub_name)
    if looks_like_path and not Path(teacher).is_file():
        raise ValueError(f"teacher checkpoint {teacher!r} not found; check the path")
    if looks_like_path:
        # Reading the header takes milliseconds, while a bad file found by a replica costs a
        # Ray start and a page of Serve tracebacks.
        from teacher_service.checkpoint import read_metadata

        try:
            read_metadata(teacher)
        except ValueError as error:
            raise ValueError(
                f"{error}; pass a checkpoint written by `maskedkd export-teacher` or "
                "`maskedkd train-teacher`"
            ) from None


def _check_port_free(host: str, port: int) -> None:
    """Raise ValueError when `port` is out of range or already taken on `host`."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"cannot listen on {host}:{port} ({error.strerror}); stop the process using "
                "that port or pass another --port"
            ) from None


def listeners_on_port(port: int) -> int:
    """Return how many TCP sockets on this machine listen on `port` (0 off Linux)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_address, state = fields[1], fields[3]
            if state == "0A" and int(local_address.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def is_loopback_host(host: str) -> bool:
    """Return whether `host` (an address or a name) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        resolved = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(resolved) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in resolved)


def warn_if_open(host: str, token_file: str | None) -> bool:
    """Log a warning when the service listens beyond this machine without a token.

    Returns:
        Whether the warning was logged.
    """
    if token_file is not None or is_loopback_host(host):
        return False
    logger.warning(
        "the service listens on %s without a bearer token, so anyone who can reach this "
        "port can use the teacher and read its run names; pass --token-file FILE, or "
        "--host 127.0.0.1 to serve this machine only",
        host,
    )
    return True


def serve_teacher(config: ServeCommandConfig) -> int:
    """Deploy the teacher application and serve until SIGINT or SIGTERM.

    Returns:
        0 after a clean shutdown, 2 for invalid settings, 1 when deployment failed.
    """
    try:
        _check_teacher_source(config.service.teacher)
        if config.detach and config.address is None:
            raise ValueError("--detach needs --address; a local Ray stops when serve exits")
        read_token_digest(config.service.token_file)
        if not config.app_name:
            raise ValueError("--app-name must not be empty; the default is maskedkd-teacher")
        if not config.route_prefix.startswith("/"):
            raise ValueError(
                f"--route-prefix must start with '/', got {config.route_prefix!r}; "
                f"use '/{config.route_prefix}'"
            )
        if config.address is None:
            _check_port_free(config.host, config.port)
    except ValueError as error:
        logger.error("serve: %s", error)
        return 2

    import ray
    from ray import serve

    from teacher_service.deployment import build_app

    local = config.address is None
    warn_if_open(config.host, config.service.token_file)
    try:
        if local:
            logger.info("starting a local Ray with %s CPUs", config.ray_num_cpus or "all")
            ray.init(num_cpus=config.ray_num_cpus, include_dashboard=False)
        else:
            logger.info("connecting to the Ray cluster at %s", config.address)
            ray.init(address=config.address)
    except Exception as error:  # Ray raises plain Exception and ConnectionError here
        if local:
            # Seen on an overloaded machine: Ray's helper processes started too slowly.
            hint = "if the machine is busy, Ray's helpers may start too slowly; retry later"
            logger.error("serve: starting a local Ray failed: %s (%s)", error, hint)
        else:
            logger.error("serve: connecting to Ray at %s failed: %s", config.address, error)
        return 1

    # Installed after ray.init, which may install handlers of its own, and before the
    # deployment, so that a signal sent as soon as /v1/ready returns 200 is not lost.
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda number, frame: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        app = build_app(_service_args(config.service))
        handle = serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
        card: dict[str, Any] = handle.model_card.remote().result(timeout_s=120)
    except ValueError as error:
        logger.error("serve: %s", error)
        _shutdown(config, local)
        return 2
    except Exception as error:  # deployment failures surface as RuntimeError and Ray errors
        logger.error("serve: deploying %s failed: %s", config.app_name, error)
        _shutdown(config, local)
        return 1

    if local and listeners_on_port(config.port) > 1:
        # Serve's proxy binds with SO_REUSEPORT, so a second service started on the same
        # port at the same moment also binds, and the kernel would split clients between them.
        logger.error(
            "serve: another process also listens on port %d, so clients would reach either "
            "service at random; stop it or pass another --port",
            config.port,
        )
        _shutdown(config, local)
        return 1

    if local:
        where = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    else:
        # A cluster whose Serve was already running keeps the HTTP host and port it
        # started with; --host and --port apply only when this command starts Serve.
        where = f"route prefix {config.route_prefix} of the cluster's Serve HTTP proxy"
    logger.info(
        "teacher service ready at %s (app %r): %s, %dx%d px, %dx%d patches of %dx%d px, "
        "%d classes, %s",
        where,
        config.app_name,
        card["arch"],
        *card["img_size"],
        *card["grid_size"],
        *card["patch_size"],
        card["num_classes"],
        config.service.replicas_description,
    )
    if config.detach:
        logger.info("leaving %r running on the cluster", config.app_name)
        ray.shutdown()
        return 0

    while not stop.wait(timeout=1.0):
        pass
    logger.info("stopping the teacher service")
    _shutdown(config, local)
    return 0


def _service_args(service: ServiceConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(service)


def _shutdown(config: ServeCommandConfig, local: bool) -> None:
    import ray
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            # Other applications may share the cluster's Serve instance: remove only ours.
            serve.delete(config.app_name)
    except Exception as error:  # shutting down anyway; report and continue
        logger.warning("stopping Serve failed: %s", error)
    ray.shutdown()


@dataclass
class InfoCommandConfig:
    """Settings of `maskedkd info`.

    Attributes:
        url: base URL of the service.
        token_file: file whose first line is the bearer token, or None.
        timeout_s: timeout of the request, in seconds.
    """

    url: str
    token_file: str | None = None
    timeout_s: float = 10.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InfoCommandConfig:
        """Build the config from parsed `info` arguments."""
        return cls(url=args.url, token_file=args.token_file, timeout_s=args.timeout_s)


def show_info(config: InfoCommandConfig) -> int:
    """Print the model card of a running service as JSON.

    Returns:
        0 on success, 1 when the service could not be reached or rejected the request.
    """
    card = _fetch("info", config.url, config.token_file, config.timeout_s)
    if card is None:
        return 1
    print(json.dumps(card, indent=2))
    return 0


def _fetch(
    command: str, url: str, token_file: str | None, timeout_s: float
) -> dict[str, Any] | None:
    """Return the model card ("info") or the runs report ("runs"), or None after logging why not."""
    from teacher_service.client import TeacherClient, TeacherServiceError

    try:
        token = read_token(token_file)
        with TeacherClient(url, token=token, timeout_s=timeout_s, retries=1) as client:
            return client.info() if command == "info" else client.runs()
    except (ValueError, TeacherServiceError) as error:
        logger.error("%s: %s", command, error)
        return None


@dataclass
class RunsCommandConfig:
    """Settings of `maskedkd runs`.

    Attributes:
        url: base URL of the service.
        token_file: file whose first line is the bearer token, or None.
        timeout_s: timeout of the request, in seconds.
        as_json: print the report as JSON instead of a table.
    """

    url: str
    token_file: str | None = None
    timeout_s: float = 10.0
    as_json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunsCommandConfig:
        """Build the config from parsed `runs` arguments."""
        return cls(
            url=args.url, token_file=args.token_file, timeout_s=args.timeout_s, as_json=args.json
        )


def show_runs(config: RunsCommandConfig) -> int:
    """Print a running service's usage per student run (`GET /v1/runs`).

    Returns:
        0 on success, 1 when the service could not be reached or rejected the request.
    """
    from teacher_service.status_page import format_runs_table

    report = _fetch("runs", config.url, config.token_file, config.timeout_s)
    if report is None:
        return 1
    print(json.dumps(report, indent=2) if config.as_json else format_runs_table(report).rstrip())
    return 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a teacher over HTTP and Ray Serve handles",
        description=(
            "Deploy the masked teacher as a Ray Serve application with an HTTP API under "
            "/v1 and serve until interrupted (SIGINT or SIGTERM). Without --address a local "
            "Ray is started on this machine."
        ),
    )
    parser.add_argument(
        "--teacher",
        required=True,
        metavar="FILE_OR_TIMM_NAME",
        help="portable .safetensors teacher checkpoint (readable on every replica's node) or "
        "a timm model name",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="with a timm name, use random weights instead of downloading pretrained ones "
        "(tests and benchmarks only)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the HTTP server binds (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument(
        "--replicas",
        type=_positive_int,
        default=None,
        help="fixed number of teacher replicas; not with the autoscaling options (default: 1)",
    )
    parser.add_argument(
        "--min-replicas",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="autoscale: minimum replicas, 0 to stop all when idle; needs --max-replicas "
        "(default: 1)",
    )
    parser.add_argument(
        "--max-replicas",
        type=_positive_int,
        default=None,
        metavar="N",
        help="autoscale between --min-replicas and this many replicas (default: no autoscaling)",
    )
    parser.add_argument(
        "--target-ongoing-requests",
        type=_positive_float,
        default=None,
        metavar="R",
        help="autoscale: requests in progress per replica that Serve aims for; about the "
        "number of students per replica; needs --max-replicas (default: Serve's)",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per replica; fractions share one GPU (default: 0, CPU only)",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per replica; Ray also sets the replica's torch CPU threads to this, at "
        "least 1 (default: 1)",
    )
    parser.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads per replica, overriding the count Ray derives from "
        "--num-cpus (default: Ray's)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="device of the engine: auto (CUDA when the replica has a GPU), cpu, cuda or "
        "cuda:N (default: auto)",
    )
    parser.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="none",
        help="autocast dtype on CUDA: none (float32), bf16 or fp16 (default: none)",
    )
    parser.add_argument(
        "--max-batch-images",
        type=_positive_int,
        default=256,
        metavar="B",
        help="maximum images merged into one engine batch, summed over requests (default: 256)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        metavar="W",
        help="milliseconds a batch waits for more requests after its first (default: 5)",
    )
    parser.add_argument(
        "--max-images-per-request",
        type=_positive_int,
        default=None,
        metavar="N",
        help="maximum images in one request, at most --max-batch-images "
        "(default: --max-batch-images)",
    )
    parser.add_argument(
        "--max-images-in-flight",
        type=_positive_int,
        default=None,
        metavar="N",
        help="maximum images one replica admits at once; past it, requests get 503 with "
        "Retry-After (default: 4 x --max-batch-images)",
    )
    parser.add_argument(
        "--max-run-images-in-flight",
        type=_positive_int,
        default=None,
        metavar="N",
        help="maximum images one student run (run_id) may have admitted on a replica at once; "
        "past it, its requests get 429 with Retry-After (default: the smaller of 2 x "
        "--max-batch-images and --max-images-in-flight)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=-1,
        metavar="N",
        help="requests Serve queues per proxy when every replica is at its ongoing-request "
        "limit; past it, Serve answers 503 (default: -1, no limit)",
    )
    parser.add_argument(
        "--max-run-ids",
        type=_positive_int,
        default=256,
        metavar="N",
        help="distinct run ids each replica accounts for separately in /v1/runs and /metrics; "
        "later runs are counted together under _other (default: 256)",
    )
    parser.add_argument(
        "--max-body-mib",
        type=float,
        default=DEFAULT_MAX_BODY_BYTES / MIB,
        metavar="MIB",
        help="largest request body in MiB; larger bodies get 413 (default: 64)",
    )
    parser.add_argument(
        "--token-file",
        metavar="F",
        help="file whose first line is a bearer token that every route except /v1/health "
        "and /v1/ready requires, the status page included (default: no authentication)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to deploy onto: auto or HOST:PORT (default: start a local Ray)",
    )
    parser.add_argument(
        "--ray-num-cpus",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPUs the local Ray may use, without --address (default: all of this machine's)",
    )
    parser.add_argument(
        "--app-name",
        default=DEFAULT_APP_NAME,
        help=f"Serve application name, used by in-cluster clients (default: {DEFAULT_APP_NAME})",
    )
    parser.add_argument(
        "--route-prefix",
        default="/",
        help="URL path prefix of the application (default: /)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="with --address, exit after deploying and leave the application running",
    )
    parser.set_defaults(func=_run_serve)


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="print a running teacher service's model card",
        description="Fetch GET /v1/teacher from a running service and print it as JSON.",
    )
    _add_client_options(parser)
    parser.set_defaults(func=_run_info)


def add_runs_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `runs` subcommand."""
    parser = subparsers.add_parser(
        "runs",
        help="print a running teacher service's usage per student run",
        description=(
            "Fetch GET /v1/runs from a running service and print, per student run, requests, "
            "images, patches kept, teacher compute spent and saved, errors and latency "
            "percentiles, over the service's lifetime and the last minute."
        ),
    )
    _add_client_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run_runs)


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument(
        "--token-file", metavar="F", help="file whose first line is the service's bearer token"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=10.0, help="request timeout in seconds (default: 10)"
    )


def _run_runs(args: argparse.Namespace) -> int:
    return show_runs(RunsCommandConfig.from_args(args))


def _run_serve(args: argparse.Namespace) -> int:
    try:
        config = ServeCommandConfig.from_args(args)
    except ValueError as error:
        logger.error("serve: %s", error)
        return 2
    return serve_teacher(config)


def _run_info(args: argparse.Namespace) -> int:
    return show_info(InfoCommandConfig.from_args(args))


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive finite number")
    return value
