"""The end-to-end demo: a shared teacher service and three students on Fashion-MNIST.

`maskedkd demo` prepares the shards and starts `maskedkd serve` with the shipped teacher
as a separate process on 127.0.0.1. It then trains the same student three ways with the
same seed and budget: no teacher, full-image KD, and MaskedKD keeping half the patches,
the two KD runs through the service URL. Finally it stops the service and writes a
results table, `results.json` and a plot of the accuracy curves.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TEACHER = REPO_ROOT / "checkpoints" / "fashion_mnist_vit_teacher.safetensors"
# The README's student: a timm ViT of width 64, 4 blocks, 2 heads, 4x4 patches (0.2M params).
STUDENT_ARGS = (
    "--student", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4",
    "--in-chans", "1", "--num-classes", "10", "--embed-dim", "64", "--depth", "4",
    "--num-heads", "2",
)  # fmt: skip


@dataclass(frozen=True)
class DemoRun:
    """One student run of the demo.

    Attributes:
        name: run name, also its folder under the output folder.
        keep_ratio: share of patches the teacher sees, 0 for no teacher.
        masking: the trainer's `--masking` policy.
        use_teacher: whether the run asks the teacher service for logits.
    """

    name: str
    keep_ratio: float
    masking: str
    use_teacher: bool


DEMO_RUNS = (
    DemoRun("no_teacher", 0.0, "none", use_teacher=False),
    DemoRun("full_kd", 1.0, "none", use_teacher=True),
    DemoRun("maskedkd_50", 0.5, "student", use_teacher=True),
)


@dataclass
class DemoConfig:
    """Options of `maskedkd demo`.

    Attributes:
        out: folder for run folders, the table, `results.json` and the plot.
        source: Fashion-MNIST folder with the four IDX .gz files.
        data: folder for the prepared shards; prepared there when missing.
        teacher: portable teacher checkpoint to serve.
        student_args: timm student arguments passed to `maskedkd train`.
        epochs: training epochs for each student run.
        steps_per_epoch: optimizer steps in each epoch, so one epoch reads
            `steps_per_epoch * batch_size` training images (None: the whole split).
        max_steps: stop each run after this many steps (None: full epochs).
        batch_size: images per training step.
        lr: peak learning rate of the students.
        seed: seed shared by all runs, so they differ only in supervision.
        port: service port on 127.0.0.1 (0 picks a free one).
        ready_timeout_s: how long to wait for the service to report ready.
        threads: torch CPU threads for each student process (None: torch's default).
    """

    out: Path = Path("runs/demo")
    source: Path = Path("/usr/share/datasets/fashion-mnist")
    data: Path = Path("data/fashion-mnist")
    teacher: Path = SHIPPED_TEACHER
    student_args: list[str] = field(default_factory=lambda: list(STUDENT_ARGS))
    epochs: int = 4
    steps_per_epoch: int | None = 120
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    port: int = 0
    ready_timeout_s: float = 300.0
    threads: int | None = None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def maskedkd_command(*args: str) -> list[str]:
    """Build a command line that runs `maskedkd` with this interpreter."""
    return [sys.executable, "-m", "pipelines.cli", *args]


class ServiceProcess:
    """`maskedkd serve` running as a child process, stopped on exit.

    Args:
        teacher: checkpoint to serve.
        port: port on 127.0.0.1.
        log_path: file that receives the service's output.
    """

    def __init__(self, teacher: Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        command = maskedkd_command(
            "serve", "--teacher", str(teacher), "--host", "127.0.0.1", "--port", str(port)
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        logger.info("starting the teacher service: %s", " ".join(command))
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float) -> None:
        """Poll `/v1/ready` until it returns 200, the process exits, or `timeout_s` passes."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the teacher service exited with code {self.process.returncode} before "
                    f"it was ready; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/v1/ready", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"the teacher service at {self.url} was not ready after {timeout_s:.0f} s; "
            f"see {self.log_path}"
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        """Send SIGINT, the service's clean-shutdown signal, then kill it if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the teacher service ignored SIGINT for %.0f s; killing it", timeout_s
                )
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def ensure_shards(config: DemoConfig) -> None:
    """Prepare the Fashion-MNIST shards unless a complete copy is already there."""
    from pipelines.prepare import PrepareConfig, is_complete, prepare_fashion_mnist

    if is_complete(config.data):
        logger.info("using the shards in %s", config.data)
        return
    logger.info("preparing Fashion-MNIST shards from %s into %s", config.source, config.data)
    prepare_fashion_mnist(config.source, PrepareConfig(out_dir=config.data))


def evaluate_teacher(config: DemoConfig) -> dict[str, Any]:
    """Evaluate the teacher on the test split and compute its MACs per image by keep ratio."""
    from student_trainer.data import list_shards, make_loader
    from teacher_service.engine import MaskedTeacher

    teacher = MaskedTeacher.from_source(str(config.teacher))
    correct = total = 0
    for images, labels, _ in make_loader(list_shards(config.data, "test"), 500, train=False):
        logits = teacher.forward_images(images)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    macs = {
        run.name: teacher.macs_per_image(max(1, round(run.keep_ratio * teacher.num_patches)))
        if run.use_teacher
        else 0
        for run in DEMO_RUNS
    }
    return {
        "top1": correct / max(total, 1),
        "arch": teacher.spec.arch,
        "num_patches": teacher.num_patches,
        "full_macs_per_image": teacher.full_macs_per_image,
        "mean": list(teacher.spec.mean),
        "std": list(teacher.spec.std),
        "macs_per_image": macs,
    }


def train_command(config: DemoConfig, run: DemoRun, url: str, teacher: dict[str, Any]) -> list[str]:
    """Build the `maskedkd train` command line of one demo run.

    Every run normalises its input with the teacher's mean and std, so the runs differ
    only in their supervision.
    """
    args = [
        "train",
        "--data",
        str(config.data),
        "--val-data",
        str(config.data),
        *config.student_args,
        "--epochs",
        str(config.epochs),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.lr),
        "--seed",
        str(config.seed),
        "--out",
        str(config.out / run.name),
        "--student-mean",
        *[str(value) for value in teacher["mean"]],
        "--student-std",
        *[str(value) for value in teacher["std"]],
    ]
    if config.steps_per_epoch is not None:
        args += ["--steps-per-epoch", str(config.steps_per_epoch)]
    if config.max_steps is not None:
        args += ["--max-steps", str(config.max_steps)]
    if run.use_teacher:
        args += ["--teacher-url", url, "--keep-ratio", str(run.keep_ratio)]
        args += ["--masking", run.masking, "--run-name", f"demo-{run.name}"]
    else:
        args += ["--no-teacher"]
    return maskedkd_command(*args)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Read a run's `metrics.jsonl`."""
    path = run_dir / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_student(
    config: DemoConfig, run: DemoRun, url: str, teacher: dict[str, Any]
) -> dict[str, Any]:
    """Train one student as a child process and summarise its metrics."""
    command = train_command(config, run, url, teacher)
    env = dict(os.environ)
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)
    logger.info("training %s: %s", run.name, " ".join(command))
    start_s = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall_s = time.perf_counter() - start_s
    records = read_metrics(config.out / run.name)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        raise RuntimeError(f"{config.out / run.name}/metrics.jsonl has no epoch record")
    last = epochs[-1]
    images_seen = max(int(last.get("images_seen", 0)), 1)
    return {
        "wall_s": wall_s,
        "top1": float(last["val_top1"]),
        "teacher_macs_spent": int(last.get("teacher_macs_spent", 0)),
        "measured_macs_per_image": int(last.get("teacher_macs_spent", 0)) / images_seen,
        "blocked_s": float(last.get("blocked_s_total", 0.0)),
        "epochs": epochs,
    }


def summarise(
    config: DemoConfig, teacher: dict[str, Any], outcomes: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Build `results.json` from the teacher's figures and each run's outcome."""
    full = teacher["full_macs_per_image"]
    runs = []
    for run in DEMO_RUNS:
        macs = teacher["macs_per_image"][run.name]
        runs.append(
            {
                "name": run.name,
                "keep_ratio": run.keep_ratio,
                "kept_patches": round(run.keep_ratio * teacher["num_patches"]),
                "teacher_macs_per_image": macs,
                "teacher_compute_saved": 1.0 - macs / full,
                "top1": outcomes[run.name]["top1"],
                "wall_s": outcomes[run.name]["wall_s"],
                "teacher_macs_spent": outcomes[run.name]["teacher_macs_spent"],
                "measured_macs_per_image": outcomes[run.name]["measured_macs_per_image"],
                "blocked_on_teacher_s": outcomes[run.name]["blocked_s"],
            }
        )
    return {
        "teacher": str(config.teacher),
        "teacher_arch": teacher["arch"],
        "teacher_top1": teacher["top1"],
        "teacher_full_macs_per_image": full,
        "epochs": config.epochs,
        "steps_per_epoch": config.steps_per_epoch,
        "max_steps": config.max_steps,
        "seed": config.seed,
        "runs": runs,
    }


def format_table(results: dict[str, Any]) -> str:
    """Render the runs as a Markdown table."""
    lines = [
        "| run | kept patches | teacher MMACs/image | teacher compute saved | top-1 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['name']} | {run['kept_patches']} | {run['teacher_macs_per_image'] / 1e6:.2f} "
            f"| {run['teacher_compute_saved']:.0%} | {run['top1']:.2%} | {run['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(outcomes: dict[str, dict[str, Any]], path: Path) -> None:
    """Plot each run's validation top-1 per epoch to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, outcome in outcomes.items():
        epochs = [r["epoch"] + 1 for r in outcome["epochs"]]
        ax.plot(epochs, [r["val_top1"] for r in outcome["epochs"]], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("student top-1 (test split)")
    ax.set_title("Fashion-MNIST students: no teacher, full KD, MaskedKD 50%")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo and return the contents of `results.json`."""
    if not config.teacher.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {config.teacher} not found; train one with "
            "`maskedkd train-teacher --data DIR --out FILE` and pass --teacher FILE"
        )
    config.out.mkdir(parents=True, exist_ok=True)
    ensure_shards(config)
    teacher = evaluate_teacher(config)
    logger.info("teacher %s: test top-1 %.2f%%", teacher["arch"], 100 * teacher["top1"])

    port = config.port or free_port()
    outcomes: dict[str, dict[str, Any]] = {}
    with ServiceProcess(config.teacher, port, config.out / "service.log") as service:
        service.wait_ready(config.ready_timeout_s)
        logger.info("teacher service ready at %s", service.url)
        for run in DEMO_RUNS:
            outcomes[run.name] = run_student(config, run, service.url, teacher)

    results = summarise(config, teacher, outcomes)
    table = format_table(results)
    (config.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (config.out / "results.md").write_text(table + "\n")
    plot_curves(outcomes, config.out / "accuracy.png")
    print(f"\nteacher {teacher['arch']}: test top-1 {teacher['top1']:.2%}\n")
    print(table)
    print(f"\nwrote {config.out / 'results.json'} and {config.out / 'accuracy.png'}")
    return results
