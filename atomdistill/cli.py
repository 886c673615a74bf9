"""The `atomdistill` command line: a thin layer over the Python API.

User errors (AtomDistillError) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from .data import DATASETS, DEFAULT_DATASET
from .distill import DistillConfig
from .errors import AtomDistillError, ConfigError
from .evaluate import EvalProtocol
from .runtime import is_out_of_memory, out_of_memory_message

DATASET_HELP = ", ".join(f"{name} ({spec.about})" for name, spec in DATASETS.items()) + f"; default {DEFAULT_DATASET}"


def _block_numbers(text: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        numbers = ()
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected block numbers separated by commas, e.g. 1,2; got {text!r}")
    return numbers


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, e.g. convnet,resnet18; got {text!r}")
    return names


def _add_data_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_DATASET):
    p.add_argument("--dataset", default=default, help=DATASET_HELP)
    p.add_argument("--data-root", default=None, help="folder holding the dataset (default ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing (checks the checksum)")
    p.add_argument("--image-size", type=int, default=None, help="resize images (folder and digits datasets)")


def _add_eval_args(p: argparse.ArgumentParser, prefix: str = "", defaults: bool = True):
    """--models, --runs, --epochs; `defaults=False` leaves them None when not given (distill's
    --eval-* options: so that DistillConfig's defaults apply and a resume sees what was typed)."""
    default = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument(f"--{prefix}models", type=_names, default=default(("convnet",)),
                   help="comma-separated architectures, e.g. convnet,alexnet,vgg11,resnet18 (default convnet)")
    p.add_argument(f"--{prefix}runs", type=int, default=default(EvalProtocol.runs),
                   help=f"fresh networks trained per architecture (default {EvalProtocol.runs})")
    p.add_argument(f"--{prefix}epochs", type=int, default=default(EvalProtocol.epochs),
                   help=f"training epochs per network (default {EvalProtocol.epochs}; paper: 1000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomdistill",
        description="Dataset distillation with ATOM, the Attention Mixer (and DataDAM, DM presets).")
    parser.add_argument("--version", action="version", version=f"atomdistill {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="describe a dataset (classes, counts, size, mean/std)")
    p.add_argument("name", nargs="?", default=DEFAULT_DATASET)
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--image-size", type=int, default=None)

    sub.add_parser("models", help="list the registered architectures")

    # Every distill option defaults to None: DistillConfig holds the defaults, and --resume can tell
    # what was typed (options that would change the set are refused, the others applied).
    p = sub.add_parser("distill", help="distil a dataset into a synthetic set")
    _add_data_args(p, default=None)
    p.add_argument("--ipc", type=int, default=None, help=f"images per class (default {DistillConfig.ipc})")
    p.add_argument("--method", default=None,
                   help="loss preset: atom (default), atom+ (atom with --factor 2), atom+gaussian (atom+ with "
                        "--mmd-kernel gaussian; the best measured at IPC 10), datadam, dm, channel")
    p.add_argument("--iterations", type=int, default=None, help="default 20000 (paper)")
    p.add_argument("--out", default=None, help="run folder (default runs/DATASET-METHOD-ipcN)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run; may change only how it runs (--iterations, --device, "
                        "--data-root, --real-chunk, --checkpoint-every, --log-every, --eval-*)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="image learning rate (default 1, 10 above IPC 50)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration (256)")
    g.add_argument("--real-chunk", type=int, default=None, help="real images per forward pass (memory)")
    g.add_argument("--init", choices=("real", "noise"), default=None)
    g.add_argument("--net", default=None, help="distillation network (default convnet; convnet-d4 at 64 px)")
    g.add_argument("--zca", dest="zca", action="store_true", default=None, help="ZCA whitening (default on CIFAR)")
    g.add_argument("--no-zca", dest="zca", action="store_false")
    g.add_argument("--dsa", default=None, help="DSA strategy, or 'none'")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32 (default) or bf16 autocast (fast only on GPUs and CPUs with AVX512-BF16/AMX)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the forward passes: faster per iteration after a warm-up of about half a "
                        "minute, for runs of a few hundred iterations or more (needs a C++ compiler on a CPU)")
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--log-every", type=int, default=None)
    g = p.add_argument_group("loss weights (override the preset)")
    for name, text in (("spatial", "w_s"), ("channel", "w_c"), ("mmd", "lambda"), ("power", "p"), ("scale", "scale")):
        g.add_argument(f"--{name}", type=float, default=None, help=text)
    g.add_argument("--layers", type=_block_numbers, default=None, help="intermediate blocks, e.g. 1,2")
    g.add_argument("--mmd-kernel", choices=("linear", "gaussian"), default=None,
                   help="final-layer term: linear (class means, default) or gaussian (M3D's kernel MMD)")
    g = p.add_argument_group("beyond ATOM: multi-formation and the network source")
    g.add_argument("--factor", type=int, default=None,
                   help="each stored image holds FxF tiles, each upsampled to a training image (IDC; default 1, "
                        "2 for --method atom+ and atom+gaussian on images of 32 px and up)")
    g.add_argument("--nets", choices=("random", "pool"), default=None,
                   help="matching networks: random (fresh each iteration, default) or pool (IDM: trained on real data)")
    g.add_argument("--pool-size", type=int, default=None, help="networks in the pool (100)")
    g.add_argument("--pool-steps", type=int, default=None, help="SGD steps the used network trains per iteration (10)")
    g.add_argument("--pool-refresh", type=int, default=None, help="a new network joins every N iterations (30)")
    g = p.add_argument_group("evaluation along the way")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every K iterations (0: never)")
    _add_eval_args(g, prefix="eval-", defaults=False)

    p = sub.add_parser("evaluate", help="train fresh networks on a set, test on real data")
    p.add_argument("set", help="a synthetic set (.safetensors or run folder), or 'full' for the whole training set")
    _add_data_args(p)
    _add_eval_args(p)
    p.add_argument("--seed", type=int, default=EvalProtocol.seed)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the networks (fast only on GPUs and CPUs with AVX512-BF16/AMX)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks: faster after a warm-up of a minute or two, for the long "
                        "evaluations (IPC 10 and up); needs a C++ compiler on a CPU")
    p.add_argument("--batched", choices=("auto", "yes", "no"), default="auto",
                   help="train the runs of one architecture together (auto: on a GPU; on a CPU one by one is faster)")
    p.add_argument("--out", default=None, help="JSON record (default: eval.json beside the set); finished networks "
                                                "are kept in OUT.partial until it is written, so an interrupted "
                                                "evaluation continues when the same command is run again")

    p = sub.add_parser("baseline", help="select a real coreset (random, herding, kcenter) as a synthetic set")
    p.add_argument("kind", choices=("random", "herding", "kcenter"))
    _add_data_args(p)
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding", default="trained", choices=("trained", "random", "pixels"),
                   help="feature space of herding/k-center: a ConvNet trained on the whole train split "
                        "(default), a random ConvNet, or pixels")
    p.add_argument("--embed-epochs", type=int, default=2, help="epochs of that ConvNet's training")
    p.add_argument("--cache-dir", default=str(Path("~/.cache/atomdistill/embeddings").expanduser()),
                   help="where embeddings are kept for reuse by other baselines and IPCs ('none': nowhere)")
    p.add_argument("--zca", dest="zca", action="store_true", default=None)
    p.add_argument("--no-zca", dest="zca", action="store_false")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output .safetensors file (its grid goes beside it as .png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out set")

    p = sub.add_parser("show", help="save a PNG grid (and optionally an image folder) of a set")
    p.add_argument("set")
    p.add_argument("--out", default="grid.png", help="the PNG grid (an earlier grid there is replaced)")
    p.add_argument("--folder", default=None, help="also export one PNG per image into this new or empty folder")
    p.add_argument("--decoded", action="store_true",
                   help="show the images training sees (a multi-formation set's decoded tiles), not the stored ones")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the --folder")

    p = sub.add_parser("import", help="a set from another tool's file (DC/DM/DataDAM .pt, MTT tensors, image folder)")
    p.add_argument("file", help="the file (dc), folder or images_best.pt (mtt), or class-folder root (folder)")
    p.add_argument("--format", required=True, help="dc (DC/DSA/DM/DataDAM result .pt), mtt (images_best.pt + "
                                                    "labels_best.pt) or folder (DIR/<class>/*.png)")
    _add_data_args(p, default=None)
    p.add_argument("--zca", dest="zca", action="store_true", default=None,
                   help="the stored images are ZCA-whitened (dc, mtt); whiten the images (folder)")
    p.add_argument("--no-zca", dest="zca", action="store_false")
    p.add_argument("--index", type=int, default=None, help="experiment of a dc file (default: the last)")
    p.add_argument("--labels", default=None, help="mtt: the label file (default labels_best.pt beside the images)")
    p.add_argument("--origin", default=None, help="the code that made it (dc, dsa, dm, datadam, mtt): records "
                                                   "the network and DSA it evaluates with")
    p.add_argument("--method", default=None, help="name of the set in tables (default: the origin or format)")
    p.add_argument("--out", required=True, help="output .safetensors file (its grid goes beside it as .png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out set")

    p = sub.add_parser("export", help="write a set in another tool's format (dc, mtt, folder)")
    p.add_argument("set")
    p.add_argument("--format", required=True, help="dc, mtt or folder (as for import)")
    p.add_argument("--out", required=True, help="a .pt file (dc) or a new or empty folder (mtt, folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (dc) or a folder holding an earlier export (mtt, folder)")

    p = sub.add_parser("nas", help="architecture search with a proxy set: does it rank ConvNets like whole data?")
    p.add_argument("--proxy", required=True,
                   help="a synthetic set (.safetensors or run folder), 'random' (with --ipc) or 'full' (early-stopped)")
    _add_data_args(p)
    p.add_argument("--space", default="small", help="small (24 ConvNets), paper (720) or a JSON/YAML grid file")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="replace one option of the space, e.g. depth=2,3 (repeatable; keys: depth, width, act, norm, pool)")
    p.add_argument("--epochs", type=int, default=None, help="proxy training epochs (default 300; 2 for 'full')")
    p.add_argument("--full-epochs", type=int, default=20, help="whole-data training epochs (the ground truth)")
    p.add_argument("--runs", type=int, default=1, help="networks per candidate on the proxy")
    p.add_argument("--full-runs", type=int, default=1, help="networks per candidate on the whole data")
    p.add_argument("--ipc", type=int, default=None, help="images per class of the 'random' proxy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="result folder (default runs/nas-DATASET-PROXY)")
    p.add_argument("--cache-dir", default=None, help="whole-data results cache (default ~/.cache/atomdistill/nas)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder recorded with other options")

    p = sub.add_parser("report", help="markdown table and figure from evaluation records")
    p.add_argument("records", nargs="+", help="eval JSON files, run folders, or folders of runs (every record below)")
    p.add_argument("--out", default="report.md")
    parser.command_parsers = sub.choices   # name -> its parser, for errors in the command's own words
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# ---- commands ---------------------------------------------------------------------------------
def cmd_data(args):
    from .data import format_description, load_dataset
    data = load_dataset(args.name, args.data_root, download=args.download, image_size=args.image_size)
    print(format_description(data.describe()))


def cmd_models(args):
    from .models import list_models, model_info
    for name in list_models():
        info = model_info(name)
        print(f"{name:20s} " + " ".join(f"{k}={v}" for k, v in info.items()))


# Options of `distill`, and the DistillConfig field each sets.
_DISTILL_OPTIONS = ("dataset", "data_root", "image_size", "ipc", "method", "iterations", "lr", "momentum",
                    "batch_real", "real_chunk", "init", "net", "zca", "dsa", "seed", "device", "precision", "compile",
                    "checkpoint_every",
                    "log_every", "spatial", "channel", "mmd", "power", "scale", "layers", "eval_every",
                    "eval_models", "eval_runs", "eval_epochs", "mmd_kernel", "factor", "nets", "pool_size",
                    "pool_steps", "pool_refresh")


def cmd_distill(args):
    from .distributed import process_group
    options = {k: getattr(args, k) for k in _DISTILL_OPTIONS if getattr(args, k) is not None}
    # Under torchrun with 2+ processes the classes are sharded over them (docs/distributed.md).
    with process_group(options.get("device", "auto")) as group:
        _distill(args, options, group)


def _distill(args, options, group):
    from .distill import distill, load_run_config, resume
    from .distributed import LocalGroup
    if group is not None:
        distill, resume = group.distill, group.resume
    group = group or LocalGroup("cpu")   # the same calls in one process
    if args.resume:
        for flag, given in (("--out", args.out), ("--overwrite", args.overwrite)):
            if given:
                raise ConfigError(f"{flag} does not go with --resume: a resumed run stays in {args.resume}; "
                                  f"drop {flag}, or start a new run without --resume")
        run_dir = Path(args.resume)
        # Refuses an option that would change the set (rank 0 reads the folder); the others are applied.
        config = group.on_main(load_run_config, run_dir, **options)
        if group.main:
            applied = " ".join(f"--{k.replace('_', '-')} {_flag_value(options[k])}" for k in options)
            print(f"resuming {run_dir}" + (f" with {applied}" if applied else ""))
        dataset, data_root = config.dataset, config.data_root
    else:
        dataset = options.pop("dataset", DEFAULT_DATASET)
        data_root = options.pop("data_root", None)
        run_dir = Path(args.out or f"runs/{dataset.replace(':', '_').replace('/', '_')}-"
                                   f"{options.get('method', DistillConfig.method)}-ipc{options.get('ipc', DistillConfig.ipc)}")
    if args.download:   # fetch before the run so the loop itself never downloads
        from .data import load_dataset
        # one download per machine, and every process hears if it failed
        group.agree(lambda: group.local_rank == 0 and load_dataset(dataset, data_root, download=True))
    if args.resume:
        synset = resume(run_dir, **options)
    else:
        synset = distill(dataset, out=run_dir, overwrite=args.overwrite, data_root=data_root, **options)
    if not group.main:
        return
    print(f"\nsynthetic set: {run_dir / 'synset.safetensors'}  ({len(synset)} images, grid: {run_dir / 'grid.png'})")
    data_root = f" --data-root {synset.config.get('data_root')}" if synset.config.get("data_root") else ""
    print(f"evaluate it:   atomdistill evaluate {run_dir} --dataset {synset.dataset}{data_root}")


def _flag_value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def cmd_evaluate(args):
    from .distributed import process_group
    # Under torchrun with 2+ processes the (model, run) trainings are spread over them.
    with process_group(args.device) as group:
        _evaluate(args, group)


def _evaluate(args, group):
    from .data import load_dataset
    from .evaluate import full_training_set
    from .io import FolderLock, check_new_file
    from .synset import SyntheticSet
    data = load_dataset(args.dataset, args.data_root, download=args.download, image_size=args.image_size)
    if args.set == "full":
        synset, default_out = full_training_set(data), Path(f"eval-{data.name.replace(':', '_').replace('/', '_')}-full.json")
    else:
        synset = SyntheticSet.load(args.set)
        # a run folder gets eval.json; a set file gets NAME.eval.json beside it
        default_out = Path(args.set) / "eval.json" if Path(args.set).is_dir() else Path(args.set).with_suffix(".eval.json")
    protocol = EvalProtocol(runs=args.runs, epochs=args.epochs, seed=args.seed, precision=args.precision,
                            compile=args.compile)
    out = Path(args.out) if args.out else default_out
    # before the training, not after it: a record that cannot be written would lose the whole run.
    # An earlier record (.json) is replaced; the set itself or any other file is not.
    # One evaluation writes a record at a time: two would each overwrite the other's finished runs.
    record_lock = FolderLock.of_file(out, "evaluation record", instead="pass another --out")
    def check_out():
        check_new_file(out, overwrite=None, inputs=[set_file(args.set)], remade=(".json",))
        record_lock.acquire()
    try:
        if group is None:
            check_out()
        else:
            group.on_main(check_out)
        _evaluate_into(args, group, data, synset, protocol, out)
    finally:
        record_lock.release()


def _evaluate_into(args, group, data, synset, protocol, out):
    from .evaluate import evaluate, evaluation_record, format_result
    from .interop import annotate_record, describe_settings, label_controls, made_for, settings_advice
    from .io import write_json
    # Each finished run is kept beside the record until the record is written: a killed evaluation,
    # run again, continues from there (one process; under torchrun the ranks share the runs instead).
    journal = out.with_name(out.name + ".partial")
    options = {"journal": journal} if group is None else {}
    if group is not None:
        evaluate = group.evaluate
    def run(s):
        return evaluate(s, data, args.models, protocol, device=args.device,
                        batched={"auto": "auto", "yes": True, "no": False}[args.batched], **options)
    results = run(synset)
    # a soft-label set: the same images with hard labels, and real images with its soft labels
    controls = label_controls(synset, data, run, seed=protocol.seed)
    if group is not None and not group.main:
        return
    record = evaluation_record(synset, results, protocol, path=None if args.set == "full" else args.set,
                               device=args.device)
    write_json(out, annotate_record(record, synset, controls))
    journal.unlink(missing_ok=True)
    print(f"\n{synset.dataset} {synset.method} ipc={synset.ipc if args.set != 'full' else 'all'}  "
          f"({protocol.runs} runs x {protocol.epochs} epochs)")
    print(f"{'model':12s} {'accuracy %':>16s}  seconds")
    for model, r in results.items():
        print(f"{model:12s} {format_result(r):>16s}  {r['seconds']:7.1f}")
    for c in controls:
        print(f"{c['control']}: {c['description']}")
        for model, r in c["results"].items():
            print(f"{model:12s} {format_result(r):>16s}  {r['seconds']:7.1f}")
    settings = made_for(synset)
    if settings:
        print(f"made for: {describe_settings(settings)}")
    for advice in settings_advice(settings, args.models):
        print(f"note: {advice}")
    if protocol.epochs == 0:
        print("note: --epochs 0 trains nothing: these are untrained networks' accuracies, about chance")
    print(f"record: {out}")


def set_file(path: str, name: str = "synset.safetensors") -> Path:
    """The file a command reads for PATH: PATH itself, or NAME inside it when it is a run folder."""
    return Path(path) / name if Path(path).is_dir() else Path(path)


def check_set_out(args, inputs=()) -> None:
    """A command's --out set: not a .png (its grid is written beside it as .png), never one of its
    inputs, and an existing file only with --overwrite."""
    from .io import check_new_file
    from .synset import check_set_name
    out = Path(args.out)
    check_set_name(out)
    if out.suffix.lower() == ".png":
        raise AtomDistillError(f"--out {out} would be both the set and its grid (the grid goes beside the set as "
                               f".png); pass e.g. --out {out.with_suffix('.safetensors')}")
    check_new_file(out, overwrite=args.overwrite, inputs=[i for i in inputs if i])


def cmd_baseline(args):
    from .baselines import select_coreset
    from .data import load_dataset
    check_set_out(args)   # before the selection, which may train an embedding network
    data = load_dataset(args.dataset, args.data_root, download=args.download, image_size=args.image_size)
    synset = select_coreset(data, args.ipc, args.kind, seed=args.seed, embedding=args.embedding,
                            embed_epochs=args.embed_epochs, device=args.device, zca=args.zca,
                            cache_dir=None if args.cache_dir == "none" else args.cache_dir)
    out = synset.save(args.out)
    synset.save_grid(out.with_suffix(".png"))
    print(f"{args.kind} coreset: {out} ({len(synset)} images), grid: {out.with_suffix('.png')}")
    print(f"evaluate it:   atomdistill evaluate {out} --dataset {args.dataset}"
          + (f" --data-root {args.data_root}" if args.data_root else ""))


def cmd_show(args):
    from .synset import SyntheticSet
    from .io import check_new_file, check_new_folder
    synset = SyntheticSet.load(args.set)
    check_new_file(args.out, overwrite=None, inputs=[set_file(args.set)], remade=(".png",))
    if args.folder:
        check_new_folder(args.folder, overwrite=args.overwrite)
    print(f"{synset}\ngrid: {synset.save_grid(args.out, decoded=args.decoded)}")
    if args.folder:
        print(f"images: {synset.export_folder(args.folder, decoded=args.decoded, overwrite=args.overwrite)}")


def cmd_import(args):
    from .data import load_dataset
    from .interop import check_format, import_set
    check_format(args.format)   # before the dataset loads
    check_set_out(args, inputs=[args.file, args.labels or ""])
    if args.dataset is None:
        raise AtomDistillError("import needs --dataset: the dataset the set was made from (its normalisation, "
                               "classes and test split)")
    data = load_dataset(args.dataset, args.data_root, download=args.download, image_size=args.image_size)
    result = import_set(args.file, args.format, data, zca=args.zca, index=args.index, origin=args.origin,
                        method=args.method, labels=args.labels)
    for line in result.notes:
        print(line)
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    out = result.synset.save(args.out)
    print(f"set: {out} ({len(result.synset)} images, IPC {result.synset.ipc}), grid: "
          f"{result.synset.save_grid(out.with_suffix('.png'))}")
    net = (result.synset.info["eval_settings"].get("net") or "convnet")
    print(f"evaluate it:   atomdistill evaluate {out} --dataset {args.dataset}"
          + (f" --data-root {args.data_root}" if args.data_root else "") + f" --models {net}")


def cmd_export(args):
    from .interop import check_format, export_set
    from .io import check_new_file, check_new_folder
    from .synset import SyntheticSet
    synset = SyntheticSet.load(args.set)
    check_format(args.format)
    if args.format == "dc":
        check_new_file(args.out, overwrite=args.overwrite, inputs=[set_file(args.set)])
    else:   # the other tools read every file of the folder as part of the set
        check_new_folder(args.out, overwrite=args.overwrite)
    for line in export_set(synset, args.format, args.out, overwrite=args.overwrite):
        print(line)


def cmd_report(args):
    from .io import check_new_file
    from .report import write_report
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        raise AtomDistillError(f"--out {out} would be both the report and its figure; pass a markdown name such as "
                               "report.md (the figure goes beside it as .png)")
    records = [set_file(r, "eval.json") for r in args.records]
    check_new_file(out, overwrite=None, inputs=records, remade=(".md", ".txt"))
    check_new_file(out.with_suffix(".png"), overwrite=None, inputs=records, remade=(".png",))
    print(write_report(args.records, args.out))
    print(f"\nwritten: {args.out}")


def cmd_nas(args):
    from .distributed import process_group
    # Under torchrun with 2+ processes the candidates are dealt over them; rank 0 writes and prints.
    with process_group(args.device) as group:
        _nas(args, group)


def _nas(args, group):
    from .data import load_dataset
    from .nas import search
    if args.download and group is not None:   # one download per machine, and every process hears if it failed
        group.agree(lambda: group.local_rank == 0 and load_dataset(args.dataset, args.data_root, download=True))
    def load():
        return load_dataset(args.dataset, args.data_root, download=args.download and group is None,
                            image_size=args.image_size)

    data = load() if group is None else group.agree(load)   # a rank missing the data stops them all
    r = search(args.proxy, data, args.space, grid=args.grid, epochs=args.epochs, full_epochs=args.full_epochs,
               runs=args.runs, full_runs=args.full_runs, ipc=args.ipc, seed=args.seed, device=args.device,
               out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite, group=group)
    if group is not None and not group.main:
        return
    out = Path(r["out_dir"])
    print("\n" + (out / "nas.md").read_text())
    print(f"written: {out / 'nas.md'}, {out / 'nas.json'}, {out / 'nas.png'}")


COMMANDS = {"data": cmd_data, "models": cmd_models, "distill": cmd_distill, "evaluate": cmd_evaluate,
            "baseline": cmd_baseline, "show": cmd_show, "nas": cmd_nas, "report": cmd_report,
            "import": cmd_import, "export": cmd_export}


# What uses less memory, by command; the first option named leaves the result as it was.
OUT_OF_MEMORY_ADVICE = {
    "distill": "--real-chunk 16 matches the real images in smaller pieces (the same loss, to float rounding; it "
               "also goes with --resume), or lower --batch-real, --ipc or --image-size",
    "evaluate": "--batched no trains one network at a time (on a CPU it already does), or lower --image-size",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would answer with the top-level usage, which lists no command's options: say it in the
        # command's words, with its usage and the nearest option it has.
        command = parser.command_parsers.get(args.command, parser)
        names = {o.lstrip("-"): o for o in getattr(command, "_option_string_actions", {}) if o.startswith("--")}
        typed = unknown[0].split("=")[0]
        near = difflib.get_close_matches(typed.lstrip("-"), names, n=1) if typed.startswith("--") else []
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {names[near[0]]}?)" if near else "")
                      + (f"; see atomdistill {args.command} --help" if args.command else ""))
    from .runtime import tune_cpu_allocator
    tune_cpu_allocator()
    if args.command is None:
        # No command is a usage error (exit 2, as argparse and click give), so a script that forgot it stops.
        parser.print_help(sys.stderr)
        return 2
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()   # here, so that a reader gone away is met below, not at interpreter exit
    except BrokenPipeError:
        # The reader of the output went away (`atomdistill report ... | head`): stop quietly, as cat does,
        # with the status of a process that SIGPIPE ended. Files the command wrote are complete.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit-time flush goes nowhere
        return 141
    except AtomDistillError as e:
        # An error the whole torchrun group agreed on is said once, by rank 0, not once per process.
        if not getattr(e, "every_rank", False) or os.environ.get("RANK", "0") == "0":
            print(f"atomdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        # A size the machine cannot hold (e.g. --image-size 100000) is a user error, not a bug: one line.
        print(f"atomdistill {args.command}: error: out of memory ({out_of_memory_message(e)}); "
              + OUT_OF_MEMORY_ADVICE.get(args.command, "run where there is more memory"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\natomdistill {args.command}: interrupted"
              + ("; continue with --resume RUN_DIR" if args.command == "distill" else
                 "; run the same command again to continue" if args.command in ("nas", "evaluate") else ""),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
