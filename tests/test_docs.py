"""The repository's documentation stands on its own: nothing points outside it, every link resolves."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Files a clone of the repository does not have (the project's working notes live outside it).
OUTSIDE = ("../shared", "shared/docs", "METHOD.md", "BENCHMARKS.md", "notes/CONTEXT.md")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def scanned_files():
    files = [ROOT / "README.md"]
    for folder in ("docs", "atomdistill", "bench"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".md", ".py", ".txt", ".toml", ".yaml"))
    return files


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_docs_exist():
    for name in ("method.md", "evaluation.md", "benchmarks.md", "beyond-atom.md", "distributed.md"):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    found = [(n, s) for n, line in enumerate(text.splitlines(), 1) for s in OUTSIDE if s in line]
    assert not found, f"{path.relative_to(ROOT)} refers to files outside the repository: {found}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for n, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"line {n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"line {n}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def beyond_tables():
    spec = importlib.util.spec_from_file_location("beyond_tables", ROOT / "bench" / "beyond_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_beyond_atom_figures_agree_between_readme_and_docs():
    tables = beyond_tables()
    readme, page = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "docs" / "beyond-atom.md").read_text(encoding="utf-8")
    assert tables.check(readme, page) == []
    # Each kind of slip is caught: a per-seed figure that no longer gives the row's mean and std,
    # a seed count that does not match the figures, and a hand-edited cell on the page.
    assert "38.01, 37.84, 38.06" in readme and "| 3 | **37.97 ± 0.11** |" in readme
    slipped = tables.check(readme.replace("38.01, 37.84, 38.06", "38.01, 37.84, 39.06"), page)
    assert any("mean 37.97, per-seed figures give 38.30" in p for p in slipped)
    assert any("std 0.11, per-seed figures give" in p for p in slipped)
    moved = tables.check(readme.replace("**37.97 ± 0.11**", "**38.97 ± 0.11**"), page)   # the page's cells follow
    assert any("should read" in p and "**+11.62 (0.55, 3/3)**" in p for p in moved)
    assert any("3 seeds stated, 2 figures given" in p
               for p in tables.check(readme.replace("38.01, 37.84, 38.06", "38.01, 37.84, –"), page))
    assert "54.24, 54.71, 55.35; " in readme   # the 1,000-iteration table lists each evaluation network
    assert any("seed 0's evaluation networks give 55.10" in p
               for p in tables.check(readme.replace("54.24, 54.71, 55.35; ", "54.24, 54.71, 56.35; "), page))
    # The 1,000-iteration table's 200-iteration column must be the 200-iteration table's figures,
    # and the page's copy of that table follows the README.
    assert readme.count("54.99 ± 0.49 | 54.77, 54.64, 55.55 |") == 1 and readme.count("55.65 | 50.87, 51.01, 50.90 |") == 1
    assert any("the 200-iteration figures of seed(s) [1] are not the 200-iteration table's" in p
               for p in tables.check(readme.replace("55.65 | 50.87, 51.01, 50.90 |", "55.65 | 50.87, 51.11, 50.90 |"), page))
    assert "| `dm --factor 2` | 54.77 | 54.64 | 55.55 | 54.99 ± 0.49 |" in page
    assert any("should read" in p for p in tables.check(readme, page.replace("| 54.77 | 54.64 |", "| 54.77 | 54.46 |")))
    assert "**+10.62 (0.55, 3/3)**" in page
    assert any("should read" in p for p in tables.check(readme, page.replace("**+10.62 (0.55, 3/3)**", "**+10.72 (0.55, 3/3)**")))
