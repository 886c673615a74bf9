"""How much each loss term moves the synthetic images: gradient norms per term.

    python bench/term_gradients.py --data-root DIR                       # CIFAR-10, P1 settings, IPC 1 and 10
    python bench/term_gradients.py --data-root DIR --set results/cifar10-cpu/atom-ipc10

The step of the image optimiser is lr x gradient, so a term whose weighted gradient is small next
to another's hardly steers the images, whatever its share of the loss value. For each preset
term (spatial, channel, mmd) with its weight and scale, this measures, over `--networks` fresh
random networks (the same networks, real batches and DSA draws as distillation iterations
0..n-1), the norm of d(scale * w * term)/d(images), its share of the summed norms, and the
cosine between the attention terms' gradients and the MMD gradient. At the real init
(default) or at a finished set (`--set`).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from atomdistill.data import load_dataset
from atomdistill.distill import DistillConfig, Distiller, initial_images
from atomdistill.evaluate import cpu_name
from atomdistill.loss import PRESETS
from atomdistill.runtime import tune_cpu_allocator
from atomdistill.synset import SyntheticSet

# One term at a time, with the weight it has in the `atom` preset (the others set to 0); the
# preset's scale applies to all (datadam and dm use the same weight x scale per term: 100, 100, 1).
ATOM = PRESETS["atom"]


def one_term_weights(channel: float) -> dict[str, dict[str, float]]:
    weights = {"spatial": ATOM.spatial, "channel": channel, "mmd": ATOM.mmd}
    return {t: {o: (weights[o] if o == t else 0.0) for o in weights} for t in weights}


def term_gradients(data, ipc: int, batch_real: int, networks: int, images: torch.Tensor | None = None,
                   seed: int = 0, device: str = "cpu", zca: bool = False,
                   channel: float = ATOM.channel) -> dict[str, list[torch.Tensor]]:
    terms = one_term_weights(channel)
    grads: dict[str, list[torch.Tensor]] = {t: [] for t in terms}
    for term, weights in terms.items():
        cfg = DistillConfig(dataset=data.name, ipc=ipc, method="atom", batch_real=batch_real, seed=seed,
                            device=device, zca=zca, iterations=networks, **weights)
        d = Distiller(cfg, data=data, progress=False)
        start = images if images is not None else initial_images(d.train_images, d.cpu_class_indices,
                                                                 d.global_ids, ipc, "real", seed)
        syn = start.to(d.device).clone().requires_grad_(True)
        for it in range(networks):
            loss, _ = d.step_loss(syn, it)
            grads[term].append(torch.autograd.grad(loss, syn)[0].flatten())
    return grads


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default="data")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--set", default=None, help="a synthetic set or run folder to measure at (instead of the init)")
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--networks", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channel", type=float, default=ATOM.channel, help=f"w_c (default the atom preset's, {ATOM.channel:g})")
    args = p.parse_args()
    tune_cpu_allocator()

    data = load_dataset(args.dataset, args.data_root)
    print(f"{args.dataset}, batch_real {args.batch_real}, {args.networks} random ConvNets; {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| at | IPC | term | weight x scale | grad norm (mean) | share of summed norms | cos with mmd grad |")
    print("|---|---|---|---|---|---|---|")
    cases = []
    if args.set:
        synset = SyntheticSet.load(args.set)
        if synset.zca is not None:
            raise SystemExit("sets distilled with ZCA are not supported here; use a --no-zca run")
        cases.append((args.set, synset.ipc, synset.images))
    else:
        cases += [("real init", ipc, None) for ipc in args.ipc]
    for at, ipc, images in cases:
        grads = term_gradients(data, ipc, args.batch_real, args.networks, images, device=args.device,
                               channel=args.channel)
        norms = {t: [g.norm().item() for g in gs] for t, gs in grads.items()}
        total = sum(statistics.mean(v) for v in norms.values())
        for t, v in norms.items():
            cos = statistics.mean(torch.nn.functional.cosine_similarity(g, m, dim=0).item()
                                  for g, m in zip(grads[t], grads["mmd"]))
            w = ATOM.scale * one_term_weights(args.channel)[t][t]
            print(f"| {at} | {ipc} | {t} | {w:g} | {statistics.mean(v):.4g} ± {statistics.stdev(v):.2g} | "
                  f"{statistics.mean(v) / total:.0%} | {cos:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
