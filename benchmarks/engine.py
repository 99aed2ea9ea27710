"""Measure masked-teacher throughput against the kept-patch ratio.

For each model (random weights, batch of random uint8 images) this times one batch forward
of plain timm `model(x)` on pre-normalised images, the engine with every patch kept, and
the engine at each kept ratio. The configurations are interleaved within every repeat, so
a slowdown from other processes on the machine hits all of them alike, and the median
over repeats is reported.

Writes a JSON file and a PNG plot beside it, and prints a markdown table:

    .venv/bin/python benchmarks/engine.py --device cpu --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from teacher_service.checkpoint import load_teacher
from teacher_service.engine import MaskedTeacher

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("vit_small_patch16_224", "deit_base_patch16_224")
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.25)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMM_CONFIG = "timm"


@dataclass
class BenchmarkConfig:
    """Settings of one benchmark run.

    Attributes:
        models: timm model names, built with random weights.
        ratios: Kept-patch ratios; 1.0 runs the engine with keep=None (every patch).
        device: Torch device to run on.
        dtype: "float32", or an autocast dtype on CUDA ("bfloat16", "float16").
        batch_size: Images per forward.
        repeats: Timed forwards per configuration. The median is the headline number, and
            the fastest is stored too.
        warmup: Untimed forwards per configuration before timing.
        threads: CPU threads for torch, or 0 for torch's default.
        out: Path of the JSON results; the PNG goes beside it.
        seed: Seed of the random images and kept-patch choices.
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 32
    repeats: int = 5
    warmup: int = 1
    threads: int = 0
    out: str = "benchmarks/results/engine.json"
    seed: int = 0


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser, with `BenchmarkConfig` defaults."""
    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(defaults.models),
        help="comma-separated timm model names, built with random weights (default: %(default)s)",
    )
    parser.add_argument(
        "--ratios",
        default=",".join(str(ratio) for ratio in defaults.ratios),
        help="comma-separated kept-patch ratios in (0, 1]; 1.0 is always added "
        "(default: %(default)s)",
    )
    parser.add_argument("--device", default=defaults.device, help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=defaults.dtype,
        help="compute dtype; bfloat16 and float16 use autocast and need CUDA (default: float32)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="images per forward (default: 32)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="timed forwards per configuration, median reported (default: 5)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="untimed forwards per configuration before timing (default: 1)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads, 0 for torch's default"
    )
    parser.add_argument(
        "--out", default=defaults.out, help="JSON results path; the PNG is written beside it"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> BenchmarkConfig:
    """Parse the command line into a `BenchmarkConfig`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ratios = [float(ratio) for ratio in args.ratios.split(",")]
    if any(not 0.0 < ratio <= 1.0 for ratio in ratios):
        parser.error(f"--ratios {args.ratios!r} must all be in (0, 1]")
    if 1.0 not in ratios:
        # Every speedup is relative to keep-all, so it is always measured.
        ratios.insert(0, 1.0)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be at least 1, --warmup at least 0")
    return BenchmarkConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        ratios=ratios,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        out=args.out,
    )


def machine_info() -> dict[str, Any]:
    """Describe the CPU (and GPU, if used) the numbers come from."""
    cpu_model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu_model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        logger.warning("lscpu failed; reporting the CPU as %s", cpu_model)
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def benchmark_model(name: str, config: BenchmarkConfig) -> dict[str, Any]:
    """Time plain timm and the engine at every kept ratio for one model."""
    device = torch.device(config.device)
    model, spec = load_teacher(name, random_init=True, device=device)
    engine = MaskedTeacher(model, spec, device=device, amp_dtype=DTYPES[config.dtype])
    generator = torch.Generator().manual_seed(config.seed)
    batch_size, num_patches = config.batch_size, engine.num_patches
    images = torch.randint(
        0, 256, (batch_size, spec.in_chans, *spec.img_size), dtype=torch.uint8, generator=generator
    ).to(device)

    # Plain timm gets images already normalised, so its time excludes that step.
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    normalised = (images.float() / 255.0 - mean) / std

    runs: dict[str, Any] = {TIMM_CONFIG: lambda: _timm_forward(engine, normalised)}
    keep_counts: dict[str, int] = {}
    for ratio in config.ratios:
        keep_count = max(1, round(ratio * num_patches))
        keep_counts[str(ratio)] = keep_count
        if keep_count == num_patches:
            runs[str(ratio)] = lambda: engine.forward_images(images)
            continue
        order = torch.argsort(torch.rand(batch_size, num_patches, generator=generator), dim=1)
        keep = order[:, :keep_count].to(device)  # [B, K], random patches per image
        runs[str(ratio)] = lambda keep=keep: engine.forward_images(images, keep)

    seconds = _time_interleaved(runs, config, device)
    images_per_s = {key: batch_size / statistics.median(values) for key, values in seconds.items()}
    best_images_per_s = {key: batch_size / min(values) for key, values in seconds.items()}
    macs = {key: engine.macs_per_image(count) for key, count in keep_counts.items()}
    return {
        "num_patches": num_patches,
        "keep_counts": keep_counts,
        "images_per_s": images_per_s,
        "best_images_per_s": best_images_per_s,
        "batch_seconds": seconds,
        "macs_per_image": macs,
        "full_macs_per_image": engine.full_macs_per_image,
    }


def _timm_forward(engine: MaskedTeacher, normalised: torch.Tensor) -> torch.Tensor:
    autocast = (
        torch.autocast(device_type=engine.device.type, dtype=engine.amp_dtype)
        if engine.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        return engine.model(normalised)


def _time_interleaved(
    runs: dict[str, Any], config: BenchmarkConfig, device: torch.device
) -> dict[str, list[float]]:
    """Run every configuration once per repeat, rotating the order between repeats."""
    for _ in range(config.warmup):
        for run in runs.values():
            run()
    _synchronize(device)
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for repeat in range(config.repeats):
        shift = repeat % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            runs[key]()
            _synchronize(device)
            seconds[key].append(time.perf_counter() - start)
        logger.info("repeat %d/%d done", repeat + 1, config.repeats)
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(results: dict[str, dict[str, Any]], config: BenchmarkConfig) -> dict[str, Any]:
    """Add the headline ratios to the per-model results."""
    speedup_at_half: dict[str, float | None] = {}
    keep_all_vs_timm: dict[str, float | None] = {}
    for name, result in results.items():
        rates = result["images_per_s"]
        full = rates["1.0"]
        half = rates.get("0.5")
        speedup_at_half[name] = half / full if half else None
        keep_all_vs_timm[name] = full / rates[TIMM_CONFIG]
        result["speedup_vs_keep_all"] = {
            key: rate / full for key, rate in rates.items() if key != TIMM_CONFIG
        }
        result["mac_ratio_vs_keep_all"] = {
            key: macs / result["full_macs_per_image"]
            for key, macs in result["macs_per_image"].items()
        }
    return {
        "speedup_at_half_kept": speedup_at_half,
        "keep_all_vs_timm": keep_all_vs_timm,
        "settings": asdict(config),
        "machine": machine_info(),
        "models": results,
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """Format the results as a markdown table."""
    lines = [
        "| model | run | kept patches | images/s | vs engine keep-all | MACs vs keep-all |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in summary["models"].items():
        rates = result["images_per_s"]
        num_patches = result["num_patches"]
        lines.append(
            f"| {name} | plain timm `model(x)` | {num_patches} | {rates[TIMM_CONFIG]:.1f} | "
            f"{_ratio(rates[TIMM_CONFIG], rates.get('1.0'))} | 1.00 |"
        )
        for key, count in result["keep_counts"].items():
            lines.append(
                f"| {name} | engine, kept ratio {key} | {count} | {rates[key]:.1f} | "
                f"{_ratio(rates[key], rates.get('1.0'))} | "
                f"{result['mac_ratio_vs_keep_all'][key]:.2f} |"
            )
    return "\n".join(lines)


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "n/a"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Plot throughput and speedup against the kept ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, result in summary["models"].items():
        ratios = [float(key) for key in result["keep_counts"]]
        rates = [result["images_per_s"][key] for key in result["keep_counts"]]
        (line,) = left.plot(ratios, rates, marker="o", label=f"{name} (engine)")
        left.axhline(
            result["images_per_s"][TIMM_CONFIG],
            color=line.get_color(),
            linestyle=":",
            label=f"{name} (plain timm)",
        )
        speedups = [result["speedup_vs_keep_all"][key] for key in result["keep_counts"]]
        mac_speedups = [1.0 / result["mac_ratio_vs_keep_all"][key] for key in result["keep_counts"]]
        right.plot(ratios, speedups, marker="o", color=line.get_color(), label=f"{name} measured")
        right.plot(
            ratios,
            mac_speedups,
            linestyle="--",
            color=line.get_color(),
            label=f"{name} 1 / MAC ratio",
        )
    settings = summary["settings"]
    left.set_title(f"throughput, batch {settings['batch_size']}, {settings['device']}")
    left.set_xlabel("kept patch ratio")
    left.set_ylabel("images/s")
    left.set_yscale("log")
    left.legend(fontsize=7)
    right.set_title("speedup over keep-all")
    right.set_xlabel("kept patch ratio")
    right.set_ylabel("speedup (x)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write JSON and PNG, print the markdown table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    results = {}
    for name in config.models:
        logger.info("benchmarking %s", name)
        results[name] = benchmark_model(name, config)
    summary = summarise(results, config)

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(markdown_table(summary))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
