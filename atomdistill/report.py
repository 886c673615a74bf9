"""Tables and figures from evaluation records (the JSON files `atomdistill evaluate` writes).

One markdown table per dataset: rows are methods, columns IPC x architecture, cells
"mean ± std" test accuracy in percent. The whole-set reference ('full', or any record without an
IPC) has its own row and its own "whole set" column(s), with "—" under the IPC columns, so no
reference number is ever read as an IPC result.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import textwrap
from pathlib import Path

from .errors import AtomDistillError
from .evaluate import EvalProtocol
from .interop import describe_settings
from .io import atomic_path

METHOD_ORDER = ("full", "random", "herding", "kcenter", "dm", "datadam", "channel", "atom")
DASH = "—"


# ---- loading ------------------------------------------------------------------------------
# The names `atomdistill evaluate` gives its records: in a run folder, beside a set file, of the whole set.
RECORD_NAMES = ("eval.json", "*.eval.json", "eval-*-full.json")


def _record_files(path: Path) -> list[Path]:
    """The record files a path names: a file; a run folder's eval.json; or every record below a folder
    of runs (e.g. a benchmark's results folder), sorted by path."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise AtomDistillError(f"{path} does not exist; pass an evaluation JSON file or a run folder "
                               "containing eval.json")
    if (path / "eval.json").is_file():
        return [path / "eval.json"]
    found = sorted({f for name in RECORD_NAMES for f in path.rglob(name) if f.is_file()})
    if not found:
        raise AtomDistillError(f"{path} is a folder without evaluation records (eval.json, NAME.eval.json) in it or "
                               "below it; run `atomdistill evaluate` on its sets first or pass the evaluation JSON file")
    return found


def load_records(paths: list[str | os.PathLike]) -> list[dict]:
    """Evaluation records from JSON files, run folders holding eval.json, or folders of runs (every
    record below them, sorted by path), in the order given.

    Each record gets a '_path' key (where it came from), used to name duplicates."""
    if not paths:
        raise AtomDistillError("no evaluation records given; pass eval JSON files or run folders")
    records = []
    for path in (f for p in paths for f in _record_files(Path(p))):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AtomDistillError(f"{path} is not readable JSON ({e}); pass a file written by "
                                   "`atomdistill evaluate`") from None
        _check_record(rec, path)
        _config_from_run_folder(rec, path)
        rec["_path"] = str(path)
        records.append(rec)
    return records


def _config_from_run_folder(rec: dict, path: Path) -> None:
    """A record written before records carried the set's config (`set.config`) takes it from its run
    folder's config.json, where that is the same run (dataset, method, IPC and seed agree), so that older
    records are told apart by recipe and averaged over seeds like newer ones."""
    if isinstance(rec["set"].get("config"), dict) or path.name != "eval.json":
        return
    try:
        config = json.loads((path.parent / "config.json").read_text())["config"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return
    if isinstance(config, dict) and all(config.get(k) == rec["set"].get(k) for k in ("dataset", "method", "ipc", "seed")):
        rec["set"]["config"] = config


def _check_record(rec, path: Path) -> None:
    ok = (isinstance(rec, dict) and isinstance(rec.get("set"), dict) and isinstance(rec.get("results"), dict)
          and "dataset" in rec["set"] and "method" in rec["set"]
          and rec["results"]   # an empty one came from `evaluate --models ,,` before that was refused
          and all(isinstance(r, dict) and "mean" in r and "std" in r for r in rec["results"].values()))
    if not ok:
        raise AtomDistillError(f"{path} is JSON but not an evaluation record (needs 'set' with dataset and "
                               "method, and 'results' with mean/std per model); pass a file written by "
                               "`atomdistill evaluate`")


# ---- table --------------------------------------------------------------------------------
def _is_whole(rec: dict) -> bool:
    return rec["set"].get("ipc") is None or rec["set"]["method"] == "full"


def _method_key(method: str):
    """Row order: the reference, the baselines, the methods (a method's variants, "dm (factor 2)", after it)."""
    base = method.split(" (")[0]
    # Numbers in a label compare as numbers: "iterations 200" before "iterations 1000".
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", method)]
    return (METHOD_ORDER.index(base), natural) if base in METHOD_ORDER else (len(METHOD_ORDER), natural)


def _cell(result: dict | None) -> str:
    if result is None:
        return DASH
    if "seeds" in result:   # several distillation seeds (_over_seeds)
        n, lost = result["seeds"], result["diverged_seeds"]
        if result["mean"] is None:
            return f"diverged ({n} of {n} seeds)"
        text = f"{100 * result['mean']:.1f}" + ("" if result["std"] is None else f" ± {100 * result['std']:.1f}")
        text += f" ({n} seeds"
        return text + (f", {lost} diverged)" if lost else ")")
    diverged, runs = result.get("diverged") or 0, len(result.get("accs") or [])
    if result["mean"] is None:   # every run diverged: there is no accuracy to show
        return f"diverged ({runs} of {runs} runs)" if runs else "diverged"
    text = f"{100 * result['mean']:.1f} ± {100 * result['std']:.1f}"
    return text + (f" ({diverged} of {runs} runs diverged)" if diverged else "")


# Config fields that do not shape the set (how the run was executed) or that a row already shows.
# The distillation seed is left out too: seeds are repeats of one recipe, not recipes.
NOT_RECIPE = {"data_root", "device", "real_chunk", "checkpoint_every", "log_every", "eval_every", "eval_models",
              "eval_runs", "eval_epochs", "dataset", "method", "ipc", "factor", "seed"}


def _recipe(rec: dict) -> dict | None:
    """How a record's set was made (its distillation config less NOT_RECIPE), or None when the record
    does not say (records written before they carried the config)."""
    config = rec["set"].get("config")
    if not isinstance(config, dict) or not config:   # an imported set's config can be empty: unknown too
        return None
    recipe = {k: v for k, v in config.items() if k not in NOT_RECIPE}
    if rec["set"].get("iterations") is not None:   # the iterations done, where a run stopped early
        recipe["iterations"] = rec["set"]["iterations"]
    if recipe.get("nets") != "pool":   # the pool's settings mean nothing without the pool
        recipe = {k: v for k, v in recipe.items() if not k.startswith("pool_")}
    return recipe


def _variants(records: list[dict]) -> dict[int, str]:
    """id(record) -> what tells its set apart from other sets of its dataset, method and factor (e.g.
    "mmd-kernel gaussian" against "mmd-kernel default", "iterations 1000" against "iterations 200"), so
    that sets made with other options are rows of their own, not duplicates of one row."""
    same_row: dict[tuple, list[dict]] = {}
    for rec in records:
        key = (str(rec["set"]["dataset"]), str(rec["set"]["method"]), int(rec["set"].get("factor") or 1))
        same_row.setdefault(key, []).append(rec)
    labels = {}
    for recs in same_row.values():
        recipes = [(rec, _recipe(rec)) for rec in recs]
        known = [recipe for _, recipe in recipes if recipe is not None]
        fields = list(dict.fromkeys(k for recipe in known for k in recipe))
        # What differs within one cell's column (one IPC): a setting that differs only between IPCs (P1 runs
        # 300 iterations at IPC 1 and 200 at IPC 10) is one recipe per IPC, not two rows. Compared where
        # present: a pool setting only among pool sets, a newer option only among newer configs.
        by_ipc: dict = {}
        for rec, recipe in recipes:
            if recipe is not None:
                by_ipc.setdefault(rec["set"].get("ipc"), []).append(recipe)
        values = {ipc: {k: {json.dumps(recipe[k], sort_keys=True) for recipe in column if k in recipe} for k in fields}
                  for ipc, column in by_ipc.items()}

        def shown(k, recipe):
            # A setting is named where its value is one of several in some column (one IPC): there it tells
            # sets apart, and a set of another column with that value joins their row. Where iterations differ
            # at IPC 10 only (200 and 1,000), the IPC 1 sets (300) are not an "iterations 300" row of their own.
            value = json.dumps(recipe[k], sort_keys=True)
            return any(len(column[k]) > 1 and value in column[k] for column in values.values())

        for rec, recipe in recipes:
            if recipe is None and known:   # an older record beside newer ones: never one of their seeds
                labels[id(rec)] = "options not recorded"
            elif recipe is not None:
                label = ", ".join(f"{k.replace('_', '-')} {_value(recipe[k])}" for k in fields
                                  if k in recipe and shown(k, recipe))
                if label:
                    labels[id(rec)] = label
    return labels


def _value(v) -> str:
    if v is None:
        return "default"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _rows(rec: dict, variant: str = ""):
    """(method, results) of a record: its set, then its label controls (soft-label sets), each a row."""
    factor = int(rec["set"].get("factor") or 1)
    # A multi-formation set, or one made with other options, is a row of its own (at its stored IPC).
    notes = ([f"factor {factor}"] if factor > 1 else []) + ([variant] if variant else [])
    suffix = f" ({', '.join(notes)})" if notes else ""
    yield str(rec["set"]["method"]) + suffix, rec["results"]
    for control in rec.get("controls") or []:
        yield str(control["method"]) + suffix, control["results"]


def _collect(records: list[dict], variants: dict[int, str]):
    """The cells of one table (records of one dataset and protocol): {(method, ipc|None, model): result},
    and its duplicates {(method, ipc, model, seed): paths}.

    Records of one row and column from several distillation seeds make one cell, the mean ± std over
    the seeds' means (_over_seeds); a seed given twice is a duplicate, and its last record counts.
    `variants`: _variants() of all the records a report shows."""
    by_seed: dict[tuple, dict] = {}
    sources: dict[tuple, list[str]] = {}
    for rec in records:
        # A record that does not say how its set was made (written before records carried the config)
        # cannot be told from another recipe's: it is never averaged, the last such record counts.
        seed = rec["set"].get("seed") if _recipe(rec) is not None else None
        ipc = None if _is_whole(rec) else int(rec["set"]["ipc"])
        for method, results in _rows(rec, variants.get(id(rec), "")):
            for model, result in results.items():
                by_seed.setdefault((method, ipc, model), {})[seed] = result
                sources.setdefault((method, ipc, model, seed), []).append(rec.get("_path", "?"))
    cells = {key: (next(iter(seeds.values())) if len(seeds) == 1 else _over_seeds(list(seeds.values())))
             for key, seeds in by_seed.items()}
    return cells, {k: v for k, v in sources.items() if len(v) > 1}


def _over_seeds(results: list[dict]) -> dict:
    """One cell from several distillation seeds: the mean and the sample std of the seeds' means (as
    the README's tables give them); a seed whose every evaluation run diverged is left out and counted."""
    means = [r["mean"] for r in results if r["mean"] is not None]
    return {"mean": statistics.mean(means) if means else None,
            "std": statistics.stdev(means) if len(means) > 1 else None,   # None: one mean has no spread
            "seeds": len(results), "diverged_seeds": len(results) - len(means)}


def _models_in_order(records: list[dict], dataset: str | None = None) -> list[str]:
    models: list[str] = []
    for rec in records:
        if dataset is None or str(rec["set"]["dataset"]) == dataset:
            models += [m for m in rec["results"] if m not in models]
    return models


def _distinct(values) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _protocol_str(p: dict) -> str:
    """Everything that makes accuracies comparable or not: runs x epochs, DSA, and any training setting
    away from the default protocol (the evaluation seed is left out: seeds are repeats, not protocols)."""
    if not p:
        return "unknown"
    s = f"{p.get('runs', '?')} runs x {p.get('epochs', '?')} epochs"
    if p.get("dsa"):
        s += f", DSA {p['dsa']}"
    default = EvalProtocol()
    for name in ("lr", "momentum", "weight_decay", "batch_size", "precision"):
        if name in p and p[name] != getattr(default, name):
            s += f", {name} {p[name]}"
    return s


def _hardware_str(h: dict) -> str:
    if not h:
        return "unknown"
    rest = ", ".join(f"{k}: {v}" for k, v in h.items() if k != "device")
    return f"{h.get('device', '?')}" + (f" ({rest})" if rest else "")


def _protocol_tables(records: list[dict]) -> dict[tuple[str, str], tuple[list[dict], dict, dict]]:
    """(dataset, protocol) -> (its records in the order given, its cells, its duplicates) (_collect).
    Accuracies under different evaluation protocols (runs x epochs, DSA, ...) are not comparable: each
    (dataset, protocol) is a table, and bar groups in the figure, of its own."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        groups.setdefault((str(rec["set"]["dataset"]), _protocol_str(rec.get("protocol") or {})), []).append(rec)
    variants = _variants(records)   # over all the records: a row's name is the same in every table
    return {key: (recs, *_collect(recs, variants)) for key, recs in groups.items()}


def markdown_table(records: list[dict]) -> str:
    """Markdown: one table per dataset (sorted by name), then notes on duplicates, protocol and hardware.

    A dataset whose records used several evaluation protocols gets one table per protocol, each headed by it."""
    if not records:
        raise AtomDistillError("no evaluation records to tabulate")
    tables = _protocol_tables(records)
    lines: list[str] = []
    dups: list[tuple[str, list[str]]] = []   # (what the cell is, the records given for it)
    diverged = several_seeds = False
    for ds in sorted({ds for ds, _ in tables}):
        protocols = [p for d, p in tables if d == ds]
        for protocol in protocols:
            group, cells, group_dups = tables[(ds, protocol)]
            # One set evaluated twice under one protocol is a duplicate; under two protocols it is not.
            dups += [(f"{ds} {meth} {'whole set' if ipc is None else f'IPC {ipc}'} {m}"
                      + ("" if seed is None else f" seed {seed}") + (f" ({protocol})" if len(protocols) > 1 else ""),
                      src) for (meth, ipc, m, seed), src in group_dups.items()]
            diverged |= any(r.get("diverged") for r in cells.values())
            several_seeds |= any("seeds" in r for r in cells.values())
            models = _models_in_order(group, ds)
            ipcs = sorted({ipc for (_, ipc, _) in cells if ipc is not None})
            # Only (IPC, model) pairs some record has: an all-dash column says nothing.
            present = {(ipc, m) for (_, ipc, m) in cells}
            columns = [(ipc, m) for ipc in ipcs for m in models if (ipc, m) in present]
            columns += [(None, m) for m in models if (None, m) in present]
            header = ["method"] + [f"IPC {ipc} {m}" if ipc is not None else f"whole set {m}" for ipc, m in columns]
            methods = sorted({meth for (meth, _, _) in cells}, key=_method_key)
            title = f"### {ds}" + (f", evaluated with {protocol}" if len(protocols) > 1 else "")
            lines += [title, "", "| " + " | ".join(header) + " |",
                      "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|"]
            for meth in methods:
                row = [meth] + [_cell(cells.get((meth, ipc, m))) for ipc, m in columns]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines.append("Test accuracy in %, mean ± std over evaluation runs (runs whose training diverged are left "
                 "out and counted)." if diverged
                 else "Test accuracy in %, mean ± std over evaluation runs.")
    if several_seeds:
        lines.append("A cell marked (n seeds) holds n distillation seeds' sets: the mean ± std (sample std) of "
                     "their means.")
    if dups:
        keys = "; ".join(f"{cell} ({len(src)} records, counted: {src[-1]})" for cell, src in dups)
        lines.append(f"Duplicates: several records for the same cell and seed, the last one given counts: {keys}.")
    made_for = _distinct(f"{r['set']['method']}: {describe_settings(r['set']['made_for'])}"
                         for r in records if r["set"].get("made_for"))
    if made_for:
        lines.append(f"Made for: {'; '.join(made_for)}.")
    soft = _distinct(f"{r['set']['method']}: {r['set']['labels'].get('loss', 'soft labels')}"
                     for r in records if (r["set"].get("labels") or {}).get("kind") == "soft")
    if soft:
        lines.append(f"Soft labels, trained with {'; '.join(soft)}; the rows '... hard labels' (the same images, "
                     "argmax labels) and 'random + ... soft labels' (random real images, the set's class-mean soft "
                     "labels) show how much of the score the labels carry.")
    protocols = _distinct(_protocol_str(r.get("protocol") or {}) for r in records)
    hardware = _distinct(_hardware_str(r.get("hardware") or {}) for r in records)
    lines.append(f"Protocol: {'; '.join(protocols)}. Hardware: {'; '.join(hardware)}.")
    return "\n".join(lines) + "\n"


def _bar_groups(records: list[dict]):
    """The figure's cells and bar groups: ({(dataset, protocol): {(method, ipc, model): result}},
    [(dataset, protocol, ipc or None, label)]): a group per IPC and one for the whole set, per dataset
    and protocol; the label names the protocol where a dataset's records used several."""
    tables = {key: cells for key, (_, cells, _) in _protocol_tables(records).items()}
    groups = []
    for ds, protocol in sorted(tables, key=lambda key: key[0]):   # stable: protocols in the order given
        cells = tables[(ds, protocol)]
        ipcs = sorted({ipc for (_, ipc, _) in cells if ipc is not None})
        ipcs += [None] if any(ipc is None for (_, ipc, _) in cells) else []
        # Under the axis, only what sets this protocol apart from the dataset's others (e.g. "5 runs x 1000 epochs").
        others = [p.split(", ") for d, p in tables if d == ds and p != protocol]
        own = [part for part in protocol.split(", ") if not all(part in other for other in others)]
        groups += [(ds, protocol, ipc, f"{ds}\n{'whole set' if ipc is None else f'IPC {ipc}'}"
                    + (f"\n{textwrap.fill(', '.join(own), 18)}" if others else "")) for ipc in ipcs]
    return tables, groups


# ---- figure -------------------------------------------------------------------------------
def plot_records(records: list[dict], path: str | os.PathLike) -> None:
    """Grouped bar chart (PNG): per model one subplot; one group per (dataset, IPC), plus a
    'whole set' group per dataset with a reference; bars are methods, error bars the std. A dataset
    evaluated under several protocols gets its groups once per protocol, named under the axis."""
    from .plots import _pyplot

    if not records:
        raise AtomDistillError("no evaluation records to plot")
    plt = _pyplot()
    tables, groups = _bar_groups(records)
    models = _models_in_order(records)
    methods = sorted({meth for cells in tables.values() for (meth, _, _) in cells}, key=_method_key)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    width = 0.8 / max(len(methods), 1)
    fig_w = max(5.0, 1.5 + 0.3 * len(groups) * len(methods))
    # Long row names (sets made with other options): one legend for the figure, beside the plots.
    longest = max(map(len, methods))
    beside = longest > 24
    if beside:
        fig_w += 0.07 * longest
    fig, axes = plt.subplots(len(models), 1, figsize=(fig_w, 3.4 * len(models)), squeeze=False,
                             layout="constrained" if beside else "tight")
    for ax, model in zip(axes[:, 0], models):
        labelled, top = set(), 1.0
        for gi, (ds, protocol, ipc, _) in enumerate(groups):
            cells = tables[(ds, protocol)]
            present = [m for m in methods if (m, ipc, model) in cells
                       and cells[(m, ipc, model)]["mean"] is not None]   # no bar for all-diverged
            for bi, meth in enumerate(present):
                r = cells[(meth, ipc, model)]
                x = gi - 0.4 + width * (bi + 0.5) + (len(methods) - len(present)) * width / 2
                ax.bar(x, 100 * r["mean"], width, yerr=100 * (r["std"] or 0), capsize=2, color=colours[meth],
                       label=meth if meth not in labelled else None)
                labelled.add(meth)
                top = max(top, 100 * (r["mean"] + (r["std"] or 0)))
        ax.set_ylim(0, top * 1.25)   # head room for the legend
        ax.set_xlim(-0.5, len(groups) - 0.5)   # same groups in every subplot, even if one is empty
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([label for *_, label in groups])
        ax.set_ylabel("test accuracy %")
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda i: _method_key(names[i]))   # table row order
        if handles and not beside:
            ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize="small",
                      ncol=min(len(methods), 4))
    if beside:
        from matplotlib.patches import Patch
        fig.legend([Patch(color=colours[m]) for m in methods], methods, loc="outside right upper", fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(paths: list[str | os.PathLike], out_md: str | os.PathLike,
                 out_png: str | os.PathLike | None = None) -> str:
    """Load records, write the markdown (with the figure linked) and the PNG; return the markdown."""
    records = load_records(paths)
    out_md = Path(out_md)
    out_png = Path(out_png) if out_png is not None else out_md.with_suffix(".png")
    plot_records(records, out_png)
    rel = os.path.relpath(out_png.resolve(), out_md.resolve().parent)
    text = markdown_table(records) + f"\n![accuracy per method]({Path(rel).as_posix()})\n"
    with atomic_path(out_md) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text
