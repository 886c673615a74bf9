import json

import pytest

from atomdistill.errors import AtomDistillError
from atomdistill.report import load_records, markdown_table, plot_records, write_report

PROTOCOL = {"runs": 3, "epochs": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
            "dsa": "color_crop_cutout_flip_scale_rotate", "seed": 0}
HARDWARE = {"device": "cpu", "cpu": "AMD EPYC", "threads": 2, "torch": "2.14.1"}


def record(method, ipc, results, dataset="cifar10", protocol=PROTOCOL, hardware=HARDWARE, config=None):
    return {"set": {"path": None, "dataset": dataset, "method": method, "ipc": ipc, "num_classes": 10,
                    "iterations": None if config is None else config["iterations"],
                    "seed": 0 if config is None else config["seed"],
                    **({} if config is None else {"config": config})},
            "protocol": dict(protocol),
            "results": {m: {"mean": mean, "std": std, "accs": [mean], "seconds": 1.0}
                        for m, (mean, std) in results.items()},
            "hardware": dict(hardware)}


@pytest.fixture
def paths(tmp_path):
    recs = {
        "atom10.json": record("atom", 10, {"convnet": (0.6612, 0.0043), "resnet18": (0.5, 0.01)}),
        "random1.json": record("random", 1, {"convnet": (0.1434, 0.0021)}),
        "dm10.json": record("dm", 10, {"convnet": (0.4871, 0.0061)}),
        "zzz.json": record("zzz", 1, {"convnet": (0.2, 0.0)}),
        "full.json": record("full", None, {"convnet": (0.8456, 0.0012)},
                            hardware={"device": "cuda", "gpu": "H100", "torch": "2.14.1"}),
    }
    out = []
    for name, rec in recs.items():
        (tmp_path / name).write_text(json.dumps(rec))
        out.append(str(tmp_path / name))
    run = tmp_path / "run_herding"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(
        record("herding", 1, {"convnet": (0.2141, 0.0119)}, protocol={**PROTOCOL, "runs": 5, "epochs": 100})))
    out.append(str(run))
    return out


def rows(md):
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_load_records_files_and_run_folder(paths):
    recs = load_records(paths)
    assert [r["set"]["method"] for r in recs] == ["atom", "random", "dm", "zzz", "full", "herding"]
    assert recs[-1]["_path"].endswith("eval.json")


def test_table_cells_columns_and_row_order(tmp_path, paths):
    md = markdown_table(load_records(paths))
    # herding was evaluated with 5 runs x 100 epochs: its own table, not a row beside 3 x 300 figures
    titles = [line for line in md.splitlines() if line.startswith("### ")]
    assert titles == ["### cifar10, evaluated with 3 runs x 300 epochs, DSA color_crop_cutout_flip_scale_rotate",
                      "### cifar10, evaluated with 5 runs x 100 epochs, DSA color_crop_cutout_flip_scale_rotate"]
    second = md[md.index(titles[1]):]
    assert [r.split("|")[1].strip() for r in rows(second)] == ["herding"]
    # another evaluation seed is a repeat of the protocol, another learning rate is not
    reseeded, slower = tmp_path / "reseeded.json", tmp_path / "slower.json"
    reseeded.write_text(json.dumps(record("dm", 1, {"convnet": (0.25, 0.01)}, protocol={**PROTOCOL, "seed": 1})))
    slower.write_text(json.dumps(record("dm", 1, {"convnet": (0.2, 0.01)}, protocol={**PROTOCOL, "lr": 0.001})))
    more = markdown_table(load_records(paths + [str(reseeded), str(slower)]))
    assert [line for line in more.splitlines() if line.startswith("### ")] == titles + [titles[0] + ", lr 0.001"]
    assert next(line for line in second.splitlines() if line.startswith("| method")) == "| method | IPC 1 convnet |"
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    # no "IPC 1 resnet18" column: no record has that pair
    assert header == "| method | IPC 1 convnet | IPC 10 convnet | IPC 10 resnet18 | whole set convnet |"
    names = [r.split("|")[1].strip() for r in rows(md)]
    assert names == ["full", "random", "dm", "atom", "zzz", "herding"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows(md)}
    assert cells["atom"] == ["—", "66.1 ± 0.4", "50.0 ± 1.0", "—"]
    assert cells["random"][0] == "14.3 ± 0.2"
    assert cells["herding"][0] == "21.4 ± 1.2"
    assert cells["full"] == ["—", "—", "—", "84.6 ± 0.1"]
    assert "3 runs x 300 epochs" in md and "5 runs x 100 epochs" in md
    assert "AMD EPYC" in md and "H100" in md
    assert "Duplicates" not in md


def test_duplicates_keep_last_and_are_noted(tmp_path, paths):
    later = tmp_path / "atom10_again.json"
    later.write_text(json.dumps(record("atom", 10, {"convnet": (0.7, 0.002)})))
    md = markdown_table(load_records(paths + [str(later)]))
    atom = next(r for r in rows(md) if r.startswith("| atom"))
    assert "70.0 ± 0.2" in atom and "66.1" not in atom
    assert "Duplicates" in md and "atom10_again.json" in md


def test_sets_made_with_other_options_are_rows_of_their_own(tmp_path):
    """Sets of one method made with other options (a kernel, more iterations) are separate rows named by
    what differs; other distillation seeds of the same options make one cell (mean ± std over the seeds'
    means), and a seed given twice is a duplicate whose last record counts."""
    base = {"dataset": "cifar10", "data_root": "data", "method": "dm", "ipc": 10, "iterations": 200, "seed": 0,
            "device": "auto", "mmd_kernel": None, "nets": "random", "pool_steps": 10, "factor": 1}
    configs = {"plain.json": base, "seed1.json": {**base, "seed": 1, "device": "cpu", "data_root": "/data"},
               "kernel.json": {**base, "mmd_kernel": "gaussian"},
               "long.json": {**base, "mmd_kernel": "gaussian", "iterations": 1000},
               "pool.json": {**base, "nets": "pool", "pool_steps": 2},
               "seed2.json": {**base, "seed": 2}, "seed2_again.json": {**base, "seed": 2}}
    paths = []
    for i, (name, config) in enumerate(configs.items()):
        (tmp_path / name).write_text(json.dumps(record("dm", 10, {"convnet": (0.40 + i / 100, 0.01)}, config=config)))
        paths.append(str(tmp_path / name))
    md = markdown_table(load_records(paths))
    cells = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in rows(md)}
    # seeds 0, 1, 2 at 40, 41 and 46 (seed2_again's, the last given): mean 42.33, sample std 3.21
    assert cells == {"dm (iterations 200, mmd-kernel default, nets random)": "42.3 ± 3.2 (3 seeds)",
                     "dm (iterations 200, mmd-kernel gaussian, nets random)": "42.0 ± 1.0",
                     "dm (iterations 1000, mmd-kernel gaussian, nets random)": "43.0 ± 1.0",
                     "dm (iterations 200, mmd-kernel default, nets pool)": "44.0 ± 1.0"}
    assert "(n seeds)" in md and "seed 2 (2 records, counted: " in md and "seed2_again.json" in md
    assert "seed 1 (" not in md
    plot_records(load_records(paths), tmp_path / "fig.png")   # names this long: one legend beside the plot
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_whose_runs_all_diverged_is_counted_not_averaged(tmp_path):
    paths = []
    for seed, mean in ((0, 0.3), (1, None)):
        rec = record("dm", 1, {"convnet": (mean, None if mean is None else 0.01)},
                     config={"method": "dm", "iterations": 10, "seed": seed})
        (tmp_path / f"s{seed}.json").write_text(json.dumps(rec))
        paths.append(str(tmp_path / f"s{seed}.json"))
    md = markdown_table(load_records(paths))
    assert rows(md) == ["| dm | 30.0 (2 seeds, 1 diverged) |"]
    plot_records(load_records(paths), tmp_path / "fig.png")


def test_records_that_do_not_say_how_their_set_was_made_are_never_averaged(tmp_path):
    paths = []
    for seed, mean in ((0, 0.3), (1, 0.5)):
        rec = record("dm", 1, {"convnet": (mean, 0.01)})
        rec["set"]["seed"] = seed   # seeds, but no config: perhaps other options, so not one recipe's seeds
        (tmp_path / f"s{seed}.json").write_text(json.dumps(rec))
        paths.append(str(tmp_path / f"s{seed}.json"))
    md = markdown_table(load_records(paths))
    assert rows(md) == ["| dm | 50.0 ± 1.0 |"] and "Duplicates" in md and "s1.json" in md
    newer = tmp_path / "newer.json"   # beside a record that says how its set was made: a row of their own
    newer.write_text(json.dumps(record("dm", 1, {"convnet": (0.4, 0.01)}, config={"iterations": 10, "seed": 2})))
    md = markdown_table(load_records(paths + [str(newer)]))
    assert rows(md) == ["| dm | 40.0 ± 1.0 |", "| dm (options not recorded) | 50.0 ± 1.0 |"]


def test_one_table_per_dataset(tmp_path, paths):
    other = tmp_path / "c100.json"
    other.write_text(json.dumps(record("atom", 50, {"convnet": (0.5, 0.003)}, dataset="cifar100")))
    md = markdown_table(load_records(paths + [str(other)]))
    assert md.index("### cifar10,") < md.index("### cifar100\n")
    c100 = md[md.index("### cifar100"):]
    assert "| method | IPC 50 convnet |" in c100 and "whole set" not in c100.split("\n\n")[1]


def test_plot_and_write_report(tmp_path, paths):
    png = tmp_path / "fig.png"
    plot_records(load_records(paths), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "out" / "report.md"
    text = write_report(paths, out)
    assert out.read_text(encoding="utf-8") == text
    assert "66.1 ± 0.4" in text and "report.png" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_paths_raise(tmp_path):
    with pytest.raises(AtomDistillError, match="does not exist"):
        load_records([str(tmp_path / "missing.json")])
    with pytest.raises(AtomDistillError, match="without evaluation records"):
        load_records([str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AtomDistillError, match="not readable JSON"):
        load_records([str(bad)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": {}}))
    with pytest.raises(AtomDistillError, match="not an evaluation record"):
        load_records([str(other)])
    # `evaluate --models ,,` once wrote a record without results, and report ended in matplotlib's
    # "Number of rows must be a positive integer"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"set": {"dataset": "digits", "method": "atom"}, "results": {}}))
    with pytest.raises(AtomDistillError, match="not an evaluation record"):
        load_records([str(empty)])
    with pytest.raises(AtomDistillError):
        load_records([])


def test_a_set_under_two_protocols_is_two_cells_not_a_duplicate(tmp_path):
    """One set evaluated under two protocols: a table and figure groups per protocol, no duplicate; the
    same set given twice under one protocol is a duplicate named with its protocol, whichever came last."""
    from atomdistill.report import _bar_groups

    long = {**PROTOCOL, "runs": 5, "epochs": 1000}
    specs = [("short.json", PROTOCOL, 0.40), ("long.json", long, 0.45), ("long_again.json", long, 0.46),
             ("short_whole.json", PROTOCOL, 0.80)]
    paths = []
    for name, protocol, acc in specs:
        ipc, method = (None, "full") if "whole" in name else (1, "dm")
        (tmp_path / name).write_text(json.dumps(record(method, ipc, {"convnet": (acc, 0.01)}, protocol=protocol)))
        paths.append(str(tmp_path / name))
    recs = load_records(paths)
    md = markdown_table(recs)
    dm = [r for r in rows(md) if r.startswith("| dm")]
    assert [r.split("|")[2].strip() for r in dm] == ["40.0 ± 1.0", "46.0 ± 1.0"]
    note = next(line for line in md.splitlines() if line.startswith("Duplicates"))
    assert "cifar10 dm IPC 1 convnet (5 runs x 1000 epochs" in note and "long_again.json" in note
    assert "short.json" not in note
    tables, groups = _bar_groups(recs)
    # under each group, what sets its protocol apart (not the DSA both share)
    assert [(ipc, " ".join(label.splitlines()[2:])) for _, _, ipc, label in groups] == \
        [(1, "3 runs x 300 epochs"), (None, "3 runs x 300 epochs"), (1, "5 runs x 1000 epochs")]
    assert {tables[(ds, p)][("dm", 1, "convnet")]["mean"] for ds, p, ipc, _ in groups if ipc == 1} == {0.40, 0.46}
    # one protocol: the groups are named by dataset and IPC only
    assert [label for *_, label in _bar_groups(recs[:1])[1]] == ["cifar10\nIPC 1"]
    plot_records(recs, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_of_runs_gives_every_record_below_it(tmp_path):
    """`atomdistill report results/cifar10-cpu`: a benchmark's folder (run folders with eval.json, baseline
    records NAME.eval.json, the whole-set record, other JSON files) reports every record below it."""
    out = tmp_path / "results"
    files = {"dm-ipc1/eval.json": record("dm", 1, {"convnet": (0.25, 0.01)}),
             "atom-ipc1/eval.json": record("atom", 1, {"convnet": (0.27, 0.01)}),
             "random-ipc1.eval.json": record("random", 1, {"convnet": (0.14, 0.01)}),
             "deeper/eval-cifar10-full.json": record("full", None, {"convnet": (0.84, 0.01)})}
    for name, rec in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(rec))
    (out / "steps.json").write_text(json.dumps({"dm-ipc1": {"wall_s": 1.0}}))   # not a record: not read
    (out / "dm-ipc1" / "config.json").write_text("{}")
    recs = load_records([str(out)])
    assert [r["set"]["method"] for r in recs] == ["atom", "full", "dm", "random"]   # sorted by path
    names = [r.split("|")[1].strip() for r in rows(markdown_table(recs))]
    assert names == ["full", "random", "dm", "atom"]
    # a run folder is still its own eval.json only, and a file beside the folder adds to it
    assert [r["set"]["method"] for r in load_records([str(out / "dm-ipc1"), str(out / "random-ipc1.eval.json")])] \
        == ["dm", "random"]


def test_an_older_record_takes_its_config_from_its_run_folder(tmp_path):
    """Records written before they carried `set.config`: in a run folder whose config.json is the same run,
    they are told apart by recipe and averaged over seeds; elsewhere (or another run's config) they are not."""
    base = {"dataset": "cifar10", "method": "dm", "ipc": 1, "iterations": 300, "seed": 0, "mmd_kernel": None}
    paths = []
    for seed in (0, 1):
        run = tmp_path / f"dm-ipc1-seed{seed}"
        run.mkdir()
        rec = record("dm", 1, {"convnet": (0.25 + seed / 100, 0.01)})
        rec["set"]["seed"] = seed
        (run / "eval.json").write_text(json.dumps(rec))
        (run / "config.json").write_text(json.dumps({"config": {**base, "seed": seed}, "weights": {}}))
        paths.append(str(run))
    recs = load_records(paths)
    assert [r["set"]["config"]["seed"] for r in recs] == [0, 1]
    assert [r.split("|")[2].strip() for r in rows(markdown_table(recs))] == ["25.5 ± 0.7 (2 seeds)"]
    # a config.json of another run (seed 5) is not taken: the record stays one without options
    (tmp_path / "dm-ipc1-seed1" / "config.json").write_text(json.dumps({"config": {**base, "seed": 5}}))
    assert "config" not in load_records(paths)[1]["set"]


def test_a_setting_that_differs_only_between_ipcs_is_one_row(tmp_path):
    """P1 runs 300 iterations at IPC 1 and 200 at IPC 10: one recipe per IPC, one row, not two half-empty ones."""
    paths = []
    for ipc, iterations in ((1, 300), (10, 200)):
        config = {"dataset": "cifar10", "method": "dm", "ipc": ipc, "iterations": iterations, "seed": 0}
        (tmp_path / f"{ipc}.json").write_text(json.dumps(record("dm", ipc, {"convnet": (0.2 * ipc ** 0.3, 0.01)},
                                                                config=config)))
        paths.append(str(tmp_path / f"{ipc}.json"))
    assert [r.split("|")[1].strip() for r in rows(markdown_table(load_records(paths)))] == ["dm"]


def test_a_set_is_named_by_what_tells_it_apart_in_its_own_column(tmp_path):
    """Where iterations differ at IPC 10 only (200 and 1,000), the IPC 1 set (300) is not an "iterations 300"
    row of its own; a setting whose value is one that tells IPC 1's sets apart (the kernel) is still named at
    IPC 10, so that the set joins its row. Numbers in names sort as numbers (200 before 1000)."""
    specs = [(1, 300, None), (1, 300, "gaussian"), (10, 200, None), (10, 1000, None)]
    paths = []
    for i, (ipc, iterations, kernel) in enumerate(specs):
        config = {"dataset": "cifar10", "method": "dm", "ipc": ipc, "iterations": iterations, "seed": 0,
                  "mmd_kernel": kernel}
        (tmp_path / f"{i}.json").write_text(json.dumps(record("dm", ipc, {"convnet": (0.2 + i / 100, 0.01)},
                                                              config=config)))
        paths.append(str(tmp_path / f"{i}.json"))
    table = [[c.strip() for c in r.split("|")[1:4]] for r in rows(markdown_table(load_records(paths)))]
    assert table == [["dm (iterations 200, mmd-kernel default)", "—", "22.0 ± 1.0"],
                     ["dm (iterations 1000, mmd-kernel default)", "—", "23.0 ± 1.0"],
                     ["dm (mmd-kernel default)", "20.0 ± 1.0", "—"],
                     ["dm (mmd-kernel gaussian)", "21.0 ± 1.0", "—"]]
