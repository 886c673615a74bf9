"""Datasets: read images from disk (or scikit-learn) into normalised tensors in an ``ImageDataset``.

Names accepted by :func:`load_dataset` (the table ``DATASETS`` at the end of this module: adding a
dataset is one entry there, with its loader, class count and whether distillation whitens it):

* ``digits`` (alias ``default``): scikit-learn's 8x8 handwritten digits, 1 channel, no download.
* ``cifar10`` / ``cifar100``: the official pickled batches (``cifar-10-batches-py/``,
  ``cifar-100-python/``) under ``data_root``; ``download=True`` fetches them when missing.
* ``tinyimagenet``: ``tiny-imagenet-200/`` under ``data_root``; the validation split is the test split.
* ``folder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (or ``PATH/val/``).

``data_root`` defaults to ``./data``; for cifar/tinyimagenet it may also point directly at the
inner folder (e.g. ``.../cifar-10-batches-py``).

``classes=`` keeps only those original class ids, in the given order, relabelled ``0..len-1``.
It is meant for sharding classes across processes, so other classes are dropped as early as the
format allows (right after each CIFAR batch is read; never decoded for folder/tinyimagenet).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DatasetError, did_you_mean

__all__ = [
    "ImageDataset",
    "load_dataset",
    "list_datasets",
    "dataset_spec",
    "count_classes",
    "zca_by_default",
    "DATASETS",
    "DEFAULT_DATASET",
    "denormalize",
    "format_description",
    "DEFAULT_DATA_ROOT",
]

DEFAULT_DATA_ROOT = "./data"
DEFAULT_DATASET = "digits"

# Fixed published statistics (docs/method.md, "Datasets"), so runs on the same dataset are comparable.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_MEAN = (0.485, 0.456, 0.406)
TINY_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_CIFAR = {
    "cifar10": dict(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_files=["test_batch"],
        meta_file="batches.meta",
        names_key="label_names",
        labels_key="labels",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": dict(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=["train"],
        test_files=["test"],
        meta_file="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """A labelled image dataset with normalised float32 tensors ``[N, C, H, W]``."""

    name: str
    class_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[int] | None = None
    _class_indices: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_images, self.train_labels),
                            ("test", self.test_images, self.test_labels)):
            if x.dim() != 4 or x.shape[2] != x.shape[3]:
                raise DatasetError(f"{self.name}: {split} images have shape {tuple(x.shape)}, "
                                   "expected [N, C, H, H]; check the dataset files.")
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise DatasetError(f"{self.name}: {split} has {x.shape[0]} images but labels of shape "
                                   f"{tuple(y.shape)}; check the dataset files.")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(f"{self.name}: train images {tuple(self.train_images.shape[1:])} and test "
                               f"images {tuple(self.test_images.shape[1:])} differ in shape.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DatasetError(f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} entries "
                               f"for {self.channels} channels.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def identity(self) -> dict:
        """What identifies the data (cache keys): sizes, normalisation, and a hash of the labels and
        of an evenly strided sample of images (hashing all of CIFAR would cost seconds for nothing)."""
        from .io import hash_tensors
        tr, te = self.train_images, self.test_images
        sample = [tr[:: max(1, len(tr) // 256)], te[:: max(1, len(te) // 64)]]
        return {"name": self.name, "train": int(len(tr)), "test": int(len(te)), "channels": self.channels,
                "image_size": self.image_size, "classes": list(self.class_names),
                "mean": [round(float(m), 6) for m in self.mean], "std": [round(float(s), 6) for s in self.std],
                "hash": hash_tensors(self.train_labels, self.test_labels, *sample)}

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    def class_indices(self) -> list[torch.Tensor]:
        """Per class, the int64 indices of its images in ``train_images`` (computed once)."""
        if self._class_indices is None:
            labels = self.train_labels
            order = torch.argsort(labels, stable=True)  # stable: indices stay ascending within a class
            counts = torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
            self._class_indices = list(torch.split(order, counts.tolist()))
        return self._class_indices

    def describe(self) -> dict[str, Any]:
        """Summary as a plain dict (JSON-serialisable)."""
        counts = torch.bincount(self.train_labels.cpu(), minlength=self.num_classes)[: self.num_classes]
        return {
            "name": self.name,
            "classes": list(self.class_names),
            "class_ids": None if self.classes is None else list(self.classes),
            "num_classes": self.num_classes,
            "train": int(self.train_images.shape[0]),
            "test": int(self.test_images.shape[0]),
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "train_per_class_min": int(counts.min()) if len(counts) else 0,
            "train_per_class_max": int(counts.max()) if len(counts) else 0,
        }

    def to(self, device: torch.device | str) -> "ImageDataset":
        """A copy with all tensors on ``device`` (tensors already there are shared, not copied)."""
        moved = dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )
        if self._class_indices is not None:
            moved._class_indices = [ix.to(device) for ix in self._class_indices]
        return moved


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo normalisation: ``x * std + mean`` per channel (channel dim is -3)."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x * s + m


def format_description(desc: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :meth:`ImageDataset.describe`."""
    names = list(desc.get("classes") or [])
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    fmt = lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"  # noqa: E731
    lines = [
        f"dataset:     {desc['name']}",
        f"classes:     {desc['num_classes']} ({shown})",
    ]
    if desc.get("class_ids") is not None:
        ids = desc["class_ids"]
        lines.append(f"class ids:   {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    lines += [
        f"train:       {desc['train']} images "
        f"({desc['train_per_class_min']}-{desc['train_per_class_max']} per class)",
        f"test:        {desc['test']} images",
        f"image size:  {desc['channels']}x{desc['image_size']}x{desc['image_size']} (CxHxW)",
        f"mean:        {fmt(desc['mean'])}",
        f"std:         {fmt(desc['std'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (``folder:PATH`` stands for any image folder)."""
    return list(DATASETS)


def dataset_spec(name: str) -> "DatasetSpec":
    """The table entry of dataset ``name`` (aliases and ``folder:PATH`` resolved), or a DatasetError."""
    if name.startswith("folder:"):
        return DATASETS[FOLDER]
    key = name.lower()
    for spec in DATASETS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    if Path(name).is_dir():
        raise DatasetError(f"unknown dataset {name!r}; for a folder of class sub-folders (train/<class>/*, "
                           f"test/<class>/*) use --dataset folder:{name}")
    names = [n for spec in DATASETS.values() for n in (spec.name, *spec.aliases)]
    raise DatasetError(f"unknown dataset {name!r}{did_you_mean(key, names)}; choose one of: "
                       f"{', '.join(list_datasets())} (or 'default' for digits).")


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
    classes: Sequence[int] | None = None,
) -> ImageDataset:
    """Load dataset ``name`` (see module docstring). ``data_root`` None means ``./data``.

    ``image_size`` resizes to a square size (bilinear) when it differs from the native one.
    ``classes`` keeps only those original class ids, relabelled ``0..len-1`` in the given order.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}.")
    root = Path(DEFAULT_DATA_ROOT if data_root is None else data_root).expanduser()
    return dataset_spec(name).load(name, root, download, image_size, classes)


def check_ipc(data: ImageDataset, ipc: int, factor: int = 1) -> None:
    """ConfigError unless every class of `data` has at least `ipc` training images (ipc * factor^2
    when a multi-formation set starts from real images). The message names the smallest class,
    the one that sets the limit."""
    counts = [len(i) for i in data.class_indices()]
    need = ipc * factor ** 2
    smallest = min(range(len(counts)), key=counts.__getitem__)
    name, n = data.class_names[smallest], counts[smallest]
    if n >= need:
        return
    if factor > 1:
        raise ConfigError(f"--ipc {ipc} with --factor {factor} starts from {need} real images per class, more "
                          f"than the smallest class, {name!r}, has ({n}); use --ipc {max(1, n // factor ** 2)} "
                          "or less, a smaller --factor, or --init noise")
    raise ConfigError(f"--ipc {ipc} is larger than the smallest class, {name!r}, which has {n} training "
                      f"images; use --ipc {n} or less")


def zca_by_default(name: str) -> bool:
    """Whether distillation (and a baseline set) whitens dataset ``name`` unless told; False for a
    dataset made in code (an ImageDataset under a name of its own)."""
    try:
        return dataset_spec(name).zca
    except DatasetError:
        return False


def as_dataset(dataset: "ImageDataset | str", who: str, what: str = "an ImageDataset or a dataset name") -> "ImageDataset":
    """`dataset` itself, or the dataset of that name (loaded from ./data); a ConfigError saying
    that `who` needs `what` for anything else."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    if not isinstance(dataset, ImageDataset):
        raise ConfigError(f"{who} needs {what}, got {type(dataset).__name__}")
    return dataset


def count_classes(name: str, data_root: str | os.PathLike | None = None) -> int:
    """How many classes dataset ``name`` has, without loading its images (a folder's are counted)."""
    spec = dataset_spec(name)
    if spec.num_classes is not None:
        return spec.num_classes
    train = _folder_path(name) / "train"
    n = len(class_folders(train)) if train.is_dir() else 0
    if n == 0:
        load_dataset(name, data_root)   # raises the loader's own message for the bad layout
    return n


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_classes(classes: Sequence[int] | None, num_classes: int, name: str) -> list[int] | None:
    """Validate a class subset; returns it as a list of ints (None = all)."""
    if classes is None:
        return None
    out = [int(c) for c in classes]
    if not out:
        raise DatasetError(f"{name}: classes= is empty; give at least one class id or leave it unset.")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise DatasetError(f"{name}: class ids {bad} are out of range; valid ids are 0..{num_classes - 1}.")
    if len(set(out)) != len(out):
        raise DatasetError(f"{name}: classes= has duplicates {out}; list each class id once.")
    return out


def _remap_table(classes: list[int] | None, num_classes: int) -> np.ndarray:
    """Lookup old label -> new label (-1 = dropped)."""
    table = np.full(num_classes, -1, dtype=np.int64)
    if classes is None:
        table[:] = np.arange(num_classes)
    else:
        table[classes] = np.arange(len(classes))
    return table


def _normalise_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: (x - mean) / std per channel (saves a copy of a 600 MB CIFAR tensor)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``[N, C, H, W]`` in [0, 1] (float64 accumulation for accuracy)."""
    if x.shape[0] == 0:
        raise DatasetError("cannot compute mean/std: the train split is empty.")
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant images: avoid dividing by 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size``; antialias only when shrinking."""
    if size is None or size == x.shape[-1] and size == x.shape[-2]:
        return x
    shrink = size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _u8_to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)


def _locate(root: Path, folder: str, marker: str) -> Path:
    """``root`` itself when it already is the dataset folder (holds ``marker``), else ``root/folder``."""
    if root.name == folder or (root / marker).exists():
        return root
    return root / folder


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def _str_keys(d: dict) -> dict:
    """Official batches unpickle with bytes keys under some settings; accept both."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


class _RefusedGlobal(Exception):
    """A pickle asked for a name a CIFAR batch never contains."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batches are made of: dicts, lists, bytes, str, ints (no names needed)
    and numpy arrays (these few names). Anything else (os.system, eval, ...) is refused before it
    is looked up, so a hostile file cannot run code. The rest of unpickling stays in C: as fast."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),   # protocol 5 arrays
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),   # how Python 3 writes bytes at protocol 2 (re-pickled copies)
        ("__builtin__", "bytes"), ("builtins", "bytes"), ("__builtin__", "bytearray"), ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, title: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{title}: file {path} is missing; re-extract the dataset or pass --download "
                           "after deleting the folder.")
    try:
        with open(path, "rb") as f:
            # latin1 reads Python-2 pickles (official release) including their numpy arrays.
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise DatasetError(f"{title}: file {path} is not a CIFAR batch: it asks to load {e}, which no CIFAR "
                           "file contains; it was refused, not run. Delete the folder and extract/download "
                           "the official archive again.") from None
    except Exception as e:  # truncated/corrupt files raise many types (EOFError, UnpicklingError, ValueError...)
        raise DatasetError(f"{title}: file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                           "delete the folder and extract/download it again.") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{title}: file {path} does not hold a CIFAR dict; re-extract the dataset.")
    return _str_keys(obj)


def _read_cifar_batch(path: Path, spec: dict, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (uint8 [n, 3, 32, 32]) and remapped labels of one batch, other classes dropped at once."""
    title = spec["title"]
    d = _unpickle(path, title)
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[spec["labels_key"]], dtype=np.int64)
    except KeyError as e:
        raise DatasetError(f"{title}: file {path} lacks key {e}; it is not a {title} batch.") from None
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{title}: file {path} has unreadable labels ({e}); re-extract the dataset.") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{title}: file {path} has data of shape {data.shape} and {labels.shape} labels, "
                           "expected [n, 3072] and n labels; re-extract the dataset.")
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise DatasetError(f"{title}: file {path} has labels outside 0..{spec['num_classes'] - 1}.")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DatasetError(f"{title}: file {path} has pixel values outside 0..255.")
        data = data.astype(np.uint8)
    new = table[labels]
    keep = new >= 0
    if not keep.all():
        data, new = data[keep], new[keep]
    return data.reshape(-1, 3, 32, 32), new


def _load_cifar(key: str, name: str, root: Path, download: bool, image_size: int | None,
                classes: Sequence[int] | None) -> ImageDataset:
    spec = _CIFAR[key]
    title = spec["title"]
    folder = _locate(root, spec["folder"], spec["meta_file"])
    if not folder.is_dir():
        if not download:
            raise DatasetError(f"{title} not found at {folder}; pass --download to fetch it "
                               "(or --data-root to point at an existing copy).")
        _download(spec["url"], spec["md5"], folder.parent, title)
        if not folder.is_dir():
            raise DatasetError(f"{title}: download finished but {folder} is still missing; "
                               f"extract {spec['url']} into {folder.parent} by hand.")
    kept = _check_classes(classes, spec["num_classes"], key)
    table = _remap_table(kept, spec["num_classes"])

    meta = _unpickle(folder / spec["meta_file"], title)
    if spec["names_key"] not in meta:
        raise DatasetError(f"{title}: {folder / spec['meta_file']} lacks {spec['names_key']!r}; re-extract it.")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]]]
    if len(names) != spec["num_classes"]:
        raise DatasetError(f"{title}: {folder / spec['meta_file']} lists {len(names)} class names, "
                           f"expected {spec['num_classes']}.")

    def split(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(folder / f, spec, table) for f in files]
        data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        del parts
        x = _resize(_u8_to_float(data), image_size)
        return _normalise_(x, spec["mean"], spec["std"]), torch.from_numpy(np.ascontiguousarray(labels))

    train_x, train_y = split(spec["train_files"])
    test_x, test_y = split(spec["test_files"])
    return ImageDataset(
        name=key,
        class_names=names if kept is None else [names[c] for c in kept],
        train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
        mean=tuple(spec["mean"]), std=tuple(spec["std"]), classes=kept,
    )


def _download(url: str, md5: str | None, dest: Path, title: str) -> None:
    # Imported here so that loading from disk never needs torchvision's download machinery.
    from torchvision.datasets import utils as tv_utils

    try:
        dest.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(url, download_root=str(dest), md5=md5)
    except Exception as e:
        raise DatasetError(f"{title}: could not download {url} ({type(e).__name__}: {e}); check the "
                           f"network or extract the archive into {dest} by hand.") from None


# --------------------------------------------------------------------------------------------
# Image files (TinyImageNet, folder:)
# --------------------------------------------------------------------------------------------


def _decode_images(paths: list[Path], size: int | None) -> tuple[np.ndarray, bool]:
    """Decode to uint8 ``[N, S, S, 3]``; returns also whether every image was grayscale.

    ``size`` None keeps the native size, which must then be the same for all images.
    Threads help because Pillow releases the GIL while decoding.
    """
    from PIL import Image

    n = len(paths)
    if n == 0:
        return np.zeros((0, size or 1, size or 1, 3), np.uint8), True
    if size is None:
        try:
            with Image.open(paths[0]) as im:
                w, h = im.size
        except Exception as e:
            raise DatasetError(f"cannot read image {paths[0]} ({e}); remove or replace it.") from None
        if w != h:
            raise DatasetError(f"image {paths[0]} is {w}x{h}, not square; pass an image size to resize.")
        size = w
    out = np.empty((n, size, size, 3), np.uint8)
    gray = np.zeros(n, bool)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            p = paths[i]
            try:
                with Image.open(p) as im:
                    gray[i] = im.mode in ("L", "1")
                    im = im.convert("RGB")
                    if im.size != (size, size):
                        im = im.resize((size, size), Image.BILINEAR)
                    out[i] = np.asarray(im)
            except Exception as e:
                raise DatasetError(f"cannot read image {p} ({type(e).__name__}: {e}); remove or replace it.") \
                    from None

    workers = max(1, min(8, os.cpu_count() or 1, n // 256 or 1))
    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    if workers == 1:
        work(0, n)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]:
                f.result()  # re-raises the first DatasetError
    return out, bool(gray.all())


def _hwc_to_tensor(arr: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, channels, H, W]`` in [0, 1]."""
    arr = arr[..., :channels] if channels == 1 else arr
    return _u8_to_float(arr.transpose(0, 3, 1, 2))


def _load_tiny(name: str, root: Path, download: bool, image_size: int | None,
               classes: Sequence[int] | None) -> ImageDataset:
    """TinyImageNet; class order is ``sorted(wnids)`` (the order most codebases use)."""
    title = "TinyImageNet"
    folder = _locate(root, _TINY_FOLDER, "wnids.txt")
    if not folder.is_dir():
        if not download:
            raise DatasetError(f"{title} not found at {folder}; pass --download to fetch it "
                               "(or --data-root to point at an existing copy).")
        _download(_TINY_URL, None, folder.parent, title)
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{title}: {wnids_file} is missing; expected the tiny-imagenet-200 layout "
                           "(wnids.txt, train/<wnid>/images/*.JPEG, val/images, val/val_annotations.txt).")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise DatasetError(f"{title}: {wnids_file} lists no classes.")
    kept = _check_classes(classes, len(wnids), "tinyimagenet")
    ids = list(range(len(wnids))) if kept is None else kept
    keep_wnids = [wnids[c] for c in ids]
    new_label = {w: i for i, w in enumerate(keep_wnids)}

    # Human-readable names from words.txt when present ("n01443537\tgoldfish, Carassius auratus").
    words: dict[str, str] = {}
    words_file = folder / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if text:
                words[wnid.strip()] = text.split(",")[0].strip()
    names = [words.get(w, w) for w in keep_wnids]

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in keep_wnids:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise DatasetError(f"{title}: {d} is missing; expected train/<wnid>/images/*.JPEG for every wnid.")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"{title}: {d} holds no images.")
        train_paths += files
        train_labels += [new_label[w]] * len(files)

    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(f"{title}: {ann} is missing; expected val/images/*.JPEG with val_annotations.txt.")
    val_items = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] in new_label:
            val_items.append((parts[0], new_label[parts[1]]))
    val_items.sort()
    test_paths = [folder / "val" / "images" / f for f, _ in val_items]
    test_labels = [lab for _, lab in val_items]

    size = image_size or 64
    tr, _ = _decode_images(train_paths, size)
    te, _ = _decode_images(test_paths, size)
    train_x = _normalise_(_hwc_to_tensor(tr, 3), TINY_MEAN, TINY_STD)
    del tr
    test_x = _normalise_(_hwc_to_tensor(te, 3), TINY_MEAN, TINY_STD)
    return ImageDataset(
        name="tinyimagenet", class_names=names,
        train_images=train_x, train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=test_x, test_labels=torch.tensor(test_labels, dtype=torch.int64),
        mean=TINY_MEAN, std=TINY_STD, classes=kept,
    )


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(d: Path) -> list[Path]:
    """The class sub-folders of `d`, by name. Hidden ones (.ipynb_checkpoints, an interrupted
    export's temporary folder) are not classes."""
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _check_test_split(name: str, test_dir: Path, test_names: list[str]) -> None:
    """DatasetError for a test split that could not test anything: a class folder in it without
    images, or no images at all (a class may be absent from it)."""
    for c in test_names:
        if not _list_images(test_dir / c):
            raise DatasetError(f"{name}: {test_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add test "
                               "images or remove the folder.")
    if not test_names:
        raise DatasetError(f"{name}: {test_dir} holds no class folders with images, so nothing could be "
                           "evaluated; add PATH/test/<class>/ folders of images.")


def _folder_path(name: str) -> Path:
    path = name[len("folder:"):]
    if not path:
        raise DatasetError("folder: needs a path, e.g. folder:/data/my_images.")
    return Path(path).expanduser()


def _load_folder(name: str, root: Path, download: bool, image_size: int | None,
                 classes: Sequence[int] | None) -> ImageDataset:
    """``PATH/train/<class>/*`` + ``PATH/test/<class>/*`` (or ``val/``); stats from the loaded train images.

    With ``classes=`` only those classes are decoded, so mean/std are those of the kept classes.
    """
    path = _folder_path(name)
    layout = "expected PATH/train/<class>/*.png|jpg|... and PATH/test/<class>/* (or PATH/val/<class>/*)"
    train_dir = path / "train"
    test_dir = path / "test" if (path / "test").is_dir() else path / "val"
    if not train_dir.is_dir():
        raise DatasetError(f"{name}: {train_dir} is missing; {layout}.")
    if not test_dir.is_dir():
        raise DatasetError(f"{name}: neither {path / 'test'} nor {path / 'val'} exists; {layout}.")
    all_names = [p.name for p in class_folders(train_dir)]
    if not all_names:
        raise DatasetError(f"{name}: {train_dir} has no class sub-folders; {layout}.")
    test_names = [p.name for p in class_folders(test_dir)]
    extra = [c for c in test_names if c not in set(all_names)]
    if extra:
        raise DatasetError(f"{name}: {test_dir} has class folders {extra} that are not in {train_dir}; "
                           "every test class must also be a train class.")
    kept = _check_classes(classes, len(all_names), name)
    ids = list(range(len(all_names))) if kept is None else kept

    def gather(base: Path, required: bool) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for new, c in enumerate(ids):
            d = base / all_names[c]
            files = _list_images(d) if d.is_dir() else []
            if required and not files:
                raise DatasetError(f"{name}: {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                   "add images or remove the folder.")
            paths += files
            labels += [new] * len(files)
        return paths, labels

    train_paths, train_labels = gather(train_dir, True)
    test_paths, test_labels = gather(test_dir, False)
    _check_test_split(name, test_dir, test_names)
    untested = [all_names[c] for c in ids if all_names[c] not in test_names]
    if untested:   # allowed (a held-out split may lack rare classes), but never silently
        shown = ", ".join(untested[:5]) + (f" and {len(untested) - 5} more" if len(untested) > 5 else "")
        print(f"atomdistill: warning: {name}: {test_dir} has no folder for {len(untested)} of the "
              f"{len(ids)} classes ({shown}); accuracy is measured on the other classes' test images only",
              file=sys.stderr)
    size = image_size or 32
    tr, tr_gray = _decode_images(train_paths, size)
    te, te_gray = _decode_images(test_paths, size)
    channels = 1 if (tr_gray and te_gray) else 3
    train_x = _hwc_to_tensor(tr, channels)
    test_x = _hwc_to_tensor(te, channels)
    del tr, te
    mean, std = _channel_stats(train_x)
    return ImageDataset(
        name=name, class_names=[all_names[c] for c in ids],
        train_images=_normalise_(train_x, mean, std),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=_normalise_(test_x, mean, std),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        mean=mean, std=std, classes=kept,
    )


# --------------------------------------------------------------------------------------------
# Digits (embedded default)
# --------------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.3


def _digits_split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class a RandomState(0) permutation, first 30% to test."""
    rng = np.random.RandomState(0)
    train, test = [], []
    for c in range(10):  # 10 classes at load time, not a hot path
        idx = np.flatnonzero(target == c)
        perm = idx[rng.permutation(len(idx))]
        n_test = int(round(DIGITS_TEST_FRACTION * len(idx)))
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits(name: str, root: Path, download: bool, image_size: int | None,
                 classes: Sequence[int] | None) -> ImageDataset:
    """scikit-learn's 8x8 digits; mean/std from the full train split so class shards share them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the digits dataset needs scikit-learn; install it with "
                           "`pip install scikit-learn`.") from None
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8]
    target = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _digits_split(target)
    kept = _check_classes(classes, 10, "digits")
    mean, std = _channel_stats(images[torch.from_numpy(train_idx)])
    table = _remap_table(kept, 10)

    def split(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        new = table[target[idx]]
        idx, new = idx[new >= 0], new[new >= 0]
        x = _resize(images[torch.from_numpy(idx)], image_size)
        return _normalise_(x.contiguous(), mean, std), torch.from_numpy(new)

    train_x, train_y = split(train_idx)
    test_x, test_y = split(test_idx)
    names = [str(c) for c in range(10)]
    return ImageDataset(
        name="digits", class_names=names if kept is None else [names[c] for c in kept],
        train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
        mean=mean, std=std, classes=kept,
    )


# --------------------------------------------------------------------------------------------
# The table of datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to load it and what the rest of the package needs to know without loading it."""

    name: str
    load: Callable[..., ImageDataset]   # (name, root, download, image_size, classes)
    num_classes: int | None      # None: counted from the files (folder:PATH)
    zca: bool                    # distillation whitens it by default (as ATOM and DataDAM did on CIFAR)
    about: str                   # one line for help texts
    aliases: tuple[str, ...] = ()


FOLDER = "folder:PATH"
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", _load_digits, 10, False, "scikit-learn's 8x8 digits, embedded (no download)",
                aliases=("default",)),
    DatasetSpec("cifar10", functools.partial(_load_cifar, "cifar10"), 10, True, "CIFAR-10, official pickled batches",
                aliases=("cifar-10",)),
    DatasetSpec("cifar100", functools.partial(_load_cifar, "cifar100"), 100, True,
                "CIFAR-100, official pickled batches", aliases=("cifar-100",)),
    DatasetSpec("tinyimagenet", _load_tiny, 200, False, "TinyImageNet, the tiny-imagenet-200 layout",
                aliases=("tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200")),
    DatasetSpec(FOLDER, _load_folder, None, False, "PATH/train/<class>/* and PATH/test/<class>/*"),
)}
