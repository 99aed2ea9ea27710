import gzip
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.prepare import (
    FASHION_MNIST_FILES,
    DatasetSourceError,
    PrepareConfig,
    prepare_fashion_mnist,
    prepare_image_folder,
)
from student_trainer.data import list_shards, make_loader, read_dataset_info
from tests.pipelines.conftest import write_fashion_source


def read_all(shards: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    samples = {}
    for images, labels, keys in make_loader(shards, 7, train=False):
        for image, label, key in zip(images, labels, keys, strict=True):
            samples[key] = (image.numpy(), int(label))
    return samples


def test_prepare_fashion_mnist_counts_and_labels(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    arrays = write_fashion_source(source)
    out = tmp_path / "shards"

    info = prepare_fashion_mnist(source, PrepareConfig(out, samples_per_shard=10))

    assert info["splits"]["train"]["count"] == 36
    assert info["splits"]["test"]["count"] == 12
    assert len(info["splits"]["train"]["shards"]) == 4
    assert info["image_size"] == [28, 28]
    assert read_dataset_info(out) == info
    for split in ("train", "test"):
        samples = read_all(list_shards(out, split))
        images, labels = arrays[split]
        assert len(samples) == len(labels)
        for index in range(len(labels)):
            image, label = samples[f"{split}_{index:07d}"]
            assert image.shape == (1, 28, 28)
            assert np.array_equal(image[0], images[index])
            assert label == labels[index]


def test_prepare_keys_have_no_dots(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source, num_train=5, num_test=3)
    out = tmp_path / "shards"
    prepare_fashion_mnist(source, PrepareConfig(out))

    keys = list(read_all(list_shards(out, "train")))

    assert keys
    assert all("." not in key for key in keys)


def test_prepare_truncated_idx_raises(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source)
    images_path = source / FASHION_MNIST_FILES["train"][0]
    with gzip.open(images_path, "rb") as f:
        data = f.read()
    with gzip.open(images_path, "wb") as f:
        f.write(data[: len(data) // 2])

    with pytest.raises(DatasetSourceError, match="truncated"):
        prepare_fashion_mnist(source, PrepareConfig(tmp_path / "shards"))
    assert not (tmp_path / "shards" / "dataset.json").exists()


def test_prepare_missing_source_raises(tmp_path):
    with pytest.raises(DatasetSourceError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "absent", PrepareConfig(tmp_path / "shards"))


def test_prepare_not_gzip_raises(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source)
    (source / FASHION_MNIST_FILES["test"][1]).write_bytes(b"not a gzip file at all")

    with pytest.raises(DatasetSourceError, match="gzip"):
        prepare_fashion_mnist(source, PrepareConfig(tmp_path / "shards"))


def test_prepare_rerun_after_crash_completes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source)
    out = tmp_path / "shards"
    prepare_fashion_mnist(source, PrepareConfig(out, samples_per_shard=10))
    # Simulate a crash midway: the info file and one shard never got written, and a
    # half-written temporary shard was left behind.
    (out / "dataset.json").unlink()
    (out / "train-000002.tar").unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"partial")

    info = prepare_fashion_mnist(source, PrepareConfig(out, samples_per_shard=10))

    assert (out / "train-000002.tar").is_file()
    assert not (out / "train-000002.tar.tmp").exists()
    assert len(read_all(list_shards(out, "train"))) == info["splits"]["train"]["count"]


def test_prepare_rerun_skips_complete_output(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source)
    out = tmp_path / "shards"
    prepare_fashion_mnist(source, PrepareConfig(out))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    prepare_fashion_mnist(source, PrepareConfig(out))

    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_prepare_image_folder_split(tmp_path):
    src = tmp_path / "tree"
    for class_index, name in enumerate(["cat", "dog", "owl"]):
        (src / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.full((8, 8, 3), class_index * 40 + i, dtype=np.uint8)
            Image.fromarray(pixels).save(src / name / f"{i}.png")
    out = tmp_path / "shards"

    info = prepare_image_folder(src, PrepareConfig(out), test_fraction=0.2, seed=1)

    assert info["classes"] == ["cat", "dog", "owl"]
    assert info["channels"] == 3
    assert info["splits"]["train"]["count"] == 12
    assert info["splits"]["test"]["count"] == 3
    samples = read_all(list_shards(out, "train")) | read_all(list_shards(out, "test"))
    assert len(samples) == 15
    for image, label in samples.values():
        assert image.shape == (3, 8, 8)
        assert image[0, 0, 0] // 40 == label


def test_prepare_image_folder_mixed_sizes_raise(tmp_path):
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(src / "a" / "0.png")
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(src / "a" / "1.png")

    with pytest.raises(DatasetSourceError, match="resize"):
        prepare_image_folder(src, PrepareConfig(tmp_path / "shards"))


def test_prepare_cli_writes_dataset(tmp_path, capsys):
    source = tmp_path / "source"
    source.mkdir()
    write_fashion_source(source, num_train=4, num_test=2)
    out = tmp_path / "shards"

    code = main(["prepare", "fashion-mnist", "--source", str(source), "--out", str(out)])

    assert code == 0
    assert json.loads((out / "dataset.json").read_text())["splits"]["test"]["count"] == 2
    assert '"train": 4' in capsys.readouterr().out


def test_prepare_cli_missing_source_exits_2(tmp_path):
    code = main(
        ["prepare", "fashion-mnist", "--source", str(tmp_path / "none"), "--out", str(tmp_path)]
    )

    assert code == 2


def test_prepare_cli_bad_test_fraction_exits_2(tmp_path):
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(src / "a" / "0.png")

    code = main(
        [
            "prepare",
            "imagefolder",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--test-fraction",
            "1.5",
        ]
    )

    assert code == 2
