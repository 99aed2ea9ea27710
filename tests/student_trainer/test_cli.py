"""The `maskedkd train` command line: option parsing and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from student_trainer.cli import EXIT_INVALID_INPUT, config_from_args, register


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskedkd")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_options_map_onto_config() -> None:
    args = parse(
        [
            "train",
            "--data", "shards",
            "--val-data", "val",
            "--student", "vit_small_patch16_224",
            "--img-size", "28",
            "--patch-size", "4",
            "--in-chans", "1",
            "--num-classes", "10",
            "--embed-dim", "64",
            "--depth", "4",
            "--num-heads", "2",
            "--student-kwargs", '{"qk_norm": true}',
            "--keep-ratio", "0.25",
            "--masking", "random",
            "--teacher-url", "http://127.0.0.1:8000",
            "--token-file", "token.txt",
            "--epochs", "3",
            "--batch-size", "64",
            "--lr", "0.002",
            "--weight-decay", "0.01",
            "--warmup-epochs", "2",
            "--kd-weight", "0.5",
            "--tau", "2.0",
            "--kd-type", "hard",
            "--mixup", "0.8",
            "--cutmix", "1.0",
            "--label-smoothing", "0.1",
            "--seed", "7",
            "--max-steps", "100",
            "--log-every", "5",
            "--amp",
            "--device", "cpu",
            "--out", "runs/x",
            "--resume",
            "--no-progress",
            "--run-name", "student-a",
            "--teacher-timeout", "12.5",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.student_kwargs == {
        "qk_norm": True,
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 2,
    }
    assert config.source_kind == "url"
    assert config.teacher_url == "http://127.0.0.1:8000"
    assert config.token_file == "token.txt"
    assert (config.keep_ratio, config.masking) == (0.25, "random")
    assert (config.epochs, config.batch_size, config.lr) == (3, 64, 0.002)
    assert (config.weight_decay, config.warmup_epochs) == (0.01, 2)
    assert (config.kd_weight, config.tau, config.kd_type) == (0.5, 2.0, "hard")
    assert (config.mixup, config.cutmix, config.label_smoothing) == (0.8, 1.0, 0.1)
    assert (config.seed, config.max_steps, config.log_every) == (7, 100, 5)
    assert config.amp is True
    assert config.resume is True
    assert config.progress is False
    assert config.run_name == "student-a"
    assert config.teacher_timeout_s == 12.5
    config.validate()


def test_source_is_required() -> None:
    with pytest.raises(SystemExit):
        parse(["train", "--data", "shards"])


def test_sources_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        parse(["train", "--data", "shards", "--no-teacher", "--teacher", "t.safetensors"])


def test_train_command_runs(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = parse(
        [
            "train",
            "--data", str(tiny_data),
            "--val-data", str(tiny_data),
            "--patch-size", "4",
            "--embed-dim", "16",
            "--depth", "1",
            "--num-heads", "2",
            "--no-teacher",
            "--batch-size", "8",
            "--max-steps", "2",
            "--log-every", "1",
            "--device", "cpu",
            "--no-progress",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (out / "metrics.png").is_file()


def test_train_command_rejects_bad_keep_ratio(tiny_data: Path, tmp_path: Path) -> None:
    args = parse(
        ["train", "--data", str(tiny_data), "--teacher", "missing.safetensors",
         "--keep-ratio", "0", "--out", str(tmp_path / "run"), "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == EXIT_INVALID_INPUT


def test_build_student_bad_sizes_raise():
    from student_trainer.student import build_student

    kwargs = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 30, "num_heads": 4}
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        build_student("vit_tiny_patch16_224", kwargs)


def test_train_unreachable_service_exits_1(tiny_data, tmp_path, caplog):
    from pipelines.cli import main

    args = ["train", "--data", str(tiny_data), "--student", "vit_tiny_patch16_224"]
    args += ["--patch-size", "4", "--embed-dim", "16", "--depth", "1", "--num-heads", "2"]
    args += ["--teacher-url", "http://127.0.0.1:1", "--teacher-timeout", "1"]
    args += ["--batch-size", "8", "--max-steps", "1", "--no-progress"]
    args += ["--out", str(tmp_path / "run")]

    code = main(args)

    assert code == 1
    assert "did not answer" in caplog.text


def test_worker_options_map_onto_config() -> None:
    args = parse(
        ["train", "--data", "shards", "--no-teacher", "--loader-workers", "2",
         "--num-workers", "3", "--use-gpu", "--address", "auto", "--lr-scaling", "none",
         "--storage-path", "shared/ray", "--record-keys"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.loader_workers == 2
    assert config.num_workers == 3
    assert config.use_gpu
    assert config.address == "auto"
    assert config.lr_scaling == "none"
    assert config.storage_path == "shared/ray"
    assert config.record_keys


def test_worker_options_default_to_one_process() -> None:
    config = config_from_args(parse(["train", "--data", "shards", "--no-teacher"]))
    assert config.num_workers is None
    assert config.loader_workers == 0
    assert not config.use_gpu
    assert config.address is None
