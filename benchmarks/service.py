"""Measure the teacher service end to end against the in-process engine.

Both sides run the same checkpoint on the same images and kept indices (half the patches
by default). In-process: `MaskedTeacher.forward_images` on one batch at a time. Service: a
local Ray with one replica that owns all CPU threads, `TeacherClient` threads sending
requests of the same batch size concurrently over HTTP on 127.0.0.1 (kept patches only),
Serve batching them, and the replica's engine. Each round runs every configuration once,
so load from other processes on the machine affects all of them alike, and the median over
rounds is reported. It also measures request bytes per image for kept patches only against
whole images.

Writes a JSON file and replaces its own section of benchmarks/RESULTS.md:

    .venv/bin/python benchmarks/service.py --batch-sizes 32,128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from markdown_sections import replace_section

from teacher_service.checkpoint import load_teacher, save_teacher
from teacher_service.client import TeacherClient, encode_images
from teacher_service.engine import MaskedTeacher
from teacher_service.patches import PatchGrid
from teacher_service.protocol import encode_request

logger = logging.getLogger(__name__)

SECTION_START = "<!-- service benchmark: start -->"
SECTION_END = "<!-- service benchmark: end -->"


@dataclass
class ServiceBenchmarkConfig:
    """Settings of one benchmark run.

    Attributes:
        arch: timm model name of the teacher, built with random weights.
        img_size: teacher input size in pixels (square).
        patch_size: teacher patch size in pixels.
        in_chans: image channels.
        num_classes: teacher classes.
        keep_ratio: fraction of patches kept per image.
        batch_sizes: images per request (service) and per forward (in-process).
        batches_per_round: timed batches per configuration and round.
        rounds: rounds; the median over rounds is reported.
        client_threads: concurrent client requests in flight.
        threads: torch CPU threads for the in-process engine and the replica; 0 for all
            of this machine's cores.
        max_batch_images: the service's batch limit in images.
        batch_wait_ms: the service's batch wait in milliseconds.
        out: path of the JSON results.
        results_md: markdown file whose service section is replaced.
        seed: seed of the images and kept indices.
    """

    arch: str = "vit_small_patch16_224"
    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    keep_ratio: float = 0.5
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128])
    batches_per_round: int = 4
    rounds: int = 3
    client_threads: int = 2
    threads: int = 0
    max_batch_images: int = 256
    batch_wait_ms: float = 5.0
    out: str = "benchmarks/results/service.json"
    results_md: str = "benchmarks/RESULTS.md"
    seed: int = 0


def parse_args() -> tuple[bool, ServiceBenchmarkConfig]:
    """Parse the command line into (render only, `ServiceBenchmarkConfig`)."""
    defaults = ServiceBenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=defaults.arch, help="timm teacher model name")
    parser.add_argument("--img-size", type=int, default=defaults.img_size, help="pixels")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="pixels")
    parser.add_argument("--in-chans", type=int, default=defaults.in_chans, help="channels")
    parser.add_argument(
        "--keep-ratio", type=float, default=defaults.keep_ratio, help="fraction of patches kept"
    )
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, defaults.batch_sizes)),
        help="comma-separated images per request and per in-process forward",
    )
    parser.add_argument(
        "--batches-per-round",
        type=int,
        default=defaults.batches_per_round,
        help="timed batches per configuration and round",
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds (median)")
    parser.add_argument(
        "--client-threads",
        type=int,
        default=defaults.client_threads,
        help="concurrent client requests in flight",
    )
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch CPU threads (0: all cores)"
    )
    parser.add_argument(
        "--max-batch-images",
        type=int,
        default=defaults.max_batch_images,
        help="service batch limit in images",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=defaults.batch_wait_ms, help="service batch wait"
    )
    parser.add_argument("--out", default=defaults.out, help="JSON results path")
    parser.add_argument("--results-md", default=defaults.results_md, help="markdown results")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the markdown section from the JSON file at --out",
    )
    args = parser.parse_args()
    return args.render_only, ServiceBenchmarkConfig(
        arch=args.arch,
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=args.in_chans,
        keep_ratio=args.keep_ratio,
        batch_sizes=[int(size) for size in args.batch_sizes.split(",")],
        batches_per_round=args.batches_per_round,
        rounds=args.rounds,
        client_threads=args.client_threads,
        threads=args.threads,
        max_batch_images=args.max_batch_images,
        batch_wait_ms=args.batch_wait_ms,
        out=args.out,
        results_md=args.results_md,
    )


def machine_info() -> dict[str, Any]:
    """Describe the CPU and the library versions."""
    import ray

    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def make_batch(
    batch_size: int, grid: PatchGrid, keep_count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random uint8 images [B, C, H, W] and kept indices [B, K]."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (batch_size, grid.in_chans, *grid.img_size), dtype=torch.uint8, generator=generator
    )
    keep = torch.stack(
        [torch.randperm(grid.num_patches, generator=generator)[:keep_count] for _ in images]
    )
    return images, keep


def time_in_process(
    engine: MaskedTeacher, images: torch.Tensor, keep: torch.Tensor, batches: int
) -> float:
    """Return images per second of `batches` sequential engine forwards."""
    start = time.perf_counter()
    for _ in range(batches):
        engine.forward_images(images, keep)
    return batches * len(images) / (time.perf_counter() - start)


def time_service(
    client: TeacherClient, images: torch.Tensor, keep: torch.Tensor, batches: int
) -> float:
    """Return images per second of `batches` requests, `client`'s threads in flight at once."""
    start = time.perf_counter()
    futures = [client.submit(images, keep) for _ in range(batches)]
    for future in futures:
        future.result()
    return batches * len(images) / (time.perf_counter() - start)


def wire_bytes(images: torch.Tensor, keep: torch.Tensor, grid: PatchGrid) -> dict[str, float]:
    """Return request bytes per image for kept patches only and for whole images."""
    kept_body = encode_images(images, keep, grid)
    whole_body = encode_request(images.numpy(), keep.numpy(), kind="image")
    count = len(images)
    return {
        "kept_patches_per_image": len(kept_body) / count,
        "whole_image_per_image": len(whole_body) / count,
        "ratio": len(kept_body) / len(whole_body),
    }


def batch_stats(url: str) -> tuple[float, float]:
    """Return the service's (engine batches, images in them) so far, from /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30.0).text.splitlines():
        if line.startswith("maskedkd_teacher_batch_images_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return (
        values.get("maskedkd_teacher_batch_images_count", 0.0),
        values.get("maskedkd_teacher_batch_images_sum", 0.0),
    )


def start_service(teacher_path: Path, config: ServiceBenchmarkConfig, threads: int) -> str:
    """Start a local Ray and the teacher application; return its URL once ready."""
    import ray
    from ray import serve

    from teacher_service.deployment import build_app

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "teacher": str(teacher_path),
            "num_cpus": threads,
            "torch_threads": threads,
            "max_batch_images": config.max_batch_images,
            "max_images_per_request": max(config.batch_sizes),
            "batch_wait_ms": config.batch_wait_ms,
        }
    )
    serve.run(app, name="maskedkd-teacher", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    httpx.get(f"{url}/v1/ready", timeout=120.0).raise_for_status()
    return url


def run(config: ServiceBenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark and return the results."""
    import ray
    from ray import serve

    load_start = os.getloadavg()[0]
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_kwargs = {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "num_classes": config.num_classes,
    }
    model, spec = load_teacher(config.arch, random_init=True, model_kwargs=model_kwargs)
    grid = PatchGrid.from_spec(spec)
    keep_count = max(1, round(config.keep_ratio * grid.num_patches))
    batches = {
        size: make_batch(size, grid, keep_count, config.seed + size) for size in config.batch_sizes
    }

    with tempfile.TemporaryDirectory() as folder:
        teacher_path = Path(folder) / "teacher.safetensors"
        save_teacher(model, spec, teacher_path)
        engine = MaskedTeacher.from_source(str(teacher_path))
        url = start_service(teacher_path, config, threads)
        samples: dict[int, dict[str, list[float]]] = {
            size: {"in_process": [], "service": [], "engine_batch_images": []}
            for size in config.batch_sizes
        }
        try:
            with TeacherClient(url, max_workers=config.client_threads, timeout_s=600) as client:
                for images, keep in batches.values():  # warm-up, untimed
                    engine.forward_images(images, keep)
                    client.request(images, keep)
                for round_index in range(config.rounds):
                    for size, (images, keep) in batches.items():
                        in_process = time_in_process(engine, images, keep, config.batches_per_round)
                        count_before, images_before = batch_stats(url)
                        service = time_service(client, images, keep, config.batches_per_round)
                        count_after, images_after = batch_stats(url)
                        mean_batch = (images_after - images_before) / max(
                            1.0, count_after - count_before
                        )
                        samples[size]["in_process"].append(in_process)
                        samples[size]["service"].append(service)
                        samples[size]["engine_batch_images"].append(mean_batch)
                        logger.info(
                            "round %d, batch %d: in-process %.1f images/s, service %.1f "
                            "images/s (engine batches of %.0f images)",
                            round_index + 1,
                            size,
                            in_process,
                            service,
                            mean_batch,
                        )
        finally:
            serve.shutdown()
            ray.shutdown()

    per_batch = {}
    for size, values in samples.items():
        in_process = statistics.median(values["in_process"])
        service = statistics.median(values["service"])
        # Both sides of a round run back to back, so a per-round ratio cancels most of the
        # load from other processes. The headline is the median of these ratios.
        round_ratios = [
            service_round / in_process_round
            for service_round, in_process_round in zip(
                values["service"], values["in_process"], strict=True
            )
        ]
        per_batch[str(size)] = {
            "in_process_images_per_s": in_process,
            "service_images_per_s": service,
            "service_vs_inprocess": statistics.median(round_ratios),
            "round_ratios": round_ratios,
            "mean_engine_batch_images": statistics.median(values["engine_batch_images"]),
            "in_process_samples": values["in_process"],
            "service_samples": values["service"],
        }
    wire = wire_bytes(*batches[max(config.batch_sizes)], grid)
    return {
        "config": asdict(config),
        "machine": machine_info(),
        "teacher": {
            "arch": config.arch,
            "model_kwargs": model_kwargs,
            "grid_size": list(grid.grid_size),
            "keep_count": keep_count,
            "macs_per_image_kept": engine.macs_per_image(keep_count),
            "macs_per_image_full": engine.full_macs_per_image,
        },
        "threads": threads,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "per_batch_size": per_batch,
        "service_vs_inprocess": {
            size: values["service_vs_inprocess"] for size, values in per_batch.items()
        },
        "wire_bytes": wire,
        "wire_bytes_half_vs_full": wire["ratio"],
    }


def markdown_section(results: dict[str, Any]) -> str:
    """Render the results as the service section of RESULTS.md."""
    config = results["config"]
    machine = results["machine"]
    teacher = results["teacher"]
    wire = results["wire_bytes"]
    lines = [
        SECTION_START,
        "## Teacher service against the in-process engine",
        "",
        "```",
        f".venv/bin/python benchmarks/service.py --batch-sizes "
        f"{','.join(map(str, config['batch_sizes']))} --rounds {config['rounds']}",
        "```",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores shared with other jobs, "
        f"torch {machine['torch']}, Ray {machine['ray']}, CPU only, {results['threads']} "
        "torch threads on both sides.",
        "",
        f"Teacher: {teacher['arch']} with random weights at {config['img_size']}x"
        f"{config['img_size']} px, patch {config['patch_size']} "
        f"({teacher['grid_size'][0]}x{teacher['grid_size'][1]} grid), {teacher['keep_count']} "
        f"patches kept per image, {teacher['macs_per_image_kept'] / 1e9:.2f} GMACs per image "
        f"({teacher['macs_per_image_full'] / 1e9:.2f} with every patch), so a request spends "
        "seconds in the engine against tens of kilobytes on the wire.",
        "",
        f"Service: one replica, {config['client_threads']} client threads in flight, batches "
        f"of up to {config['max_batch_images']} images, {config['batch_wait_ms']:g} ms batch "
        f"wait, HTTP on 127.0.0.1. Median of {config['rounds']} rounds of "
        f"{config['batches_per_round']} batches each.",
        "",
        "The ratio column is the median over rounds of service / in-process within a round, "
        "which cancels most of the load drift between rounds. The range column shows its "
        "spread. The images/s columns are medians over rounds. "
        f"Load average (1 min) was {results['load_average_1min']['start']:.1f} at the start "
        f"and {results['load_average_1min']['end']:.1f} at the end.",
        "",
        *_load_warning(results),
        "| batch size | in-process (images/s) | service (images/s) | service / in-process "
        "| per-round range | mean engine batch (images) |",
        "|---|---|---|---|---|---|",
    ]
    for size, values in results["per_batch_size"].items():
        low, high = min(values["round_ratios"]), max(values["round_ratios"])
        lines.append(
            f"| {size} | {values['in_process_images_per_s']:.1f} "
            f"| {values['service_images_per_s']:.1f} | {values['service_vs_inprocess']:.2f} "
            f"| {low:.2f} to {high:.2f} | {values['mean_engine_batch_images']:.0f} |"
        )
    lines += [
        "",
        "The service merges the concurrent requests of its clients into one engine batch (last "
        "column), while the in-process engine runs each batch alone. So at batch sizes where "
        "a larger CPU batch is more efficient, the service can beat the in-process engine.",
        "",
        f"Request bytes per image: {wire['kept_patches_per_image']:.0f} with kept patches "
        f"only, {wire['whole_image_per_image']:.0f} with whole images "
        f"(ratio {wire['ratio']:.2f}).",
        "",
        "Target: service >= 0.9x in-process at batch 128.",
        SECTION_END,
    ]
    wrapped = [
        line if line.startswith(("|", "<!--", "```", ".venv")) else textwrap.fill(line, 92)
        for line in lines
    ]
    return "\n".join(wrapped) + "\n"


def _load_warning(results: dict[str, Any]) -> list[str]:
    load = results["load_average_1min"]
    cores = results["machine"]["cpu_count"] or 1
    if max(load["start"], load["end"]) <= cores:
        return []
    return [
        f"Other jobs kept this {cores}-core machine oversubscribed during the run (load "
        "average above the core count), so single rounds vary widely, as the range column "
        "shows. Treat the ratios as rough.",
        "",
    ]


def main() -> None:
    """Run the benchmark, write the JSON file and the markdown section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    render_only, config = parse_args()
    out = Path(config.out)
    if render_only:
        results = json.loads(out.read_text())
    else:
        results = run(config)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    section = markdown_section(results)
    replace_section(Path(config.results_md), section, SECTION_START, SECTION_END)
    print(section)


if __name__ == "__main__":
    main()
