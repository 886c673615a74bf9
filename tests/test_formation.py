"""Multi-formation (--factor): decoding, real-image initialisation, sets that decode wherever they are loaded."""
import importlib
import numpy as np
import pytest
import torch
from PIL import Image

from atomdistill import DistillConfig, SyntheticSet, distill
from atomdistill.cli import main
from atomdistill.distill import Distiller, initial_images
from atomdistill.errors import ConfigError
from atomdistill.evaluate import evaluate
from atomdistill.formation import decode, decode_labels, encode
from conftest import make_dataset

FAST = dict(iterations=3, batch_real=5, log_every=1, checkpoint_every=3, progress=False, device="cpu")


def _bilinear(tile: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of one [s, s] tile to [size, size], align_corners=False, written out
    (source coordinate (y + 0.5) * s / size - 0.5, clamped at 0; neighbours clamped at s - 1)."""
    s = tile.shape[0]
    out = np.zeros((size, size))
    for y in range(size):
        for x in range(size):
            sy, sx = max((y + 0.5) * s / size - 0.5, 0.0), max((x + 0.5) * s / size - 0.5, 0.0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, s - 1), min(x0 + 1, s - 1)
            wy, wx = sy - y0, sx - x0
            out[y, x] = ((1 - wy) * (1 - wx) * tile[y0, x0] + (1 - wy) * wx * tile[y0, x1]
                         + wy * (1 - wx) * tile[y1, x0] + wy * wx * tile[y1, x1])
    return out


@pytest.mark.parametrize("factor,size", [(2, 8), (3, 9), (4, 8)])
def test_decoding_matches_a_direct_loop_over_tiles(factor, size):
    g = torch.Generator().manual_seed(factor)
    images = torch.randn(3, 2, size, size, generator=g)
    labels = torch.tensor([4, 0, 7])
    got, got_labels = decode(images, factor), decode_labels(labels, factor)
    s = size // factor
    expected, expected_labels = [], []
    for img, label in zip(images.numpy(), labels.tolist()):
        for a in range(factor):          # tile row
            for b in range(factor):      # tile column
                tile = img[:, a * s:(a + 1) * s, b * s:(b + 1) * s]
                expected.append(np.stack([_bilinear(ch, size) for ch in tile]))
                expected_labels.append(label)
    assert got.shape == (3 * factor ** 2, 2, size, size)
    np.testing.assert_allclose(got.numpy(), np.stack(expected), rtol=1e-5, atol=1e-5)
    assert got_labels.tolist() == expected_labels


def test_factor_1_is_the_identity_and_touches_nothing():
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    assert decode(x, 1) is x and decode_labels(y, 1) is y and encode(x, 1) is x
    s = SyntheticSet(images=x, labels=y, class_names=list("abcd"), mean=(0.0,), std=(1.0,))
    images, labels = s.decoded()
    assert images is x and labels is y


def test_encoding_puts_block_means_of_each_real_image_into_its_tile():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(8, 3, 8, 8, generator=g)     # 2 stored images x 4 tiles
    stored = encode(real, 2)
    assert stored.shape == (2, 3, 8, 8)
    for i in range(2):
        for k in range(4):
            a, b = divmod(k, 2)
            block_means = real[i * 4 + k].reshape(3, 4, 2, 4, 2).mean((2, 4))
            assert torch.allclose(stored[i, :, a * 4:(a + 1) * 4, b * 4:(b + 1) * 4], block_means, atol=1e-6)


def test_real_init_tiles_factor_squared_real_images_of_the_class():
    data = make_dataset(per_class=12)
    idx = data.class_indices()
    stored = initial_images(data.train_images, idx, [0, 1, 2], 2, "real", seed=3, factor=2)
    assert stored.shape == (6, 1, 8, 8)
    # The same seed draws the same real images: the factor-1 init is the first of them.
    plain = initial_images(data.train_images, idx, [0, 1, 2], 2, "real", seed=3)
    assert torch.equal(stored, initial_images(data.train_images, idx, [0, 1, 2], 2, "real", seed=3, factor=2))
    assert torch.allclose(stored[0, :, :4, :4], plain[0].reshape(1, 4, 2, 4, 2).mean((2, 4)), atol=1e-6)


def test_distill_with_factor_2_matches_decoded_images_and_records_the_factor(tmp_path):
    data = make_dataset()
    synset = distill(data, ipc=1, factor=2, out=tmp_path / "run", **FAST)
    assert synset.factor == 2 and synset.images.shape == (3, 1, 8, 8) and synset.ipc == 1
    images, labels = synset.decoded()
    assert images.shape == (12, 1, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(synset.to_dataset()) == 12
    loaded = SyntheticSet.load(tmp_path / "run")
    assert loaded.factor == 2 and torch.equal(loaded.decoded()[0], images)
    # The synthetic forward sees the decoded images: the loss equals the one of a factor-1 run
    # whose stored images are those decoded images (same networks, batches and draws).
    d2 = Distiller(DistillConfig(dataset="toy", ipc=1, factor=2, dsa="none", batch_real=5, device="cpu"), data=data,
                   progress=False)
    d1 = Distiller(DistillConfig(dataset="toy", ipc=4, dsa="none", batch_real=5, device="cpu"), data=data,
                   progress=False)
    assert d2.step_loss(synset.images, 0)[0].item() == pytest.approx(d1.step_loss(images, 0)[0].item(), rel=1e-5)


def test_a_saved_factor_2_set_evaluates_as_in_memory(tmp_path, monkeypatch):
    ev = importlib.import_module("atomdistill.evaluate")   # the module (atomdistill.evaluate is the function)
    data = make_dataset(per_class=10)
    synset = distill(data, ipc=1, factor=2, **FAST)
    synset.save(tmp_path / "s.safetensors")
    loaded = SyntheticSet.load(tmp_path / "s.safetensors")
    trained_on = []
    original = ev.train_and_test
    monkeypatch.setattr(ev, "train_and_test", lambda images, *a, **k: trained_on.append(len(images))
                        or original(images, *a, **k))
    kw = dict(runs=2, epochs=3, device="cpu", progress=False)
    in_memory, from_file = evaluate(synset, data, **kw), evaluate(loaded, data, **kw)
    assert from_file["convnet"]["accs"] == in_memory["convnet"]["accs"]
    assert trained_on == [12, 12]   # the decoded images (3 stored x 4 tiles), not the 3 stored ones


def test_factor_errors_are_clear(toy):
    with pytest.raises(ConfigError, match="does not divide"):
        distill(toy, ipc=1, factor=3, **FAST)
    with pytest.raises(ConfigError, match="positive integer"):
        DistillConfig(factor=0)
    with pytest.raises(ConfigError, match="with --factor 2 starts from 16 real images"):
        distill(toy, ipc=4, factor=2, **FAST)   # 12 images per class
    assert distill(toy, ipc=4, factor=2, init="noise", **FAST).images.shape == (12, 1, 8, 8)


def test_show_decoded_grid_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--ipc", "1", "--factor", "2", "--iterations", "1", "--batch-real", "4",
                 "--out", str(run)]) == 0
    assert main(["show", str(run), "--out", str(tmp_path / "stored.png")]) == 0
    assert main(["show", str(run), "--decoded", "--out", str(tmp_path / "decoded.png"),
                 "--folder", str(tmp_path / "images")]) == 0
    assert "factor=2: 40 training images" in capsys.readouterr().out
    stored, decoded = Image.open(tmp_path / "stored.png"), Image.open(tmp_path / "decoded.png")
    assert decoded.size[0] > stored.size[0] and decoded.size[1] == stored.size[1]   # 4 images per class row, not 1
    assert len(list((tmp_path / "images").rglob("*.png"))) == 40


def test_report_gives_a_factor_2_set_its_own_row_at_its_stored_ipc(tmp_path):
    import json
    from atomdistill.report import load_records, markdown_table
    for name, factor, acc in (("plain", None, 0.27), ("tiled", 2, 0.33)):
        rec = {"set": {"path": None, "dataset": "cifar10", "method": "atom", "ipc": 1, "num_classes": 10,
                       "iterations": 300, "seed": 0, **({"factor": factor} if factor else {})},
               "protocol": {"runs": 3, "epochs": 300}, "hardware": {"device": "cpu", "cpu": "x", "torch": "2"},
               "results": {"convnet": {"mean": acc, "std": 0.0, "accs": [acc], "seconds": 1.0}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    md = markdown_table(load_records([str(tmp_path / "plain.json"), str(tmp_path / "tiled.json")]))
    assert "| atom | 27.0 ± 0.0 |" in md and "| atom (factor 2) | 33.0 ± 0.0 |" in md
    assert "Duplicates" not in md


def test_atom_plus_is_atom_with_factor_2_from_32_px_and_whole_images_below(tmp_path):
    data32 = make_dataset(size=32, per_class=8)
    plus = distill(data32, ipc=1, method="atom+", out=tmp_path / "plus", **FAST)
    tiled = distill(data32, ipc=1, method="atom", factor=2, **FAST)
    assert plus.factor == 2 and torch.equal(plus.images, tiled.images)
    assert SyntheticSet.load(tmp_path / "plus").factor == 2
    # --factor given explicitly wins over the preset's
    assert torch.equal(distill(data32, ipc=1, method="atom+", factor=1, **FAST).images,
                       distill(data32, ipc=1, method="atom", **FAST).images)
    # 8 px images would make 4 px tiles: atom+ keeps whole images there (and equals atom)
    small = make_dataset()
    plus8 = distill(small, ipc=1, method="atom+", **FAST)
    assert plus8.factor == 1 and torch.equal(plus8.images, distill(small, ipc=1, method="atom", **FAST).images)
    assert DistillConfig(method="atom+").resolved(32).factor == 2
    assert DistillConfig(method="atom").resolved(32).factor == 1


def test_atom_plus_gaussian_is_atom_plus_with_the_gaussian_kernel(tmp_path):
    data32 = make_dataset(size=32, per_class=8)
    preset = distill(data32, ipc=1, method="atom+gaussian", out=tmp_path / "g", **FAST)
    spelled_out = distill(data32, ipc=1, method="atom", factor=2, mmd_kernel="gaussian", **FAST)
    assert preset.factor == 2 and torch.equal(preset.images, spelled_out.images)
    assert not torch.equal(preset.images, distill(data32, ipc=1, method="atom+", **FAST).images)
    assert SyntheticSet.load(tmp_path / "g").config["method"] == "atom+gaussian"
    # an explicit kernel wins over the preset's, as --factor does
    assert torch.equal(distill(data32, ipc=1, method="atom+gaussian", mmd_kernel="linear", **FAST).images,
                       distill(data32, ipc=1, method="atom+", **FAST).images)
