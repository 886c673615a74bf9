"""Coreset baselines: real training images selected per class, written as SyntheticSets.

A selected set is evaluated exactly like a distilled one (same SyntheticSet, same protocol), so
tables compare distillation against the usual selection baselines of the DC/DM benchmarks:

- random:  ``ipc`` images per class, uniformly without replacement. The permutation uses the same
  generator as the distillation loop's real initialisation (``distill.initial_images`` with
  ``init='real'``), so for one seed the random baseline *is* the set a distillation run starts from:
  the gain of distillation over it is the gain of the optimisation alone.
- herding (Welling 2009; as in the DC benchmark code): per class, greedily add the image that keeps
  the running mean of the selected embeddings closest to the class-mean embedding.
- kcenter (greedy k-center, Sener & Savarese 2018): per class, start from the image closest to the
  class mean, then repeatedly add the image farthest from the selected set.

Embeddings for herding/kcenter: 'trained' (default, the literature's choice) is the final embedding
``model.features(x)[1]`` of a ConvNet trained on the whole training set; 'random' uses a randomly
initialised ConvNet; 'pixels' the flattened normalised pixels.

Selection always works on the normalised, *unwhitened* images (the embedding network is trained on
them too); with ZCA on, only the stored images are whitened afterwards, so the set lives in the same
space as a distilled set with ZCA and is evaluated the same way.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import ImageDataset, as_dataset, check_ipc, zca_by_default
from .errors import ConfigError, check_integer
from .io import atomic_path, hash_json
from .models import build_model
from .rng import Stream, generator, seeded
from .runtime import resolve_device
from .synset import SyntheticSet
from .zca import ZCA

BASELINES = ("random", "herding", "kcenter")
EMBEDDINGS = ("trained", "random", "pixels")

EMBED_LR, EMBED_MOMENTUM, EMBED_WD, EMBED_BATCH = 0.01, 0.9, 5e-4, 256
EMBED_CHUNK = 1024   # images per forward when embedding: bounds memory, not the result


def select_coreset(dataset: ImageDataset | str, ipc: int, method: str = "random", *, seed: int = 0,
                   embedding: str = "trained", embed_epochs: int = 2, device: str | torch.device = "auto",
                   zca: bool | None = None, cache_dir: str | os.PathLike | None = None) -> SyntheticSet:
    """Select ``ipc`` real training images per class with ``method`` and return them as a SyntheticSet.

    ``zca=None`` whitens for CIFAR-10/100 (as distillation does); the ZCA is fitted on the training
    images and stored with the set. ``set.info['indices']`` holds the selected train indices.
    ``cache_dir``: keep the embeddings there, keyed by (data, embedding, seed, epochs), so herding
    and k-center at several IPCs train the embedding network once. ``dataset`` may be a dataset's
    name (loaded from ./data).
    """
    dataset = as_dataset(dataset, "select_coreset")
    if method not in BASELINES:
        raise ConfigError(f"unknown baseline {method!r}; use one of {', '.join(BASELINES)}")
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"unknown embedding {embedding!r}; use one of {', '.join(EMBEDDINGS)}")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"ipc must be a positive integer, got {ipc!r}; pass e.g. --ipc 10")
    if isinstance(embed_epochs, bool) or not isinstance(embed_epochs, int) or embed_epochs < 1:
        raise ConfigError(f"embed_epochs must be a positive integer, got {embed_epochs!r}")
    check_integer("seed", seed, 0)
    class_indices = dataset.class_indices()
    check_ipc(dataset, ipc)
    dev = resolve_device(device)
    use_zca = zca if zca is not None else zca_by_default(dataset.name)
    net_name = _embedding_net_name(dataset.image_size)

    if method == "random":
        used_embedding = None   # random selection looks at no embedding
        ids = dataset.classes if dataset.classes is not None else range(dataset.num_classes)
        picks = [cls_idx.cpu()[torch.randperm(len(cls_idx), generator=generator(seed, Stream.INIT, gid))[:ipc]]
                 for cls_idx, gid in zip(class_indices, ids)]
        indices = torch.stack(picks)                                        # [K, ipc]
    else:
        used_embedding = embedding
        emb = cached_embeddings(dataset, embedding, seed=seed, epochs=embed_epochs, device=dev, cache_dir=cache_dir)
        padded, valid, idx_pad = _pad_by_class(emb, class_indices)
        pos = herding(padded, ipc, valid) if method == "herding" else kcenter(padded, ipc, valid)
        indices = torch.gather(idx_pad, 1, pos.cpu())                       # [K, ipc]

    indices = indices.reshape(-1)
    images = dataset.train_images[indices.to(dataset.train_images.device)].detach().float().cpu().clone()
    labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    fitted = None
    if use_zca:
        fitted = ZCA.fit(dataset.train_images.cpu())
        images = fitted(images)
    config = {"dataset": dataset.name, "ipc": ipc, "method": method, "seed": seed, "embedding": embedding,
              "embed_epochs": embed_epochs, "zca": bool(use_zca), "device": str(device),
              "embed_net": net_name if used_embedding in ("trained", "random") else None}
    info = {"embedding": used_embedding, "indices": indices.tolist()}
    if used_embedding in ("trained", "random"):
        info["embed_net"] = net_name
    if used_embedding == "trained":
        info["embed_epochs"] = embed_epochs
    return SyntheticSet(images=images, labels=labels, class_names=list(dataset.class_names),
                        mean=tuple(dataset.mean), std=tuple(dataset.std), zca=fitted, dataset=dataset.name,
                        method=method, config=config, info=info)


# ---- embeddings ---------------------------------------------------------------------------
def _embedding_net_name(image_size: int) -> str:
    return "convnet-d4" if image_size >= 64 else "convnet"   # as distillation picks its network


def cached_embeddings(dataset: ImageDataset, embedding: str, *, seed: int, epochs: int, device: torch.device,
                      cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """compute_embeddings, read from / written to ``cache_dir`` when one is given."""
    if cache_dir is None or embedding == "pixels":
        return compute_embeddings(dataset, embedding, seed=seed, epochs=epochs, device=device)
    key = {"data": dataset.identity(), "embedding": embedding, "net": _embedding_net_name(dataset.image_size),
           "seed": seed, "epochs": epochs if embedding == "trained" else 0,
           "streams": [int(Stream.EMBED_NET), int(Stream.EMBED_SHUFFLE)]}   # embeddings drawn from other streams differ
    path = Path(cache_dir) / f"{dataset.name.replace(':', '_').replace('/', '_')}-{embedding}-{hash_json(key)}.safetensors"
    if path.exists():
        return load_file(str(path))["embeddings"].to(device)
    emb = compute_embeddings(dataset, embedding, seed=seed, epochs=epochs, device=device)
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb.detach().float().cpu().contiguous()}, str(tmp))
    return emb


def compute_embeddings(dataset: ImageDataset, embedding: str = "trained", *, seed: int = 0, epochs: int = 2,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """[N, D] float32 embeddings of the (unwhitened) training images, on ``device``."""
    dev = resolve_device(device)
    if embedding == "pixels":
        return dataset.train_images.reshape(len(dataset.train_images), -1).float().to(dev)
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"unknown embedding {embedding!r}; use one of {', '.join(EMBEDDINGS)}")
    with seeded(seed, Stream.EMBED_NET):   # seeded init without touching the global stream
        net = build_model(_embedding_net_name(dataset.image_size), dataset.channels, dataset.num_classes,
                          dataset.image_size)
    net = net.to(dev)
    if embedding == "trained":
        _train(net, dataset, epochs, seed, dev)
    net.eval()
    out = []
    with torch.no_grad():
        for chunk in dataset.train_images.split(EMBED_CHUNK):
            out.append(net.features(chunk.to(dev).float())[1].float())
    return torch.cat(out)


def _train(net: torch.nn.Module, dataset: ImageDataset, epochs: int, seed: int, device: torch.device) -> None:
    """Plain supervised training on the whole training set (no augmentation), seeded shuffling."""
    opt = torch.optim.SGD(net.parameters(), lr=EMBED_LR, momentum=EMBED_MOMENTUM, weight_decay=EMBED_WD)
    x_all, y_all = dataset.train_images, dataset.train_labels
    n = len(y_all)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator(seed, Stream.EMBED_SHUFFLE, epoch))
        for batch in order.split(EMBED_BATCH):
            b = batch.to(x_all.device)
            x, y = x_all[b].to(device).float(), y_all[b].to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


# ---- greedy selection (all classes at once) -------------------------------------------------
def _pad_by_class(emb: torch.Tensor, class_indices: list[torch.Tensor]):
    """Stack per-class embeddings into [K, n_max, D] (zero padding), a validity mask [K, n_max]
    and the train index of every slot [K, n_max] (-1 for padding), without a loop over classes."""
    dev = emb.device
    counts = torch.tensor([len(i) for i in class_indices], dtype=torch.long)
    k, n_max = len(class_indices), int(counts.max())
    order = torch.cat([i.cpu() for i in class_indices])
    cls = torch.arange(k).repeat_interleave(counts)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(order)) - offsets[cls]
    idx_pad = torch.full((k, n_max), -1, dtype=torch.long)
    idx_pad[cls, pos] = order
    valid = idx_pad >= 0
    padded = emb.new_zeros(k, n_max, emb.shape[1])
    padded[cls.to(dev), pos.to(dev)] = emb[order.to(dev)]
    return padded, valid.to(dev), idx_pad


def _dist_to(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every point [K, n, D] to its class's centre [K, D] -> [K, n].

    The direct (difference) form, not |a|^2 - 2ab + |b|^2, so near-ties are not decided by
    cancellation error."""
    return torch.cdist(points, centres.unsqueeze(1), compute_mode="donot_use_mm_for_euclid_dist").squeeze(-1)


def _batched(emb: torch.Tensor, valid: torch.Tensor | None):
    single = emb.dim() == 2
    if single:
        emb = emb.unsqueeze(0)
        valid = None if valid is None else valid.unsqueeze(0)
    if valid is None:
        valid = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return emb, valid.to(emb.device), single


def _class_means(emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.to(emb.dtype)
    return torch.einsum("kn,knd->kd", w, emb) / w.sum(1, keepdim=True)


def herding(emb: torch.Tensor, ipc: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Herding positions: ``emb`` [n, D] -> [ipc], or [K, n, D] (+ mask [K, n]) -> [K, ipc].

    Step t picks argmin_e || mu - (s + e) / t || = argmin_e || t*mu - s - e || (s: sum so far)."""
    emb, valid, single = _batched(emb, valid)
    k = emb.shape[0]
    rows = torch.arange(k, device=emb.device)
    mu = _class_means(emb, valid)
    total = torch.zeros_like(mu)
    avail = valid.clone()
    picks = []
    for t in range(1, ipc + 1):
        d = _dist_to(emb, t * mu - total).masked_fill(~avail, math.inf)
        j = d.argmin(1)
        picks.append(j)
        avail[rows, j] = False
        total = total + emb[rows, j]
    out = torch.stack(picks, 1)
    return out[0] if single else out


def kcenter(emb: torch.Tensor, ipc: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-center positions, seeded with the point closest to the class mean; shapes as herding."""
    emb, valid, single = _batched(emb, valid)
    k = emb.shape[0]
    rows = torch.arange(k, device=emb.device)
    mu = _class_means(emb, valid)
    j = _dist_to(emb, mu).masked_fill(~valid, math.inf).argmin(1)
    picks = [j]
    # -inf marks padding and selected points: never the farthest, and min() keeps them there.
    min_d = _dist_to(emb, emb[rows, j]).masked_fill(~valid, -math.inf)
    min_d[rows, j] = -math.inf
    for _ in range(1, ipc):
        j = min_d.argmax(1)
        picks.append(j)
        min_d = torch.minimum(min_d, _dist_to(emb, emb[rows, j]))
        min_d[rows, j] = -math.inf
    out = torch.stack(picks, 1)
    return out[0] if single else out
