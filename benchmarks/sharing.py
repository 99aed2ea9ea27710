"""Measure one teacher service shared by 1, 2 and 4 concurrent student trainers.

Starts one `maskedkd serve` with the shipped Fashion-MNIST teacher on 127.0.0.1, then for
each configuration starts real `maskedkd train` processes against it (the README's small
student, student-guided masking at half the patches):

- `runs_N`: N trainers at the same batch size, each with its own `--run-name`;
- `one_client_4x`: one trainer at 4 times that batch size, the reference for `runs_4`.

While trainers run, the script polls `GET /v1/runs` about once a second. Throughput is
measured over a window of `--window-s` seconds that starts once every trainer of the
configuration has received teacher logits: per run, the images the teacher served it in
that window over the window's length. Then the trainers get SIGTERM. The total is the sum
over runs. Jain's fairness index over the per-run rates is (sum x)^2 / (N * sum x^2): 1.0
when every run gets the same rate, 1/N when one run gets everything.

Writes a JSON file and replaces its own section of benchmarks/RESULTS.md:

    .venv/bin/python benchmarks/sharing.py --batch-size 64 --window-s 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from markdown_sections import replace_section

from pipelines.demo import STUDENT_ARGS

logger = logging.getLogger(__name__)

SECTION_START = "<!-- sharing benchmark: start -->"
SECTION_END = "<!-- sharing benchmark: end -->"


@dataclass
class SharingBenchmarkConfig:
    """Settings of one benchmark run.

    Attributes:
        teacher: teacher checkpoint that the service loads.
        data: training shards (a folder written by `maskedkd prepare`).
        batch_size: images per step of each trainer in `runs_N`.
        window_s: seconds of measurement per configuration, once every trainer is served.
        keep_ratio: fraction of teacher patches each student keeps.
        run_counts: the N of the `runs_N` configurations.
        trainer_threads: torch threads of each trainer process (OMP_NUM_THREADS), so that
            several trainers on a small machine do not oversubscribe its cores.
        service_threads: torch threads of the teacher replica (`serve --torch-threads`).
        poll_s: seconds between polls of GET /v1/runs.
        out: path of the JSON results.
        results_md: markdown file whose sharing section is replaced.
    """

    teacher: str = "checkpoints/fashion_mnist_vit_teacher.safetensors"
    data: str = "data/fashion-mnist"
    batch_size: int = 64
    window_s: float = 30.0
    keep_ratio: float = 0.5
    run_counts: tuple[int, ...] = (1, 2, 4)
    trainer_threads: int = 1
    service_threads: int = 1
    poll_s: float = 1.0
    out: str = "benchmarks/results/sharing.json"
    results_md: str = "benchmarks/RESULTS.md"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "--log-level", "WARNING", *args]


def start_service(config: SharingBenchmarkConfig, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `maskedkd serve` and return the process and its URL once /v1/ready is 200."""
    port = _free_port()
    command = _cli(
        "serve",
        "--teacher",
        config.teacher,
        "--port",
        str(port),
        "--torch-threads",
        str(config.service_threads),
    )
    log = open(log_path, "w")  # noqa: SIM115 (the child process writes it until stopped)
    process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"maskedkd serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/v1/ready", timeout=10.0).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    stop_process(process)
    raise RuntimeError(f"maskedkd serve was not ready after 600 s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    """Send SIGINT to the process group and wait, killing it after 120 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _served_images(url: str) -> dict[str, int]:
    report = httpx.get(f"{url}/v1/runs", timeout=30.0).json()
    return {run["run_id"]: int(run["lifetime"]["images"]) for run in report["runs"]}


def _start_trainers(
    config: SharingBenchmarkConfig, url: str, run_ids: list[str], batch_size: int, folder: Path
) -> list[tuple[subprocess.Popen, Any]]:
    processes = []
    for run_id in run_ids:
        command = _cli(
            "train",
            "--data", config.data,
            *STUDENT_ARGS,
            "--teacher-url", url,
            "--keep-ratio", str(config.keep_ratio),
            "--masking", "student",
            "--batch-size", str(batch_size),
            "--epochs", "1000",
            "--no-progress",
            "--out", str(folder / run_id),
            "--run-name", run_id,
        )  # fmt: skip
        log = open(folder / f"{run_id}.log", "w")  # noqa: SIM115 (closed with the process)
        environment = {**os.environ, "OMP_NUM_THREADS": str(config.trainer_threads)}
        process = subprocess.Popen(command, stdout=log, stderr=log, env=environment)
        processes.append((process, log))
    return processes


def run_configuration(
    config: SharingBenchmarkConfig,
    url: str,
    name: str,
    num_runs: int,
    batch_size: int,
    folder: Path,
) -> dict[str, Any]:
    """Run `num_runs` trainers at once and measure each one's teacher throughput.

    The window starts at the first poll where every trainer has been served and lasts
    `config.window_s` seconds, after which the trainers get SIGTERM (they checkpoint and
    stop).
    """
    run_ids = [f"{name}-run{index}" for index in range(num_runs)]
    processes = _start_trainers(config, url, run_ids, batch_size, folder)
    window_start: tuple[float, dict[str, int]] | None = None
    last: tuple[float, dict[str, int]] | None = None
    try:
        while True:
            if any(process.poll() is not None for process, _ in processes):
                raise RuntimeError(f"{name}: a trainer exited early; see the logs in {folder}")
            now_s = time.monotonic()
            served = _served_images(url)
            last = (now_s, served)
            if window_start is None and all(served.get(run_id, 0) > 0 for run_id in run_ids):
                window_start = last
            if window_start is not None and now_s - window_start[0] >= config.window_s:
                break
            time.sleep(config.poll_s)
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, log in processes:
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
    assert window_start is not None and last is not None

    end_s, end_served = last
    start_s, start_served = window_start
    window_s = end_s - start_s
    rates = {
        run_id: (end_served.get(run_id, 0) - start_served.get(run_id, 0)) / window_s
        for run_id in run_ids
    }
    total = sum(rates.values())
    squares = sum(rate * rate for rate in rates.values())
    jain = total * total / (num_runs * squares) if squares else 0.0
    logger.info("%s: %.1f images/s in all, Jain %.3f, %s", name, total, jain, rates)
    return {
        "runs": num_runs,
        "batch_size": batch_size,
        "window_s": window_s,
        "images_per_s_per_run": rates,
        "images_per_s_total": total,
        "jain_index": jain,
    }


def run_benchmark(config: SharingBenchmarkConfig) -> dict[str, Any]:
    """Start the service, run every configuration and return the results."""
    load_start = os.getloadavg()[0]
    results: dict[str, Any] = {
        "config": asdict(config),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
        },
        "configurations": {},
    }
    # Logs and run folders stay on failure, so the error can be read; removed on success.
    folder = Path(tempfile.mkdtemp(prefix="maskedkd-sharing-"))
    logger.info("trainer and service logs go to %s", folder)
    service, url = start_service(config, folder / "serve.log")
    try:
        for num_runs in config.run_counts:
            name = f"runs_{num_runs}"
            results["configurations"][name] = run_configuration(
                config, url, name, num_runs, config.batch_size, folder
            )
        results["configurations"]["one_client_4x"] = run_configuration(
            config,
            url,
            "one_client_4x",
            1,
            4 * config.batch_size,
            folder,
        )
    finally:
        stop_process(service)
    shutil.rmtree(folder, ignore_errors=True)
    configurations = results["configurations"]
    reference = configurations["one_client_4x"]["images_per_s_total"]
    if "runs_4" in configurations:
        results["total_4_runs_vs_one_client"] = (
            configurations["runs_4"]["images_per_s_total"] / reference
        )
        results["jain_4_runs"] = configurations["runs_4"]["jain_index"]
    results["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    return results


def render_section(results: dict[str, Any], command: str) -> str:
    """Render the results as the sharing section of RESULTS.md."""
    config = results["config"]
    rows = []
    for name, measured in results["configurations"].items():
        per_run = ", ".join(f"{rate:.0f}" for rate in measured["images_per_s_per_run"].values())
        rows.append(
            f"| {name} | {measured['runs']} | {measured['batch_size']} | "
            f"{measured['window_s']:.0f} | {per_run} | {measured['images_per_s_total']:.0f} | "
            f"{measured['jain_index']:.3f} |"
        )
    load = results["load_average_1min"]
    ratio = results.get("total_4_runs_vs_one_client")
    jain = results.get("jain_4_runs")
    lines = [
        SECTION_START,
        "## One teacher service shared by several student trainers",
        "",
        "Real `maskedkd train` processes (the README's student: width 64, 4 blocks, 2 heads; "
        f"student-guided masking at {config['keep_ratio']:g} of the patches) against one "
        "`maskedkd serve` with the shipped Fashion-MNIST teacher, one replica, on 127.0.0.1. "
        "Rates are teacher images per second per run, from `GET /v1/runs`, over a window of "
        f"{config['window_s']:g} s that starts once every trainer of the configuration has "
        "been served.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {results['machine']['cpu_count']} CPU cores, no GPU, shared with other "
        f"jobs (1-minute load average {load['start']:.1f} at the start and {load['end']:.1f} "
        "at the end). The trainers, the replica and Ray all share the two cores. Results: "
        "`results/sharing.json`.",
        "",
        "| configuration | runs | batch | window s | images/s per run | images/s total | Jain |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if ratio is not None and jain is not None:
        lines += [
            "Against the targets: total throughput of 4 runs over one client sending 4 times "
            f"the batch {ratio:.2f}x (target at least 0.9x, "
            f"{'met' if ratio >= 0.9 else 'missed'}); Jain's index over the 4 runs "
            f"{jain:.3f} (target at least 0.9, {'met' if jain >= 0.9 else 'missed'}).",
            "",
        ]
    lines.append(SECTION_END)
    wrapped = [
        line
        if line.startswith(("|", "<!--", "```", ".venv"))
        else textwrap.fill(line, 92, break_on_hyphens=False)
        for line in lines
    ]
    return "\n".join(wrapped) + "\n"


def parse_args(argv: list[str] | None = None) -> SharingBenchmarkConfig:
    """Parse the command line into a config."""
    defaults = SharingBenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=defaults.teacher, help="teacher checkpoint")
    parser.add_argument("--data", default=defaults.data, help="training shards folder")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per trainer step"
    )
    parser.add_argument(
        "--window-s",
        type=float,
        default=defaults.window_s,
        help="seconds measured per configuration once every trainer is served",
    )
    parser.add_argument(
        "--trainer-threads",
        type=int,
        default=defaults.trainer_threads,
        help="torch threads per trainer process (default: %(default)s)",
    )
    parser.add_argument(
        "--service-threads",
        type=int,
        default=defaults.service_threads,
        help="torch threads of the teacher replica (default: %(default)s)",
    )
    parser.add_argument("--out", default=defaults.out, help="JSON results file")
    parser.add_argument("--results-md", default=defaults.results_md, help="markdown to update")
    args = parser.parse_args(argv)
    if args.trainer_threads < 1 or args.service_threads < 1:
        parser.error(
            f"--trainer-threads and --service-threads must be at least 1, got "
            f"{args.trainer_threads} and {args.service_threads}"
        )
    if args.batch_size < 1 or not args.window_s > 0:
        parser.error(
            f"--batch-size must be at least 1 and --window-s positive, got "
            f"{args.batch_size} and {args.window_s}"
        )
    return SharingBenchmarkConfig(
        teacher=args.teacher,
        data=args.data,
        batch_size=args.batch_size,
        window_s=args.window_s,
        trainer_threads=args.trainer_threads,
        service_threads=args.service_threads,
        out=args.out,
        results_md=args.results_md,
    )


def main() -> None:
    """Run the benchmark, write the JSON file and the markdown section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    config = parse_args()
    results = run_benchmark(config)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    command = (
        f".venv/bin/python benchmarks/sharing.py --batch-size {config.batch_size} "
        f"--window-s {config.window_s:g} --trainer-threads {config.trainer_threads} "
        f"--service-threads {config.service_threads}"
    )
    section = render_section(results, command)
    replace_section(Path(config.results_md), section, SECTION_START, SECTION_END)
    logger.info("wrote %s and %s", out, config.results_md)


if __name__ == "__main__":
    main()
