"""Tests for atomdistill.data: tiny fake copies of every on-disk format, written to tmp_path."""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atomdistill import data as D
from atomdistill.data import (ImageDataset, count_classes, denormalize, format_description, list_datasets,
                             load_dataset)
from atomdistill.errors import AtomDistillError, DatasetError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------
# Fake data writers (real formats)
# ------------------------------------------------------------------------------------------


def _rows_for(labels: np.ndarray) -> np.ndarray:
    """CIFAR rows whose pixel values encode the label (R plane = 10*label) so the mapping is checkable."""
    n = len(labels)
    rows = np.zeros((n, 3, 32, 32), np.uint8)
    rows[:, 0] = (10 * labels)[:, None, None]
    rows[:, 1] = 128
    rows[:, 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    return rows.reshape(n, -1)


def _dump(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:  # as the official Python-2 files look when read with encoding='bytes'
        obj = {k.encode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, bytes_keys: bool = True) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = (np.arange(per_batch) + b) % 10
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5",
                                           "labels": labels.tolist(), "data": _rows_for(labels)}, bytes_keys)
    labels = np.arange(n_test) % 10
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                                  "data": _rows_for(labels)}, bytes_keys)
    names = [n.encode() for n in CIFAR10_NAMES] if bytes_keys else CIFAR10_NAMES
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch,
                                    "num_vis": 3072}, bytes_keys)
    return folder


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        _dump(folder / split, {"filenames": [b"x"] * n, "fine_labels": fine.tolist(),
                               "coarse_labels": (fine // 5).tolist(), "data": _rows_for(fine % 25)}, True)
    _dump(folder / "meta", {"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                            "coarse_label_names": [f"s{i}".encode() for i in range(20)]}, True)
    return folder


def _save_img(path: Path, value: int, size: int = 64, mode: str = "RGB", ext: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        arr = np.full((size, size), value, np.uint8)
    else:
        arr = np.full((size, size, 3), value, np.uint8)
        arr[..., 1] = 255 - value
    Image.fromarray(arr, mode).save(path, format=ext)


TINY_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted in wnids.txt: class order must be sorted


def write_tiny(root: Path, per_class: int = 4, val_per_class: int = 2) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\n")  # n03 has no name
    lines = []
    for w in TINY_WNIDS:
        c = sorted(TINY_WNIDS).index(w)
        for k in range(per_class):
            # one grayscale JPEG per class: must be converted to RGB
            _save_img(folder / "train" / w / "images" / f"{w}_{k}.JPEG", 60 * c + k,
                      mode="L" if k == 0 else "RGB")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    v = 0
    for k in range(val_per_class):
        for w in TINY_WNIDS:
            c = sorted(TINY_WNIDS).index(w)
            _save_img(folder / "val" / "images" / f"val_{v}.JPEG", 60 * c)
            lines.append(f"val_{v}.JPEG\t{w}\t0\t0\t63\t63")
            v += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class=3, test_name="test",
                 size=32, mode="RGB", test_classes=None) -> Path:
    for split, n, names in (("train", per_class, classes), (test_name, 2, test_classes or classes)):
        for ci, c in enumerate(names):
            for k in range(n):
                ext = ["PNG", "BMP", "JPEG"][k % 3] if mode == "RGB" else "PNG"
                suffix = {"PNG": ".png", "BMP": ".bmp", "JPEG": ".jpg"}[ext]
                _save_img(root / split / c / f"{k}{suffix}", 40 * ci + 5 * k, size=size, mode=mode, ext=ext)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_loads(tmp_path, bytes_keys):
    write_cifar10(tmp_path, bytes_keys=bytes_keys)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_NAMES and ds.classes is None
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.train_images.dtype == torch.float32
    assert ds.test_images.shape == (30, 3, 32, 32)
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [10] * 10
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 3, 32)
    assert ds.mean == D.CIFAR10_MEAN and ds.std == D.CIFAR10_STD
    # Normalised with the fixed stats: undoing it gives back the stored pixels, label in R plane.
    raw = denormalize(ds.train_images, ds.mean, ds.std) * 255
    assert torch.allclose(raw[:, 0, 0, 0], 10 * ds.train_labels.float(), atol=1e-3)
    assert torch.allclose(raw[:, 1], torch.full_like(raw[:, 1], 128.0), atol=1e-3)
    # Train order: batches 1..5 in order, rows in file order (batch 1 starts with label 1).
    assert ds.train_labels[:3].tolist() == [1, 2, 3]
    assert ds.train_labels[20:22].tolist() == [2, 3]


def test_cifar10_data_root_may_be_inner_folder(tmp_path):
    inner = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", inner)
    assert len(ds.train_labels) == 100


def test_cifar10_classes_subset(tmp_path):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, classes=[7, 2])
    assert ds.class_names == ["horse", "bird"] and ds.classes == [7, 2] and ds.num_classes == 2
    assert ds.train_images.shape[0] == 20 and ds.test_images.shape[0] == 6
    raw = denormalize(ds.train_images, ds.mean, ds.std) * 255
    orig = torch.tensor([7, 2])[ds.train_labels].float()
    assert torch.allclose(raw[:, 0, 0, 0], 10 * orig, atol=1e-3)  # remapped in the given order
    raw_t = denormalize(ds.test_images, ds.mean, ds.std) * 255
    assert torch.allclose(raw_t[:, 0, 0, 0], 10 * torch.tensor([7, 2])[ds.test_labels].float(), atol=1e-3)
    idx = ds.class_indices()
    assert [len(i) for i in idx] == [10, 10]
    assert all((ds.train_labels[i] == c).all() for c, i in enumerate(idx))


@pytest.mark.parametrize("classes", [[], [10], [-1], [1, 1]])
def test_bad_classes(tmp_path, classes):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetError):
        load_dataset("cifar10", tmp_path, classes=classes)


def test_cifar100_loads(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_names[:2] == ["c00", "c01"]
    assert ds.train_images.shape == (200, 3, 32, 32) and ds.test_images.shape == (100, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [2] * 100
    assert ds.mean == D.CIFAR100_MEAN
    ds = load_dataset("cifar-100", tmp_path / "cifar-100-python", classes=[99, 5])
    assert ds.class_names == ["c99", "c05"] and ds.train_labels.tolist().count(0) == 2
    assert len(ds.test_labels) == 2


def test_missing_folder_message(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--download" in msg
    with pytest.raises(DatasetError, match="--download"):
        load_dataset("cifar100", tmp_path)


def test_download_only_when_missing(tmp_path, monkeypatch):
    """download=True calls torchvision with the official URL/md5, and only when the folder is absent."""
    from torchvision.datasets import utils as tv_utils

    calls = []

    def fake(url, download_root, md5=None, **kw):
        calls.append((url, md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake)
    ds = load_dataset("cifar10", tmp_path, download=True)
    assert len(ds.train_labels) == 100
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")]
    load_dataset("cifar10", tmp_path, download=True)
    assert len(calls) == 1  # already there: no second download

    def failing(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", failing)
    with pytest.raises(DatasetError, match="could not download"):
        load_dataset("cifar100", tmp_path, download=True)


def test_truncated_pickle(tmp_path):
    folder = write_cifar10(tmp_path)
    f = folder / "data_batch_3"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in str(e.value)


def test_garbage_and_missing_files(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_wrong_shapes_and_keys(tmp_path):
    folder = write_cifar10(tmp_path)
    _dump(folder / "data_batch_1", {"labels": [0, 1], "data": np.zeros((2, 100), np.uint8)}, True)
    with pytest.raises(DatasetError, match="shape"):
        load_dataset("cifar10", tmp_path)
    _dump(folder / "data_batch_1", {"data": np.zeros((2, 3072), np.uint8)}, True)
    with pytest.raises(DatasetError, match="labels"):
        load_dataset("cifar10", tmp_path)
    _dump(folder / "data_batch_1", {"labels": [0, 1, 2], "data": np.zeros((2, 3072), np.uint8)}, True)
    with pytest.raises(DatasetError):
        load_dataset("cifar10", tmp_path)


def test_cifar_image_size(tmp_path):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, image_size=16)
    assert ds.train_images.shape == (100, 3, 16, 16) and ds.image_size == 16


# ------------------------------------------------------------------------------------------
# TinyImageNet
# ------------------------------------------------------------------------------------------


def test_tinyimagenet_loads(tmp_path):
    write_tiny(tmp_path)
    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.class_names == ["goldfish", "shark", "n03"]  # sorted wnids; words.txt names; fallback wnid
    assert ds.train_images.shape == (12, 3, 64, 64) and ds.test_images.shape == (6, 3, 64, 64)
    assert torch.bincount(ds.train_labels).tolist() == [4, 4, 4]
    assert torch.bincount(ds.test_labels).tolist() == [2, 2, 2]
    assert ds.mean == D.TINY_MEAN
    raw = denormalize(ds.test_images, ds.mean, ds.std) * 255
    # val image of class c has R = 60*c (JPEG is lossy on the flat colour: small tolerance)
    assert torch.allclose(raw[:, 0].mean((1, 2)), 60 * ds.test_labels.float(), atol=3)
    # grayscale JPEG got 3 identical channels
    train_raw = denormalize(ds.train_images, ds.mean, ds.std) * 255
    gray = train_raw[ds.train_labels == 0][0]  # n01_0.JPEG, saved as mode L
    assert torch.allclose(gray[0], gray[1], atol=1e-3) and torch.allclose(gray[0], gray[2], atol=1e-3)


def test_tinyimagenet_subset_and_inner_root(tmp_path):
    inner = write_tiny(tmp_path)
    ds = load_dataset("tiny-imagenet", inner, classes=[2, 0], image_size=32)
    assert ds.class_names == ["n03", "goldfish"] and ds.classes == [2, 0]
    assert ds.train_images.shape == (8, 3, 32, 32) and len(ds.test_labels) == 4
    raw = denormalize(ds.test_images, ds.mean, ds.std) * 255
    assert torch.allclose(raw[:, 0].mean((1, 2)), 60 * torch.tensor([2, 0])[ds.test_labels].float(), atol=3)


def test_tinyimagenet_skips_other_classes(tmp_path):
    """Images of classes not asked for are never decoded: a corrupt one there does not matter."""
    inner = write_tiny(tmp_path)
    (inner / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b"broken")
    ds = load_dataset("tinyimagenet", tmp_path, classes=[0])
    assert len(ds.train_labels) == 4
    with pytest.raises(DatasetError, match="n02_1.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", tmp_path)


# ------------------------------------------------------------------------------------------
# folder:
# ------------------------------------------------------------------------------------------


def test_folder_loads_and_normalises(tmp_path):
    write_folder(tmp_path)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.train_images.shape == (9, 3, 32, 32) and ds.test_images.shape == (6, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [3, 3, 3]
    m = ds.train_images.mean((0, 2, 3))
    s = ds.train_images.std((0, 2, 3), unbiased=False)
    assert torch.allclose(m, torch.zeros(3), atol=1e-4) and torch.allclose(s, torch.ones(3), atol=1e-3)
    assert 0 < ds.mean[0] < 1 and ds.std[0] > 0


def test_folder_resize_val_and_grayscale(tmp_path):
    write_folder(tmp_path, size=20, mode="L", test_name="val")
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.channels == 1 and ds.image_size == 8
    assert ds.train_images.shape == (9, 1, 8, 8) and ds.test_images.shape == (6, 1, 8, 8)
    raw = denormalize(ds.train_images, ds.mean, ds.std) * 255
    expected = torch.tensor([40 * c + 5 * k for c in range(3) for k in range(3)], dtype=torch.float32)
    assert torch.allclose(raw.mean((1, 2, 3)), expected, atol=0.5)  # constant images survive resizing


def test_folder_mixed_modes_become_rgb(tmp_path):
    write_folder(tmp_path, size=32, mode="L")
    _save_img(tmp_path / "test" / "dog" / "color.png", 100, size=32, ext="PNG")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.channels == 3


def test_folder_subset_does_not_decode_other_classes(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"nope")
    ds = load_dataset(f"folder:{tmp_path}", classes=[2, 1])
    assert ds.class_names == ["emu", "dog"] and ds.classes == [2, 1]
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_test_classes_must_be_subset(tmp_path):
    write_folder(tmp_path, test_classes=("cat", "yak"))
    with pytest.raises(DatasetError, match="yak"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_test_subset_ok_but_said(tmp_path, capsys):
    write_folder(tmp_path, test_classes=("dog",))
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.test_labels.tolist() == [1, 1]
    # It loaded silently, and the accuracy then left two of the three classes out unsaid.
    err = capsys.readouterr().err
    assert "warning" in err and "no folder for 2 of the 3 classes (cat, emu)" in err
    load_dataset(f"folder:{tmp_path}", classes=[1])   # every kept class has test images: nothing to say
    assert capsys.readouterr().err == ""


def test_folder_hidden_folders_are_not_classes(tmp_path, capsys):
    # Jupyter's .ipynb_checkpoints became a class (then "holds no images"), and an interrupted
    # export's temporary folder would have become one too.
    write_folder(tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    assert load_dataset(f"folder:{tmp_path}").class_names == ["cat", "dog", "emu"]
    assert count_classes(f"folder:{tmp_path}") == 3 and capsys.readouterr().err == ""


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="train"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="val"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{tmp_path}")


# ------------------------------------------------------------------------------------------
# digits / registry / container
# ------------------------------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert ds.train_images.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert ds.class_names == [str(i) for i in range(10)]
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert 1200 < len(ds.train_labels) < 1300 and 500 < len(ds.test_labels) < 600
    counts = torch.bincount(ds.test_labels, minlength=10)
    total = counts + torch.bincount(ds.train_labels, minlength=10)
    assert ((counts.float() / total.float() - 0.3).abs() < 0.01).all()  # stratified
    assert abs(float(ds.train_images.mean())) < 1e-4
    assert abs(float(ds.train_images.std(unbiased=False)) - 1) < 1e-3
    raw = denormalize(ds.train_images, ds.mean, ds.std)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_digits_deterministic_and_aliases():
    a, b = load_dataset("digits"), load_dataset("default")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    tr, te = D._digits_split(np.repeat(np.arange(10), 20))
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 200
    assert np.array_equal(tr, D._digits_split(np.repeat(np.arange(10), 20))[0])


def test_digits_image_size_and_subset():
    ds = load_dataset("digits", image_size=16, classes=[3, 1])
    assert ds.train_images.shape[1:] == (1, 16, 16) and ds.num_classes == 2
    assert ds.class_names == ["3", "1"]
    full = load_dataset("digits")
    # shards share the full train statistics
    assert ds.mean == full.mean and ds.std == full.std
    n3 = int((full.train_labels == 3).sum())
    assert int((ds.train_labels == 0).sum()) == n3


def test_unknown_name():
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist")
    for n in ("cifar10", "digits", "folder:"):
        assert n in str(e.value)
    assert isinstance(e.value, AtomDistillError)
    assert "cifar10" in list_datasets() and "digits" in list_datasets()


def test_the_table_of_datasets_answers_without_loading(tmp_path):
    from atomdistill.data import DATASETS, count_classes, dataset_spec, zca_by_default
    assert list_datasets() == list(DATASETS)
    assert count_classes("digits") == 10 and count_classes("cifar100") == 100 and count_classes("tiny-imagenet") == 200
    assert dataset_spec("CIFAR-10").name == "cifar10" and dataset_spec("default").name == "digits"
    assert zca_by_default("cifar10") and zca_by_default("cifar-100")   # aliases too, as ATOM whitened CIFAR
    assert not zca_by_default("digits") and not zca_by_default("tinyimagenet") and not zca_by_default("toy")
    for name in ("a", "b", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert count_classes(f"folder:{tmp_path}") == 3
    with pytest.raises(DatasetError, match="unknown dataset"):
        count_classes("imagenet-99")
    # a near miss names the closest dataset, and a folder's path the folder: form it needs
    with pytest.raises(DatasetError, match="'cifar1000' \\(did you mean 'cifar100'\\?\\)"):
        count_classes("cifar1000")
    with pytest.raises(DatasetError, match=f"use --dataset folder:{tmp_path}$"):
        count_classes(str(tmp_path))


def test_class_indices_cached_and_describe():
    ds = load_dataset("digits")
    idx = ds.class_indices()
    assert ds.class_indices() is idx
    assert len(idx) == 10 and all(i.dtype == torch.int64 for i in idx)
    assert sorted(torch.cat(idx).tolist()) == list(range(len(ds.train_labels)))
    assert all((ds.train_labels[i] == c).all() for c, i in enumerate(idx))
    d = ds.describe()
    assert d["num_classes"] == 10 and d["train"] == len(ds.train_labels) and d["channels"] == 1
    assert d["train_per_class_min"] <= d["train_per_class_max"]
    text = format_description(d)
    assert "digits" in text and "1x8x8" in text and str(d["train"]) in text
    moved = ds.to("cpu")
    assert isinstance(moved, ImageDataset) and moved.train_images.device.type == "cpu"


def test_imagedataset_rejects_bad_shapes():
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(DatasetError):
        ImageDataset("x", ["a"], x, torch.zeros(3, dtype=torch.long), x, torch.zeros(4, dtype=torch.long),
                     (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(DatasetError):
        ImageDataset("x", ["a"], torch.zeros(4, 3, 8), torch.zeros(4, dtype=torch.long), x,
                     torch.zeros(4, dtype=torch.long), (0.0,) * 3, (1.0,) * 3)


def test_denormalize_roundtrip():
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    y = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(denormalize(y, mean, std), x, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("ATOMDISTILL_CIFAR_ROOT"), reason="set ATOMDISTILL_CIFAR_ROOT to a CIFAR-10 copy")
def test_real_cifar10():
    t = time.perf_counter()
    ds = load_dataset("cifar10", os.environ["ATOMDISTILL_CIFAR_ROOT"])
    elapsed = time.perf_counter() - t
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert abs(float(ds.train_images.mean())) < 0.1
    print(f"real CIFAR-10 loaded in {elapsed:.2f}s")
