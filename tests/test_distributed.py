"""Class-sharded runs over real process groups (gloo, 2 CPU processes) equal single-process runs."""
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from atomdistill import SyntheticSet, distill, load_dataset, resume
from atomdistill.distributed import check_shardable, count_classes, launched, process_group, shard_classes
from atomdistill.errors import AtomDistillError, ConfigError
from atomdistill.evaluate import evaluate, train_and_test
from atomdistill.io import FolderLock
from atomdistill.nas import candidate_name, candidates, search
from atomdistill.zca import ZCA

# Tiny runs on the embedded digits (10 classes, 8x8): a few seconds per process group.
RUN = dict(ipc=2, iterations=3, batch_real=8, log_every=1, checkpoint_every=1, zca=True, seed=3, device="cpu")
EVAL_EVERY = dict(ipc=1, iterations=2, batch_real=4, eval_every=1, eval_runs=3, eval_epochs=1, seed=4, device="cpu")
# A 4-candidate search with a random ipc-2 proxy: 2 rounds of 2 candidates over 2 ranks.
NAS = dict(ipc=2, epochs=2, full_epochs=1, seed=5, device="cpu", progress=False)
NAS_GRID = {"depth": [1, 2], "width": [4], "act": ["relu", "sigmoid"], "norm": ["instance"], "pool": ["avg"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- jobs run inside every process of a group ------------------------------------------------
def _job_session(group, tmp, checkpoint_1proc):
    """The happy-path checks, in one process group (starting one costs seconds on 2 cores)."""
    s = group.distill("digits", out=tmp / "run2", progress=False, **RUN)
    out = {"distill": {"images": s.images, "labels": s.labels, "names": s.class_names, "zca": s.zca.state_dict()}}
    out["resume"] = group.resume(checkpoint_1proc, iterations=4, progress=False).images
    out["no_zca"] = group.distill("digits", progress=False, **{**RUN, "zca": False}).images
    data = load_dataset("digits")
    out["evaluate"] = group.evaluate(_small_set(data), data, models=("convnet",), runs=3, epochs=1, progress=False)
    out["eval_every"] = group.distill("digits", out=tmp / "eval2", progress=False, **EVAL_EVERY).images
    messages = []
    for options in (dict(net="convnet-bn"), dict(ipc=10_000), dict(out=checkpoint_1proc)):
        try:
            group.distill("digits", **{"iterations": 1, "batch_real": 4, "device": "cpu", "progress": False,
                                       "ipc": 1, **options})
        except ConfigError as e:
            messages.append(str(e))
    out["config_errors"] = messages
    try:   # the test process holds this folder's lock: a sharded run is a second writer too
        group.distill("digits", out=tmp / "locked", iterations=1, batch_real=4, device="cpu", progress=False, ipc=1)
    except AtomDistillError as e:
        out["lock_error"] = str(e)
    out.update(_nas_session(group, tmp, data))
    return out


class _CountingTrain:
    """evaluate.train_and_test, recording which candidates this rank trains (and failing on request)."""

    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = [], fail_at_call

    def __call__(self, images, *args, model_kwargs, **kw):
        if len(self.calls) == self.fail_at_call:
            raise RuntimeError("injected failure")
        self.calls.append(("proxy" if len(images) < 100 else "whole", candidate_name(model_kwargs)))
        return train_and_test(images, *args, model_kwargs=model_kwargs, **kw)


def _nas_session(group, tmp, data):
    """A search whose rank 1 fails in the second round, then the same search run again to finish."""
    out = {}
    kw = dict(out_dir=tmp / "nas2", cache_dir=tmp / "nas2-cache", group=group, **NAS)
    try:   # rank 1 trains the proxy of candidates 1 then 3: the second fails
        search("random", data, NAS_GRID, train_fn=_CountingTrain(1 if group.rank == 1 else None), **kw)
    except Exception as e:
        out["nas_error"] = (type(e).__name__, str(e))
    out["nas_recorded"] = list(json.loads((tmp / "nas2" / "candidates.json").read_text())["candidates"])
    train = _CountingTrain()
    out["nas"] = search("random", data, NAS_GRID, train_fn=train, **kw)
    out["nas_calls"] = train.calls
    return out


def _small_set(data):
    idx = torch.cat([i[:2] for i in data.class_indices()])
    return SyntheticSet(images=data.train_images[idx], labels=data.train_labels[idx],
                        class_names=data.class_names, mean=data.mean, std=data.std, dataset="digits")


def _job_nothing(group):
    return None


def _job_rank1_dies(group, sleep_s):
    if group.rank == 1:
        if sleep_s:
            time.sleep(sleep_s)   # alive but absent: rank 0 must time out, not hang
        raise RuntimeError("rank 1 broke before the collective")
    t0 = time.perf_counter()
    try:
        group.all_reduce_sum(torch.ones(1))
    finally:
        (Path(os.environ["RESULT_DIR"]) / "rank0_seconds").write_text(str(time.perf_counter() - t0))


JOBS = {"session": _job_session, "nothing": _job_nothing, "rank1_dies": _job_rank1_dies}


def _worker(rank, world, port, result_dir, job, args, env):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), RESULT_DIR=str(result_dir), **env)
    torch.set_num_threads(1)
    try:
        with process_group("cpu") as group:
            outcome = ("ok", JOBS[job](group, *args))
    except BaseException as e:   # reported to the test, which decides
        outcome = ("error", type(e).__name__, str(e))
    torch.save(outcome, Path(result_dir) / f"rank{rank}.pt")


def spawn(tmp_path, job, *args, nprocs=2, world=None, env=None):
    """Run `job` in `nprocs` fresh processes forming a gloo group; their outcomes by rank."""
    result_dir = tmp_path / f"results-{job}-{time.monotonic_ns()}"
    result_dir.mkdir()
    mp.spawn(_worker, args=(world or nprocs, _free_port(), result_dir, job, args, env or {}), nprocs=nprocs,
             join=True)
    return [torch.load(result_dir / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def ok(outcomes):
    for o in outcomes:
        assert o[0] == "ok", o
    return [o[1] for o in outcomes]


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def session(tmp_module):
    """One 2-process session: a 3-iteration run (ZCA on, checkpoint every iteration), a resume of a
    1-process checkpoint, an evaluation and three refused configurations."""
    single(iterations=2, out=tmp_module / "run1")
    with FolderLock(tmp_module / "locked"):
        results = ok(spawn(tmp_module, "session", tmp_module, tmp_module / "run1",
                           env={"ATOMDISTILL_DIST_TIMEOUT": "60"}))
    return tmp_module, results


def single(**overrides):
    if set(overrides) <= {"iterations"}:
        return _reference(overrides.get("iterations", RUN["iterations"]))
    return distill("digits", progress=False, **{**RUN, **overrides})


@functools.lru_cache(maxsize=None)
def _reference(iterations):
    """The single-process run the sharded ones must equal (cached: several tests compare with it)."""
    return distill("digits", progress=False, **{**RUN, "iterations": iterations})


# ---- pure functions ------------------------------------------------------------------------------
def test_shard_classes_is_contiguous_balanced_and_covers_every_class():
    for k, w in ((10, 1), (10, 2), (10, 3), (10, 10), (100, 8)):
        shards = [shard_classes(k, w, r) for r in range(w)]
        assert sum(shards, []) == list(range(k))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_classes(10, 3, 0) == [0, 1, 2, 3] and shard_classes(10, 3, 2) == [7, 8, 9]
    with pytest.raises(ConfigError, match="at most 10 processes"):
        shard_classes(10, 11, 0)


def test_count_classes_without_loading():
    assert count_classes("digits") == 10 and count_classes("cifar100") == 100
    with pytest.raises(AtomDistillError, match="unknown dataset"):
        count_classes("imagenet-99")


def test_batch_norm_nets_are_refused_only_when_sharded():
    with pytest.raises(ConfigError, match="batch norm.*--net convnet"):
        check_shardable("convnet-bn", 1, 10, 8, world_size=2)
    check_shardable("convnet-bn", 1, 10, 8, world_size=1)
    check_shardable("convnet", 1, 10, 8, world_size=2)


def test_zca_from_moments_of_parts_equals_fit_of_the_whole():
    x = torch.randn(200, 3, 4, 4) * torch.linspace(0.2, 3, 48).view(1, 3, 4, 4)
    parts = (x[:70], x[70:])
    mean = sum(ZCA.sum(p) for p in parts) / len(x)
    z = ZCA.from_moments(mean, sum(ZCA.scatter(p, mean) for p in parts), len(x))
    ref = ZCA.fit(x)
    for k, v in ref.state_dict().items():
        assert torch.allclose(z.state_dict()[k], v, atol=1e-6), k


def test_not_launched_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not launched()
    with process_group() as group:
        assert group is None


# ---- real process groups ---------------------------------------------------------------------------
def test_two_processes_equal_one(session):
    tmp, results = session
    ref = single()
    for r in (r["distill"] for r in results):   # every rank returns the whole set, in global class order
        assert torch.equal(r["labels"], ref.labels) and r["names"] == ref.class_names
        assert torch.allclose(r["images"], ref.images, atol=1e-5)
    assert not torch.allclose(ref.images, single(iterations=0).images, atol=1e-3)   # the run moved the images
    written = SyntheticSet.load(tmp / "run2")
    assert torch.allclose(written.images, ref.images, atol=1e-5)
    assert written.info["processes"] == 2 and written.info["classes"] == list(range(10))
    losses = [json.loads(line)["loss"] for line in (tmp / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3   # logged once, by rank 0, as the sum over the ranks' classes
    assert losses[-1] == pytest.approx(ref.info["final_loss"], rel=1e-4)


def test_without_zca_two_processes_equal_one_bit_for_bit(session):
    # Every process sees the very same normalised images, so the sets agree in every bit; with ZCA
    # the whitening fitted from moments summed over the processes differs in its last bits (above).
    _, results = session
    ref = distill("digits", progress=False, **{**RUN, "zca": False})
    for r in results:
        assert torch.equal(r["no_zca"], ref.images)


def test_distributed_zca_equals_single_process_fit(session):
    _, results = session
    ref = ZCA.fit(load_dataset("digits").train_images).state_dict()
    for r in results:
        for k, v in ref.items():
            assert torch.allclose(r["distill"]["zca"][k], v, atol=1e-5), k


def test_two_process_checkpoint_resumes_in_one_process(session, tmp_path):
    tmp, _ = session
    copy = tmp_path / "run"
    copy.mkdir()
    for f in (tmp / "run2").iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    resumed = resume(copy, iterations=4, progress=False)
    assert torch.allclose(resumed.images, single(iterations=4).images, atol=1e-5)


def test_one_process_checkpoint_resumes_in_two(session):
    tmp, results = session
    straight = single(iterations=4)
    for r in results:
        assert torch.allclose(r["resume"], straight.images, atol=1e-5)
    assert torch.allclose(SyntheticSet.load(tmp / "run1").images, straight.images, atol=1e-5)


def test_evaluation_runs_spread_over_ranks_equal_one_process(session):
    _, results = session
    data = load_dataset("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in the workers, so the float sums are done in the same order
    try:
        ref = evaluate(_small_set(data), data, models=("convnet",), runs=3, epochs=1, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    for r in results:
        assert r["evaluate"]["convnet"]["accs"] == ref["convnet"]["accs"]
        assert r["evaluate"]["convnet"]["mean"] == pytest.approx(ref["convnet"]["mean"])


def test_evaluation_during_a_sharded_run_equals_one_process(session, tmp_path):
    tmp, results = session
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in the workers
    try:
        ref = distill("digits", out=tmp_path / "eval1", progress=False, **EVAL_EVERY)
    finally:
        torch.set_num_threads(threads)
    for r in results:
        assert torch.allclose(r["eval_every"], ref.images, atol=1e-5)

    def evals(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [row["eval"] for row in rows if "eval" in row]

    sharded, single_process = evals(tmp / "eval2"), evals(tmp_path / "eval1")
    assert len(sharded) == len(single_process) == 2
    for a, b in zip(sharded, single_process):   # images equal to ~1e-7: at most a test image may flip
        assert a["convnet"]["mean"] == pytest.approx(b["convnet"]["mean"], abs=2 / 540)


def test_nas_candidates_spread_over_ranks_equal_one_process(session, tmp_path):
    tmp, results = session
    names = [candidate_name(c) for c in candidates(NAS_GRID)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in the workers
    try:
        ref = search("random", load_dataset("digits"), NAS_GRID, out_dir=tmp_path / "nas1",
                     cache_dir=tmp_path / "cache1", **NAS)
    finally:
        torch.set_num_threads(threads)
    assert len({c["whole_acc"] for c in ref["candidates"]}) > 1   # the candidates differ: equality means something
    # The interrupted search: every rank stopped with rank 1's error; round 1 (candidates 0, 1) was recorded.
    assert results[1]["nas_error"] == ("RuntimeError", "injected failure")
    assert results[0]["nas_error"][0] == "AtomDistillError" and "rank 1 failed" in results[0]["nas_error"][1]
    assert results[0]["nas_recorded"] == names[:2]
    # The re-run trained only what was missing, candidates dealt round-robin over the ranks.
    assert results[0]["nas_calls"] == [("proxy", names[2]), ("whole", names[0]), ("whole", names[2])]
    assert results[1]["nas_calls"] == [("proxy", names[3]), ("whole", names[1]), ("whole", names[3])]
    written = json.loads((tmp / "nas2" / "nas.json").read_text())
    for r in (*(r["nas"] for r in results), written):
        assert [c["name"] for c in r["candidates"]] == names
        for c, c_ref in zip(r["candidates"], ref["candidates"]):
            assert (c["proxy_accs"], c["whole_accs"]) == (c_ref["proxy_accs"], c_ref["whole_accs"]), c["name"]
        for key in ("spearman", "spearman_top"):
            assert r[key] == pytest.approx(ref[key], nan_ok=True) or (r[key] is None and math.isnan(ref[key]))
        assert r["pick"] == ref["pick"] and r["best"] == ref["best"]
    assert len(json.loads((tmp / "nas2" / "candidates.json").read_text())["candidates"]) == 4


def test_configuration_errors_reach_every_rank_without_a_hang(session):
    _, results = session
    for r in results:
        messages = r["config_errors"]
        assert len(messages) == 3, messages
        assert "batch norm" in messages[0] and "--ipc 10000" in messages[1] and "already exists" in messages[2]


def test_a_locked_run_folder_refuses_every_rank_naming_the_holder(session):
    tmp, results = session
    for r in results:
        assert f"in use by another atomdistill process (pid {os.getpid()} on" in r.get("lock_error", ""), r
    assert not (tmp / "locked").exists()   # the lock's folder went with it: no rank wrote anything there


@pytest.mark.parametrize("sleep_s", [0, 15], ids=["rank-exits", "rank-hangs"])
def test_a_failing_rank_ends_the_others_with_a_clear_error(tmp_path, sleep_s):
    results = spawn(tmp_path, "rank1_dies", sleep_s, env={"ATOMDISTILL_DIST_TIMEOUT": "2"})
    assert results[1][:2] == ("error", "RuntimeError")
    assert results[0][:2] == ("error", "AtomDistillError"), results[0]
    assert "rank 0 failed" in results[0][2] and "--resume" in results[0][2]
    seconds = float(next(tmp_path.glob("results-*/rank0_seconds")).read_text())
    # Within the 2 s timeout (plus slack for a loaded machine), before the hung rank wakes at 15 s.
    assert seconds < 12, seconds


def test_a_rendezvous_that_never_completes_is_a_clear_error(tmp_path):
    (outcome,) = spawn(tmp_path, "nothing", nprocs=1, world=2, env={"ATOMDISTILL_DIST_TIMEOUT": "2"})
    assert outcome[:2] == ("error", "AtomDistillError")
    assert "could not join the 2 processes" in outcome[2] and "ATOMDISTILL_DIST_TIMEOUT" in outcome[2]


def test_torchrun_command_line(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "atomdistill",
           "distill", "--ipc", "1", "--iterations", "2", "--batch-real", "4", "--device", "cpu", "--seed", "1",
           "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("synthetic set:") == 1   # only rank 0 reports
    ref = distill("digits", ipc=1, iterations=2, batch_real=4, device="cpu", seed=1, progress=False)
    assert torch.allclose(SyntheticSet.load(out).images, ref.images, atol=1e-5)
    # A refusal every rank agrees on is said once (each rank printed it), then torchrun's own report.
    p = subprocess.run([*cmd[:cmd.index("--ipc")], "--ipc", "1000", "--out", str(tmp_path / "refused")],
                       capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode != 0 and p.stderr.count("--ipc 1000 is larger than the smallest class") == 1, p.stderr[-3000:]
