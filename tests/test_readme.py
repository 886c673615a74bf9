"""The README's examples run as written, on the embedded digits set with small counts.

Only the dataset and the iteration/run/epoch counts are substituted, each by a pattern that must
match (evaluate commands get small --epochs/--runs, nas commands 4 of their 24 candidates, and
the NAS cache goes to a temporary folder): if the README's examples change shape, these tests
fail and must be updated with them, so the examples cannot silently break.
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from atomdistill import SyntheticSet
from atomdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def substitute(text: str, *subs: tuple[str, str]) -> str:
    """Apply (pattern, replacement) substitutions, each of which must match at least once."""
    for pattern, replacement in subs:
        text, n = re.subn(pattern, replacement, text)
        assert n, f"the README example no longer contains {pattern!r}:\n{text}"
    return text


# ---- the Python API ------------------------------------------------------------------------------
def run_python(code: str, cwd: Path) -> str:
    """`code` in a fresh interpreter (nothing imported beforehand), with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def python_blocks():
    blocks = code_blocks("python")
    assert len(blocks) == 2, blocks   # distil-and-evaluate, then load-and-train
    return blocks


@pytest.fixture(scope="module")
def first_example(python_blocks, tmp_path_factory):
    """The first example run in a fresh folder: its output and the folder."""
    cwd = tmp_path_factory.mktemp("readme-python")
    code = substitute(python_blocks[0], (r'ad\.load_dataset\("cifar10", "data"\)', 'ad.load_dataset("digits")'),
                      (r"iterations=\d+", "iterations=2"), (r"runs=\d+", "runs=1"), (r"epochs=\d+", "epochs=1"))
    return run_python(code, cwd), cwd


def test_python_api_example_distils_and_evaluates(first_example):
    out, cwd = first_example
    mean, std = map(float, out.split())
    assert 0 <= mean <= 1 and std == 0   # one run
    synset = SyntheticSet.load(cwd / "runs" / "c10")
    assert len(synset) == 100 and synset.dataset == "digits" and synset.info["iterations_done"] == 2


def test_python_api_example_loads_a_saved_set_and_trains(python_blocks, first_example):
    out = run_python(substitute(python_blocks[1], (r"range\(\d+\)", "range(1)")), first_example[1])
    assert "convnet" in out and "resnet18" in out   # ad.list_models()


# ---- the shell examples that run on the embedded set -------------------------------------------------
def commands(block: str) -> list[str]:
    """The `atomdistill` commands of a bash block, in order (comments dropped, `\\` lines joined)."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [c.strip() for c in line.split("&&") if re.match(r"(\S*/)?atomdistill ", c.strip())]
    return out


def digits_blocks() -> list[list[str]]:
    """Every bash block whose commands need no downloaded data (no CIFAR, no --data-root)."""
    blocks = [commands(b) for b in code_blocks("bash")
              if not re.search(r"cifar|tinyimagenet|folder:|--data-root", b, re.I)]
    return [b for b in blocks if b]


def shrink(cmd: str) -> list[str]:
    """A README command with small counts, as argv for atomdistill's main()."""
    argv = shlex.split(re.sub(r"^(\S*/)?atomdistill ", "", cmd))
    sub = argv[0]
    subs = {"distill": [(r"--iterations \d+", "--iterations 2")],
            "nas": [(r"--epochs \d+", "--epochs 0"), (r"--full-epochs \d+", "--full-epochs 0")]}.get(sub, [])
    text = substitute(" ".join(argv), *subs)
    if sub == "evaluate":   # the README's evaluations use the protocol's defaults (3 runs x 300 epochs)
        assert "--epochs" not in text and "--runs" not in text, text
        text += " --epochs 0 --runs 1"
    if sub == "nas":        # 4 of the small space's 24 candidates (the space itself is tested in test_nas)
        assert "--space small" in text and "--grid" not in text, text
        text += " --grid act=relu --grid norm=instance"
    return [x for a in shlex.split(text) for x in (sorted(glob.glob(a)) or [a])]


def test_the_runnable_shell_examples_are_the_expected_ones():
    # quick start; the digits results; the NAS examples (if this fails, the README changed: update the tests)
    assert [[c.split()[1] for c in b] for b in digits_blocks()] == [
        ["distill", "evaluate"], ["distill", "evaluate", "baseline", "evaluate"], ["nas", "nas"]]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """A working folder for the shell examples, the quick start already run in it."""
    cwd = tmp_path_factory.mktemp("readme-shell")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("XDG_CACHE_HOME", str(cwd / "cache"))   # the NAS ground-truth cache
        run_block(digits_blocks()[0])
        yield cwd


def run_block(block: list[str]):
    for cmd in block:
        assert main(shrink(cmd)) == 0, cmd


def test_quick_start(shell):
    synset = SyntheticSet.load(shell / "runs" / "quickstart")
    assert len(synset) == 100 and synset.method == "atom"
    record = json.loads((shell / "runs" / "quickstart" / "eval.json").read_text())
    assert record["set"]["iterations"] == 2 and record["protocol"]["epochs"] == 0


def test_digits_results_commands(shell):
    run_block(digits_blocks()[1])
    assert (shell / "runs" / "digits-atom-ipc1" / "eval.json").exists()
    assert (shell / "runs" / "digits-random-ipc1.eval.json").exists()


def test_nas_commands(shell):
    run_block(digits_blocks()[2])
    nas = json.loads((shell / "runs" / "nas-digits-atom-ipc10" / "nas.json").read_text())
    assert nas["space"]["candidates"] == 4 and nas["space"]["name"].startswith("small")
