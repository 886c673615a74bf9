"""Import the atomdistill package as it was at a git revision, beside today's, in one process.

The speed benches time today's code and a previous revision interleaved (A, B, A, B, ...) in
the same process, so that machine load affects both alike and the ratio means something on a
shared machine. `load(ref)` extracts `atomdistill/` at `ref` with `git archive` into a temporary
folder as the package `atomdistill_base` (absolute `atomdistill` imports rewritten) and imports it.
"""
from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "atomdistill_base"
_IMPORT = re.compile(r"^(\s*)(from|import) atomdistill\b", re.M)


def load(ref: str):
    """The package at git revision `ref` (e.g. 'main', a commit), imported as `atomdistill_base`."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "atomdistill"],
                         capture_output=True, check=False)
    if tar.returncode != 0:
        raise SystemExit(f"cannot read atomdistill/ at git revision {ref!r}: {tar.stderr.decode().strip()}; "
                         "pass an existing branch or commit to --baseline")
    root = Path(tempfile.mkdtemp(prefix="atomdistill_base_"))
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(root, filter="data")
    pkg = root / NAME
    (root / "atomdistill").rename(pkg)
    for f in pkg.glob("*.py"):
        f.write_text(_IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)} {NAME}", f.read_text()))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.import_module(NAME)


def revision(ref: str | None = None) -> str:
    """Short commit id of `ref` as `load` extracts it; None: today's code, the working tree
    ('+changes' after HEAD's id when atomdistill/ differs from it)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref or "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "?"
    if ref is None and subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "atomdistill"]).returncode:
        sha += "+changes"
    return sha
