"""Subcommands owned by `pipelines`: prepare, train-teacher, demo and precompute."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `maskedkd` parser."""
    add_prepare(subparsers)
    add_train_teacher(subparsers)
    add_demo(subparsers)
    add_precompute(subparsers)


def add_prepare(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.prepare import DEFAULT_FASHION_MNIST_DIR

    parser = subparsers.add_parser(
        "prepare",
        help="write a dataset as WebDataset shards",
        description="Write a dataset as WebDataset shards (PNG image, integer class) plus "
        "dataset.json. Reruns keep finished shards; an interrupted run never leaves a "
        "folder that looks complete.",
    )
    sources = parser.add_subparsers(dest="source_kind", metavar="SOURCE", required=True)

    fashion = sources.add_parser("fashion-mnist", help="Fashion-MNIST from its gzip IDX files")
    fashion.add_argument(
        "--source",
        default=DEFAULT_FASHION_MNIST_DIR,
        help="folder holding the four IDX .gz files (default: %(default)s, where Debian's "
        "dataset-fashion-mnist package installs them)",
    )
    add_shard_options(fashion)
    fashion.set_defaults(func=run_prepare)

    folder = sources.add_parser("imagefolder", help="a class-per-folder image tree")
    folder.add_argument("src", help="folder with one subfolder of images per class")
    folder.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of images, in [0, 1), held out as the test split (default: 0)",
    )
    folder.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    add_shard_options(folder)
    folder.set_defaults(func=run_prepare)


def add_shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards and dataset.json")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=5000,
        help="images in each tar shard (default: %(default)s)",
    )


def run_prepare(args: argparse.Namespace) -> int:
    from pipelines.prepare import (
        DatasetSourceError,
        PrepareConfig,
        prepare_fashion_mnist,
        prepare_image_folder,
    )

    if args.samples_per_shard < 1:
        logger.error("--samples-per-shard must be at least 1, got %s", args.samples_per_shard)
        return 2
    config = PrepareConfig(out_dir=Path(args.out), samples_per_shard=args.samples_per_shard)
    try:
        if args.source_kind == "fashion-mnist":
            info = prepare_fashion_mnist(args.source, config)
        else:
            info = prepare_image_folder(
                args.src, config, test_fraction=args.test_fraction, seed=args.seed
            )
    except (DatasetSourceError, ValueError) as err:
        logger.error("prepare failed: %s", err)
        return 2
    counts = {split: entry["count"] for split, entry in info["splits"].items()}
    print(f"{args.out}: {json.dumps(counts)} in {len(info['classes'])} classes")
    return 0


def add_train_teacher(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-teacher",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a ViT teacher on prepared shards",
        description="Train a timm ViT teacher on shards from `maskedkd prepare` and write a "
        "portable safetensors checkpoint after every epoch. The defaults are the recipe of "
        "the shipped Fashion-MNIST teacher.",
    )
    parser.add_argument("--data", required=True, help="folder written by `maskedkd prepare`")
    parser.add_argument("--out", required=True, help="checkpoint path (.safetensors) to write")
    parser.add_argument("--arch", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--img-size", type=int, default=28, help="input side in pixels")
    parser.add_argument("--patch-size", type=int, default=4, help="patch side in pixels")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels")
    parser.add_argument("--embed-dim", type=int, default=128, help="token width")
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    parser.add_argument(
        "--patch-drop",
        type=float,
        default=0.0,
        help="share of patch tokens dropped at random in each training step (timm's "
        "patch_drop_rate), which makes the teacher robust to masked input (default: 0)",
    )
    parser.add_argument("--epochs", type=int, default=12, help="passes over the train split")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="warm-up in epochs")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument(
        "--shift-px", type=int, default=2, help="maximum random shift in pixels, 0 to disable"
    )
    parser.add_argument("--no-hflip", action="store_true", help="disable horizontal flips")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)"
    )
    parser.add_argument(
        "--save-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="weight dtype in the checkpoint",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--init-from",
        default=None,
        help="portable teacher checkpoint whose weights start the run (default: random init)",
    )
    parser.set_defaults(func=run_train_teacher)


def run_train_teacher(args: argparse.Namespace) -> int:
    from pipelines.train_teacher import TeacherTrainConfig, train_teacher

    config = TeacherTrainConfig(
        data=Path(args.data),
        out=Path(args.out),
        arch=args.arch,
        model_kwargs={
            "img_size": args.img_size,
            "patch_size": args.patch_size,
            "in_chans": args.in_chans,
            "embed_dim": args.embed_dim,
            "depth": args.depth,
            "num_heads": args.num_heads,
            "drop_path_rate": args.drop_path,
            "patch_drop_rate": args.patch_drop,
        },
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        shift_px=args.shift_px,
        hflip=not args.no_hflip,
        seed=args.seed,
        num_workers=args.num_workers,
        max_steps=args.max_steps,
        save_dtype=args.save_dtype,
        threads=args.threads,
        init_from=Path(args.init_from) if args.init_from else None,
    )
    summary = train_teacher(config)
    print(json.dumps({k: summary[k] for k in ("checkpoint", "test_top1", "steps", "wall_s")}))
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from pipelines.demo import DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="serve the shipped teacher and train three students against it",
        description="Prepare Fashion-MNIST shards, start `maskedkd serve` with the shipped "
        "teacher on 127.0.0.1, train the same student with no teacher, with full-image KD "
        "and with MaskedKD keeping 50% of patches (both through the service), then print "
        "and save the comparison.",
    )
    parser.add_argument("--out", default=str(defaults.out), help="output folder")
    parser.add_argument("--source", default=str(defaults.source), help="Fashion-MNIST IDX folder")
    parser.add_argument(
        "--data", default=str(defaults.data), help="shard folder, prepared when missing"
    )
    parser.add_argument(
        "--teacher",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="teacher checkpoint to serve (default: the shipped "
        "checkpoints/fashion_mnist_vit_teacher.safetensors)",
    )
    parser.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="epochs per student run"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=defaults.steps_per_epoch,
        help="optimizer steps per epoch of each student run; 0 reads the whole train split ",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each student run after this many steps (None: full epochs)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per step"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="student peak learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed shared by all runs")
    parser.add_argument(
        "--port", type=int, default=0, help="service port on 127.0.0.1 (0: a free one)"
    )
    parser.add_argument(
        "--ready-timeout-s",
        type=float,
        default=defaults.ready_timeout_s,
        help="seconds to wait for the service to become ready",
    )
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from pipelines.demo import SHIPPED_TEACHER, DemoConfig, run_demo

    config = DemoConfig(
        out=Path(args.out),
        source=Path(args.source),
        data=Path(args.data),
        teacher=Path(getattr(args, "teacher", SHIPPED_TEACHER)),
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch or None,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        port=args.port,
        ready_timeout_s=args.ready_timeout_s,
    )
    run_demo(config)
    return 0


def add_precompute(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "precompute",
        help="write teacher logits for a dataset split as Parquet (Ray Data job)",
        description="Run the teacher over every sample of a split with Ray Data and write "
        "its logits as Parquet part files keyed by the WebDataset __key__, for the trainer's "
        "--teacher-logits. A killed job, run again with the same options, computes only "
        "the missing keys. The output folder appears only when complete.",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        help="portable teacher checkpoint (.safetensors), or a timm model name with "
        "pretrained weights from the model hub",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="shard folder written by `maskedkd prepare`, a .tar file or a brace pattern; "
        "on a cluster, a path that every node can read",
    )
    parser.add_argument(
        "--split", default="train", help="split to read from a shard folder (default: train)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder; it must not exist unless resuming"
    )

    parser.add_argument(
        "--masking",
        choices=["none", "random"],
        default="none",
        help="none: full images; random: a fixed random subset of patches per key, stored "
        "in the `keep` column (default: none)",
    )
    parser.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="fraction of teacher patches kept with --masking random, in (0, 1]",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks (default: 0)")
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="store only the K largest logits, their class indices and the log-sum-exp "
        "(default: every logit)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="storage dtype of logit values (default: float16)",
    )

    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per teacher forward (default: 256)"
    )
    parser.add_argument(
        "--rows-per-part",
        type=int,
        default=8192,
        help="minimum rows per Parquet part file, the unit a rerun keeps (default: 8192)",
    )
    parser.add_argument(
        "--num-actors",
        type=int,
        default=None,
        help="teacher actors (default: one per GPU of the cluster with CUDA, else 1)",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs reserved per teacher actor; on CPU also its torch threads (default: 1)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="teacher device; auto picks CUDA when the cluster has GPUs (default: auto)",
    )

    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run on: `auto` for the cluster of this node, or HOST:6379; "
        "Ray Client ray:// addresses are not supported (default: start a local Ray)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray started without --address (default: all)",
    )
    parser.add_argument(
        "--progress-interval-s",
        type=float,
        default=10.0,
        help="seconds between progress lines (default: 10)",
    )
    parser.set_defaults(func=run_precompute_command)


def run_precompute_command(args: argparse.Namespace) -> int:
    from pipelines.precompute import PrecomputeConfig, run_precompute

    config = PrecomputeConfig(
        teacher=args.teacher,
        data=args.data,
        out=Path(args.out),
        split=args.split,
        masking=args.masking,
        keep_ratio=args.keep_ratio,
        seed=args.seed,
        top_k=args.top_k,
        dtype=args.dtype,
        batch_size=args.batch_size,
        rows_per_part=args.rows_per_part,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        device=args.device,
        address=args.address,
        num_cpus=args.num_cpus,
        progress_interval_s=args.progress_interval_s,
    )
    try:
        summary = run_precompute(config)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(summary))
    return 0
