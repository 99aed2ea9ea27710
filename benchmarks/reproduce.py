"""Reproduce MaskedKD's claim at small scale: student accuracy against teacher compute.

Trains the same student on Fashion-MNIST with the shipped teacher, the same recipe and budget,
in seven arms, several seeds each:

    no_teacher        labels only
    full_kd           the teacher gets every patch
    maskedkd_75/50/25 the teacher sees the patches with the student's highest CLS attention
    random_50         the teacher sees a random half of the patches
    student_mask_25   the student's own input loses a random 25% of its patches (timm's
                      patch dropout, training only) and the teacher sees every patch: the
                      control that masks the student instead of the teacher

Each run is a separate `maskedkd train` process with the teacher in that process (no network
in the measurement), one thread, so that `--parallel 2` uses both cores of a 2-core machine.
A finished run (its summary.json exists) is skipped, so a stopped study resumes by rerunning
the same command.

Usage:
    python benchmarks/reproduce.py run --data data/fashion-mnist --out runs/reproduce
    python benchmarks/reproduce.py summarise --runs runs/reproduce

`benchmarks/results/reproduction_runs/` keeps the metrics.jsonl, summary.json and wall.json of
the published study's runs (with repository-relative paths), so `summarise` with no options
rebuilds the published JSON and plots from them.

`summarise` reads every run's metrics.jsonl and writes
`benchmarks/results/reproduction.json` (per arm: keep_ratio, teacher_macs_per_image and the
per-seed top1 fractions), the accuracy-against-compute plot and the curriculum plot, and
prints the Markdown table of docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.demo import STUDENT_ARGS as DEMO_STUDENT_ARGS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEACHER = "checkpoints/fashion_mnist_vit_teacher.safetensors"

STUDENT_ARGS = [
    *DEMO_STUDENT_ARGS,
    # The teacher's normalisation, given to every arm so that no-teacher runs match.
    "--student-mean",
    "0.286",
    "--student-std",
    "0.353",
]


@dataclass(frozen=True)
class Arm:
    """One configuration of the study.

    Attributes:
        name: folder and table name.
        keep_ratio: fraction of teacher patches kept (1.0 for full images, 0.0 without teacher).
        args: `maskedkd train` options that define the arm.
    """

    name: str
    keep_ratio: float
    args: tuple[str, ...]


def arms(teacher: str) -> list[Arm]:
    """Return the study's arms in table order."""
    with_teacher = ("--teacher", teacher)
    return [
        Arm("no_teacher", 0.0, ("--no-teacher",)),
        Arm("full_kd", 1.0, (*with_teacher, "--masking", "none")),
        Arm("maskedkd_75", 0.75, (*with_teacher, "--masking", "student", "--keep-ratio", "0.75")),
        Arm("maskedkd_50", 0.5, (*with_teacher, "--masking", "student", "--keep-ratio", "0.5")),
        Arm("maskedkd_25", 0.25, (*with_teacher, "--masking", "student", "--keep-ratio", "0.25")),
        Arm("random_50", 0.5, (*with_teacher, "--masking", "random", "--keep-ratio", "0.5")),
        Arm(
            "student_mask_25",
            1.0,
            (
                *with_teacher,
                "--masking",
                "none",
                "--student-kwargs",
                json.dumps({"patch_drop_rate": 0.25}),
            ),
        ),
    ]


def run_command(arm: Arm, seed: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """Return the `maskedkd train` command line of one run."""
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "--log-level",
        "WARNING",
        "train",
        "--data",
        args.data,
        "--val-data",
        args.data,
        *STUDENT_ARGS,
        *arm.args,
        "--epochs",
        str(args.epochs),
        "--steps-per-epoch",
        str(args.steps_per_epoch),
        "--batch-size",
        str(args.batch_size),
        "--log-every",
        str(args.log_every),
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(run_dir),
    ]


def run_study(args: argparse.Namespace) -> None:
    """Train every (arm, seed) pair that has no summary yet, `--parallel` at a time."""
    selected = [arm for arm in arms(args.teacher) if not args.arms or arm.name in args.arms]
    unknown = set(args.arms or ()) - {arm.name for arm in arms(args.teacher)}
    if unknown:
        names = ", ".join(arm.name for arm in arms(args.teacher))
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose from {names}")
    # Seed-major order, so that a study cut short still has every arm at the first seeds.
    queue = [(arm, seed) for seed in args.seeds for arm in selected]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running: list[tuple[subprocess.Popen[bytes], Path, float]] = []
    failed: list[str] = []
    while queue or running:
        while queue and len(running) < args.parallel:
            arm, seed = queue.pop(0)
            run_dir = Path(args.out) / arm.name / f"seed{seed}"
            if (run_dir / "summary.json").is_file():
                continue
            if run_dir.exists():
                # A run killed before its end restarts from scratch, so its metrics are whole.
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "wb")  # noqa: SIM115 (closed with the process)
            command = run_command(arm, seed, args, run_dir)
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment
            )
            log.close()
            running.append((process, run_dir, time.perf_counter()))
            print(f"started {arm.name} seed {seed}", flush=True)
        time.sleep(1.0)
        for entry in list(running):
            process, run_dir, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            wall_s = time.perf_counter() - started
            if process.returncode != 0:
                failed.append(str(run_dir))
                print(f"FAILED {run_dir} (exit {process.returncode}); see train.log", flush=True)
                continue
            (run_dir / "wall.json").write_text(json.dumps({"wall_s": wall_s}) + "\n")
            print(f"finished {run_dir} in {wall_s:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read every record of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """Return one finished run's top-1, teacher cost, times and teacher top-1 per step."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    end = next(r for r in records if r["kind"] == "end")
    wall_path = run_dir / "wall.json"
    wall_s = json.loads(wall_path.read_text())["wall_s"] if wall_path.is_file() else None
    steps = [r for r in records if r["kind"] == "step"]
    return {
        "top1": end["final_val_top1"],
        "images_seen": end["images_seen"],
        "teacher_macs": end["teacher_macs_spent"],
        "teacher_macs_per_image": end["teacher_macs_spent"] / end["images_seen"],
        "train_s": end["train_time_s"],
        "wall_s": wall_s,
        "teacher_top1_by_step": [
            [r["step"], r["teacher_top1"]] for r in steps if r.get("teacher_top1") is not None
        ],
    }


def summarise(args: argparse.Namespace) -> dict[str, Any]:
    """Collect every finished run under `args.runs` into the study's JSON and plots."""
    runs_root = Path(args.runs)
    repository = RESULTS_DIR.parent.parent
    inside = runs_root.resolve().is_relative_to(repository)
    label = runs_root.resolve().relative_to(repository) if inside else runs_root
    result: dict[str, Any] = {"runs": str(label), "arms": {}}
    for arm in arms(TEACHER):
        seed_dirs = sorted(
            (d for d in (runs_root / arm.name).glob("seed*") if (d / "summary.json").is_file()),
            key=lambda d: int(d.name.removeprefix("seed")),
        )
        if not seed_dirs:
            continue
        runs = [summarise_run(d) for d in seed_dirs]
        top1 = [r["top1"] for r in runs]
        walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
        result["arms"][arm.name] = {
            "keep_ratio": arm.keep_ratio,
            "seeds": [int(d.name.removeprefix("seed")) for d in seed_dirs],
            "top1": top1,
            "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "teacher_macs_per_image": statistics.fmean(r["teacher_macs_per_image"] for r in runs),
            "teacher_macs_per_run": statistics.fmean(r["teacher_macs"] for r in runs),
            "images_per_run": runs[0]["images_seen"],
            "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
            "wall_s_mean": statistics.fmean(walls) if walls else None,
            "teacher_top1_by_step": _mean_curve([r["teacher_top1_by_step"] for r in runs]),
        }
    if not result["arms"]:
        raise SystemExit(f"no finished runs under {runs_root}; run the study first")
    json_path = Path(args.json)
    plots_dir = Path(args.plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    _plot_accuracy(result, plots_dir / "reproduction_accuracy.png")
    _plot_curriculum(result, plots_dir / "reproduction_curriculum.png")
    print(markdown_table(result))
    print(f"\nwrote {json_path} and the plots in {plots_dir}")
    return result


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """Average per-step values over seeds, at the steps every seed logged."""
    if not curves or not all(curves):
        return []
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(int(step), []).append(float(value))
    return [[s, statistics.fmean(v)] for s, v in sorted(by_step.items()) if len(v) == len(curves)]


def markdown_table(result: dict[str, Any]) -> str:
    """Return the study's table in Markdown."""
    lines = [
        "| arm | teacher patches kept | teacher MMACs/image | teacher TMACs/run "
        "| student top-1 (mean ± std) | seeds | train s/run | wall s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        kept = "none" if arm["keep_ratio"] == 0 else f"{arm['keep_ratio']:.0%}"
        wall = "n/a" if arm["wall_s_mean"] is None else f"{arm['wall_s_mean']:.0f}"
        lines.append(
            f"| {name} | {kept} | {arm['teacher_macs_per_image'] / 1e6:.2f} "
            f"| {arm['teacher_macs_per_run'] / 1e12:.2f} "
            f"| {100 * arm['top1_mean']:.2f} ± {100 * arm['top1_std']:.2f} "
            f"| {len(arm['seeds'])} | {arm['train_s_mean']:.0f} | {wall} |"
        )
    return "\n".join(lines)


def _plot_accuracy(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (name, arm) in enumerate(result["arms"].items()):
        axes.errorbar(
            arm["teacher_macs_per_run"] / 1e12,
            100 * arm["top1_mean"],
            yerr=100 * arm["top1_std"],
            fmt="o",
            capsize=4,
            color=f"C{index}",
            label=name,
        )
    axes.set(
        xlabel="teacher compute per run (TMACs)",
        ylabel="student top-1 (%)",
        title="Fashion-MNIST student accuracy against teacher compute",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_curriculum(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    # The same colour per arm as in the accuracy plot; full_kd and student_mask_25 coincide
    # because both show the teacher every patch.
    for index, (name, arm) in enumerate(result["arms"].items()):
        curve = arm["teacher_top1_by_step"]
        if curve:
            steps = [step for step, _ in curve]
            values = [100 * value for _, value in curve]
            axes.plot(steps, values, color=f"C{index}", label=name)
    axes.set(
        xlabel="training step",
        ylabel="teacher top-1 on its input (%)",
        title="Teacher accuracy on the patches it was given (mean over seeds)",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every arm and seed that has not finished")
    run.add_argument("--data", required=True, help="Fashion-MNIST shard folder")
    run.add_argument("--teacher", default=TEACHER, help="teacher checkpoint (default: %(default)s)")
    run.add_argument("--out", default="runs/reproduce", help="study folder (default: %(default)s)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    run.add_argument("--arms", nargs="+", help="arm names to run (default: all)")
    run.add_argument("--epochs", type=int, default=5, help="default: %(default)s")
    run.add_argument("--steps-per-epoch", type=int, default=100, help="default: %(default)s")
    run.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    run.add_argument("--log-every", type=int, default=20, help="default: %(default)s")
    run.add_argument("--parallel", type=int, default=2, help="runs at once (default: 2)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    summary = commands.add_parser("summarise", help="collect finished runs into JSON and plots")
    summary.add_argument(
        "--runs",
        default=str(RESULTS_DIR / "reproduction_runs"),
        help="study folder (default: benchmarks/results/reproduction_runs, the committed runs)",
    )
    summary.add_argument(
        "--json",
        default=str(RESULTS_DIR / "reproduction.json"),
        help="output JSON (default: benchmarks/results/reproduction.json)",
    )
    summary.add_argument(
        "--plots-dir",
        default=str(RESULTS_DIR),
        help="folder of the two PNG plots (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        for name in ("epochs", "steps_per_epoch", "batch_size", "parallel", "threads"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        run_study(args)
    else:
        summarise(args)


if __name__ == "__main__":
    main()
