"""Reliability (issue 18): every bad input and broken run folder ends with one clear line and exit
code 2, leaving what existed untouched; run folders are locked; sets and checkpoints are checked.

Each test builds the bad input, runs the command line in-process (`main`, as tests/test_cli.py
does), and compares a hash of every file before and after."""
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import atomdistill.io as io_module
from atomdistill import SyntheticSet, distill, resume
from atomdistill.cli import main
from atomdistill.distill import DistillConfig, Distiller
from atomdistill.errors import AtomDistillError, ConfigError, DatasetError
from atomdistill.evaluate import format_result, summarise_runs
from atomdistill.io import LOCK_NAME, FolderLock
from atomdistill.zca import ZCA
from conftest import make_dataset
from test_data import write_cifar10, write_folder

RUN_ARGS = ["--ipc", "1", "--iterations", "2", "--batch-real", "4", "--checkpoint-every", "1"]


# ---- helpers ----------------------------------------------------------------------------------
def snapshot(*roots) -> dict:
    """{path: hash of its bytes} of every file under the roots (or the root files themselves)."""
    files = {}
    for root in map(Path, roots):
        for p in ([root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []):
            if p.is_file():
                files[str(p)] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return files


def refused(capsys, argv, *fragments) -> str:
    """Run the CLI; it must exit 2 with one error line (no traceback) containing every fragment."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    # the message is the last line (a progress bar may have written before it)
    assert err.strip().splitlines()[-1] == errors[0]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests check outcomes, not speed: one thread keeps them fast on a shared machine, where
    OpenMP threads spin waiting for each other (sets do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, one_thread):
    """A finished 2-iteration digits run with a checkpoint: copied by the tests that damage it."""
    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["distill", *RUN_ARGS, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(good_run, tmp_path):
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def small_set(zca: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 4, 4, generator=g)
    z = ZCA.fit(torch.randn(40, 1, 4, 4, generator=g)) if zca else None
    return SyntheticSet(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2]), class_names=["a", "b", "c"],
                        mean=(0.5,), std=(0.25,), zca=z, dataset="toy", method="atom", config={"ipc": 2},
                        info={"final_loss": 1.5})


# ---- 1. damaged run folders --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "random", "no-metadata", "edited"])
def test_resume_from_a_damaged_checkpoint_names_the_way_forward(run, good_run, capsys, damage):
    ckpt = run / "checkpoint.safetensors"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        ckpt.write_bytes(random.Random(0).randbytes(len(data)))
    elif damage == "no-metadata":
        save_file({"images": torch.zeros(10, 1, 8, 8)}, str(ckpt))
    else:   # a flipped byte in the image data: only the checksum can tell
        ckpt.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    before = snapshot(run)
    refused(capsys, ["distill", "--resume", run], str(ckpt), "delete it", f"--resume {run}", "--overwrite")
    assert snapshot(run) == before
    if damage != "truncated":
        return
    # the way forward the message names: delete the checkpoint and resume, from iteration 0
    ckpt.unlink()
    assert main(["distill", "--resume", str(run)]) == 0
    assert torch.equal(SyntheticSet.load(run).images, SyntheticSet.load(good_run).images)


@pytest.mark.parametrize("content", [b"", b'{"config": {"ipc": 1, "iter', b"[1, 2]", b'{"config": {"ipc": "ten"}}',
                                     b'{"config": {"lr": NaN}}'])
def test_resume_with_a_damaged_config_names_the_way_forward(run, capsys, content):
    (run / "config.json").write_bytes(content)
    before = snapshot(run)
    refused(capsys, ["distill", "--resume", run], "config.json is damaged", "--overwrite")
    assert snapshot(run) == before


def test_a_kill_during_the_first_config_write_leaves_a_folder_both_commands_understand(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.k3j2h1.tmp").write_text('{"config": {"ip')   # the half-written temporary
    (run / LOCK_NAME).write_text("pid 1 on elsewhere\n")                  # the dead process's lock file
    before = snapshot(run)
    refused(capsys, ["distill", "--resume", run], "no run to resume", "original", f"--out {run}")
    assert snapshot(run) == before
    assert main(["distill", *RUN_ARGS, "--out", str(run)]) == 0   # the original command accepts it
    assert not list(run.glob(".*.tmp")) and SyntheticSet.load(run).info["iterations_done"] == 2


def test_resuming_with_fewer_iterations_than_done_is_refused_and_changes_nothing(run, capsys):
    # It kept the 2 iterations done and rewrote the configuration (and the set's) to say 1.
    before = snapshot(run)
    refused(capsys, ["distill", "--resume", run, "--iterations", "1"], "has done 2 iterations",
            "pass --iterations 2 or more")
    assert snapshot(run) == before
    assert main(["distill", "--resume", str(run), "--iterations", "3"]) == 0
    s = SyntheticSet.load(run)
    assert s.config["iterations"] == 3 and s.info["iterations_done"] == 3


def test_a_run_folder_without_its_set_yet_says_how_to_finish_it(run, capsys):
    # "no synthetic set at RUN/synset.safetensors: pass a .safetensors file ..." read as a wrong path.
    (run / "synset.safetensors").unlink()
    for command in (["evaluate", run, "--runs", "1", "--epochs", "0"], ["show", run]):
        refused(capsys, command, "has not finished", f"atomdistill distill --resume {run}")


def test_evaluating_with_no_epochs_says_the_networks_are_untrained(good_run, tmp_path, capsys):
    # A chance-level accuracy was printed like any other.
    assert main(["evaluate", str(good_run), "--runs", "1", "--epochs", "0", "--out", str(tmp_path / "e.json")]) == 0
    assert "note: --epochs 0 trains nothing" in capsys.readouterr().out
    assert main(["evaluate", str(good_run), "--runs", "1", "--epochs", "1", "--out", str(tmp_path / "f.json")]) == 0
    assert "trains nothing" not in capsys.readouterr().out


def test_a_record_another_evaluation_is_writing_is_refused(good_run, tmp_path, capsys):
    # Two evaluations into one record each rewrote the journal of finished runs without the other's.
    record = tmp_path / "e.json"
    with FolderLock.of_file(record, "evaluation record"):
        refused(capsys, ["evaluate", good_run, "--runs", "1", "--epochs", "0", "--out", record],
                f"evaluation record {record} is in use by another atomdistill process (pid {os.getpid()} on",
                "pass another --out")
        assert not record.exists() and not (tmp_path / "e.json.partial").exists()
    assert main(["evaluate", str(good_run), "--runs", "1", "--epochs", "0", "--out", str(record)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]   # the lock file went with the lock
    # a refused evaluation into new folders leaves none of them behind
    refused(capsys, ["evaluate", good_run, "--models", "nope", "--out", tmp_path / "x" / "y" / "e.json"], "nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]


# ---- 2. non-finite options and diverging runs ----------------------------------------------------
@pytest.mark.parametrize("option", ["--lr=nan", "--lr=inf", "--lr=-1", "--momentum=nan", "--channel=inf", "--mmd=nan",
                                    "--scale=-inf", "--power=nan", "--checkpoint-every=0", "--log-every=0",
                                    "--pool-steps=-1", "--pool-size=0", "--seed=-1", "--momentum=1",
                                    "--momentum=2"])
def test_non_finite_or_impossible_options_are_refused_at_the_start(tmp_path, capsys, option):
    refused(capsys, ["distill", *RUN_ARGS, option, "--out", tmp_path / "r"], option.split("=")[0])
    assert not (tmp_path / "r").exists()


def test_a_layer_the_network_lacks_is_refused_before_the_run_starts(tmp_path, capsys):
    # It was found by the first iteration's loss, after the progress bar had been drawn.
    code = main(["distill", *RUN_ARGS, "--layers", "1,9", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("atomdistill distill: error: layers [9] out of range: this network "
                                         "has intermediate blocks 1..2"), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", [["evaluate", "SET", "--runs", "1", "--epochs", "1"],
                                     ["baseline", "random", "--ipc", "1"], ["baseline", "herding", "--ipc", "1"],
                                     ["nas", "--proxy", "SET", "--grid", "depth=1", "--epochs", "1"]])
def test_a_negative_seed_is_refused_before_any_work(good_run, tmp_path, capsys, command):
    # numpy's seeding raised a bare ValueError deep inside (after NAS had drawn its progress bar).
    argv = [str(good_run) if a == "SET" else a for a in command]
    refused(capsys, [*argv, "--seed", "-1", "--out", tmp_path / "out"], "seed must be an integer >= 0", "-1")
    assert not (tmp_path / "out").exists()


def test_a_misspelt_option_in_the_api_is_named_with_the_closest_one(good_run, tmp_path):
    # distill(iters=...) was a bare TypeError from the dataclass; resume's overrides said only "unknown".
    with pytest.raises(ConfigError, match=r"unknown distillation option\(s\) 'iters' \(did you mean 'iterations'\?\)"):
        distill("digits", ipc=1, iters=2, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match=r"'checkpoint_evry' \(did you mean 'checkpoint_every'\?\)"):
        resume(good_run, checkpoint_evry=5)


def test_config_refuses_non_finite_numbers_in_the_api():
    for bad in (dict(lr=float("nan")), dict(momentum=float("inf")), dict(spatial=float("nan")), dict(ipc=1.5)):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_says_so(run, capsys, monkeypatch):
    original = Distiller.step_loss

    def nan_from_3(self, syn, iteration):
        loss, terms = original(self, syn, iteration)
        return (loss * float("nan"), terms) if iteration >= 3 else (loss, terms)

    monkeypatch.setattr(Distiller, "step_loss", nan_from_3)
    before = snapshot(run / "checkpoint.safetensors")
    message = refused(capsys, ["distill", "--resume", run, "--iterations", "6"],
                      "became nan at iteration 3", "--lr", "keeps its last checkpoint, iteration 3")
    assert snapshot(run / "checkpoint.safetensors") != before   # iteration 3 was written ...
    monkeypatch.setattr(Distiller, "step_loss", original)
    meta, tensors = __import__("atomdistill.synset", fromlist=["x"]).read_safetensors(
        run / "checkpoint.safetensors", "checkpoint", "")
    assert meta["iteration"] == 3 and torch.isfinite(tensors["images"]).all(), message   # ... and kept


def test_a_checkpoint_is_never_written_from_non_finite_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: [
        p.data.fill_(float("inf")) for g in self.param_groups for p in g["params"]])
    refused(capsys, ["distill", *RUN_ARGS, "--out", tmp_path / "r"], "non-finite at iteration 1",
            "has no checkpoint of this run")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


# ---- 3. a lock on the run folder -----------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_first(run, capsys):
    before = snapshot(run)
    with FolderLock(run):
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        refused(capsys, ["distill", "--resume", run, "--iterations", "3"], "in use", holder)
        refused(capsys, ["distill", *RUN_ARGS, "--overwrite", "--out", run], "in use", holder)
    assert snapshot(run) == before
    assert main(["distill", "--resume", str(run), "--iterations", "3"]) == 0   # released: free again
    assert not (run / LOCK_NAME).exists()


def test_a_failed_new_run_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Distiller, "_run", lambda self: (_ for _ in ()).throw(ConfigError("stop")))
    refused(capsys, ["distill", *RUN_ARGS, "--out", tmp_path / "new"], "stop")
    assert not (tmp_path / "new").exists()


def test_kill_9_at_a_random_point_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real process, killed with SIGKILL while it runs (checkpoints every iteration, so the kill
    often lands in a write); its stale lock must not block the resume; the set equals a straight run."""
    rng = random.Random(18)
    run, iterations = tmp_path / "run", 40
    args = ["--ipc", "1", "--iterations", str(iterations), "--batch-real", "8", "--checkpoint-every", "1",
            "--log-every", "1", "--seed", "7"]
    proc = subprocess.Popen([sys.executable, "-m", "atomdistill", "distill", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_after = rng.randint(1, 25)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                lines = (run / "metrics.jsonl").read_text().splitlines()
                if lines and json.loads(lines[-1])["iteration"] >= kill_after:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert (run / LOCK_NAME).exists()   # the dead process's lock file, whose flock died with it
    assert main(["distill", "--resume", str(run)]) == 0
    straight = distill("digits", ipc=1, iterations=iterations, batch_real=8, seed=7, progress=False)
    resumed = SyntheticSet.load(run)
    assert torch.equal(resumed.images, straight.images)
    assert resumed.info["iterations_done"] == iterations and not list(run.glob(".*.tmp"))


def test_kill_9_during_an_evaluation_then_the_same_command_continues_it(run, tmp_path):
    """Each finished network is kept in eval.json.partial: the same command, run again, trains only
    the networks left, and the record equals one from an evaluation never interrupted."""
    args = ["evaluate", str(run), "--runs", "4", "--epochs", "40", "--seed", "3"]
    journal = run / "eval.json.partial"
    proc = subprocess.Popen([sys.executable, "-m", "atomdistill", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not journal.exists():
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the evaluation ended before it was killed"
    kept = json.loads(journal.read_text())["runs"]
    assert 1 <= sum(len(runs) for by_model in kept.values() for runs in by_model.values()) < 4
    assert not (run / "eval.json").exists()
    assert main(args) == 0 and not journal.exists()   # the dead process's record lock does not stand in the way
    assert not (run / ".eval.json.atomdistill.lock").exists()
    assert main([*args, "--out", str(tmp_path / "straight.json")]) == 0
    resumed, straight = (json.loads(p.read_text())["results"]["convnet"]["accs"]
                         for p in (run / "eval.json", tmp_path / "straight.json"))
    assert resumed == straight


# ---- 4. the set loader checks what it reads ----------------------------------------------------
def _write_raw(path: Path, tensors: dict, meta) -> Path:
    """A set file as an old version or another tool might write it: no checksum."""
    save_file(tensors, str(path), metadata={"atomdistill": json.dumps(meta)})
    return path


def _raw_parts():
    s = small_set()
    meta = {"format": "atomdistill.SyntheticSet", "version": 1, "class_names": s.class_names, "mean": [0.5],
            "std": [0.25], "dataset": "toy", "method": "atom", "config": {}, "info": {}}
    return {"images": s.images.clone(), "labels": s.labels.clone()}, meta


def _damaged(kind):
    t, m = _raw_parts()
    if kind == "no class_names":
        del m["class_names"]
    elif kind == "no images":
        del t["images"]
    elif kind == "metadata a list":
        m = [m]
    elif kind == "count mismatch":
        t["labels"] = t["labels"][:4].contiguous()
    elif kind == "1-D images":
        t["images"] = t["images"].flatten().contiguous()
    elif kind == "label 2^31":
        t["labels"][2] = 2 ** 31
    elif kind == "negative label":
        t["labels"][0] = -1
    elif kind == "float labels":
        t["labels"] = t["labels"].float()
    elif kind == "NaN pixel":
        t["images"][3, 0, 1, 1] = float("nan")
    elif kind == "mean length":
        m["mean"] = [0.5, 0.5, 0.5]
    elif kind == "std zero":
        m["std"] = [0.0]
    elif kind == "names not strings":
        m["class_names"] = [1, 2, 3]
    elif kind == "config a string":
        m["config"] = "ipc=2"
    elif kind == "zca shape":
        t.update({"zca.mean": torch.zeros(16), "zca.transform": torch.zeros(3, 3),
                  "zca.inverse_transform": torch.eye(16)})
    return t, m


DAMAGE = ["no class_names", "no images", "metadata a list", "count mismatch", "1-D images", "label 2^31",
          "negative label", "float labels", "NaN pixel", "mean length", "std zero", "names not strings",
          "config a string", "zca shape"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_set_is_one_clear_line_in_show(tmp_path, capsys, kind):
    path = _write_raw(tmp_path / "s.safetensors", *_damaged(kind))
    before = snapshot(tmp_path)
    refused(capsys, ["show", path, "--out", tmp_path / "g.png"], str(path))
    assert snapshot(tmp_path) == before


def test_a_damaged_set_is_refused_by_evaluate_before_training(tmp_path, capsys, monkeypatch):
    t, m = _damaged("NaN pixel")
    t["images"], t["labels"] = torch.zeros(10, 1, 8, 8), torch.arange(10)
    t["images"][0, 0, 0, 0] = float("nan")
    m.update(class_names=[str(i) for i in range(10)], mean=[0.3], std=[0.4])
    path = _write_raw(tmp_path / "s.safetensors", t, m)
    monkeypatch.setattr(sys.modules["atomdistill.evaluate"], "train_and_test", lambda *a, **k: pytest.fail("trained"))
    refused(capsys, ["evaluate", path, "--epochs", "1", "--runs", "1"], "NaN or infinite")


def test_sets_without_a_checksum_still_load_and_an_edited_one_is_caught(tmp_path):
    legacy = SyntheticSet.load(_write_raw(tmp_path / "old.safetensors", *_raw_parts()))
    assert legacy.ipc == 2 and legacy.class_names == ["a", "b", "c"]
    path = small_set().save(tmp_path / "new.safetensors")
    assert "checksum" in json.loads(_metadata(path.read_bytes()))
    data = path.read_bytes()
    assert data.count(b"toy") == 1
    path.write_bytes(data.replace(b"toy", b"tox"))   # an edit that leaves valid JSON and structure
    with pytest.raises(AtomDistillError, match="does not match its checksum"):
        SyntheticSet.load(path)


def test_saving_a_set_with_nan_pixels_is_refused(tmp_path):
    s = small_set()
    s.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(AtomDistillError, match="NaN or infinite"):
        s.save(tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())


# ---- the fuzz: mutants of a set and of a checkpoint ----------------------------------------------
def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _metadata(data: bytes) -> str:
    return _header(data)[0]["__metadata__"]["atomdistill"]


def _pack(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


_VALUES = [None, -1, 0, 2 ** 40, 1.5, "x", [], {}, [1, "a"], True, float("nan"), 1e308]


def _edit(obj, rng):
    """One random edit deep inside a JSON value: delete, replace or add a key / item."""
    if isinstance(obj, dict) and obj and rng.random() < 0.7:
        key = rng.choice(sorted(obj))
        r = rng.random()
        if r < 0.25:
            del obj[key]
        elif r < 0.5 or not isinstance(obj[key], (dict, list)):
            obj[key] = rng.choice(_VALUES)
        else:
            _edit(obj[key], rng)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        i = rng.randrange(len(obj))
        if rng.random() < 0.5:
            obj[i] = rng.choice(_VALUES)
        else:
            del obj[i]
        return obj
    if isinstance(obj, dict):
        obj[rng.choice(["extra", "checksum", "iteration"])] = rng.choice(_VALUES)
    return obj


def mutants(data: bytes, n: int, seed: int):
    """n seeded mutants of a safetensors file: byte flips, truncations, metadata and header edits."""
    rng = random.Random(seed)
    header, body = _header(data)
    for k in range(n):
        kind = k % 5
        if kind == 0:    # flip 1-3 bytes anywhere
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            yield "flip", bytes(b)
        elif kind == 1:  # truncate
            yield "truncate", data[: rng.randrange(len(data))]
        elif kind in (2, 3):   # edit the metadata JSON (keeping or dropping its checksum)
            meta = json.loads(header["__metadata__"]["atomdistill"])
            meta = _edit(meta, rng) if rng.random() < 0.9 else [meta]
            h = json.loads(json.dumps(header))
            h["__metadata__"]["atomdistill"] = json.dumps(meta)
            yield "metadata", _pack(h, body)
        else:            # edit the tensor table: dtype, shape or offsets
            h = json.loads(json.dumps(header))
            name = rng.choice(sorted(k for k in h if k != "__metadata__"))
            field = rng.choice(["dtype", "shape", "data_offsets"])
            h[name][field] = {"dtype": rng.choice(["F64", "I64", "F16", "U8", "BOOL"]),
                              "shape": rng.choice([[], [2 ** 31], [1, 2, 3], [0]]),
                              "data_offsets": rng.choice([[0, 4], [1, 2 ** 40], [8, 0]])}[field]
            yield "header", _pack(h, body)


def _same_set(a: SyntheticSet, b: SyntheticSet) -> bool:
    same_zca = (a.zca is None) == (b.zca is None) and (a.zca is None or all(
        torch.equal(x, y) for x, y in zip(a.zca.state_dict().values(), b.zca.state_dict().values())))
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.class_names == b.class_names
            and a.mean == b.mean and a.std == b.std and (a.dataset, a.method, a.config, a.info) ==
            (b.dataset, b.method, b.config, b.info) and same_zca)


def test_fuzz_every_mutant_of_a_set_is_an_error_or_the_same_set(tmp_path):
    original = small_set(zca=True)
    data = original.save(tmp_path / "orig.safetensors").read_bytes()
    path, outcomes = tmp_path / "m.safetensors", {"error": 0, "same": 0}
    for i, (kind, mutant) in enumerate(mutants(data, 300, seed=18)):
        path.write_bytes(mutant)
        try:
            loaded = SyntheticSet.load(path)
        except AtomDistillError as e:
            assert "\n" not in str(e), (i, kind, str(e))
            outcomes["error"] += 1
            continue
        assert _same_set(loaded, original), (i, kind)
        outcomes["same"] += 1
    assert outcomes["error"] > 250, outcomes


def test_fuzz_every_mutant_of_a_set_without_checksum_is_an_error_or_a_usable_set(tmp_path):
    """Old sets carry no checksum: a mutant may load with other values, but never crashes the
    loader or what uses a set (ipc, pixels) with anything but a library error."""
    data = _write_raw(tmp_path / "orig.safetensors", *_raw_parts()).read_bytes()
    path = tmp_path / "m.safetensors"
    for i, (kind, mutant) in enumerate(mutants(data, 200, seed=19)):
        path.write_bytes(mutant)
        try:
            s = SyntheticSet.load(path)
        except AtomDistillError:
            continue
        assert 1 <= s.ipc <= len(s) and torch.isfinite(s.to_pixels()).all(), (i, kind)


def test_fuzz_every_mutant_of_a_checkpoint_is_an_error_or_the_same_state(tmp_path):
    data_set = make_dataset()
    distill(data_set, ipc=2, out=tmp_path / "run", iterations=2, batch_real=4, checkpoint_every=1,
            progress=False, device="cpu")
    cfg = DistillConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())["config"])
    d = Distiller(cfg, data=data_set, out=tmp_path / "run", resume=True, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    original, data = d._load_checkpoint(), ckpt.read_bytes()
    errors = 0
    for i, (kind, mutant) in enumerate(mutants(data, 300, seed=20)):
        ckpt.write_bytes(mutant)
        try:
            state = d._load_checkpoint()
        except AtomDistillError as e:
            assert "\n" not in str(e), (i, kind, str(e))
            errors += 1
            continue
        assert state.iteration == original.iteration and state.history == original.history, (i, kind)
        assert torch.equal(state.images, original.images), (i, kind)
        assert (state.momentum is None) == (original.momentum is None), (i, kind)
        assert state.momentum is None or torch.equal(state.momentum, original.momentum), (i, kind)
    assert errors > 250


# ---- 5. output paths ----------------------------------------------------------------------------
def test_distill_out_that_is_a_file_or_under_one(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    before = snapshot(tmp_path)
    refused(capsys, ["distill", *RUN_ARGS, "--out", blocker], str(blocker), "is a file, not a folder")
    refused(capsys, ["distill", *RUN_ARGS, "--out", blocker / "run"], str(blocker), "is a file, not a folder")
    assert snapshot(tmp_path) == before


def test_no_command_writes_over_its_input_or_an_earlier_result(run, tmp_path, capsys):
    # `export RUN --format dc --out RUN/synset.safetensors` replaced the set with the export, and an
    # export into a used folder mixed its PNGs with the earlier ones.
    the_set = run / "synset.safetensors"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.png").write_bytes(b"an earlier export")
    (tmp_path / "earlier.pt").write_bytes(b"an earlier result")
    before = snapshot(run, tmp_path / "used", tmp_path / "earlier.pt")
    reads_it = "is what this command reads"
    for argv, message in [
            (["export", run, "--format", "dc", "--out", the_set, "--overwrite"], reads_it),
            (["show", run, "--out", the_set], reads_it),
            (["evaluate", run, "--runs", "1", "--epochs", "1", "--out", the_set], reads_it),
            (["report", run, "--out", run / "eval.json"], "eval.json"),
            (["export", run, "--format", "dc", "--out", tmp_path / "earlier.pt"], "pass --overwrite"),
            (["show", run, "--out", tmp_path / "earlier.pt"], "already exists"),
            (["export", run, "--format", "folder", "--out", tmp_path / "used"], "not empty"),
            (["export", run, "--format", "mtt", "--out", run], "not empty"),
            (["show", run, "--folder", tmp_path / "used"], "not empty"),
            (["baseline", "random", "--ipc", "1", "--out", the_set], "pass --overwrite"),
            (["baseline", "random", "--ipc", "1", "--out", tmp_path / "b.png"], "both"),
            (["import", tmp_path / "earlier.pt", "--format", "dc", "--dataset", "digits", "--out", the_set],
             "pass --overwrite")]:
        if argv[0] == "report":
            (run / "eval.json").write_text(json.dumps({"a record": 1}))
            before[str(run / "eval.json")] = snapshot(run / "eval.json")[str(run / "eval.json")]
        refused(capsys, argv, message)
        assert snapshot(run, tmp_path / "used", tmp_path / "earlier.pt") == before, argv
    # What a command makes again is replaced: the grid, the evaluation record, a set with --overwrite.
    assert main(["show", str(run), "--out", str(tmp_path / "g.png")]) == 0
    assert main(["show", str(run), "--out", str(tmp_path / "g.png")]) == 0
    assert main(["export", str(run), "--format", "dc", "--out", str(tmp_path / "earlier.pt"), "--overwrite"]) == 0
    assert main(["baseline", "random", "--ipc", "1", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert main(["baseline", "random", "--ipc", "1", "--seed", "1", "--out", str(tmp_path / "b.safetensors"),
                 "--overwrite"]) == 0
    assert SyntheticSet.load(tmp_path / "b.safetensors").config["seed"] == 1


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder. chmod does not stop root, so there the writes into it fail by hand."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.txt").write_text("keep me")
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):   # root: make creating files under it fail as the kernel would
        real = io_module.tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir).absolute().is_relative_to(folder):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if self.absolute().is_relative_to(folder) and not self.exists():
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(io_module.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    yield folder
    folder.chmod(0o755)


def test_outputs_in_a_read_only_location(read_only, capsys, tmp_path):
    before = snapshot(read_only)
    refused(capsys, ["distill", *RUN_ARGS, "--out", read_only / "run"], "not writable")
    refused(capsys, ["baseline", "random", "--ipc", "1", "--out", read_only / "b.safetensors"], "not writable")
    refused(capsys, ["show", small_set().save(tmp_path / "s.safetensors"), "--out", read_only / "g.png"],
            "not writable")
    assert snapshot(read_only) == before


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    distill_module = sys.modules["atomdistill.distill"]

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distill_module, "save_file", full)
    before = snapshot(run)
    refused(capsys, ["distill", "--resume", run, "--iterations", "3"], "checkpoint.safetensors", "disk is full")
    after = snapshot(run)
    assert after[str(run / "checkpoint.safetensors")] == before[str(run / "checkpoint.safetensors")]
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("where", ["under-a-file", "read-only", "a-folder"])
def test_evaluate_out_is_checked_before_training(good_run, tmp_path, capsys, monkeypatch, read_only, where):
    monkeypatch.setattr(sys.modules["atomdistill.evaluate"], "train_and_test", lambda *a, **k: pytest.fail("trained first"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = {"under-a-file": blocker / "eval.json", "read-only": read_only / "eval.json", "a-folder": tmp_path}[where]
    before = snapshot(good_run, read_only, blocker)
    refused(capsys, ["evaluate", good_run, "--epochs", "1", "--runs", "1", "--out", out], str(out))
    assert snapshot(good_run, read_only, blocker) == before


def test_leftover_temporaries_of_killed_writes_are_removed_by_the_next_run(run):
    for name in (".checkpoint.safetensors.a1b2c3.tmp", ".synset.safetensors.x9y8.tmp", ".metrics.jsonl.q.tmp"):
        (run / name).write_bytes(b"half a file")
    (run / "notes.tmp").write_text("the user's own file")
    assert main(["distill", "--resume", str(run), "--iterations", "3"]) == 0
    assert not list(run.glob(".*.tmp")) and (run / "notes.tmp").exists()


# ---- 6. a folder dataset with an empty test split ------------------------------------------------
@pytest.mark.parametrize("case", ["empty-test", "class-without-images"])
def test_a_folder_dataset_with_nothing_to_test_on_is_refused(tmp_path, capsys, case):
    root = write_folder(tmp_path / "ds")
    if case == "empty-test":
        shutil.rmtree(root / "test")
        (root / "test").mkdir()
        where = root / "test"
    else:
        for p in (root / "test" / "dog").iterdir():
            p.unlink()
        where = root / "test" / "dog"
    before = snapshot(root)
    refused(capsys, ["data", f"folder:{root}"], str(where))
    refused(capsys, ["distill", "--dataset", f"folder:{root}", *RUN_ARGS, "--out", tmp_path / "r"], str(where))
    with pytest.raises(DatasetError, match="holds no"):
        from atomdistill import load_dataset
        load_dataset(f"folder:{root}")
    assert snapshot(root) == before and not (tmp_path / "r").exists()


# ---- 7. CIFAR batches are unpickled with an allow-list -------------------------------------------
class _Payload:
    """Unpickles as fn(*args): what a hostile file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("attack", ["os.system", "eval"])
def test_a_hostile_cifar_batch_is_refused_and_not_run(tmp_path, capsys, attack):
    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = (_Payload(os.system, f"touch {marker}") if attack == "os.system" else
               _Payload(eval, f"__import__('os').system('touch {marker}')"))
    obj = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": payload}
    (root / "data_batch_1").write_bytes(pickle.dumps(obj, protocol=2))
    before = snapshot(root)
    refused(capsys, ["data", "cifar10", "--data-root", tmp_path], "data_batch_1", "refused")
    assert not marker.exists() and snapshot(root) == before


# ---- 8. diverged evaluation runs ------------------------------------------------------------------
def test_diverged_evaluation_runs_are_marked_not_averaged(tmp_path, capsys):
    # pixels of 1e30 overflow instance norm at once: every network's weights become NaN
    from atomdistill import load_dataset
    digits = load_dataset("digits")
    images = torch.full((10, 1, 8, 8), 1e30)
    images[::2] = -1e30
    huge = SyntheticSet(images=images, labels=torch.arange(10), class_names=list(digits.class_names),
                        mean=digits.mean, std=digits.std, dataset="digits", method="atom")
    path = huge.save(tmp_path / "huge.safetensors")
    assert main(["evaluate", str(path), "--runs", "2", "--epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert "diverged (all 2 runs)" in out and "±" not in out
    record = json.loads((tmp_path / "huge.eval.json").read_text())
    assert record["results"]["convnet"] == {**record["results"]["convnet"], "mean": None, "std": None,
                                            "accs": [None, None], "diverged": 2}
    assert main(["report", str(tmp_path / "huge.eval.json"), "--out", str(tmp_path / "report.md")]) == 0
    assert "diverged (2 of 2 runs)" in (tmp_path / "report.md").read_text()


def test_a_partly_diverged_model_shows_the_count_beside_the_mean(tmp_path):
    r = summarise_runs([0.5, float("nan"), 0.7], 1.0)
    assert r["accs"] == [0.5, None, 0.7] and r["diverged"] == 1
    assert r["mean"] == pytest.approx(0.6) and r["std"] == pytest.approx(0.1)
    assert format_result(r).strip() == "60.00 ± 10.00 (1 of 3 runs diverged)"
    from atomdistill.report import markdown_table
    rec = {"set": {"dataset": "digits", "method": "atom", "ipc": 1}, "results": {"convnet": r}}
    assert "60.0 ± 10.0 (1 of 3 runs diverged)" in markdown_table([rec])


def test_results_get_the_permissions_of_ordinary_files(tmp_path):
    # Atomic writes go through mkstemp/mkdtemp, which make private (0600/0700) files: a set saved on
    # a shared machine could not be read by the rest of the team.
    old = os.umask(0o022)
    try:
        SyntheticSet(images=torch.zeros(2, 1, 8, 8), labels=torch.tensor([0, 1]), class_names=["a", "b"],
                     mean=(0.0,), std=(1.0,)).export_folder(tmp_path / "imgs")
        io_module.write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "imgs").stat().st_mode & 0o777 == 0o755
