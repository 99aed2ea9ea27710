"""Compare the Ray Data precompute job with a plain in-process loop over the same shards.

Both paths decode the same WebDataset shards, run the same teacher on whole images and end
with float16 logits in Parquet. The loop reads batches with `make_loader`, calls the engine
and writes one Parquet file at the end. The Ray Data job is `maskedkd precompute`, timed
from the start of its execution (after Ray itself has started), as the job reports it.

Usage:
    python benchmarks/precompute.py --teacher checkpoints/fashion_mnist_vit_teacher.safetensors \\
        --data data/fashion-mnist --split test --work-dir /tmp/precompute-bench

Writes `benchmarks/results/precompute.json` (with `ray_data_vs_loop` and the peak-memory
figures of `benchmarks/results/precompute_memory.json` when that file exists) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.precompute import PrecomputeConfig, run_precompute
from student_trainer.data import list_shards, make_loader
from teacher_service.engine import MaskedTeacher

logger = logging.getLogger("benchmarks.precompute")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_loop(teacher: str, data: str, split: str, batch_size: int, out: Path) -> dict[str, Any]:
    """Run the teacher over a split in this process and write its logits to one Parquet file."""
    engine = MaskedTeacher.from_source(teacher)
    started = time.perf_counter()
    keys: list[str] = []
    logits: list[np.ndarray] = []
    for images, _, batch_keys in make_loader(list_shards(data, split), batch_size, train=False):
        logits.append(engine.forward_images(images).to(torch.float16).numpy())
        keys.extend(batch_keys)
    values = np.concatenate(logits)  # [rows, num_classes]
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "logits": pa.FixedSizeListArray.from_arrays(
                pa.array(values.reshape(-1), pa.float16()), values.shape[1]
            ),
        }
    )
    pq.write_table(table, out)
    seconds = time.perf_counter() - started
    return {"rows": len(keys), "seconds": seconds, "images_per_s": len(keys) / seconds}


def run_ray_data(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run `maskedkd precompute` on a local Ray and return its rows and throughput."""
    summary = run_precompute(
        PrecomputeConfig(
            teacher=args.teacher,
            data=args.data,
            out=out,
            split=args.split,
            batch_size=args.batch_size,
            num_cpus=args.num_cpus,
            cpus_per_actor=args.cpus_per_actor,
            progress_interval_s=30.0,
        )
    )
    return {
        "rows": summary["rows_written"],
        "seconds": summary["job_s"],
        "images_per_s": summary["images_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint or timm name")
    parser.add_argument("--data", required=True, help="shard folder from `maskedkd prepare`")
    parser.add_argument("--split", default="test", help="split to read (default: test)")
    parser.add_argument("--work-dir", required=True, help="scratch folder, emptied first")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward")
    parser.add_argument("--num-cpus", type=int, default=3, help="logical CPUs of the local Ray")
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=2.0,
        help="CPUs (and torch threads) of the teacher actor; the loop uses torch's default",
    )
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "precompute.json"), help="JSON results path"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    loop = run_loop(args.teacher, args.data, args.split, args.batch_size, work / "loop.parquet")
    ray_data = run_ray_data(args, work / "ray")
    results: dict[str, Any] = {
        # Stored without the output path, which is specific to the machine.
        "command_args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "loop": loop,
        "ray_data": ray_data,
        "ray_data_vs_loop": ray_data["images_per_s"] / loop["images_per_s"],
    }
    memory_path = RESULTS_DIR / "precompute_memory.json"
    if memory_path.is_file():
        memory = json.loads(memory_path.read_text())
        results["peak_rss_mib"] = {
            str(run["images"]): run["peak_rss_sum_mib"] for run in memory["runs"]
        }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| path | images | seconds | images/s |")
    print("|---|---|---|---|")
    for name in ("loop", "ray_data"):
        row = results[name]
        print(f"| {name} | {row['rows']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} |")
    print(f"\nray_data_vs_loop = {results['ray_data_vs_loop']:.2f}")


if __name__ == "__main__":
    main()
