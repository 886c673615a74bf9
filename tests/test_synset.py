import errno

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from atomdistill import SyntheticSet
from atomdistill.errors import AtomDistillError
from atomdistill.zca import ZCA


def _set(zca=False, channels=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, channels, 8, 8, generator=g)
    z = ZCA.fit(torch.randn(50, channels, 8, 8, generator=g)) if zca else None
    return SyntheticSet(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2]), class_names=["a", "b", "c/d"],
                        mean=(0.5,) * channels, std=(0.25,) * channels, zca=z, dataset="toy", method="atom",
                        config={"ipc": 2, "lr": 1.0}, info={"final_loss": 1.5})


@pytest.mark.parametrize("zca", [False, True])
def test_save_load_round_trip(tmp_path, zca):
    s = _set(zca)
    s.save(tmp_path / "s.safetensors")
    t = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(s.images, t.images) and torch.equal(s.labels, t.labels)
    assert (t.class_names, t.mean, t.std, t.dataset, t.method) == (s.class_names, s.mean, s.std, "toy", "atom")
    assert t.config == {"ipc": 2, "lr": 1.0} and t.info == {"final_loss": 1.5}
    assert t.ipc == 2 and t.num_classes == 3 and t.image_size == 8 and t.channels == 3
    if zca:
        x = torch.randn(4, 3, 8, 8)
        assert torch.allclose(t.zca(x), s.zca(x), atol=1e-5)
        assert torch.allclose(t.prepare_real(x), s.zca(x), atol=1e-5)
    else:
        assert t.zca is None


def test_three_lines_to_train_on(tmp_path):
    _set().save(tmp_path / "s.safetensors")
    loader = torch.utils.data.DataLoader(SyntheticSet.load(tmp_path / "s.safetensors").to_dataset(), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64


def test_true_colour_pixels_undo_zca_and_normalisation():
    s = _set(zca=True)
    pixels_in = torch.rand(6, 3, 8, 8)
    s.images = s.zca((pixels_in - 0.5) / 0.25)
    assert torch.allclose(s.to_pixels(), pixels_in, atol=1e-4)


def test_grid_and_folder_export(tmp_path):
    s = _set(zca=True)
    s.save_grid(tmp_path / "grid.png")
    img = Image.open(tmp_path / "grid.png")
    # 3 rows of 2 images of 8 px with 1 px padding, scaled up 8x
    assert img.size == ((2 * 9 + 1) * 8, (3 * 9 + 1) * 8)
    s.export_folder(tmp_path / "images")
    files = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png"))
    assert files == ["a/0000.png", "a/0001.png", "b/0000.png", "b/0001.png", "c_d/0000.png", "c_d/0001.png"]
    s.save_grid(tmp_path / "grid.jpg")   # was PNG bytes under a .jpg name
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"
    _set(channels=1).save_grid(tmp_path / "gray.png")
    gray = torch.from_numpy(np.array(Image.open(tmp_path / "gray.png").convert("RGB"))).reshape(-1, 3)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_loading_bad_files_is_a_clear_error(tmp_path):
    with pytest.raises(AtomDistillError, match="no synthetic set"):
        SyntheticSet.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(AtomDistillError, match="not a readable synthetic set"):
        SyntheticSet.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(AtomDistillError, match="not an atomdistill synthetic set"):
        SyntheticSet.load(tmp_path / "other.safetensors")


def test_save_is_atomic_an_existing_file_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    _set().save(path)
    before = path.read_bytes()
    import atomdistill.synset as synset_module

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synset_module, "save_file", broken)
    with pytest.raises(AtomDistillError, match="disk is full"):
        _set().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_a_file_of_another_kind_given_as_a_set_is_named(tmp_path):
    # Each was "is not a readable synthetic set (Error while deserializing: header too large)".
    s = _set()
    s.save_grid(tmp_path / "grid.png")
    (tmp_path / "eval.json").write_text('{"results": {}}')
    torch.save({"data": []}, tmp_path / "res.pt")
    for name, says in (("grid.png", "a PNG picture"), ("eval.json", "a JSON file"), ("res.pt", "atomdistill import")):
        with pytest.raises(AtomDistillError, match=f"{name} is not a synthetic set: it is .*{says}"):
            SyntheticSet.load(tmp_path / name)
    # A real set whose safetensors header length starts with one of those bytes still loads.
    for pad in range(256):
        s.info = {"pad": "x" * pad}
        s.save(tmp_path / "s.safetensors")
        if (tmp_path / "s.safetensors").read_bytes()[0] in (0x80, ord("{")):
            break
    assert (tmp_path / "s.safetensors").read_bytes()[0] in (0x80, ord("{"))
    assert SyntheticSet.load(tmp_path / "s.safetensors").info["pad"] == "x" * pad


def test_a_set_named_like_a_torch_file_is_refused_before_any_work(tmp_path, capsys):
    # s.save("s.pt") wrote safetensors bytes that torch.load later failed on ("invalid load key").
    from atomdistill.cli import main
    for name in ("s.pt", "s.PTH", "s.pkl", "s.npz"):
        with pytest.raises(AtomDistillError, match=r"saved as safetensors.*name it s\.safetensors.*--format dc"):
            _set().save(tmp_path / name)
    assert main(["baseline", "random", "--ipc", "1", "--out", str(tmp_path / "b.pt")]) == 2
    assert "name it b.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    _set().save(tmp_path / "s")   # no suffix, or any other, stays allowed
    assert SyntheticSet.load(tmp_path / "s").ipc == 2
