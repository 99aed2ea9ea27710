"""Student training speed on 1 and 2 Ray Train workers, against a plain single-process run.

Each run trains the demo student (timm ViT, width 64, 4 blocks, 2 heads) on Fashion-MNIST
shards for `--steps` optimizer steps at `--batch-size` images per worker. It runs with no
teacher and no evaluation, so the numbers show the training loop and its data-parallel
overhead alone. Speeds come from the metrics.jsonl step lines after the first `--warmup-steps`
steps, so Ray start-up, worker start-up and the first batches are not counted. Images per
second count the images of every worker.

On a CPU-only machine each Ray Train worker runs torch on one thread (Ray sets
OMP_NUM_THREADS to the worker's one CPU), so the plain run here also uses one thread.

Usage:
    python benchmarks/train_workers.py --data data/fashion-mnist --work-dir /tmp/train-workers
    python benchmarks/train_workers.py --data /shared/fashion-mnist --work-dir /shared/bench \\
        --use-gpu --address auto --workers 1 2 4 8

Writes `benchmarks/results/train_workers.json` (or `--results`) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from student_trainer.config import TrainConfig
from student_trainer.metrics import read_metrics
from student_trainer.train import train

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "train_workers.json"
STUDENT_KWARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
# Fashion-MNIST's pixel statistics on the [0, 1] scale, so no run estimates them first.
FASHION_MNIST_MEAN = (0.286,)
FASHION_MNIST_STD = (0.353,)


def run_once(args: argparse.Namespace, num_workers: int | None) -> dict[str, Any]:
    """Train one run and return its speed; `num_workers` None is the plain run."""
    label = "plain" if num_workers is None else f"ray_train_{num_workers}"
    out = Path(args.work_dir) / label
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        data=args.data,
        out=str(out),
        student_kwargs=dict(STUDENT_KWARGS),
        student_mean=FASHION_MNIST_MEAN,
        student_std=FASHION_MNIST_STD,
        no_teacher=True,
        batch_size=args.batch_size,
        epochs=1,
        warmup_epochs=0,
        max_steps=args.steps,
        log_every=args.log_every,
        device="cuda" if args.use_gpu and num_workers is None else "cpu",
        progress=False,
        num_workers=num_workers,
        use_gpu=args.use_gpu and num_workers is not None,
        address=args.address if num_workers is not None else None,
    )
    summary = train(config)

    # Time only the step lines after the warm-up steps.
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    timed = [r for r in steps if r["step"] > args.warmup_steps]
    if not timed:
        raise ValueError(
            f"no step lines after step {args.warmup_steps}; raise --steps above --warmup-steps"
        )
    seconds = sum(r["interval_s"] for r in timed)
    timed_steps = timed[-1]["step"] - args.warmup_steps
    images = timed[-1]["images_seen"] - _images_at(steps, args.warmup_steps)

    return {
        "run": label,
        "workers": num_workers or 1,
        "ray_train": num_workers is not None,
        "batch_size_per_worker": args.batch_size,
        "effective_batch_size": args.batch_size * (num_workers or 1),
        "steps": summary["steps"],
        "timed_steps": timed_steps,
        "timed_s": seconds,
        "steps_per_s": timed_steps / seconds,
        "img_per_s": images / seconds,
    }


def _images_at(steps: list[dict[str, Any]], step: int) -> int:
    for record in steps:
        if record["step"] == step:
            return int(record["images_seen"])
    raise ValueError(f"no step line at step {step}; make --warmup-steps a multiple of --log-every")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/fashion-mnist", help="prepared shard folder")
    parser.add_argument("--work-dir", required=True, help="folder for the runs' outputs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps left untimed")
    parser.add_argument("--log-every", type=int, default=10, help="steps per metrics line")
    parser.add_argument("--batch-size", type=int, default=128, help="images per worker")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--address", help="Ray cluster address; default: a local Ray")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain run")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="output JSON file")
    parser.add_argument("--note", default="", help="text stored with the results, e.g. the load")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.warmup_steps % args.log_every:
        parser.error("--warmup-steps must be a multiple of --log-every")

    import ray

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    if not args.use_gpu:
        torch.set_num_threads(1)  # the plain run gets one core, as each CPU worker does
    runs = [] if args.no_plain else [run_once(args, None)]
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        runs += [run_once(args, workers) for workers in args.workers]
    finally:
        ray.shutdown()

    results = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min_end": os.getloadavg()[0],
        },
        "note": args.note,
        "settings": {
            "student": STUDENT_KWARGS,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "use_gpu": args.use_gpu,
            "address": args.address,
        },
        "runs": runs,
    }
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    print("| run | workers | effective batch | steps/s | images/s |")
    print("|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run['run']} | {run['workers']} | {run['effective_batch_size']} | "
            f"{run['steps_per_s']:.2f} | {run['img_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
