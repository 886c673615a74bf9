"""The command line, end to end on tiny data: what a user types and what they get back."""
import json
import subprocess
import sys

import pytest

from atomdistill import SyntheticSet
from atomdistill.cli import main
from test_data import write_cifar10


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "atomdistill", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("data", "models", "distill", "evaluate", "baseline", "show", "report"):
        assert command in out.stdout


def test_no_command_prints_the_commands_and_fails():
    out = run_cli()
    assert out.returncode == 2 and out.stdout == ""
    assert "distill" in out.stderr and "Traceback" not in out.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `atomdistill models | head -1`: the pipe closes before the output is written
    proc = subprocess.Popen([sys.executable, "-m", "atomdistill", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_an_unknown_option_is_named_in_the_command_s_words_with_the_nearest_one(capsys):
    # argparse alone answers with the top-level usage, which lists none of the command's options
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--out", "x", "--iteratoins", "5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: atomdistill distill ")
    assert err.strip().splitlines()[-1] == ("atomdistill distill: error: unrecognized arguments: --iteratoins 5 "
                                            "(did you mean --iterations?); see atomdistill distill --help")
    with pytest.raises(SystemExit):
        main(["show", "x", "--nrow", "3"])   # nothing near: no guess
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "atomdistill show: error: unrecognized arguments: --nrow 3; see atomdistill show --help")


def test_data_describes_a_cifar_folder(tmp_path, capsys):
    write_cifar10(tmp_path)
    assert main(["data", "cifar10", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cifar10" in out and "32" in out and "airplane" in out


def test_missing_and_corrupt_cifar_give_one_clear_line_and_exit_2(tmp_path):
    out = run_cli("data", "cifar10", "--data-root", str(tmp_path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "--download" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    root = write_cifar10(tmp_path)
    batch = next(root.glob("data_batch_3")) if root.name == "cifar-10-batches-py" else \
        next(tmp_path.glob("cifar-10-batches-py/data_batch_3"))
    batch.write_bytes(batch.read_bytes()[:100])
    out = run_cli("data", "cifar10", "--data-root", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "data_batch_3" in out.stderr


def test_unknown_names_are_user_errors(tmp_path, capsys):
    assert main(["data", "imagenet-99"]) == 2
    assert "digits" in capsys.readouterr().err
    assert main(["distill", "--method", "magic", "--iterations", "1", "--out", str(tmp_path / "r")]) == 2
    assert "atom" in capsys.readouterr().err
    assert main(["distill", "--ipc", "500", "--iterations", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "--ipc" in capsys.readouterr().err


def test_distill_show_resume_and_refuse_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--ipc", "1", "--iterations", "3", "--batch-real", "4", "--checkpoint-every", "1",
            "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "atomdistill evaluate" in out and str(run) in out
    for name in ("synset.safetensors", "grid.png", "config.json", "metrics.jsonl", "checkpoint.safetensors",
                 "curves.png"):
        assert (run / name).exists(), name
    s = SyntheticSet.load(run)
    assert s.images.shape == (10, 1, 8, 8) and s.method == "atom"
    assert json.loads((run / "config.json").read_text())["config"]["iterations"] == 3

    assert main(args) == 2   # never overwritten silently
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", "--resume", str(run), "--iterations", "4"]) == 0
    assert SyntheticSet.load(run).info["iterations_done"] == 4

    assert main(["show", str(run), "--out", str(tmp_path / "g.png"), "--folder", str(tmp_path / "imgs")]) == 0
    assert (tmp_path / "g.png").exists() and len(list((tmp_path / "imgs").rglob("*.png"))) == 10


def test_baseline_writes_a_set(tmp_path, capsys):
    out = tmp_path / "random.safetensors"
    assert main(["baseline", "random", "--ipc", "2", "--out", str(out)]) == 0
    s = SyntheticSet.load(out)
    assert s.method == "random" and len(s) == 20 and out.with_suffix(".png").exists()


def test_resume_applies_or_refuses_every_option_it_is_given(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--ipc", "1", "--iterations", "2", "--batch-real", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    for extra in (["--lr", "5"], ["--ipc", "2"], ["--dataset", "cifar10"], ["--no-zca", "--seed", "4"]):
        assert main(["distill", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and extra[-2 if extra[-2].startswith("--") else -1].split()[0] in err
        assert "would change the set" in err and "--iterations" in err
    for extra in (["--out", str(tmp_path / "x")], ["--overwrite"]):
        assert main(["distill", "--resume", str(run), *extra]) == 2
        assert f"{extra[0]} does not go with --resume" in capsys.readouterr().err
    # the same values as the run's, and options that change only how it runs: applied, and said so
    assert main(["distill", "--resume", str(run), "--ipc", "1", "--iterations", "3", "--eval-every", "3",
                 "--eval-epochs", "0", "--eval-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} with --ipc 1 --iterations 3 --eval-every 3 --eval-runs 1 --eval-epochs 0" in out
    s = SyntheticSet.load(run)
    assert s.info["iterations_done"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in row for row in rows)


def test_a_malformed_layers_list_names_the_expected_form(capsys):
    # It named the parser's internal function ("invalid _floats value") before.
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--layers", "1,x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "atomdistill distill: error: argument --layers: expected block numbers separated by commas, e.g. 1,2; got '1,x'")


def test_an_empty_list_is_refused_not_read_as_nothing(capsys):
    # `--layers ,` ended in torch.cat's traceback mid-run, and `evaluate --models ,,` printed an
    # empty table with rc 0: both now stop at the parser, naming the expected form.
    for argv, expected in ((["distill", "--layers", ","], "--layers: expected block numbers"),
                           (["evaluate", "s", "--models", ",,"], "--models: expected names separated by commas"),
                           (["distill", "--eval-models", " "], "--eval-models: expected names separated by commas")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_api_refuses_an_empty_list_too():
    import atomdistill as ad
    with pytest.raises(ad.ConfigError, match="layers names no block"):
        ad.DistillConfig(layers=())
    with pytest.raises(ad.ConfigError, match="eval_models names no architecture"):
        ad.DistillConfig(eval_models=[])
    digits = ad.load_dataset("digits")
    s = ad.distill(digits, ipc=1, iterations=0, progress=False)
    with pytest.raises(ad.ConfigError, match="models names no architecture"):
        ad.evaluate(s, digits, models=[])


def test_running_out_of_memory_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # `--image-size 100000` ended in the CPU allocator's traceback while resizing the data. The
    # allocator's error is raised here by hand: where memory is overcommitted, asking for it could
    # succeed and the machine would then run out for real.
    import atomdistill.data

    def allocate(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 50320000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(atomdistill.data, "_resize", allocate)
    assert main(["distill", "--dataset", "digits", "--image-size", "100000", "--iterations", "1",
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("atomdistill distill: error: out of memory (tried to allocate 46864.2 GiB); --real-chunk 16")
    assert "--image-size" in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_unknown_evaluation_network_is_refused_before_distilling(tmp_path, capsys):
    # `--eval-models convnett` distilled with rc 0 and never said that the name was wrong.
    assert main(["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "1", "--eval-models", "convnett",
                 "--out", str(tmp_path / "run")]) == 2
    assert "unknown model 'convnett' (did you mean 'convnet'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
