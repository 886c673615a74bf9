"""NAS with a proxy set: known rankings, resumption, Spearman against scipy, grids, the CLI."""
import json
import math

import numpy as np
import pytest
import torch

from atomdistill import ConfigError, SyntheticSet
from atomdistill.cli import main
from atomdistill.nas import (SPACES, candidate_name, candidates, check_candidate, load_grid_file, rankdata,
                             resolve_space, search, spearman)
from conftest import make_dataset

scipy_stats = pytest.importorskip("scipy.stats")

GRID = {"depth": [1, 2], "width": [4, 8], "act": ["relu", "sigmoid"], "norm": ["instance"], "pool": ["avg"]}


def score(cfg):
    """A known quality of each candidate: distinct for every config of GRID."""
    return 0.3 + 0.2 * cfg["depth"] + cfg["width"] / 100 + (0.1 if cfg["act"] == "relu" else 0.0)


class FakeTrain:
    """Stands in for evaluate.train_and_test: accuracy is a known function of the config."""

    def __init__(self, proxy=lambda s: s / 2, fail_after=None):
        self.calls, self.proxy_calls, self.proxy, self.fail_after = 0, 0, proxy, fail_after

    def __call__(self, images, labels, test_images, test_labels, model, protocol, *, model_kwargs, **kw):
        assert model == "convnet" and kw["num_classes"] == 3
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt   # as a user's Ctrl-C
        self.calls += 1
        is_proxy = len(images) < 36     # the toy's whole training set has 36 images
        self.proxy_calls += is_proxy
        s = score(model_kwargs)
        return [self.proxy(s) if is_proxy else s] * protocol.runs


def tiny_set(data, ipc=2):
    idx = torch.cat([i[:ipc] for i in data.class_indices()])
    return SyntheticSet(images=data.train_images[idx].clone(), labels=data.train_labels[idx].clone(),
                        class_names=list(data.class_names), mean=data.mean, std=data.std, dataset=data.name,
                        method="atom")


# ---- (a) a ranking known by construction --------------------------------------------------
def test_known_ranking_gives_correlation_one_and_the_best_pick(tmp_path):
    data = make_dataset()
    fake = FakeTrain()
    r = search(tiny_set(data), data, GRID, epochs=3, full_epochs=5, out_dir=tmp_path / "out",
               cache_dir=tmp_path / "cache", progress=False, train_fn=fake)
    assert fake.calls == 16 and fake.proxy_calls == 8
    assert r["spearman"] == pytest.approx(1.0) and r["spearman_top"] == pytest.approx(1.0)
    best = max(candidates(GRID), key=score)
    assert r["pick"]["name"] == r["best"]["name"] == candidate_name(best) == "convnet-d2-w8-relu-instance-avg"
    assert r["pick"]["whole_acc"] == pytest.approx(score(best)) and r["gap"] == 0 and r["pick"]["whole_rank"] == 1
    assert r["top_count"] == 2 and r["proxy"]["storage"] == {"images": 6, "bytes": 6 * 64 * 4,
                                                             "note": r["proxy"]["storage"]["note"]}
    # a reversed proxy ranks everything backwards and picks the worst
    fake = FakeTrain(proxy=lambda s: 1 - s)
    r = search(tiny_set(data), data, GRID, epochs=4, full_epochs=5, out_dir=tmp_path / "rev",
               cache_dir=tmp_path / "cache", progress=False, train_fn=fake)
    assert fake.proxy_calls == fake.calls == 8          # the whole-data results come from the cache
    assert r["spearman"] == pytest.approx(-1.0)
    assert r["pick"]["name"] == candidate_name(min(candidates(GRID), key=score))
    assert r["gap"] == pytest.approx(score(best) - min(map(score, candidates(GRID))))


def test_real_tiny_search_writes_sane_outputs(tmp_path):
    data = make_dataset(num_classes=3, per_class=8, size=8, test_per_class=4)
    grid = {"depth": [1, 4], "width": [4], "act": ["relu", "sigmoid"], "norm": ["instance", "batch"],
            "pool": ["avg"]}
    out = tmp_path / "out"
    r = search("random", data, grid, ipc=2, epochs=2, full_epochs=1, out_dir=out, cache_dir=tmp_path / "c",
               progress=False, device="cpu")
    assert r["space"]["candidates"] == 4 and len(r["space"]["skipped"]) == 4    # depth 4 pools 8px below 1px
    assert all("below 1 pixel" in s["reason"] for s in r["space"]["skipped"])
    for c in r["candidates"]:
        for key in ("proxy_acc", "whole_acc"):
            assert 0.0 <= c[key] <= 1.0 and (c[key] * 12) == pytest.approx(round(c[key] * 12))   # k of 12 right
        assert c["proxy_seconds"] > 0 and c["whole_seconds"] > 0
    assert r["proxy"]["storage"]["images"] == 6 and r["proxy"]["label"] == "random-ipc2"
    assert -1.0 <= (r["spearman"] if not math.isnan(r["spearman"]) else 0.0) <= 1.0
    saved = json.loads((out / "nas.json").read_text())
    assert saved["pick"] == r["pick"] and len(saved["candidates"]) == 4
    md = (out / "nas.md").read_text()
    assert "Spearman" in md and r["pick"]["name"] in md and "Skipped" in md
    assert (out / "nas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "candidates.json").read_text())["candidates"]) == 4


# ---- (b) resumption -----------------------------------------------------------------------
def test_interrupted_search_resumes_where_it_stopped(tmp_path):
    data = make_dataset()
    kw = dict(epochs=3, full_epochs=5, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(KeyboardInterrupt):
        search(tiny_set(data), data, GRID, train_fn=FakeTrain(fail_after=3), **kw)
    record = json.loads((tmp_path / "out" / "candidates.json").read_text())
    assert len(record["candidates"]) == 3
    fake = FakeTrain()
    r = search(tiny_set(data), data, GRID, train_fn=fake, **kw)
    assert fake.proxy_calls == 8 - 3 and fake.calls == 5 + 8 and r["spearman"] == pytest.approx(1.0)
    # interrupted during the whole-data part: the cache keeps what finished
    kw2 = {**kw, "full_epochs": 6, "out_dir": tmp_path / "out2"}
    with pytest.raises(KeyboardInterrupt):
        search(tiny_set(data), data, GRID, train_fn=FakeTrain(fail_after=8 + 2), **kw2)
    fake = FakeTrain()
    search(tiny_set(data), data, GRID, train_fn=fake, **kw2)
    assert fake.proxy_calls == 0 and fake.calls == 6
    # everything done: nothing trains again
    fake = FakeTrain()
    search(tiny_set(data), data, GRID, train_fn=fake, **kw2)
    assert fake.calls == 0


def test_other_options_in_the_same_folder_are_refused_unless_overwrite(tmp_path):
    data = make_dataset()
    kw = dict(full_epochs=5, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    search(tiny_set(data), data, GRID, epochs=3, train_fn=FakeTrain(), **kw)
    with pytest.raises(ConfigError, match=r"epochs \(3 recorded, 4 now\)"):
        search(tiny_set(data), data, GRID, epochs=4, train_fn=FakeTrain(), **kw)
    with pytest.raises(ConfigError, match="grid.depth"):
        search(tiny_set(data), data, {**GRID, "depth": [1]}, epochs=3, train_fn=FakeTrain(), **kw)
    with pytest.raises(ConfigError, match="proxy"):
        search(tiny_set(data, ipc=3), data, GRID, epochs=3, train_fn=FakeTrain(), **kw)
    fake = FakeTrain()
    search(tiny_set(data), data, GRID, epochs=4, train_fn=fake, overwrite=True, **kw)
    assert fake.proxy_calls == 8 and fake.calls == 8


def test_bad_proxy_options_are_user_errors(tmp_path):
    data = make_dataset()
    kw = dict(out_dir=tmp_path / "o", cache_dir=tmp_path / "c", progress=False, train_fn=FakeTrain())
    with pytest.raises(ConfigError, match="--ipc"):
        search("random", data, GRID, **kw)
    with pytest.raises(ConfigError, match="--ipc"):
        search("full", data, GRID, ipc=2, **kw)
    with pytest.raises(ConfigError, match="below 1 pixel"):
        search("full", data, {"depth": [4]}, **kw)


# ---- (c) Spearman -------------------------------------------------------------------------
def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for n, levels in ((2, None), (10, None), (37, 5), (50, 3), (720, 40)):
        a = rng.normal(size=n) if levels is None else rng.integers(0, levels, n).astype(float)
        b = a + rng.normal(size=n) if levels is None else rng.integers(0, levels, n).astype(float)
        assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
        assert np.array_equal(rankdata(a), scipy_stats.rankdata(a))
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


# ---- (d) spaces and grids -----------------------------------------------------------------
def test_spaces_and_candidate_names():
    paper = candidates(SPACES["paper"])
    assert len(paper) == 720 and len({candidate_name(c) for c in paper}) == 720
    small = candidates(SPACES["small"])
    assert 24 <= len(small) <= 48
    assert all(c in paper for c in small)        # a sub-grid: its whole-data results serve 'paper' too
    assert candidate_name({"depth": 3, "width": 128, "act": "relu", "norm": "instance", "pool": "avg"}) \
        == "convnet-d3-w128-relu-instance-avg"
    bad = [c for c in paper if check_candidate(c, 1, 10, 8)]
    assert len(bad) == 4 * 3 * 5 * 2 and all(c["depth"] == 4 and c["pool"] != "none" for c in bad)
    assert not any(check_candidate(c, 3, 10, 32) for c in small)


def test_grid_from_json_file_and_cli_strings(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"depth": [2, 3], "act": ["ReLU", "leaky_relu"], "norm": "instancenorm"}))
    grid = load_grid_file(path)
    assert grid == {"depth": [2, 3], "width": [128], "act": ["relu", "leakyrelu"], "norm": ["instance"],
                    "pool": ["avg"]}
    assert resolve_space(str(path)) == grid
    g = resolve_space("small", ["depth=1,2,3", "pool=max, avg"])
    assert g["depth"] == [1, 2, 3] and g["pool"] == ["max", "avg"] and g["width"] == SPACES["small"]["width"]
    assert len(candidates(g)) == 3 * 2 * 2 * 3 * 2
    for bad in (["depth"], ["colour=red"], ["depth=two"], ["act=tanh"], ["width="]):
        with pytest.raises(ConfigError):
            resolve_space("small", bad)
    with pytest.raises(ConfigError, match="small"):
        resolve_space("huge")
    (tmp_path / "bad.json").write_text("{depth: [1")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_space(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="unknown search option"):
        resolve_space({"depht": [1]})
    # yaml's own message spans four lines with a caret drawing; the error is one line
    (tmp_path / "bad.yaml").write_text("depth: [1, 2\n")
    with pytest.raises(ConfigError) as error:
        resolve_space(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(error.value) and "not valid YAML (line 2, column 1: expected ',' or ']'" in str(error.value)


def test_grid_from_yaml_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("depth: [1, 2]\nwidth: [32]\n")
    assert resolve_space(str(path))["depth"] == [1, 2]


# ---- (e) command line ---------------------------------------------------------------------
def test_nas_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nas", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--proxy", "--space", "--grid", "--epochs", "--full-epochs", "--ipc", "--out"):
        assert option in out


def test_nas_command_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "nas"
    args = ["nas", "--proxy", "random", "--ipc", "1", "--dataset", "digits", "--grid", "depth=1",
            "--grid", "width=4", "--grid", "act=relu,sigmoid", "--epochs", "1", "--full-epochs", "0",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and (out / "nas.json").exists() and (out / "nas.png").exists()
    assert main(args[:-4] + ["--epochs", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "epochs (1 recorded, 2 now)" in capsys.readouterr().err
