"""Streaming image-classification batches from WebDataset shards.

Shards are the ones `maskedkd prepare` writes: each sample has a `__key__`, a `png` image
and a `cls` integer label, and the folder holds a `dataset.json` with counts and classes.
Samples stream from the tar files, so memory does not grow with the dataset's size.

Data-parallel ranks read disjoint parts of a split. With at least as many shards as ranks,
rank k reads shards k, k + R, k + 2R, ... of the epoch's shuffled shard list (R ranks), so
each shard is read by one rank only. With fewer shards than ranks, every rank reads every
shard and keeps the samples at stream positions k, k + R, ... before decoding them. Shard
splitting reads each byte once but gives ranks unequal counts when shard sizes differ, and
the trainer ends an epoch when the first rank runs out of batches.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

DATASET_INFO_NAME = "dataset.json"


@dataclass(frozen=True)
class Batch:
    """One batch of raw pixels, labels and sample keys.

    Attributes:
        images: uint8 pixels, shape [B, C, H, W], unnormalised.
        labels: int64 class indices, shape [B].
        keys: the WebDataset `__key__` of each row.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __iter__(self) -> Iterator[Any]:
        # Unpacks as `images, labels, keys = batch`.
        return iter((self.images, self.labels, self.keys))


def read_dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """Read the `dataset.json` that `maskedkd prepare` writes beside the shards.

    Args:
        data_dir: folder holding the shards.

    Returns:
        The parsed description: name, classes, splits with counts and shard names,
        image size and channel count.
    """
    path = Path(data_dir) / DATASET_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared dataset folder; "
            "create one with `maskedkd prepare`"
        )
    with open(path, encoding="utf-8") as f:
        info: dict[str, Any] = json.load(f)
    return info


def list_shards(data: str | Path, split: str | None = None) -> list[str]:
    """Resolve a dataset folder, a single tar or a brace pattern into shard paths.

    Args:
        data: a folder written by `maskedkd prepare`, a `.tar` file, or a WebDataset
            brace pattern such as `data/train-{000000..000009}.tar`.
        split: with a folder, the split whose shards to list (for example `train`).

    Returns:
        Shard paths in a stable order.
    """
    text = str(data)
    path = Path(text)
    if path.is_dir():
        if split is None:
            raise ValueError(f"{text} is a folder: name the split to read (for example 'train')")
        info_path = path / DATASET_INFO_NAME
        if info_path.is_file():
            splits = read_dataset_info(path).get("splits", {})
            if split not in splits:
                raise ValueError(
                    f"split {split!r} not in {info_path}; available splits: {sorted(splits)}"
                )
            shards = [str(path / name) for name in splits[split]["shards"]]
        else:
            shards = sorted(str(p) for p in path.glob(f"{split}-*.tar"))
        if not shards:
            raise FileNotFoundError(f"no {split}-*.tar shards in {text}")
        return shards
    if "{" in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    if path.is_file():
        return [text]
    raise FileNotFoundError(f"{text} is neither a shard folder, a .tar file nor a brace pattern")


def count_samples(data: str | Path, split: str) -> int | None:
    """Return the number of samples in a prepared split, or None when unknown."""
    path = Path(data)
    if path.is_dir() and (path / DATASET_INFO_NAME).is_file():
        splits = read_dataset_info(path).get("splits", {})
        if split in splits:
            return int(splits[split]["count"])
    return None


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, int, str]:
    """Decode one raw WebDataset sample into (uint8 CHW pixels, label, key)."""
    key = sample["__key__"]
    if "png" not in sample or "cls" not in sample:
        raise ValueError(
            f"sample {key!r} has fields {sorted(sample)}; expected 'png' and 'cls' "
            "as written by `maskedkd prepare`"
        )
    with Image.open(io.BytesIO(sample["png"])) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[None]  # [H, W] -> [1, H, W]
    else:
        pixels = pixels.transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]
    label = int(
        sample["cls"].decode("ascii") if isinstance(sample["cls"], bytes) else sample["cls"]
    )
    return np.ascontiguousarray(pixels, dtype=np.uint8), label, key


def collate(samples: Sequence[tuple[np.ndarray, int, str]]) -> Batch:
    """Stack decoded samples into one `Batch`."""
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return Batch(images=images, labels=labels, keys=[s[2] for s in samples])


def make_dataset(
    shards: Sequence[str],
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 2000,
    drop_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> wds.WebDataset:
    """Build the WebDataset pipeline that yields `Batch` objects.

    Args:
        shards: shard paths, as `list_shards` returns them.
        batch_size: images per batch.
        train: shuffle shards and samples (seeded by `seed` and `epoch`) and drop the
            last partial batch.
        seed: base seed for shuffling.
        epoch: epoch number, mixed into the seed so each epoch sees a new order.
        shuffle_buffer: samples held in the shuffle buffer (memory grows with it).
        drop_last: override whether the final partial batch is dropped.
        rank: this process's data-parallel rank; it reads the part of the data that the
            module docstring describes.
        world_size: number of data-parallel ranks.

    Returns:
        An iterable dataset; iterate it directly or wrap it in `wds.WebLoader`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    shard_list = list(shards)
    if not shard_list:
        raise ValueError("no shards to read: pass at least one .tar file")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if train:
        # Every rank shuffles with the same seed, so their shard lists agree.
        random.Random(seed * 1_000_003 + epoch).shuffle(shard_list)
    split_shards = world_size > 1 and len(shard_list) >= world_size
    if split_shards:
        shard_list = shard_list[rank::world_size]
    dataset = wds.WebDataset(
        shard_list,
        shardshuffle=False,
        # The rank's part is chosen here and below, not from torch.distributed's state.
        nodesplitter=_all_shards,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    )
    if world_size > 1 and not split_shards:
        dataset = dataset.compose(_every_nth_sample(rank, world_size))
    if train:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch)
    partial = not train if drop_last is None else not drop_last
    return dataset.map(decode_sample).batched(batch_size, collation_fn=collate, partial=partial)


def make_loader(
    shards: Sequence[str],
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
    drop_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """Return an iterable of `Batch` (images uint8 [B, C, H, W], labels [B], keys).

    With `num_workers` above zero, decoding runs in DataLoader worker processes, each
    reading its own shards of this rank's part; see `make_dataset` for the other arguments.
    """
    dataset = make_dataset(
        shards,
        batch_size,
        train=train,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    if num_workers <= 0:
        return dataset
    rank_shards = len(shards) // world_size if len(shards) >= world_size else len(shards)
    if num_workers > rank_shards:
        logger.warning(
            "num_workers=%s exceeds the %s shards this rank reads; extra workers would read "
            "nothing, using %s",
            num_workers,
            rank_shards,
            rank_shards,
        )
        num_workers = rank_shards
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)


def _all_shards(urls: Any) -> Any:
    return urls


def _every_nth_sample(rank: int, world_size: int) -> Any:
    """Return a pipeline stage that keeps the samples at positions rank, rank + world_size, ..."""

    def keep_rank_samples(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for position, sample in enumerate(samples):
            if position % world_size == rank:
                yield sample

    return keep_rank_samples
