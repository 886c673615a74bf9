"""Sets from other tools in and out, and the settings they were made for.

Formats (``FORMATS``):

- ``dc``: the result file of the DC / DSA / DM / DataDAM code,
  ``torch.save({'data': [[images, labels], ...], 'accs_all_exps': {...}})``, one ``[images, labels]``
  pair per experiment; images float ``[N, C, H, W]`` normalised with the dataset's mean/std and,
  when the code ran with ``--zca``, ZCA-whitened (kornia ``ZCAWhitening(eps=0.1)`` fitted on the
  normalised training split: the convention of atomdistill.zca); labels int ``[N]``.
- ``mtt``: separate tensor files as MTT-style code writes them, ``images_best.pt`` (same space as
  above), ``labels_best.pt`` (hard ``[N]`` or learned soft ``[N, K]``) and optionally the learned
  learning rate (``lr_best.pt`` or ``syn_lr_best.pt``).
- ``folder``: one PNG/JPEG per image in ``DIR/<class>/``, true colours (what
  ``SyntheticSet.export_folder`` writes and most releases ship).

Reading never executes code from a file: tensors, lists, dicts and numbers only
(``torch.load(weights_only=True)`` or safetensors); a file that needs other objects unpickled is
refused. Whether stored images are ZCA-whitened is not written in these files, so the user states it
(``zca=``) and the images' scale is checked against the dataset's: normalised real images have an
rms near the dataset's own, and the dataset's inverse ZCA blows them up (x23 on CIFAR-10), while
whitened images come back to that rms under the inverse.

Soft labels are stored as class probabilities; a source that stored logits (rows that are not
probability vectors) is converted with a softmax at temperature 1. Evaluation trains on them with
the soft cross-entropy ``-sum_k p_k log q_k`` (= KL(p || q) + the labels' entropy: the gradient of
KL at T = 1), see ``evaluate._loss``; ``label_controls`` adds the rows that show how much of a
soft-label score the labels carry.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from .data import ImageDataset, _decode_images, _hwc_to_tensor, _list_images, as_dataset, class_folders
from .errors import AtomDistillError
from .io import atomic_folder, atomic_path, check_new_file
from .synset import SyntheticSet, _safe_name
from .zca import ZCA

FORMATS = ("dc", "mtt", "folder")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"   # the DSA/DM/DataDAM/MTT evaluation default

# What each origin's code evaluates its sets with (its defaults for CIFAR-size images).
ORIGINS = {
    "dc": {"norm": "instance", "dsa": "none",
           "note": "DC's code evaluates without DSA (its augmentation is off outside MNIST)"},
    "dsa": {"norm": "instance", "dsa": DSA_STRATEGY},
    "dm": {"norm": "instance", "dsa": DSA_STRATEGY},
    "datadam": {"norm": "batch", "dsa": DSA_STRATEGY,
                "note": "DataDAM's code distils and evaluates on a batch-norm ConvNet"},
    "mtt": {"norm": "instance", "dsa": DSA_STRATEGY,
            "note": "MTT evaluates with its learned learning rate"},
}
SOFT_LOSS = "soft cross-entropy with the stored probabilities (the gradient of KL at T=1)"
PROBABILITY_TOLERANCE = 1e-3    # rows summing to 1 within this are probabilities, not logits
ZCA_CHECK_IMAGES = 5000         # real images a check-only ZCA is fitted on (the scale needs no more)
ZCA_CHECK_MARGIN = 0.25         # |log rms ratio| difference below which the space is not called


@dataclasses.dataclass
class Imported:
    synset: SyntheticSet
    notes: list[str]       # what was read and what it implies, for the user
    warnings: list[str]    # doubts about the user's statements (e.g. the ZCA claim)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise AtomDistillError(f"unknown format {fmt!r}; use --format {', '.join(FORMATS)}")


# ---- reading tensors safely ----------------------------------------------------------------
def load_tensors(path: str | Path):
    """The tensors/lists/dicts in a torch or safetensors file; anything needing code is refused."""
    path = Path(path)
    if not path.is_file():
        raise AtomDistillError(f"{path} does not exist; pass the file written by the other tool")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise AtomDistillError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():   # torch warns about pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise AtomDistillError(
                f"{path} refused: it needs {found.group(1)} unpickled, and unpickling objects can run code; "
                "re-save it with tensors, lists and dicts only (torch.save of plain tensors)") from None
        raise AtomDistillError(f"{path} refused: it is not a torch.save file of tensors, lists and dicts only "
                               "(reading it would need a full unpickler, which can run code); re-save it with "
                               "plain tensors") from None
    except Exception as e:   # a zip or pickle reader error: a corrupt or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AtomDistillError(f"{path} is not a readable torch file ({first}); pass the .pt file the other "
                               "tool saved") from None


def _tensor(obj, what: str) -> torch.Tensor:
    if not isinstance(obj, torch.Tensor):
        raise AtomDistillError(f"{what} is a {type(obj).__name__}, not a tensor; pass the file the other tool saved")
    return obj.detach().cpu()


def _check_images(images, data: ImageDataset, what: str) -> torch.Tensor:
    images = _tensor(images, what)
    want = (data.channels, data.image_size, data.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want or len(images) == 0:
        raise AtomDistillError(f"{what} have shape {tuple(images.shape)}, but {data.name} needs [N, "
                               f"{', '.join(map(str, want))}]; pass the matching --dataset (and --image-size)")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise AtomDistillError(f"{what} must be finite floats (normalised images), got {images.dtype} values "
                               "with NaN/inf or integers; pass the saved image tensor")
    return images.float().contiguous()


# ---- labels --------------------------------------------------------------------------------
def check_soft_labels(soft: torch.Tensor, n: int, num_classes: int, what: str = "soft labels") -> torch.Tensor:
    """Soft labels as float32 [n, num_classes] class probabilities, or a one-line AtomDistillError."""
    if not isinstance(soft, torch.Tensor) or not soft.is_floating_point() or tuple(soft.shape) != (n, num_classes):
        got = tuple(soft.shape) if isinstance(soft, torch.Tensor) else type(soft).__name__
        raise AtomDistillError(f"{what} must be float probabilities of shape [{n}, {num_classes}] (one row per "
                               f"image, one column per class), got {got}")
    soft = soft.detach().float()
    if not torch.isfinite(soft).all() or (soft < 0).any() or \
            ((soft.sum(1) - 1).abs() > PROBABILITY_TOLERANCE).any():
        raise AtomDistillError(f"{what} are not probabilities (rows must be >= 0 and sum to 1); re-import the set "
                               "from its source file")
    return soft


def read_labels(labels, n: int, num_classes: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(hard [N], soft [N, K] or None, how they were given: 'hard' | 'probabilities' | 'logits').

    Soft labels given as logits become probabilities by a softmax at T=1; hard labels of a soft
    set are the argmax."""
    labels = _tensor(labels, what)
    if labels.dim() == 1 and len(labels) == n:
        if labels.is_floating_point():
            if not torch.isfinite(labels).all() or (labels != labels.round()).any():
                raise AtomDistillError(f"{what} are fractional numbers, not class ids; pass integer labels [N] or "
                                       f"soft labels [N, {num_classes}]")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise AtomDistillError(f"{what} hold class id {int(bad[0])}, out of range for a dataset of {num_classes} "
                                   f"classes (0..{num_classes - 1}); pass the matching --dataset")
        return labels.long(), None, "hard"
    if labels.dim() == 2 and tuple(labels.shape) == (n, num_classes) and labels.is_floating_point():
        if not torch.isfinite(labels).all():
            raise AtomDistillError(f"{what} contain NaN or infinite values; pass the saved label tensor")
        probabilities = bool((labels >= 0).all() and ((labels.sum(1) - 1).abs() <= PROBABILITY_TOLERANCE).all())
        soft = labels.float() if probabilities else torch.softmax(labels.double(), 1).float()
        return soft.argmax(1), soft, "probabilities" if probabilities else "logits"
    raise AtomDistillError(f"{what} have shape {tuple(labels.shape)} ({labels.dtype}); expected class ids [{n}] or "
                           f"soft labels [{n}, {num_classes}] for {n} images of a {num_classes}-class dataset")


# ---- formats in ----------------------------------------------------------------------------
def read_dc(path: Path, index: int | None) -> tuple[object, object, dict]:
    """(images, labels, facts) of experiment `index` (default: the last) of a DC/DM result file."""
    obj = load_tensors(path)
    pairs = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise AtomDistillError(f"{path} is not a DC/DSA/DM/DataDAM result file (expected a dict with 'data': "
                               "[[images, labels], ...]); pass --format mtt for separate tensors")
    k = len(pairs) - 1 if index is None else index
    if not -len(pairs) <= k < len(pairs):
        raise AtomDistillError(f"--index {index} is out of range: {path} holds {len(pairs)} experiments "
                               f"(0..{len(pairs) - 1})")
    pair = pairs[k]
    if not isinstance(pair, (list, tuple)) or len(pair) < 2:
        raise AtomDistillError(f"{path}: experiment {k} is not an [images, labels] pair")
    facts = {"index": k % len(pairs), "experiments": len(pairs)}
    accs = obj.get("accs_all_exps")
    if isinstance(accs, dict):   # the source's own evaluation: {model: [accuracy, ...]}
        facts["source_accuracies"] = {str(m): [float(a) for a in v] for m, v in accs.items()
                                      if isinstance(v, (list, tuple)) and all(isinstance(a, (int, float)) for a in v)}
    return pair[0], pair[1], facts


MTT_IMAGES, MTT_LABELS, MTT_LRS = "images_best.pt", "labels_best.pt", ("lr_best.pt", "syn_lr_best.pt")


def read_mtt(path: Path, labels_path: str | Path | None) -> tuple[object, object, dict]:
    """(images, labels, facts) from a folder holding images_best.pt/labels_best.pt, or an image file."""
    folder = path if path.is_dir() else path.parent
    images_path = path / MTT_IMAGES if path.is_dir() else path
    if labels_path is None:
        labels_path = folder / (MTT_LABELS if path.is_dir() else path.name.replace("images", "labels"))
    labels_path = Path(labels_path)
    if labels_path == images_path:   # the name has no "images" to turn into "labels"
        raise AtomDistillError(f"no label file for {images_path}: MTT saves images_best.pt beside labels_best.pt, "
                               "and this name does not say which file holds the labels; pass --labels FILE (or "
                               "--format dc for a DC/DM/DataDAM result file)")
    if not labels_path.is_file():
        raise AtomDistillError(f"no label file for {images_path} (looked for {labels_path}); pass --labels FILE")
    facts = {"images": str(images_path), "labels": str(labels_path)}
    lr_path = next((folder / n for n in MTT_LRS if (folder / n).is_file()), None)
    if lr_path is not None:
        lr = load_tensors(lr_path)
        if isinstance(lr, torch.Tensor) and lr.numel() == 1 or isinstance(lr, (int, float)):
            facts["lr"] = float(lr)
    images, labels = load_tensors(images_path), load_tensors(labels_path)
    return images, labels, facts


def read_folder(path: Path, data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pixels in [0, 1] [N, C, H, W], labels [N], facts) from DIR/<class>/*.png|jpg.

    Sub-folders are matched to the dataset's classes by name (as export_folder writes them) or,
    when every name is a number, by class id."""
    if not path.is_dir():
        raise AtomDistillError(f"{path} is not a folder; --format folder needs DIR/<class>/*.png")
    folders = class_folders(path)
    if not folders:
        raise AtomDistillError(f"{path} has no class sub-folders; expected DIR/<class>/*.png (one folder per class)")
    by_name = {_safe_name(c): k for k, c in enumerate(data.class_names)}
    names = [f.name for f in folders]
    if all(n in by_name for n in names):
        ids = [by_name[n] for n in names]
    elif all(n.isdigit() and int(n) < data.num_classes for n in names):
        ids = [int(n) for n in names]
    else:
        unknown = [n for n in names if n not in by_name][:5]
        raise AtomDistillError(f"{path}: sub-folders {unknown} are not {data.name} classes; name them after the "
                               f"classes ({', '.join(list(by_name)[:5])}, ...) or by class id 0..{data.num_classes - 1}")
    images, labels = [], []
    for k, folder in sorted(zip(ids, folders)):   # the dataset's class order
        files = _list_images(folder)
        if files:
            arr, _ = _decode_images(files, None)
            if arr.shape[1] != data.image_size:
                raise AtomDistillError(f"{folder} holds {arr.shape[1]}px images but {data.name} is "
                                       f"{data.image_size}px; load the dataset with --image-size {arr.shape[1]}")
            images.append(_hwc_to_tensor(arr, data.channels))
            labels += [k] * len(files)
    if not labels:
        raise AtomDistillError(f"{path} holds no PNG/JPEG images in its class folders")
    return torch.cat(images), torch.tensor(labels), {"classes_found": len(folders)}


# ---- the ZCA claim -------------------------------------------------------------------------
def _rms(x: torch.Tensor) -> float:
    return max(float(x.double().pow(2).mean().sqrt()), 1e-12)   # > 0: its log is taken


def guess_space(images: torch.Tensor, data: ImageDataset, zca: ZCA) -> tuple[str | None, str]:
    """'normalised', 'whitened' or None (can't tell) for stored images, and the evidence.

    Compares the images' rms as stored and after the dataset's inverse ZCA with the rms of the
    normalised real images: the right space is the one in which they look like real images."""
    ref = _rms(data.train_images[:: max(1, len(data.train_images) // ZCA_CHECK_IMAGES)])
    as_is, unwhitened = _rms(images), _rms(zca.inverse(images))
    off_normalised, off_whitened = abs(math.log(as_is / ref)), abs(math.log(unwhitened / ref))
    evidence = (f"rms {as_is:.2f} as stored, {unwhitened:.2f} after {data.name}'s inverse ZCA; "
                f"normalised real images {ref:.2f}")
    if abs(off_normalised - off_whitened) < ZCA_CHECK_MARGIN:
        return None, evidence
    return ("normalised" if off_normalised < off_whitened else "whitened"), evidence


def _fit_zca(data: ImageDataset, full: bool) -> ZCA:
    """The dataset's ZCA (eps 0.1 on the normalised training split, as distillation fits it);
    `full=False` fits on a subset, enough for the scale check."""
    train = data.train_images.cpu()
    return ZCA.fit(train if full else train[:: max(1, len(train) // ZCA_CHECK_IMAGES)])


# ---- settings a set was made for ------------------------------------------------------------
def origin_settings(origin: str, image_size: int) -> dict:
    """The evaluation settings an origin's code uses: network (registry name), norm, DSA, note."""
    if origin not in ORIGINS:
        raise AtomDistillError(f"unknown --origin {origin!r}; use one of {', '.join(ORIGINS)}")
    from .models import list_models
    spec = dict(ORIGINS[origin])
    # Their ConvNet is 3 blocks up to 32 px and 4 at 64 px (ConvNetD4), as atomdistill picks too.
    net = ("convnet-d4" if image_size >= 64 else "convnet") + ("-bn" if spec["norm"] == "batch" else "")
    spec["net"] = net if net in list_models() else None
    if spec["net"] is None:
        spec["note"] = spec.get("note", "") + f" (a depth-4 {spec['norm']}-norm ConvNet: no registered name)"
    return {"origin": origin, **spec}


def made_for(synset: SyntheticSet) -> dict | None:
    """The evaluation settings a set was made for: recorded at import, or its distillation's config."""
    if synset.info.get("eval_settings"):
        return dict(synset.info["eval_settings"])
    net = synset.config.get("net")
    if not net:
        return None   # a baseline or the whole set: made for nothing in particular
    from .models import model_info
    try:
        norm = model_info(net).get("norm")
    except AtomDistillError:
        norm = None
    return {"origin": "atomdistill", "net": net, "norm": norm, "dsa": synset.config.get("dsa"),
            "zca": synset.zca is not None}


def describe_settings(s: dict) -> str:
    net = f"{s['net']} ({s['norm']} norm)" if s.get("net") else "network not stated"
    dsa = {None: "DSA not stated", "none": "no DSA"}.get(s.get("dsa"), f"DSA {s.get('dsa')}")
    text = f"{net}, {dsa}, ZCA {'on' if s.get('zca') else 'off'}"
    if s.get("lr") is not None:
        text += f", lr {s['lr']:.4g}"
    if s.get("origin"):
        text += f" (origin {s['origin']}" + (f": {s['note']}" if s.get("note") else "") + ")"
    return text


def settings_advice(s: dict | None, models) -> list[str]:
    """Where an evaluation differs from what the set was made for."""
    if not s:
        return []
    out = []
    # (a set distilled here on another network is a cross-architecture evaluation: nothing to say)
    if s.get("net") and s["net"] not in models and s.get("origin") != "atomdistill":
        out.append(f"the set was made for {s['net']} and was evaluated with {', '.join(models)}: add "
                   f"--models {s['net']} to evaluate it as its authors did")
    if s.get("dsa") == "none":
        out.append("the set was made for evaluation without DSA; this protocol trains with DSA")
    if s.get("lr") is not None:
        out.append(f"the set was made for training at lr {s['lr']:.4g}; this protocol uses its own lr")
    return out


# ---- import ----------------------------------------------------------------------------------
def import_set(path: str | Path, fmt: str, data: ImageDataset | str, *, zca: bool | None = None,
               index: int | None = None, origin: str | None = None, method: str | None = None,
               labels: str | Path | None = None) -> Imported:
    """A SyntheticSet from another tool's file (see FORMATS), carrying the dataset's normalisation,
    the ZCA when `zca` (fitted on the dataset, eps 0.1) and the settings it was made for. `data`:
    the ImageDataset the set was made from, or its name (loaded from ./data)."""
    path = Path(path)
    check_format(fmt)
    data = as_dataset(data, "import_set", "the dataset the set was made from (an ImageDataset or a dataset name)")
    if origin is None and fmt == "mtt":
        origin = "mtt"
    settings = origin_settings(origin, data.image_size) if origin is not None else {}
    notes, warns = [], []
    if fmt == "folder":
        pixels, hard, facts = read_folder(path, data)
        mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.std).view(1, -1, 1, 1)
        images, soft, given = (pixels - mean) / std, None, "hard"
        fitted = _fit_zca(data, True) if zca else None
        if fitted is not None:
            images = fitted(images)
        notes.append(f"read {len(hard)} images from {facts['classes_found']} class folders of {path}"
                     + ("; whitened with the dataset's ZCA" if zca else ""))
    else:
        raw_images, raw_labels, facts = read_dc(path, index) if fmt == "dc" else read_mtt(path, labels)
        where = f"{path} experiment {facts['index']}" if fmt == "dc" else str(facts["images"])
        images = _check_images(raw_images, data, f"the images of {where}")
        hard, soft, given = read_labels(raw_labels, len(images), data.num_classes, f"the labels of {where}")
        fitted = _fit_zca(data, zca is True)
        space, evidence = guess_space(images, data, fitted)
        if zca is None:
            raise AtomDistillError(f"say whether the images are ZCA-whitened: --zca or --no-zca (they look "
                                   f"{space or 'like either'}: {evidence})")
        claimed = "whitened" if zca else "normalised"
        if space is not None and space != claimed:
            warns.append(f"the images look {space}, not {claimed} as stated ({evidence}); if so, import again with "
                         + ("--no-zca" if zca else "--zca") + ": a set evaluated in the wrong space scores near chance")
        if not zca:
            fitted = None
        read = (f"experiment {facts['index']} of {facts['experiments']} in {path}" if fmt == "dc"
                else f"{facts['images']} and {facts['labels']}")
        check = ("the images' scale agrees" if space == claimed else "the scale disagrees" if space
                 else "the scale does not tell")
        notes.append(f"read {read}: {len(images)} images {'x'.join(map(str, images.shape[1:]))}, {given} labels; "
                     f"ZCA {'on' if zca else 'off'} as stated, {check} ({evidence})")
        if facts.get("lr") is not None:
            settings["lr"] = facts["lr"]
        accs = facts.get("source_accuracies")
        if accs:
            import numpy as np
            notes.append("the file's own evaluation: " + ", ".join(
                f"{m} {100 * np.mean(a):.2f} ± {100 * np.std(a):.2f} ({len(a)} runs)" for m, a in accs.items() if a))
    settings["zca"] = bool(zca)
    counts = torch.bincount(hard, minlength=data.num_classes)
    if soft is not None and counts.min() != counts.max():
        warns.append(f"the soft labels' argmax, taken as the images' classes, gives {int(counts.min())} to "
                     f"{int(counts.max())} images per class: the hard-label control and the IPC follow it")
    if soft is not None:
        notes.append(f"soft labels given as {given}" + (" (softmax at T=1 to probabilities)" if given == "logits" else "")
                     + f"; evaluation trains with {SOFT_LOSS}")
    if origin is not None:
        notes.append(f"made for: {describe_settings(settings)}")
    else:
        notes.append("origin not stated: --origin " + "|".join(ORIGINS) + " records the network and DSA its "
                     "code evaluates with")
    info = {"eval_settings": settings, "imported": {"format": fmt, "path": str(path), **facts}}
    if soft is not None:
        info["soft_labels"] = {"given_as": given, "loss": SOFT_LOSS}
    synset = SyntheticSet(images=images, labels=hard, class_names=list(data.class_names), mean=tuple(data.mean),
                          std=tuple(data.std), zca=fitted, dataset=data.name, method=method or origin or fmt,
                          config={"format": fmt, "origin": origin}, info=info, soft_labels=soft)
    return Imported(synset, notes, warns)


# ---- export ----------------------------------------------------------------------------------
def _save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def export_set(synset: SyntheticSet, fmt: str, out: str | Path, overwrite: bool = False) -> list[str]:
    """Write `synset` in another tool's format (plain tensors, lists and dicts only); returns notes.

    `out` is a .pt file (dc) or a folder (mtt, folder) that must be new or empty: the other tools
    read every file there. `overwrite` replaces an existing file, or a folder holding an earlier
    export. Either way the result appears whole: a killed export leaves the old one or nothing."""
    out = Path(out)
    check_format(fmt)
    if fmt == "dc":
        check_new_file(out, overwrite=overwrite)
    # Other tools do not decode multi-formation sets: they get the images training sees.
    images, labels = (t.detach().cpu().contiguous() for t in synset.decoded())
    images, labels = images.float(), labels.long()
    notes = [f"a multi-formation set (factor {synset.factor}): its {len(images)} decoded images were written, as "
             "training sees them"] if synset.factor > 1 else []
    if fmt == "dc":
        _save_torch({"data": [[images, labels]], "accs_all_exps": {}}, out)
        notes.append(f"wrote {out}: {{'data': [[images {tuple(images.shape)}, labels {tuple(labels.shape)}]]}}")
        if synset.soft_labels is not None:
            notes.append("the DC format has hard labels only: the argmax was written; --format mtt keeps the soft labels")
    elif fmt == "mtt":
        targets = labels if synset.soft_labels is None else \
            synset.soft_labels.detach().float().cpu().repeat_interleave(synset.factor ** 2, dim=0).contiguous()
        written = [MTT_IMAGES, MTT_LABELS]
        lr = (made_for(synset) or {}).get("lr")
        with atomic_folder(out, overwrite=overwrite) as tmp:
            torch.save(images, tmp / MTT_IMAGES)
            torch.save(targets, tmp / MTT_LABELS)
            if lr is not None:
                torch.save(torch.tensor(float(lr)), tmp / MTT_LRS[0])
                written.append(MTT_LRS[0])
        notes.append(f"wrote {', '.join(str(out / n) for n in written)}"
                     + (" (soft labels: probabilities)" if synset.soft_labels is not None else ""))
    else:
        synset.export_folder(out, decoded=True, overwrite=overwrite)
        notes.append(f"wrote {len(images)} PNGs in true colours to {out}/<class>/ (8-bit)")
        if synset.soft_labels is not None:
            notes.append("an image folder has hard labels only (its class folders); --format mtt keeps the soft labels")
    if fmt != "folder":
        notes.append("images are normalised with the dataset's mean/std" + (
            " and ZCA-whitened (eps 0.1, fitted on the normalised training split): evaluate them with the other "
            "tool's --zca" if synset.zca is not None else ", not whitened: evaluate them without ZCA"))
    return notes


# ---- soft-label controls --------------------------------------------------------------------
def random_real_with_soft_labels(synset: SyntheticSet, data: ImageDataset, seed: int = 0) -> SyntheticSet:
    """A random real subset of the set's IPC, each image given its class's mean soft label in the set.

    No teacher network is trained here (DD-Ranking's control labels real images with a teacher's
    outputs): the class mean keeps what the set's labels say about how classes resemble each
    other but none of their per-image knowledge, so this control shows the labels' share of the
    score without a teacher's extra knowledge. A class with no image in the set keeps one-hot."""
    from .baselines import select_coreset
    picked = select_coreset(data, synset.ipc, "random", seed=seed, zca=False)
    soft = check_soft_labels(synset.soft_labels, len(synset), synset.num_classes)
    class_means = torch.eye(synset.num_classes)
    for k in range(synset.num_classes):
        mine = synset.labels == k
        if mine.any():
            class_means[k] = soft[mine].mean(0)
    return SyntheticSet(images=synset.prepare_real(picked.images), labels=picked.labels,
                        class_names=list(synset.class_names), mean=synset.mean, std=synset.std, zca=synset.zca,
                        dataset=synset.dataset, method=f"random + {synset.method} class-mean soft labels",
                        config={"ipc": synset.ipc, "seed": seed}, info={"indices": picked.info["indices"]},
                        soft_labels=class_means[picked.labels])


def label_controls(synset: SyntheticSet, data: ImageDataset, evaluate: Callable[[SyntheticSet], dict], *,
                   seed: int = 0) -> list[dict]:
    """Beside a soft-label set's score: (a) the same images with hard (argmax) labels, (b) a random
    real subset of the same IPC with the set's class-mean soft labels (drawn with `seed`);
    `evaluate(set)` runs each exactly like the set itself (same models and protocol)."""
    if synset.soft_labels is None:
        return []
    hard = dataclasses.replace(synset, soft_labels=None, method=f"{synset.method} hard labels")
    real = random_real_with_soft_labels(synset, data, seed)
    return [{"control": "hard labels", "method": hard.method,
             "description": "the same images trained on their argmax labels", "results": evaluate(hard)},
            {"control": "random real + soft labels", "method": real.method,
             "description": f"{real.ipc} random real images per class (seed {seed}), each with its class's mean "
                            "soft label in the set (no teacher)",
             "results": evaluate(real)}]


def annotate_record(record: dict, synset: SyntheticSet, controls: list[dict]) -> dict:
    """Add what the set was made for, its labels and the label controls to an evaluation record."""
    settings = made_for(synset)
    if settings:
        record["set"]["made_for"] = settings
    if synset.soft_labels is not None:
        record["set"]["labels"] = {"kind": "soft", **synset.info.get("soft_labels", {"loss": SOFT_LOSS})}
    if controls:   # evaluate()'s results are plain floats already: JSON as they are
        record["controls"] = controls
    return record
