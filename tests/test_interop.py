"""Sets from other tools: files in each format built here, round trips, safety, soft labels."""
import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from atomdistill import SyntheticSet
from atomdistill.baselines import select_coreset
from atomdistill.cli import main
from atomdistill.data import load_dataset
from atomdistill.distill import distill
from atomdistill.errors import AtomDistillError
from atomdistill.evaluate import EvalProtocol, _loss, evaluate, train_and_test
from atomdistill.interop import export_set, import_set, load_tensors, read_labels
from atomdistill.zca import ZCA

from conftest import make_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_zca(digits):
    return ZCA.fit(digits.train_images)


def real_set(digits, ipc=2, zca=None, seed=0):
    s = select_coreset(digits, ipc, "random", seed=seed, zca=False)
    if zca is not None:
        s.images, s.zca = zca(s.images), zca
    return s


def with_soft_labels(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(s), s.num_classes, generator=g) + 4 * torch.nn.functional.one_hot(s.labels, s.num_classes)
    s.soft_labels = torch.softmax(logits, 1)
    s.labels = s.soft_labels.argmax(1)
    return s


def run(*args):
    return main([str(a) for a in args])


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("zca", [False, True])
def test_dc_round_trip_gives_the_same_tensors_and_transform(tmp_path, digits, digits_zca, zca):
    s = real_set(digits, zca=digits_zca if zca else None)
    export_set(s, "dc", tmp_path / "res.pt")
    raw = torch.load(tmp_path / "res.pt", weights_only=True)   # what DC/DM evaluation scripts read
    assert set(raw) == {"data", "accs_all_exps"} and torch.equal(raw["data"][-1][0], s.images)
    t = import_set(tmp_path / "res.pt", "dc", digits, zca=zca).synset
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels) and t.soft_labels is None
    assert t.info["eval_settings"]["zca"] is zca and (t.zca is not None) is zca
    if zca:
        x = torch.randn(5, 1, 8, 8)
        assert torch.allclose(t.zca(x), s.zca(x), atol=1e-5)
        assert torch.allclose(t.to_pixels(), s.to_pixels(), atol=1e-5)


def test_mtt_round_trip_keeps_soft_labels_and_lr(tmp_path, digits):
    s = with_soft_labels(real_set(digits, ipc=3))
    s.info["eval_settings"] = {"lr": 0.0123, "zca": False}
    export_set(s, "mtt", tmp_path / "mtt")
    assert sorted(os.listdir(tmp_path / "mtt")) == ["images_best.pt", "labels_best.pt", "lr_best.pt"]
    t = import_set(tmp_path / "mtt", "mtt", digits, zca=False).synset
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
    assert torch.equal(t.soft_labels, s.soft_labels)
    assert t.info["eval_settings"]["lr"] == pytest.approx(0.0123) and t.info["soft_labels"]["given_as"] == "probabilities"
    t.save(tmp_path / "t.safetensors")   # the soft labels are saved with the set
    assert torch.equal(SyntheticSet.load(tmp_path / "t.safetensors").soft_labels, s.soft_labels)
    # the images file named directly, hard labels
    hard = real_set(digits)
    export_set(hard, "mtt", tmp_path / "hard")
    t = import_set(tmp_path / "hard" / "images_best.pt", "mtt", digits, zca=False).synset
    assert torch.equal(t.labels, hard.labels) and t.soft_labels is None


def test_learned_logits_become_probabilities(digits):
    logits = torch.tensor([[3.0, -1.0] + [0.0] * 8, [0.0, 2.0] + [0.5] * 8])
    hard, soft, given = read_labels(logits, 2, 10, "labels")
    assert given == "logits" and torch.allclose(soft, torch.softmax(logits, 1)) and hard.tolist() == [0, 1]


def test_uneven_argmax_classes_are_flagged(tmp_path, digits):
    s = real_set(digits)
    s.soft_labels = torch.nn.functional.one_hot(s.labels, 10).float()
    s.soft_labels[0] = s.soft_labels[19]                # class 0 loses an image to class 9
    export_set(s, "mtt", tmp_path / "mtt")
    result = import_set(tmp_path / "mtt", "mtt", digits, zca=False)
    assert result.synset.ipc == 3 and "1 to 3 images per class" in result.warnings[0]


@pytest.mark.parametrize("zca", [False, True])
def test_folder_round_trip_within_one_grey_level(tmp_path, digits, digits_zca, zca):
    s = real_set(digits, ipc=3, zca=digits_zca if zca else None)
    s.images = s.images + 0.01 * torch.randn(s.images.shape, generator=torch.Generator().manual_seed(1))
    export_set(s, "folder", tmp_path / "imgs")
    t = import_set(tmp_path / "imgs", "folder", digits, zca=zca).synset
    assert torch.equal(t.labels, s.labels) and (t.zca is not None) is zca
    assert (t.to_pixels() - s.to_pixels()).abs().max() <= 1 / 255 + 1e-6


def test_folder_classes_by_id_and_unknown_names(tmp_path, digits):
    s = real_set(digits)
    export_set(s, "folder", tmp_path / "imgs")      # digits' classes are named "0".."9": ids and names agree
    (tmp_path / "imgs" / "3").rename(tmp_path / "imgs" / "cat")
    with pytest.raises(AtomDistillError, match="'cat'.*not digits classes"):
        import_set(tmp_path / "imgs", "folder", digits)


# ---- an imported DM set is the native set --------------------------------------------------------
def test_imported_dm_file_evaluates_like_the_native_set(tmp_path, digits):
    native = distill(digits, ipc=1, method="dm", iterations=2, batch_real=8, net="convnet-w32", progress=False)
    export_set(native, "dc", tmp_path / "res_DM.pt")
    imported = import_set(tmp_path / "res_DM.pt", "dc", digits, zca=False, origin="dm").synset
    kw = dict(models=["convnet-w32"], runs=2, epochs=3, seed=5, progress=False)
    a, b = evaluate(native, digits, **kw)["convnet-w32"], evaluate(imported, digits, **kw)["convnet-w32"]
    assert a["accs"] == b["accs"]
    assert imported.info["eval_settings"]["net"] == "convnet" and imported.method == "dm"


# ---- safety and errors ---------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys, writer):
    marker = tmp_path / "code-ran"
    evil = {"data": [[torch.zeros(2, 1, 8, 8), _RunsCode(marker)]]}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(AtomDistillError, match="refused"):
        load_tensors(path)
    assert run("import", path, "--format", "dc", "--dataset", "digits", "--no-zca",
               "--out", tmp_path / "x.safetensors") == 2
    err = capsys.readouterr().err
    assert "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def _dc(path, images, labels):
    torch.save({"data": [[images, labels]], "accs_all_exps": {"ConvNet": [0.5, 0.6]}}, path)
    return path


@pytest.mark.parametrize("images, labels, fmt, message", [
    (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "dc", "shape"),
    (torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]), "dc", "class id 10, out of range"),
    (torch.zeros(4, 1, 8, 8), torch.zeros(5, dtype=torch.long), "dc", "expected class ids"),
    (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), "hdf5", "unknown format 'hdf5'"),
    # a DC file read as MTT said "no label file for res.pt (looked for res.pt)"
    (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), "mtt", "pass --labels FILE (or --format dc"),
])
def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys, images, labels, fmt, message):
    path = _dc(tmp_path / "res.pt", images, labels)
    assert run("import", path, "--format", fmt, "--dataset", "digits", "--no-zca", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert run("import", path, "--format", "dc", "--dataset", "digits", "--no-zca", "--index", "3",
               "--out", tmp_path / "x") == 2
    assert "--index 3 is out of range" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(AtomDistillError, match="junk.pt"):
        load_tensors(tmp_path / "junk.pt")


def test_the_zca_claim_is_checked_against_the_images(tmp_path, capsys, digits, digits_zca):
    whitened = _dc(tmp_path / "w.pt", real_set(digits, ipc=5, zca=digits_zca).images, real_set(digits, ipc=5).labels)
    assert run("import", whitened, "--format", "dc", "--dataset", "digits", "--out", tmp_path / "x") == 2
    assert "--zca or --no-zca (they look whitened" in capsys.readouterr().err
    assert run("import", whitened, "--format", "dc", "--dataset", "digits", "--no-zca",
               "--out", tmp_path / "x.safetensors") == 0
    assert "warning: the images look whitened, not normalised" in capsys.readouterr().err
    assert run("import", whitened, "--format", "dc", "--dataset", "digits", "--zca",
               "--out", tmp_path / "x.safetensors", "--overwrite") == 0   # replaces the --no-zca import
    out = capsys.readouterr()
    assert "warning" not in out.err and "the images' scale agrees" in out.out
    assert "the file's own evaluation: ConvNet 55.00 ± 5.00 (2 runs)" in out.out


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_exports_never_mix_with_or_half_replace_an_earlier_one(tmp_path, capsys, digits, monkeypatch):
    # The API wrote into a used folder (an earlier, larger export's PNGs were read back with the new
    # ones) and replaced a .pt silently; a failed export left half a folder for another tool to read.
    big, small = real_set(digits, ipc=3), real_set(digits, ipc=1, seed=1)
    imgs, mtt, res = tmp_path / "imgs", tmp_path / "mtt", tmp_path / "res.pt"
    for fmt, out in (("folder", imgs), ("mtt", mtt), ("dc", res)):
        export_set(big, fmt, out)
        with pytest.raises(AtomDistillError, match="not empty|already exists"):
            export_set(small, fmt, out)
        export_set(small, fmt, out, overwrite=True)
        assert import_set(out, fmt, digits, zca=False).synset.ipc == 1, fmt
    with pytest.raises(AtomDistillError, match="not empty.*overwrite"):
        big.export_folder(imgs)
    before = _files(imgs)

    real_save, saved = Image.Image.save, []
    def failing_save(self, *args, **kwargs):   # the disk fills up after five images
        if len(saved) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real_save(self, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(AtomDistillError, match="disk is full"):
        export_set(big, "folder", imgs, overwrite=True)
    saved.clear()
    with pytest.raises(AtomDistillError, match="disk is full"):
        big.export_folder(tmp_path / "new")
    assert _files(imgs) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "mtt", "res.pt"]   # no temporaries left
    monkeypatch.setattr(Image.Image, "save", real_save)

    (imgs / "notes.txt").write_text("the user's own file")
    with pytest.raises(AtomDistillError, match="notes.txt, which no export writes"):
        export_set(big, "folder", imgs, overwrite=True)
    (imgs / "notes.txt").unlink()
    big.save(tmp_path / "big.safetensors")
    assert run("export", tmp_path / "big.safetensors", "--format", "folder", "--out", imgs) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert run("export", tmp_path / "big.safetensors", "--format", "folder", "--out", imgs, "--overwrite") == 0
    assert import_set(imgs, "folder", digits, zca=False).synset.ipc == 3
    small.save(tmp_path / "small.safetensors")   # show --folder takes --overwrite too
    assert run("show", tmp_path / "small.safetensors", "--out", tmp_path / "g.png", "--folder", imgs,
               "--overwrite") == 0
    assert import_set(imgs, "folder", digits, zca=False).synset.ipc == 1


def _killed_export(target, before_swap=True):
    """A real process that dies by SIGKILL inside atomic_folder, holding its locks: before the swap
    (a half-written temporary folder) or between moving the earlier export aside and renaming in."""
    code = f"""
import os, signal
from pathlib import Path
from atomdistill import io
target = Path({str(target)!r})
if not {before_swap}:
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).parent.name.startswith(".{target.name}.old."):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
with io.atomic_folder(target, overwrite=True) as tmp:
    (tmp / "0").mkdir()
    (tmp / "0" / "0.png").write_bytes(b"half")
    if {before_swap}:
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def _age(path, seconds=3600):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_export_leaves_nothing_behind_and_loses_nothing(tmp_path, digits):
    # A kill -9 during a folder export left its hidden temporary folder for good; a kill between
    # its two renames left the earlier export hidden beside a missing target.
    s = real_set(digits, ipc=1)
    imgs = tmp_path / "imgs"
    export_set(s, "folder", imgs)
    before = _files(imgs)
    _killed_export(imgs)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "imgs"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".imgs.") and _files(imgs) == before
    export_set(s, "folder", tmp_path / "other")   # a young leftover may be an export starting: kept
    assert leftovers[0].exists()
    _age(leftovers[0])
    export_set(s, "folder", tmp_path / "third")   # any export in the folder sweeps the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "other", "third"]

    _killed_export(imgs, before_swap=False)       # killed with the earlier export moved aside
    assert not imgs.exists()
    for p in tmp_path.glob(".imgs.*"):
        _age(p)
    with pytest.raises(AtomDistillError, match="not empty"):   # it is back in its place, and kept
        export_set(s, "folder", imgs)
    assert _files(imgs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "other", "third"]


def test_an_export_to_the_current_folder_is_refused(tmp_path, digits, monkeypatch):
    # In an empty folder, `--out .` passed the checks and failed on the rename: "Device or resource busy".
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(AtomDistillError, match="is the current folder or holds it.*name a new folder"):
            export_set(real_set(digits, ipc=1), "folder", out, overwrite=True)
    assert list((tmp_path / "here").iterdir()) == []


def test_the_sweep_spares_live_exports_and_what_no_export_writes(tmp_path):
    from atomdistill.io import sweep_killed_exports
    live, users, named = (tmp_path / ".imgs.abcd1234.tmp", tmp_path / ".imgs.efgh5678.tmp",
                          tmp_path / ".cache.tmp")
    for d in (live, users, named):
        (d / "0").mkdir(parents=True)
        (d / "0" / "0.png").write_bytes(b"x")
    (users / "notes.txt").write_text("the user's own file")
    for d in (live, users, named):
        _age(d)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as an export that is running holds it
    try:
        assert sweep_killed_exports(tmp_path) == []
    finally:
        os.close(fd)
    assert sweep_killed_exports(tmp_path) == [live]
    assert users.exists() and named.exists()


# ---- soft labels in evaluation ---------------------------------------------------------------------
def test_soft_loss_is_the_soft_cross_entropy_and_one_hot_equals_hard():
    g = torch.Generator().manual_seed(0)
    logits, p = torch.randn(2, 5, 4, generator=g), torch.softmax(torch.randn(2, 5, 4, generator=g), -1)
    want = -(p * torch.log_softmax(logits, -1)).sum(-1).mean(1).sum()
    assert torch.allclose(_loss(logits, p), want)
    hard = torch.randint(4, (2, 5), generator=g)
    assert torch.allclose(_loss(logits, torch.nn.functional.one_hot(hard, 4).float()), _loss(logits, hard))


def test_one_hot_soft_labels_train_like_hard_labels_and_soft_ones_learn():
    data = make_dataset(num_classes=3, per_class=8, test_per_class=40, seed=1)
    kw = dict(model_name="convnet", protocol=EvalProtocol(runs=1, epochs=8, seed=1), progress=False)
    x, y, tx, ty = data.train_images, data.train_labels, data.test_images, data.test_labels
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    hard = train_and_test(x, y, tx, ty, **kw)
    assert hard[0] > 0.8 and hard == pytest.approx(train_and_test(x, one_hot, tx, ty, **kw), abs=2 / len(ty))
    assert train_and_test(x, 0.7 * one_hot + 0.1, tx, ty, **kw)[0] > 0.6   # 0.8 on the class; chance is 1/3


def test_evaluate_a_soft_label_set_shows_the_label_controls(tmp_path, capsys, digits):
    s = with_soft_labels(real_set(digits, ipc=1, seed=3))
    export_set(s, "mtt", tmp_path / "mtt")
    assert run("import", tmp_path / "mtt", "--format", "mtt", "--dataset", "digits", "--no-zca", "--origin",
               "datadam", "--method", "released", "--out", tmp_path / "soft.safetensors") == 0
    out = capsys.readouterr().out
    assert "--models convnet-bn" in out and "soft cross-entropy" in out
    assert run("evaluate", tmp_path / "soft.safetensors", "--runs", "1", "--epochs", "1", "--models", "convnet-w32") == 0
    out = capsys.readouterr().out
    assert "hard labels: the same images" in out and "random real + soft labels" in out
    assert "made for: convnet-bn (batch norm)" in out and "add --models convnet-bn" in out
    record = json.loads((tmp_path / "soft.eval.json").read_text())
    assert [c["method"] for c in record["controls"]] == ["released hard labels",
                                                          "random + released class-mean soft labels"]
    assert record["set"]["made_for"]["net"] == "convnet-bn" and record["set"]["labels"]["kind"] == "soft"
    assert all(0 <= c["results"]["convnet-w32"]["mean"] <= 1 for c in record["controls"])
    assert run("report", tmp_path / "soft.eval.json", "--out", tmp_path / "r.md") == 0
    table = (tmp_path / "r.md").read_text()
    for row in ("| released |", "| released hard labels |", "| random + released class-mean soft labels |"):
        assert row in table
    assert "Made for: released: convnet-bn" in table
