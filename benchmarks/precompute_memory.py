"""Measure the peak memory of `maskedkd precompute` on dataset splits of different sizes.

Each split runs as a fresh `maskedkd precompute` process that starts its own local Ray.
With a local Ray, every Ray process descends from that command: the driver starts the GCS
server and the raylet, and the raylet starts the workers, actors and agents. A sampler
thread walks that process tree every `--sample-interval-s` seconds and sums:

- RSS (resident set size) of every process. Pages that several processes map, such as the
  Ray object store in /dev/shm and shared libraries, count once per process, so this sum
  overstates the machine's memory use.
- PSS (proportional set size), which splits each shared page among the processes that map
  it. Processes outside the job count too: when other programs on the machine map the same
  libraries (torch), the job's PSS falls, so on a shared machine PSS moves with them.
- USS (unique set size): pages that only one process maps. The sum is a lower bound, because
  it leaves out pages that the job's processes share with each other, such as the object
  store.

The peak of each sum over the run is the job's peak memory. A streaming job has about the
same peak for a small and a large split. The script writes a JSON file and prints a
markdown table:

    .venv/bin/python benchmarks/precompute_memory.py --teacher TEACHER.safetensors \
        --data SHARD_FOLDER --splits test train --work-dir /tmp/precompute-memory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class MemoryBenchmarkConfig:
    """Settings of one benchmark run.

    Attributes:
        teacher: teacher checkpoint passed to `maskedkd precompute --teacher`.
        data: shard folder written by `maskedkd prepare`.
        splits: splits to run, one fresh job each.
        work_dir: scratch folder for the jobs' outputs; emptied before each job.
        out: path of the JSON results.
        batch_size: images per teacher forward.
        rows_per_part: minimum rows per Parquet part file.
        num_cpus: CPUs of each job's local Ray; None uses all.
        sample_interval_s: seconds between process-tree samples.
        extra_args: further arguments for `maskedkd precompute`.
    """

    teacher: str
    data: str
    splits: list[str]
    work_dir: Path
    out: Path
    batch_size: int = 256
    rows_per_part: int = 8192
    num_cpus: int | None = None
    sample_interval_s: float = 0.5
    extra_args: list[str] = field(default_factory=list)


@dataclass
class TreeSample:
    """Memory of a process tree at one moment, in bytes.

    Attributes:
        rss_bytes: summed RSS.
        pss_bytes: summed PSS.
        uss_bytes: summed USS.
        processes: processes read.
        by_process: (name, RSS MiB, PSS MiB, USS MiB) of each process, largest RSS first.
    """

    rss_bytes: int
    pss_bytes: int
    uss_bytes: int
    processes: int
    by_process: list[tuple[str, float, float, float]] = field(default_factory=list)


class TreeSampler:
    """Sample the summed RSS and PSS of a process and its descendants in a thread.

    Reads Linux's /proc: parent ids from `/proc/PID/stat`, RSS from `/proc/PID/status`
    and PSS from `/proc/PID/smaps_rollup`.

    Args:
        root_pid: process id of the tree's root.
        interval_s: seconds between samples.
    """

    def __init__(self, root_pid: int, interval_s: float) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak_rss = TreeSample(rss_bytes=0, pss_bytes=0, uss_bytes=0, processes=0)
        self.peak_pss = TreeSample(rss_bytes=0, pss_bytes=0, uss_bytes=0, processes=0)
        self.peak_uss = TreeSample(rss_bytes=0, pss_bytes=0, uss_bytes=0, processes=0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            if sample.processes:
                self.samples += 1
                if sample.rss_bytes > self.peak_rss.rss_bytes:
                    self.peak_rss = sample
                if sample.pss_bytes > self.peak_pss.pss_bytes:
                    self.peak_pss = sample
                if sample.uss_bytes > self.peak_uss.uss_bytes:
                    self.peak_uss = sample
            self._stop.wait(self.interval_s)

    def sample(self) -> TreeSample:
        """Sum RSS and PSS over the tree now; processes that exit meanwhile are skipped."""
        by_process = []
        for pid in tree_pids(self.root_pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                rss_kib = _read_kib(f"/proc/{pid}/status", "VmRSS:")
                rollup = f"/proc/{pid}/smaps_rollup"
                pss_kib = _read_kib(rollup, "Pss:")
                uss_kib = _read_kib(rollup, "Private_Clean:") + _read_kib(rollup, "Private_Dirty:")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            sizes_mib = (
                round(rss_kib / 1024, 1),
                round(pss_kib / 1024, 1),
                round(uss_kib / 1024, 1),
            )
            by_process.append((name, *sizes_mib))
        by_process.sort(key=lambda item: -item[1])
        return TreeSample(
            rss_bytes=int(sum(item[1] for item in by_process) * MIB),
            pss_bytes=int(sum(item[2] for item in by_process) * MIB),
            uss_bytes=int(sum(item[3] for item in by_process) * MIB),
            processes=len(by_process),
            by_process=by_process,
        )


def tree_pids(root_pid: int) -> list[int]:
    """Return `root_pid` and the ids of all its descendants (empty once it has exited)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name in parentheses may contain spaces, so split after the last ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    if not Path(f"/proc/{root_pid}").exists():
        return []
    pids = [root_pid]
    for pid in pids:
        pids.extend(children.get(pid, []))
    return pids


def _read_kib(path: str, field_name: str) -> int:
    """Return a "NAME: N kB" field of a /proc file in KiB (0 when the field is absent)."""
    with open(path, encoding="ascii") as stream:
        for line in stream:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


def run_split(config: MemoryBenchmarkConfig, split: str) -> dict[str, Any]:
    """Run one precompute job on a split while sampling its memory; return its record."""
    out = config.work_dir / f"logits-{split}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "precompute",
        "--teacher",
        config.teacher,
        "--data",
        config.data,
        "--split",
        split,
        "--out",
        str(out),
        "--batch-size",
        str(config.batch_size),
        "--rows-per-part",
        str(config.rows_per_part),
        *(["--num-cpus", str(config.num_cpus)] if config.num_cpus else []),
        *config.extra_args,
    ]

    env = dict(os.environ)
    # The local Ray may need long to start on a busy machine.
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    logger.info("running %s", " ".join(command))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    with TreeSampler(process.pid, config.sample_interval_s) as sampler:
        stdout, _ = process.communicate()
    wall_s = time.perf_counter() - started

    if process.returncode != 0:
        raise RuntimeError(
            f"precompute on split {split!r} failed with exit status {process.returncode}"
        )
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "split": split,
        "images": summary["rows"],
        "peak_rss_sum_mib": round(sampler.peak_rss.rss_bytes / MIB, 1),
        "processes_at_rss_peak": sampler.peak_rss.processes,
        "peak_pss_sum_mib": round(sampler.peak_pss.pss_bytes / MIB, 1),
        "processes_at_pss_peak": sampler.peak_pss.processes,
        "peak_uss_sum_mib": round(sampler.peak_uss.uss_bytes / MIB, 1),
        "rss_peak_by_process": sampler.peak_rss.by_process,
        "pss_peak_by_process": sampler.peak_pss.by_process,
        "uss_peak_by_process": sampler.peak_uss.by_process,
        "samples": sampler.samples,
        "wall_s": round(wall_s, 1),
        "job_s": summary["job_s"],
        "images_per_s": round(summary["images_per_s"], 1),
        "teacher_macs_spent": summary["teacher_macs_spent"],
    }


def run_benchmark(config: MemoryBenchmarkConfig) -> dict[str, Any]:
    """Run every split and write the JSON results."""
    config.work_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_split(config, split) for split in config.splits]
    smallest = min(runs, key=lambda run: run["images"])
    largest = max(runs, key=lambda run: run["images"])
    results = {
        # Scratch and output paths are left out: they describe this machine, not the run.
        "config": {
            name: value for name, value in asdict(config).items() if name not in ("work_dir", "out")
        },
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(_read_kib("/proc/meminfo", "MemTotal:") / 1024**2, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": runs,
        "peak_rss_ratio_largest_vs_smallest": round(
            largest["peak_rss_sum_mib"] / smallest["peak_rss_sum_mib"], 3
        ),
        "peak_pss_ratio_largest_vs_smallest": round(
            largest["peak_pss_sum_mib"] / smallest["peak_pss_sum_mib"], 3
        ),
        "peak_uss_ratio_largest_vs_smallest": round(
            largest["peak_uss_sum_mib"] / smallest["peak_uss_sum_mib"], 3
        ),
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def print_table(results: dict[str, Any]) -> None:
    print("| split | images | peak RSS sum | peak PSS sum | peak USS sum | processes | images/s |")
    print("|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        print(
            f"| {run['split']} | {run['images']} | {run['peak_rss_sum_mib']} MiB | "
            f"{run['peak_pss_sum_mib']} MiB | {run['peak_uss_sum_mib']} MiB | "
            f"{run['processes_at_rss_peak']} | {run['images_per_s']} |"
        )
    print(
        f"largest/smallest peak: RSS {results['peak_rss_ratio_largest_vs_smallest']}x, "
        f"PSS {results['peak_pss_ratio_largest_vs_smallest']}x, "
        f"USS {results['peak_uss_ratio_largest_vs_smallest']}x"
    )


def parse_args(argv: list[str] | None = None) -> MemoryBenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="shard folder from `maskedkd prepare`")
    parser.add_argument(
        "--splits", nargs="+", default=["test", "train"], help="splits to run, one job each"
    )
    parser.add_argument("--work-dir", required=True, help="scratch folder for job outputs")
    parser.add_argument(
        "--out",
        default="benchmarks/results/precompute_memory.json",
        help="JSON results path (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward")
    parser.add_argument("--rows-per-part", type=int, default=8192, help="rows per part file")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument(
        "--sample-interval-s", type=float, default=0.5, help="seconds between memory samples"
    )
    args, extra = parser.parse_known_args(argv)
    return MemoryBenchmarkConfig(
        teacher=args.teacher,
        data=args.data,
        splits=args.splits,
        work_dir=Path(args.work_dir),
        out=Path(args.out),
        batch_size=args.batch_size,
        rows_per_part=args.rows_per_part,
        num_cpus=args.num_cpus,
        sample_interval_s=args.sample_interval_s,
        extra_args=extra,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = parse_args(argv)
    print_table(run_benchmark(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
