import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

from atomdistill.errors import ConfigError
from atomdistill.evaluate import EvalProtocol, evaluate, evaluation_record, full_training_set, train_and_test
from atomdistill.synset import SyntheticSet
from atomdistill.zca import ZCA

from conftest import make_dataset

ev = importlib.import_module("atomdistill.evaluate")   # the module (atomdistill.evaluate is the function)

SMALL = {"width": 16}   # a narrow ConvNet keeps the tests fast


@pytest.fixture(scope="module")
def data():
    return make_dataset(num_classes=3, per_class=8, test_per_class=40, seed=1)


@pytest.fixture(scope="module")
def noisy(data):
    """Much noisier test images: accuracies land mid-range, so comparisons of them mean something."""
    g = torch.Generator().manual_seed(5)
    return dataclasses.replace(data, test_images=data.test_images + 2.5 * torch.randn(data.test_images.shape,
                                                                                        generator=g))


def as_set(data, **kw) -> SyntheticSet:
    args = dict(images=data.train_images, labels=data.train_labels, class_names=list(data.class_names),
                mean=tuple(data.mean), std=tuple(data.std), dataset=data.name, method="random")
    args.update(kw)
    return SyntheticSet(**args)


def run(data, model="convnet", runs=2, epochs=6, seed=0, batch_size=256, **kw):
    kw.setdefault("model_kwargs", SMALL)
    protocol = EvalProtocol(runs=runs, epochs=epochs, seed=seed, batch_size=batch_size)
    return train_and_test(data.train_images, data.train_labels, data.test_images, data.test_labels, model,
                          protocol, progress=False, **kw)


def test_learns_separable_toy_well_above_chance(data):
    res = evaluate(as_set(data), data, models=["convnet"], runs=2, epochs=8, progress=False)
    r = res["convnet"]
    assert set(r) == {"mean", "std", "accs", "diverged", "seconds"} and r["diverged"] == 0
    assert len(r["accs"]) == 2 and r["seconds"] > 0
    assert r["mean"] > 0.8, r            # chance is 1/3
    assert r["std"] == pytest.approx(float(np.std(r["accs"])))


def test_same_seed_same_accuracies_bitwise(noisy):
    a = run(noisy, seed=3, epochs=10, batch_size=8, batched=True)
    assert a == run(noisy, seed=3, epochs=10, batch_size=8, batched=True)
    assert run(noisy, seed=3, epochs=10, batch_size=8, batched=False) == \
        run(noisy, seed=3, epochs=10, batch_size=8, batched=False)
    assert a != run(noisy, seed=4, epochs=10, batch_size=8, batched=True)


def test_auto_batches_on_gpu_only(data, monkeypatch):
    used = []
    monkeypatch.setattr(ev, "_train_group", lambda spec, ids, *a: used.append("batched") or [0.0] * len(ids))
    monkeypatch.setattr(ev, "_train_one", lambda spec, ids, *a: used.append("sequential") or [0.0])
    run(data, runs=2, device="cpu")
    assert used == ["sequential", "sequential"]
    with pytest.raises(ConfigError, match="batched"):
        run(data, batched="yes")


def test_batched_matches_sequential(noisy):
    # Same draws and initial weights; only float rounding differs (vmapped convs sum in another
    # order), so allow one test image of difference per run.
    a = run(noisy, runs=3, epochs=15, batch_size=8, batched=True)
    b = run(noisy, runs=3, epochs=15, batch_size=8, batched=False)
    assert 0.4 < min(a) and max(a) < 0.95, a          # mid-range: the comparison is not trivial
    assert np.allclose(a, b, rtol=0, atol=1.0 / len(noisy.test_labels) + 1e-9), (a, b)


def test_a_runs_draws_do_not_depend_on_the_other_runs(data, monkeypatch):
    # Bitwise: run 1 alone is run 1 of three.
    assert run(data, runs=3, batched=False)[1] == run(data, runs=1, run_ids=[1], batched=False)[0]
    # The batched path asks for exactly the draws the sequential path asks for.
    calls = {}
    for name in ("_draws", "_shuffle", "_fresh_model"):
        original = getattr(ev, name)

        def spy(*args, _orig=original, _name=name):
            key = tuple(a for a in args if isinstance(a, int))
            calls.setdefault(mode, []).append((_name, key))
            return _orig(*args)
        monkeypatch.setattr(ev, name, spy)
    for mode in ("batched", "sequential", "grouped"):
        run(data, runs=3, epochs=3, batched=mode != "sequential", max_parallel=2 if mode == "grouped" else None)
    assert sorted(calls["batched"]) == sorted(calls["sequential"]) == sorted(calls["grouped"])
    assert len(calls["batched"]) > 3 * 4


def test_epochs_and_lr_schedule_follow_the_reference(data, monkeypatch):
    # Reference: range(Epoch+1) passes; lr x0.1 (new optimiser) after pass Epoch//2+1.
    lrs, shuffles = [], []
    orig_sgd, orig_shuffle = ev._sgd, ev._shuffle
    monkeypatch.setattr(ev, "_sgd", lambda p, lr, o: lrs.append(lr) or orig_sgd(p, lr, o))
    monkeypatch.setattr(ev, "_shuffle", lambda n, s, r, e, d: shuffles.append(e) or orig_shuffle(n, s, r, e, d))
    steps = []
    orig_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: steps.append(self.param_groups[0]["lr"])
                        or orig_step(self, *a))
    run(data, runs=1, epochs=4, batch_size=10)   # 24 images: 3 steps per pass
    assert shuffles == [0, 1, 2, 3, 4]
    assert lrs == pytest.approx([0.01, 0.001])
    assert steps == pytest.approx([0.01] * 12 + [0.001] * 3)   # passes 0..3 at lr, pass 4 at lr/10


def test_batchnorm_models_train_batched_and_sequentially(data, noisy):
    # Running statistics are stacked buffers updated in place under vmap.
    a = run(data, "convnet-bn", runs=2, epochs=20, batch_size=8, batched=True)   # 63 steps: running stats settle
    b = run(data, "convnet-bn", runs=2, epochs=20, batch_size=8, batched=False)
    assert min(a) > 0.9 and min(b) > 0.9, (a, b)     # eval mode uses the running statistics
    a = run(noisy, "convnet-bn", runs=2, epochs=20, batch_size=8, batched=True)
    b = run(noisy, "convnet-bn", runs=2, epochs=20, batch_size=8, batched=False)
    assert np.allclose(a, b, rtol=0, atol=1.0 / len(noisy.test_labels) + 1e-9), (a, b)


def test_an_unknown_model_fails_before_any_network_trains(data, monkeypatch):
    trained = []
    monkeypatch.setattr(ev, "train_and_test", lambda *a, **k: trained.append(a[4]) or [0.5])
    with pytest.raises(ConfigError, match="unknown model 'resnet99' \\(did you mean 'resnet18'\\?\\)"):
        evaluate(as_set(data), data, models=["convnet", "resnet99"], runs=1, epochs=0, progress=False)
    assert trained == []
    evaluate(as_set(data), data, models=["convnet"], runs=1, epochs=0, progress=False)
    assert trained == ["convnet"]   # the stand-in is what evaluate calls, so the check above can fail


def test_mismatched_normalisation_or_shape_raises(data):
    with pytest.raises(ConfigError, match="another dataset or normalisation"):
        evaluate(as_set(data, mean=(0.5,)), data, runs=1, epochs=0, progress=False)
    with pytest.raises(ConfigError, match="another dataset or normalisation"):
        evaluate(as_set(data, std=(0.2,)), data, runs=1, epochs=0, progress=False)
    small = as_set(data, images=data.train_images[:, :, :4, :4])
    with pytest.raises(ConfigError, match="image"):
        evaluate(small, data, runs=1, epochs=0, progress=False)


def test_zca_set_gets_whitened_test_images(data, monkeypatch):
    zca = ZCA.fit(data.train_images)
    synset = as_set(data, images=zca(data.train_images), zca=zca)
    seen = {}

    def spy(images, labels, test_images, test_labels, *a, **kw):
        seen["test"] = test_images
        return [0.5]
    monkeypatch.setattr(ev, "train_and_test", spy)
    evaluate(synset, data, runs=1, epochs=0, progress=False)
    assert torch.allclose(seen["test"], zca(data.test_images))
    assert not torch.allclose(seen["test"], data.test_images, atol=1e-2)
    evaluate(as_set(data), data, runs=1, epochs=0, progress=False)   # no ZCA: test images as they are
    assert torch.equal(seen["test"], data.test_images)
    given = torch.zeros_like(data.test_images)                         # `test` given: used as is
    evaluate(synset, data, runs=1, epochs=0, progress=False, test=(given, data.test_labels))
    assert torch.equal(seen["test"], given)


def test_full_training_set_and_record(data, tmp_path):
    full = full_training_set(data)
    assert full.method == "full" and len(full) == len(data.train_labels)
    results = {"convnet": {"mean": 0.5, "std": 0.1, "accs": [0.4, 0.6], "seconds": 1.0}}
    out = tmp_path / "eval.json"
    rec = evaluation_record(full, results, {"runs": 2, "epochs": 5, "seed": 0}, out=out)
    assert rec["set"]["ipc"] is None and rec["set"]["method"] == "full" and rec["set"]["path"] is None
    assert rec["protocol"]["lr"] == 0.01 and rec["protocol"]["runs"] == 2 and rec["protocol"]["batch_size"] == 256
    hw = rec["hardware"]
    assert hw["device"] in ("cpu", "cuda") and hw["threads"] >= 1 and hw["torch"] == torch.__version__ and hw["cpu"]
    assert json.loads(out.read_text()) == rec
    rec = evaluation_record(as_set(data, config={"seed": 7, "iterations": 100}), results, {}, path="x.safetensors")
    assert rec["set"]["ipc"] == 8 and rec["set"]["iterations"] == 100 and rec["set"]["seed"] == 7
    assert rec["set"]["path"] == "x.safetensors" and rec["set"]["num_classes"] == 3
    assert rec["set"]["config"] == {"seed": 7, "iterations": 100}   # how it was made, for `report`'s rows


def test_one_protocol_everywhere(data, tmp_path):
    from atomdistill import DistillConfig
    from atomdistill.cli import build_parser
    defaults = EvalProtocol()
    assert (DistillConfig().eval_runs, DistillConfig().eval_epochs) == (defaults.runs, defaults.epochs)
    args = build_parser().parse_args(["evaluate", "x"])
    assert (args.runs, args.epochs, args.seed) == (defaults.runs, defaults.epochs, defaults.seed)
    # keywords and an EvalProtocol are the same call
    p = EvalProtocol(runs=1, epochs=2, seed=3, batch_size=8)
    a = evaluate(as_set(data), data, protocol=p, progress=False)
    assert a["convnet"]["accs"] == evaluate(as_set(data), data, runs=1, epochs=2, seed=3, batch_size=8,
                                            progress=False)["convnet"]["accs"]
    # the record carries every field of the protocol
    rec = evaluation_record(as_set(data), a, p)
    assert rec["protocol"] == dataclasses.asdict(p) and set(rec["protocol"]) == {
        f.name for f in dataclasses.fields(EvalProtocol)}
    with pytest.raises(ConfigError, match="unknown evaluation option"):
        evaluate(as_set(data), data, learning_rate=0.1, progress=False)
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        evaluate(as_set(data), data, epoch=2, progress=False)
    # each field is checked for its kind as well as its range (runs="3" failed on `<` before)
    for bad, message in ((dict(runs=0), "runs must be an integer >= 1, got 0"),
                         (dict(runs="3"), "runs must be an integer >= 1, got '3'"),
                         (dict(epochs=2.5), "epochs must be an integer >= 0, got 2.5"),
                         (dict(seed=-1), "seed must be an integer >= 0, got -1"),
                         (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
                         (dict(weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
                         (dict(momentum=1.0), "momentum must be below 1")):
        with pytest.raises(ConfigError, match=message):
            EvalProtocol(**bad)


# ---- the journal: an interrupted evaluation continues where it stopped ----------------------------
def test_a_journal_keeps_finished_runs_and_an_interrupted_evaluation_ends_as_one_run(tmp_path, noisy, monkeypatch):
    kw = dict(models=["convnet", "convnet-bn"], runs=3, epochs=4, seed=2, progress=False)
    straight = evaluate(as_set(noisy), noisy, **kw)
    real_train, trained = ev._train_one, []

    def killed_at_the_fourth_run(spec, ids, *args):
        if len(trained) == 3:
            raise KeyboardInterrupt
        trained.append((spec.name, *ids))
        return real_train(spec, ids, *args)
    monkeypatch.setattr(ev, "_train_one", killed_at_the_fourth_run)
    journal = tmp_path / "eval.json.partial"
    with pytest.raises(KeyboardInterrupt):
        evaluate(as_set(noisy), noisy, journal=journal, **kw)
    assert trained == [("convnet", 0), ("convnet", 1), ("convnet", 2)]
    trained.clear()
    monkeypatch.setattr(ev, "_train_one",
                        lambda spec, ids, *a: trained.append((spec.name, *ids)) or real_train(spec, ids, *a))
    resumed = evaluate(as_set(noisy), noisy, journal=journal, **kw)
    assert trained == [("convnet-bn", 0), ("convnet-bn", 1), ("convnet-bn", 2)]   # only the runs left
    assert {m: r["accs"] for m, r in resumed.items()} == {m: r["accs"] for m, r in straight.items()}
    # The journal lends runs to nothing else: another protocol, set or model trains afresh.
    trained.clear()
    evaluate(as_set(noisy), noisy, journal=journal, **{**kw, "epochs": 3, "models": ["convnet"], "runs": 1})
    evaluate(as_set(noisy, images=noisy.train_images.flip(-1)), noisy, journal=journal,
             **{**kw, "models": ["convnet"], "runs": 1})
    assert trained == [("convnet", 0), ("convnet", 0)]
    journal.write_text("{")
    with pytest.raises(ev.AtomDistillError, match="not a readable evaluation journal; delete it"):
        evaluate(as_set(noisy), noisy, journal=journal, **kw)
