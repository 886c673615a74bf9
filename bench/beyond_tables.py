"""Check the README's Beyond ATOM tables and rebuild docs/beyond-atom.md's tables from them.

The README's per-seed figures are the record: each is one distillation seed's mean accuracy over its
evaluation networks, read from that run's eval.json (results.convnet.accs). This script

- checks every README row: its "seeds" count and its mean ± std against its per-seed figures, and
  each seed's figure against its evaluation networks where the table lists them (to within 0.01,
  the rounding of the printed figures: bench/cifar10.py computes them from unrounded accuracies);
- checks the 1,000-iteration table's last column (the same seeds at 200 iterations) against the
  200-iteration table's per-seed figures;
- derives docs/beyond-atom.md's three tables (one option's effect on each loss; the three losses
  under the same options; the longer budget) from the README rows' printed means, stds and per-seed
  figures, and either rewrites them between their markers (--write) or reports where the page
  disagrees (the default).

    python bench/beyond_tables.py           # check; exit 1 listing each disagreement
    python bench/beyond_tables.py --write   # rewrite the tables on docs/beyond-atom.md, then check
"""
import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README, PAGE = ROOT / "README.md", ROOT / "docs" / "beyond-atom.md"
# The README tables this script reads: (IPC, iterations, the start of their header row, whether the
# page's two tables are built from it). Their first five columns are: the set, its options, seeds,
# mean ± std over seeds, per-seed figures. The 1,000-iteration table's last column gives the same
# seeds' figures at 200 iterations.
TABLES = [(1, 300, "| CIFAR-10, IPC 1 (10 stored images)", True),
          (10, 200, "| CIFAR-10, IPC 10 (100 stored images), 200 iterations", True),
          (10, 1000, "| CIFAR-10, IPC 10 (100 stored images), 1,000 iterations", False),
          (1, 300, "| CIFAR-10, IPC 1, more seeds", False),
          (1, 300, "| CIFAR-10, IPC 1, IDM's pool", False)]
LOSSES = ("atom", "datadam", "dm")
POOL, KERNEL, FACTOR = "--nets pool --pool-steps 2", "--mmd-kernel gaussian", "--factor 2"
# Table 1: (IPC, the option as the page names it, the options with it, without it, "added to").
EFFECTS = [
    (1, "`--factor 2`", FACTOR, "", "–"),
    (1, "`--mmd-kernel gaussian`", KERNEL, "", "–"),
    (1, "pool", POOL, "", "–"),
    (1, "kernel + pool", f"{KERNEL} {POOL}", KERNEL, "`--mmd-kernel gaussian`"),
    (1, "`--factor 2` + kernel", f"{FACTOR} {KERNEL}", FACTOR, "`--factor 2`"),
    (1, "`--factor 2` + pool", f"{FACTOR} {POOL}", FACTOR, "`--factor 2`"),
    (1, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}", f"{FACTOR} {KERNEL}", "`--factor 2` + kernel"),
    (1, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}", FACTOR, "`--factor 2`"),
    (10, "`--factor 2`", FACTOR, "", "–"),
    (10, "`--mmd-kernel gaussian`", KERNEL, "", "–"),
    (10, "pool", POOL, "", "–"),
    (10, "kernel + pool", f"{KERNEL} {POOL}", KERNEL, "`--mmd-kernel gaussian`"),
    (10, "`--factor 2` + kernel", f"{FACTOR} {KERNEL}", FACTOR, "`--factor 2`"),
    (10, "`--factor 2` + pool", f"{FACTOR} {POOL}", FACTOR, "`--factor 2`"),
    (10, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}", f"{FACTOR} {KERNEL}", "`--factor 2` + kernel"),
    (10, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}", FACTOR, "`--factor 2`"),
]
# Table 2: (IPC, the options as the page names them, the options).
SAME_OPTIONS = [
    (1, "–", ""), (1, "`--mmd-kernel gaussian`", KERNEL), (1, "pool", POOL), (1, "kernel + pool", f"{KERNEL} {POOL}"),
    (1, "`--factor 2`", FACTOR),
    (1, "`--factor 2` + kernel", f"{FACTOR} {KERNEL}"), (1, "`--factor 2` + pool", f"{FACTOR} {POOL}"),
    (1, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}"),
    (10, "–", ""), (10, "`--mmd-kernel gaussian`", KERNEL), (10, "pool", POOL), (10, "kernel + pool", f"{KERNEL} {POOL}"),
    (10, "`--factor 2`", FACTOR),
    (10, "`--factor 2` + kernel", f"{FACTOR} {KERNEL}"),
    (10, "`--factor 2` + pool", f"{FACTOR} {POOL}"),
    (10, "`--factor 2` + kernel + pool", f"{FACTOR} {KERNEL} {POOL}"),
]
BEGIN, END = "<!-- beyond_tables.py: {} (generated from the README; edit there, then run --write) -->", \
    "<!-- end of beyond_tables.py: {} -->"


@dataclass
class Row:
    label: str                # the first cell
    ipc: int
    iterations: int
    on_page: bool             # from a table the page's tables are built from
    loss: str | None          # None for the random-image rows
    options: str
    mean: int                 # hundredths of a percent, as printed
    std: int | None           # None for one seed
    seeds: dict[int, int]     # seed -> its mean, hundredths
    at_200: dict[int, int]    # 1,000-iteration rows: seed -> its figure at 200 iterations, hundredths


def hundredths(text: str) -> int:
    return round(float(text) * 100)


def fmt(h: int) -> str:
    return f"{h / 100:.2f}"


def readme_rows(readme: str) -> tuple[list[Row], list[str]]:
    """The rows of the README's Beyond ATOM tables, and the disagreements found within them."""
    rows, problems = [], []
    for ipc, iterations, header, on_page in TABLES:
        start = readme.find(header)
        if start < 0:
            problems.append(f"README: no table starting {header!r}")
            continue
        lines = readme[start:].splitlines()
        seed_order = [int(s) for s in re.findall(r"\d+", lines[0].split("per seed", 1)[1].split("|")[0])]
        by_network = "| per evaluation network" in lines[0]   # a sixth column: "a, b, c; d, e, f" by seed
        at_200_order = [int(s) for s in re.findall(r"\d+", lines[0].split("| 200 iterations", 1)[1])] \
            if iterations != 200 and "| 200 iterations" in lines[0] else []
        for line in lines[2:]:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            label, option, count, accuracy, per_seed = cells[:5]
            name = re.search(r"`([^`]+)`", label)
            loss = None if name is None else name.group(1).split("+")[0]
            seeds = {s: hundredths(v) for s, v in zip(seed_order, per_seed.split(",")) if v.strip() != "–"}
            m = re.fullmatch(r"\**([\d.]+)(?: ± ([\d.]+))?\**", accuracy)
            at_200 = {s: hundredths(v) for s, v in zip(at_200_order, cells[-1].split(",")) if v.strip() != "–"} \
                if at_200_order else {}
            row = Row(label, ipc, iterations, on_page, loss, "" if option == "–" else option.strip("`"), hundredths(m.group(1)),
                      None if m.group(2) is None else hundredths(m.group(2)), seeds, at_200)
            rows.append(row)
            where = f"README, IPC {ipc}, {iterations} iterations, {label} {option}"
            if int(count) != len(seeds):
                problems.append(f"{where}: {count} seeds stated, {len(seeds)} figures given")
            if by_network:
                for seed, group in zip(seed_order, cells[5].split(";")):
                    nets = [float(v) for v in group.split(",") if v.strip() != "–"]
                    if nets and (seed not in seeds or abs(seeds[seed] - 100 * statistics.mean(nets)) > 1 + 1e-6):
                        problems.append(f"{where}: seed {seed}'s evaluation networks give {statistics.mean(nets):.2f}, "
                                        f"not its figure")
            values = [v / 100 for v in seeds.values()]
            if abs(row.mean - 100 * statistics.mean(values)) > 1 + 1e-6:
                problems.append(f"{where}: mean {fmt(row.mean)}, per-seed figures give {statistics.mean(values):.2f}")
            if len(values) > 1 and (row.std is None or abs(row.std - 100 * statistics.stdev(values)) > 1 + 1e-6):
                problems.append(f"{where}: std {fmt(row.std) if row.std else 'missing'}, per-seed figures give "
                                f"{statistics.stdev(values):.2f}")
    at_200 = {(r.ipc, r.loss, r.options): r for r in rows if r.iterations == 200}
    for r in rows:
        if r.at_200:
            short = at_200.get((r.ipc, r.loss, r.options))
            differ = [s for s, v in r.at_200.items() if short is None or short.seeds.get(s) != v]
            if differ:
                problems.append(f"README, IPC {r.ipc}, {r.iterations} iterations, {r.label} {r.options}: "
                                f"the 200-iteration figures of seed(s) {differ} are not the 200-iteration table's")
    return rows, problems


def compare(a: Row | None, b: Row | None) -> str:
    """The cell "difference (summed stds, seeds where a is higher/common seeds)", bold beyond the summed stds."""
    if a is None or b is None or a.std is None or b.std is None:
        return "–"
    diff, summed = a.mean - b.mean, a.std + b.std
    common = sorted(set(a.seeds) & set(b.seeds))
    ahead = sum(a.seeds[s] > b.seeds[s] for s in common)
    cell = f"{diff / 100:+.2f} ({fmt(summed)}, {ahead}/{len(common)})"
    return f"**{cell}**" if abs(diff) > summed else cell


def page_tables(rows: list[Row]) -> dict[str, str]:
    find = {(r.ipc, r.loss, r.options): r for r in rows if r.loss and r.on_page}

    def row(ipc, loss, options):
        r = find.get((ipc, loss, options))
        return r if r is not None and r.std is not None else None

    effects = ["| IPC | option | added to | `atom` | `datadam` | `dm` |", "|---|---|---|---|---|---|"]
    for ipc, name, with_it, without, base in EFFECTS:
        cells = [compare(row(ipc, loss, with_it), row(ipc, loss, without)) for loss in LOSSES]
        effects.append(f"| {ipc} | {name} | {base} | " + " | ".join(cells) + " |")
    same = ["| IPC | options | `atom` | `datadam` | `dm` | `atom` minus `datadam` | `atom` minus `dm` |",
            "|---|---|---|---|---|---|---|"]
    for ipc, name, options in SAME_OPTIONS:
        by_loss = {loss: row(ipc, loss, options) for loss in LOSSES}
        means = [f"{fmt(r.mean)} ± {fmt(r.std)}" if r else "–" for r in by_loss.values()]
        margins = [compare(by_loss["atom"], by_loss[other]) for other in ("datadam", "dm")]
        same.append(f"| {ipc} | {name} | " + " | ".join(means + margins) + " |")
    longer = [r for r in rows if r.iterations == 1000 and r.loss]
    seeds = sorted({s for r in longer for s in r.seeds})
    budget = ["| IPC 10, 1,000 iterations | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean ± std | the same seeds at 200 iterations |", "|---" * (len(seeds) + 3) + "|"]
    for r in longer:
        name = re.search(r"`([^`]+)`", r.label).group(1)
        name = name if "+" in name or not r.options else f"{name} {r.options}"   # `atom+`, `dm --factor 2`
        figures = [fmt(r.seeds[s]) if s in r.seeds else "–" for s in seeds]
        mean = f"{fmt(r.mean)} ± {fmt(r.std)}" if r.std is not None else "–"
        budget.append(f"| `{name}` | " + " | ".join(figures) + f" | {mean} | "
                      + ", ".join(fmt(r.at_200[s]) for s in sorted(r.at_200)) + " |")
    return {"effects": "\n".join(effects), "same options": "\n".join(same), "longer budget": "\n".join(budget)}


def splice(page: str, tables: dict[str, str]) -> tuple[str, list[str]]:
    """The page with each generated table replaced, and the tables whose markers are missing."""
    missing = []
    for name, table in tables.items():
        begin, end = BEGIN.format(name), END.format(name)
        i, j = page.find(begin), page.find(end)
        if i < 0 or j < i:
            missing.append(f"{PAGE.name}: markers for the {name!r} table missing")
            continue
        page = page[:i + len(begin)] + "\n" + table + "\n" + page[j:]
    return page, missing


def check(readme: str, page: str) -> list[str]:
    rows, problems = readme_rows(readme)
    rebuilt, missing = splice(page, page_tables(rows))
    problems += missing
    if rebuilt != page:
        old, new = page.splitlines(), rebuilt.splitlines()
        problems += [f"{PAGE.name}: {a!r} should read {b!r}" for a, b in zip(old, new) if a != b]
        if len(old) != len(new):
            problems.append(f"{PAGE.name}: the tables' length differs from the README's rows")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite docs/beyond-atom.md's tables from the README")
    args = p.parse_args()
    readme, page = README.read_text(encoding="utf-8"), PAGE.read_text(encoding="utf-8")
    if args.write:
        rows, _ = readme_rows(readme)
        page, _ = splice(page, page_tables(rows))
        PAGE.write_text(page, encoding="utf-8")
    problems = check(readme, page)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} disagreement(s)" if problems else "README and docs/beyond-atom.md agree")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
