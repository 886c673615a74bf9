"""SyntheticSet: a distilled (or selected) set of images and everything needed to use it.

Saved as one safetensors file: tensors plus a JSON metadata string. Loading parses tensors
and JSON only, so it never executes code from the file (unlike a pickle).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save_file

from .errors import AtomDistillError
from .formation import check_factor, decode, decode_labels
from .io import atomic_folder, atomic_path, content_checksum
from .zca import ZCA

FORMAT_VERSION = 1


@dataclass
class SyntheticSet:
    """images live in the model-input space: normalised with mean/std, then ZCA-whitened if zca.

    With factor f > 1 every stored image holds f x f tiles (multi-formation, atomdistill.formation):
    training uses the decoded images (`decoded()`, `to_dataset()`), f^2 per stored image, while
    `images`, `len()` and `ipc` count what is stored."""

    images: torch.Tensor            # float32 [N, C, H, W]
    labels: torch.Tensor            # int64 [N]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None
    dataset: str = ""
    method: str = ""
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # e.g. iterations done, final loss, selection embedding
    factor: int = 1                             # multi-formation tiles per side (1: images used as stored)
    soft_labels: torch.Tensor | None = None    # float32 [N, K] class probabilities (imported sets), trained on

    # ---- shape ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ipc(self) -> int:
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        return int(counts.max())

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"SyntheticSet(dataset={self.dataset!r}, method={self.method!r}, classes={self.num_classes}, "
                f"ipc={self.ipc}, images={tuple(self.images.shape)}, zca={self.zca is not None}"
                + (f", factor={self.factor}: {len(self) * self.factor ** 2} training images" if self.factor > 1 else "")
                + ")")

    # ---- use ------------------------------------------------------------------------------
    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) to train on: the stored ones, or their f^2 decoded tiles each (factor f)."""
        if self.factor == 1:
            return self.images, self.labels
        return decode(self.images.detach(), self.factor), self.decoded_labels()

    def decoded_labels(self) -> torch.Tensor:
        """The label of every training image (decoded tile) without decoding the images."""
        return decode_labels(self.labels, self.factor)

    def to_dataset(self) -> torch.utils.data.TensorDataset:
        """A torch Dataset of (image, label) in the model-input space (the decoded images)."""
        return torch.utils.data.TensorDataset(*self.decoded())

    def prepare_real(self, normalised: torch.Tensor) -> torch.Tensor:
        """Map real images, normalised with this set's mean/std, into the set's space (ZCA)."""
        return self.zca(normalised) if self.zca is not None else normalised

    def to_pixels(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """True-colour images in [0, 1]: inverse ZCA, then inverse normalisation."""
        x = self.images if images is None else images
        x = x.detach().float().cpu()
        if self.zca is not None:
            x = self.zca.to("cpu").inverse(x)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def save_grid(self, path: str | os.PathLike, upscale: int | None = None, decoded: bool = False) -> Path:
        """A PNG grid, one row per class (at most 10 images of each shown): the stored images, or
        with `decoded` the images training sees (the same for factor 1)."""
        from PIL import Image
        from torchvision.utils import make_grid

        images, labels = self.decoded() if decoded else (self.images, self.labels)
        pixels = self.to_pixels(images)
        per_row = min(int(torch.bincount(labels, minlength=self.num_classes).max()), 10)
        rows = []
        for c in range(self.num_classes):
            idx = (labels == c).nonzero().flatten()[:per_row]
            row = pixels[idx]
            if len(row) < per_row:    # keep the grid rectangular for uneven classes
                row = torch.cat([row, row.new_ones(per_row - len(row), *row.shape[1:])])
            rows.append(row)
        grid = make_grid(torch.cat(rows), nrow=per_row, padding=1, pad_value=1.0)
        if upscale is None:   # small images are hard to see: aim for about 64 px per image
            upscale = max(1, 64 // self.image_size)
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
        if upscale > 1:
            img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
        with atomic_path(path) as tmp:   # PNG unless the name asks for another format PIL writes
            img.save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
        return Path(path)

    def export_folder(self, directory: str | os.PathLike, decoded: bool = False, overwrite: bool = False) -> Path:
        """One PNG per image in DIRECTORY/<class>/<k>.png, in true colours (stored, or `decoded`).

        DIRECTORY must be new or empty (files of an earlier export would be read back with this
        one); `overwrite` replaces an earlier export there. The folder appears whole or not at all."""
        from PIL import Image

        directory = Path(directory)
        images, labels = self.decoded() if decoded else (self.images, self.labels)
        pixels = (self.to_pixels(images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        seen = [0] * self.num_classes
        with atomic_folder(directory, overwrite=overwrite) as tmp:
            for img, label in zip(pixels, labels.tolist()):
                out = tmp / _safe_name(self.class_names[label]) / f"{seen[label]:04d}.png"
                seen[label] += 1
                out.parent.mkdir(exist_ok=True)
                Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(out, format="PNG")
        return directory

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as one safetensors file (images, labels, ZCA, soft labels, metadata)."""
        check_set_name(path)
        tensors = {"images": self.images.detach().float().cpu().contiguous(),
                   "labels": self.labels.detach().long().cpu().contiguous()}
        if not torch.isfinite(tensors["images"]).all():   # load() refuses such a set: never write one
            raise AtomDistillError(f"cannot save {path}: some of the set's pixels are NaN or infinite")
        if self.zca is not None:
            tensors.update({f"zca.{k}": v.cpu().contiguous() for k, v in self.zca.state_dict().items()})
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().float().cpu().contiguous()
        meta = {"format": "atomdistill.SyntheticSet", "version": FORMAT_VERSION,
                "class_names": self.class_names, "mean": list(self.mean), "std": list(self.std),
                "dataset": self.dataset, "method": self.method, "config": self.config, "info": self.info,
                "factor": self.factor}
        meta = json.loads(json.dumps(meta))   # the form load() will see (tuples become lists)
        meta["checksum"] = content_checksum(tensors, meta)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"atomdistill": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SyntheticSet":
        path = Path(path)
        if path.is_dir():   # a run folder: take its final set
            path = path / "synset.safetensors"
        if not path.exists() and path.name == "synset.safetensors" and (path.parent / "config.json").exists():
            run = path.parent   # a run folder whose run is going on or was stopped before its end
            raise AtomDistillError(f"{run} holds a run that has not finished (no synset.safetensors yet): wait for "
                                   f"it, or if it was stopped, continue it with `atomdistill distill --resume {run}`")
        if not path.exists():
            raise AtomDistillError(f"no synthetic set at {path}: pass a .safetensors file written by "
                                   "`atomdistill distill` or `atomdistill baseline`, or its run folder")
        try:
            meta, tensors = read_safetensors(path, "synthetic set", "re-create it")
        except AtomDistillError:
            _refuse_other_kinds(path)   # a picture, record or torch file given by mistake: say which
            raise
        if not isinstance(meta, dict) or meta.get("format") != "atomdistill.SyntheticSet":
            raise AtomDistillError(f"{path} is a safetensors file but not an atomdistill synthetic set")
        check_set_content(meta, tensors, path)
        zca_state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("zca.")}
        return cls(images=tensors["images"].to(device), labels=tensors["labels"].to(device),
                   class_names=meta["class_names"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                   zca=ZCA.from_state_dict(zca_state) if zca_state else None,
                   dataset=meta.get("dataset", ""), method=meta.get("method", ""), config=meta.get("config", {}),
                   info=meta.get("info", {}),
                   factor=_stored_factor(meta, path, tensors["images"].shape[-1]),
                   soft_labels=tensors["soft_labels"].to(device) if "soft_labels" in tensors else None)


# Names that promise another format: torch.load or pickle on a safetensors file fails obscurely.
OTHER_FORMAT_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".json")


def check_set_name(path: str | os.PathLike) -> None:
    """AtomDistillError for a set file named as if it were a torch, pickle, numpy or JSON file."""
    path = Path(path)
    if path.suffix.lower() in OTHER_FORMAT_SUFFIXES:
        raise AtomDistillError(
            f"{path}: a synthetic set is saved as safetensors, which torch.load and pickle cannot read; name it "
            f"{path.with_suffix('.safetensors').name} (for a torch file that DC/DM-style scripts read, export it: "
            "`atomdistill export SET --format dc --out res.pt`, or ad.export_set(synset, 'dc', 'res.pt'))")


# The files users pass for a set by mistake, told apart by their first bytes.
_OTHER_KINDS = ((b"\x89PNG", "a PNG picture (a set's grid?); pass the .safetensors file beside it"),
                (b"PK\x03\x04", "a torch/zip file; bring another tool's set in with `atomdistill import FILE "
                                "--format dc|mtt`"),
                (b"\x80", "a pickle/torch file; bring another tool's set in with `atomdistill import FILE "
                         "--format dc|mtt`"),
                (b"{", "a JSON file (an evaluation record?); pass the .safetensors set or its run folder"))


def _refuse_other_kinds(path: Path) -> None:
    """Only for a file that is not safetensors: a safetensors header's length may start with any byte."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return   # read_safetensors says why
    for magic, what in _OTHER_KINDS:
        if head.startswith(magic):
            raise AtomDistillError(f"{path} is not a synthetic set: it is {what}")


def read_safetensors(path: Path, what: str, fix: str) -> tuple:
    """(metadata 'atomdistill' JSON, tensors on the CPU) of a safetensors file; an AtomDistillError
    naming `what` and `fix` if it cannot be read (truncated, not safetensors, bad JSON).

    The file is read into memory once: safetensors' load_file maps it instead, and a mapped tensor
    changes (or faults) if the file is later rewritten in place."""
    try:
        raw = path.read_bytes()
        tensors = tensors_from_bytes(raw)   # validates the header (offsets, sizes, dtypes)
        (size,) = struct.unpack("<Q", raw[:8])
        text = (json.loads(raw[8:8 + size]).get("__metadata__") or {}).get("atomdistill")
        meta = None if text is None else json.loads(text)
    except (SafetensorError, OSError, ValueError, RuntimeError, RecursionError, struct.error, AttributeError,
            TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AtomDistillError(f"{path} is not a readable {what} ({reason}); {fix}") from None
    return meta, tensors


def check_set_content(meta: dict, tensors: dict, path) -> None:
    """AtomDistillError (one line) unless a loaded set is whole and consistent: the checksum
    matches (sets saved before it existed have none), required entries exist with the right
    types and shapes, labels lie within the classes and pixels are finite."""
    def bad(what: str):
        raise AtomDistillError(f"{path} is a damaged synthetic set ({what}); re-create it")

    if "checksum" in meta and meta["checksum"] != content_checksum(tensors, meta):
        bad("its content does not match its checksum")
    missing = [k for k in ("images", "labels") if k not in tensors] + \
              [k for k in ("class_names", "mean", "std") if k not in meta]
    if missing:
        bad(f"missing {', '.join(missing)}")
    names, mean, std = meta["class_names"], meta["mean"], meta["std"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        bad("class_names is not a non-empty list of names")
    for key, kind in (("dataset", str), ("method", str), ("config", dict), ("info", dict)):
        if key in meta and not isinstance(meta[key], kind):
            bad(f"{key} is not a {kind.__name__}")
    images, labels = tensors["images"], tensors["labels"]
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0 \
            or images.shape[2] != images.shape[3]:
        bad(f"images are {images.dtype} of shape {tuple(images.shape)}, not float [N>0, C, H, H]")
    channels = images.shape[1]
    for key, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)):
            bad(f"{key} is not a list of {channels} finite numbers, one per channel")
    if any(v <= 0 for v in std):
        bad("std has a value <= 0")
    if labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != images.shape[0]:
        bad(f"labels are {labels.dtype} of shape {tuple(labels.shape)}, not int64 [{images.shape[0]}]")
    if labels.min() < 0 or labels.max() >= len(names):
        bad(f"labels outside 0..{len(names) - 1}")
    if not torch.isfinite(images).all():
        bad("some pixels are NaN or infinite")
    zca = {k[4:]: v for k, v in tensors.items() if k.startswith("zca.")}
    if zca:
        dim = images[0].numel()
        shapes = {"mean": (dim,), "transform": (dim, dim), "inverse_transform": (dim, dim)}
        wrong = [k for k, shape in shapes.items() if k not in zca or tuple(zca[k].shape) != shape
                 or not zca[k].is_floating_point()]
        if wrong:
            bad(f"its ZCA {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} missing or not shaped for "
                f"{dim}-value images")
        if not all(torch.isfinite(t).all() for t in zca.values()):
            bad("its ZCA holds NaN or infinite values")


def _stored_factor(meta: dict, path: Path, image_size: int) -> int:
    """The multi-formation factor a file records (1 for files written before it existed)."""
    try:
        return check_factor(meta.get("factor", 1), image_size)
    except AtomDistillError as e:
        raise AtomDistillError(f"{path} records an invalid multi-formation factor ({e}); re-create the set") from None


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "class"
