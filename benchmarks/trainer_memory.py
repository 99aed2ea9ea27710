"""Peak memory of `maskedkd train` over 10k and 60k training images.

The trainer streams its shards, so one epoch over 60k images should peak at about the
same resident memory as one over 10k. Each run is a separate `maskedkd train` process (no
teacher, no evaluation, one full epoch of the split) measured with GNU time's maximum
resident set size.

Usage:
    python benchmarks/trainer_memory.py --data data/fashion-mnist --work-dir /tmp/trainer-memory

Writes `benchmarks/results/trainer_memory.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from student_trainer.data import count_samples

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STUDENT_ARGS = [
    "--student",
    "vit_tiny_patch16_224",
    "--patch-size",
    "4",
    "--embed-dim",
    "64",
    "--depth",
    "4",
    "--num-heads",
    "2",
]


def peak_rss_mib(data: str, split: str, out: Path, batch_size: int) -> float:
    """Train one epoch over `split` in a child process and return its peak RSS in MiB."""
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "pipelines.cli",
        "--log-level",
        "WARNING",
        "train",
        "--data",
        data,
        "--train-split",
        split,
        *STUDENT_ARGS,
        "--no-teacher",
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--no-progress",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"GNU time printed no peak RSS:\n{result.stderr[-2000:]}")
    return int(match.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shard folder from `maskedkd prepare`")
    parser.add_argument("--work-dir", required=True, help="scratch folder, emptied first")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "trainer_memory.json"), help="JSON results path"
    )
    args = parser.parse_args()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    runs: list[dict[str, Any]] = []
    for split in ("test", "train"):
        images = count_samples(args.data, split)
        rss = peak_rss_mib(args.data, split, work / split, args.batch_size)
        runs.append({"split": split, "images": images, "peak_rss_mib": round(rss, 1)})
    ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    command_args = {k: v for k, v in vars(args).items() if k != "out"}  # no machine paths
    results = {"command_args": command_args, "runs": runs, "peak_rss_60k_vs_10k": ratio}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| training images | peak RSS (MiB) |")
    print("|---|---|")
    for run in runs:
        print(f"| {run['images']} | {run['peak_rss_mib']:.0f} |")
    print(f"\npeak_rss_60k_vs_10k = {ratio:.3f}")


if __name__ == "__main__":
    main()
