"""--nets pool: a pool of networks trained on real data, deterministic and resumable bit for bit."""
import json
import shutil

import pytest
import torch

from atomdistill import DistillConfig, distill
from atomdistill.distill import Distiller
from atomdistill.errors import ConfigError
from atomdistill.netpool import NetworkPool
from conftest import interrupt_run, make_dataset

FAST = dict(iterations=6, batch_real=5, log_every=1, checkpoint_every=3, progress=False, device="cpu")
POOL = dict(nets="pool", pool_size=2, pool_refresh=2, pool_steps=1)


def _pool(**kw):
    data = make_dataset()
    cfg = DistillConfig(dataset="toy", **{**POOL, **kw}).resolved(data.image_size)
    return NetworkPool(cfg, 1, 3, data.train_images, data.train_labels, torch.device("cpu"))


def test_births_and_departures_follow_the_iteration_not_the_calls():
    stepwise, jump = _pool(pool_refresh=3), _pool(pool_refresh=3)
    for t in range(10):
        stepwise.network(t)
    jump.network(9)
    assert [m.birth for m in stepwise.members] == [m.birth for m in jump.members] == [6, 9]


def test_the_used_network_learns_and_the_others_wait():
    pool = _pool(pool_refresh=1, pool_size=3)
    for t in range(3):
        pool.network(t)
    used = pool.network(3)
    before = {m.birth: [p.clone() for p in m.net.parameters()] for m in pool.members}
    pool.train(3)
    for m in pool.members:
        moved = any(not torch.equal(a, b) for a, b in zip(before[m.birth], m.net.parameters()))
        assert moved == (m.net is used)
    assert not any(p.requires_grad for p in used.parameters())


def test_one_network_refreshed_every_iteration_without_training_is_the_random_source(toy):
    random = distill(toy, ipc=2, **FAST)
    pool = distill(toy, ipc=2, nets="pool", pool_size=1, pool_refresh=1, pool_steps=0, **FAST)
    assert torch.equal(pool.images, random.images)
    trained = distill(toy, ipc=2, **POOL, **FAST)
    assert not torch.equal(trained.images, random.images)


def test_resumed_pool_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    full = distill(make_dataset(), ipc=2, out=tmp_path / "full", **POOL, **FAST)
    interrupt_run(monkeypatch, 4, ipc=2, out=tmp_path / "run", **POOL, **FAST)   # last checkpoint: iteration 3
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    cfg = DistillConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())["config"])
    resumed = Distiller(cfg, data=make_dataset(), out=tmp_path / "run", resume=True, progress=False).run()
    assert torch.equal(resumed.images, full.images)
    # The check has teeth: members re-born untrained at the resume give another set.
    monkeypatch.setattr(NetworkPool, "load_state_tensors", lambda self, tensors: None)
    forgetful = Distiller(cfg, data=make_dataset(), out=tmp_path / "copy", resume=True, progress=False).run()
    assert not torch.equal(forgetful.images, full.images)


def test_a_class_shard_refuses_the_pool():
    cfg = DistillConfig(dataset="toy", ipc=1, device="cpu", **POOL)
    data = make_dataset(num_classes=2)
    with pytest.raises(ConfigError, match="class-sharded"):
        Distiller(cfg, data=data, classes=[0, 2], num_classes_total=3, progress=False)


def test_pool_options_are_checked():
    with pytest.raises(ConfigError, match="nets must be"):
        DistillConfig(nets="trained")
    with pytest.raises(ConfigError, match="--pool-size must be at least 1, got 0"):
        DistillConfig(nets="pool", pool_size=0)
    with pytest.raises(ConfigError, match="--pool-steps must be a whole number"):
        DistillConfig(nets="pool", pool_steps=2.5)
