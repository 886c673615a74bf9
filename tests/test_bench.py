"""The CIFAR-10 benchmark script end to end on tiny CIFAR-format data (its `smoke` budget)."""
import json
import subprocess
import sys
from pathlib import Path

from test_data import write_cifar10

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cifar10.py"


def run_bench(*args):
    return subprocess.run([sys.executable, str(BENCH), "--budget", "smoke", *args], capture_output=True, text=True,
                          timeout=600)


def test_cifar10_bench_runs_seeds_writes_tables_and_resumes(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data-root", str(tmp_path / "data"), "--methods", "atom", "--baselines", "random",
            "--seeds", "0", "1", "--out", str(out)]
    first = run_bench(*args)
    assert first.returncode == 0, first.stderr
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == {"random-ipc1", "eval-random-ipc1", "atom-ipc1", "eval-atom-ipc1",
                          "random-ipc1-seed1", "eval-random-ipc1-seed1", "atom-ipc1-seed1", "eval-atom-ipc1-seed1"}
    # Seeds give different sets (different init, networks and batches).
    cfg0 = json.loads((out / "atom-ipc1" / "config.json").read_text())["config"]
    cfg1 = json.loads((out / "atom-ipc1-seed1" / "config.json").read_text())["config"]
    assert (cfg0["seed"], cfg1["seed"]) == (0, 1)
    table = (out / "results.md").read_text()
    assert "| atom | 1 | 0 | 3 |" in table and "| atom | 1 | 1 | 3 |" in table   # a row per seed: 3 iterations
    assert "Over distillation seeds" in table
    assert "| atom | 1 | 2 (0, 1) |" in table and "| random | 1 | 2 (0, 1) |" in table   # 2 seeds each
    assert (out / "accuracy.png").stat().st_size > 0

    # Running it again finds every step done and runs nothing.
    again = run_bench(*args)
    assert again.returncode == 0, again.stderr
    assert "$ atomdistill" not in again.stdout
    assert json.loads((out / "steps.json").read_text()) == steps

    # Another invocation on the folder (seed 1 alone, another method) tables every set the folder holds.
    alone = run_bench(*args[:2], "--methods", "dm", "--baselines", "none", "--seeds", "1", "--out", str(out))
    assert alone.returncode == 0, alone.stderr
    table = (out / "results.md").read_text()
    assert [line.split(" | ")[:3] for line in table.splitlines() if line.endswith(" |") and " GB | " in line] == \
        [["| random", "1", "0"], ["| atom", "1", "0"], ["| random", "1", "1"], ["| dm", "1", "1"], ["| atom", "1", "1"]]


def test_cifar10_bench_baselines_none_runs_only_the_methods_and_unknown_names_are_refused(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    run = run_bench("--data-root", str(tmp_path / "data"), "--methods", "dm", "--baselines", "none",
                    "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert set(json.loads((out / "steps.json").read_text())) == {"dm-ipc1", "eval-dm-ipc1"}
    bad = run_bench("--data-root", str(tmp_path / "data"), "--baselines", "randm", "--out", str(out))
    assert bad.returncode == 2 and "unknown baseline randm" in bad.stderr and "Traceback" not in bad.stderr


def test_cifar10_bench_eval_models_adds_the_architectures_table(tmp_path):
    # Issue 16's cross-architecture rows in one command (a GPU job at IPC 10): every set on every network.
    write_cifar10(tmp_path / "data")
    data = ["--data-root", str(tmp_path / "data")]
    run = run_bench(*data, "--methods", "dm", "--baselines", "random", "--eval-models", "convnet,alexnet",
                    "--out", str(tmp_path / "x"))
    assert run.returncode == 0, run.stderr
    for record in (tmp_path / "x" / "dm-ipc1" / "eval.json", tmp_path / "x" / "random-ipc1.eval.json"):
        assert set(json.loads(record.read_text())["results"]) == {"convnet", "alexnet"}
    table = (tmp_path / "x" / "results.md").read_text()
    assert "| method | IPC | seed | convnet | alexnet |" in table
    assert sum(line.startswith(("| dm | 1 | 0 | ", "| random | 1 | 0 | ")) and line.count("±") == 2
               for line in table.splitlines()) == 2
    bad = run_bench(*data, "--eval-models", "alexnet", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "lacks the distillation network convnet" in bad.stderr
    assert not (tmp_path / "y").exists()


def test_distill_speed_applies_the_loop_options_to_both_codes(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(BENCH.parent / "distill_speed.py"), "--dataset", "digits", "--ipc", "1",
                          "--methods", "atom", "--iterations", "2", "--warmup", "1", "--baseline", "HEAD",
                          "--rounds", "1", "--factor", "2", "--json", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["code"].split()[0] for r in rows] == ["new", "base"], run.stdout
    assert [r["factor"] for r in rows] == [2, 2]   # new/base compares the same computation
    assert "new/base" in run.stdout and "failed" not in run.stdout


def test_ablation_varies_one_weight_from_a_pinned_base(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "ablation"
    cmd = [sys.executable, str(BENCH.parent / "ablation.py"), "--budget", "smoke", "--data-root", str(tmp_path / "data"),
           "--variants", "base", "channel=4", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    weights = {v: json.loads((out / f"{v}-seed0" / "config.json").read_text())["weights"] for v in ("base", "channel_4")}
    # The base point is the preset's pre-ablation values whatever the atom preset is; a variant changes one constant.
    assert {k: weights["base"][k] for k in ("spatial", "channel", "mmd", "power")} == \
        {"spatial": 1, "channel": 1, "mmd": 0.01, "power": 4}
    assert {k for k in weights["base"] if weights["base"][k] != weights["channel_4"][k]} == {"channel"}
    assert weights["channel_4"]["channel"] == 4
    table = (out / "ablation.md").read_text()
    assert "| base | 1 |" in table and "| channel=4 | 1 |" in table
    assert set(json.loads((out / "steps.json").read_text())) == {
        "base-seed0", "eval-base-seed0", "channel_4-seed0", "eval-channel_4-seed0"}


def test_cifar10_bench_net_option_distils_and_evaluates_on_that_network(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "bn"
    run = run_bench("--data-root", str(tmp_path / "data"), "--net", "convnet-bn", "--methods", "dm",
                    "--baselines", "random", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "dm-ipc1" / "config.json").read_text())["config"]["net"] == "convnet-bn"
    for record in (out / "dm-ipc1" / "eval.json", out / "random-ipc1.eval.json"):
        assert set(json.loads(record.read_text())["results"]) == {"convnet-bn"}
    table = (out / "results.md").read_text()
    assert "network: convnet-bn" in table and "| dm | 1 | 0 | 3 |" in table


FAKE_OFFICIAL = """import argparse, os, sys
p = argparse.ArgumentParser()
for a in ("--dataset", "--model", "--dsa_strategy", "--init", "--lr_img", "--batch_real", "--num_exp",
          "--ipc", "--Iteration", "--data_path", "--save_path"):
    p.add_argument(a)
args = p.parse_args()
assert os.environ["NO_EVAL"] == "1" and args.batch_real == "64" and os.path.isdir(args.data_path)
for it in range(int(args.Iteration) + 1):
    print("ITER %d %.6f" % (it, SECONDS if it >= 1 else 99.0))
"""


def test_side_by_side_times_official_code_and_ours_and_gives_ratios(tmp_path):
    """The official scripts are stand-ins that print the timing lines the patched code prints."""
    write_cifar10(tmp_path / "data")
    for name, script, seconds in (("dm", "main_DM.py", 4.0), ("datadam", "main_DataDAM.py", 8.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / script).write_text(FAKE_OFFICIAL.replace("SECONDS", str(seconds)))
    cmd = [sys.executable, str(BENCH.parent / "side_by_side.py"), "--data-root", str(tmp_path / "data"),
           "--official-dm", str(tmp_path / "dm"), "--official-datadam", str(tmp_path / "datadam"),
           "--ipc", "1", "--iterations", "3", "--warmup", "1", "--json", str(tmp_path / "rows.json"),
           "--scratch", str(tmp_path / "scratch")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = {(r["code"], r["net"]): r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows[("official DM", "ConvNet-IN")]["s_per_iter"] == 4.0          # iteration 0 (99 s) is warm-up
    assert rows[("official DataDAM", "ConvNet-BN")]["s_per_iter"] == 8.0
    assert {k for k in rows} >= {("ours `dm`", "ConvNet-IN"), ("ours `atom`", "ConvNet-BN")}
    ours = rows[("ours `dm`", "ConvNet-IN")]["s_per_iter"]
    assert f"| {ours / 4.0:.2f}x official DM |" in run.stdout
    # A folder without the official script is one clear error.
    bad = subprocess.run(cmd[:4] + ["--official-dm", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "main_DM.py not found" in bad.stderr and "Traceback" not in bad.stderr


def test_conv_floor_prints_the_rates_and_the_floor():
    run = subprocess.run([sys.executable, str(BENCH.parent / "conv_floor.py"), "--threads", "1", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "fp32 matrix product" in run.stdout and "| 128->128 at 16x16 | 4.83 |" in run.stdout
    assert "IPC 10: measured real + synthetic passes" in run.stdout
