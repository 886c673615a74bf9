"""A pool of matching networks that learn as the distillation goes (`--nets pool`).

IDM's "enriched model sampling" (Zhao et al., CVPR 2023): instead of only fresh random networks
(`--nets random`, the default), the matching network of an iteration is drawn from a pool of
networks trained on real data in small steps, so the matching also sees features of networks
that have learned something. Here:

- births: at iterations 0, R, 2R, ... (R = `pool_refresh`) a network joins the pool, initialised
  as the random network of that iteration (`random_network`); once the pool holds K
  (`pool_size`) networks, the oldest leaves when a new one joins;
- use: at iteration t one member, uniform from the generator of (seed, t), is the matching network;
- training: after the synthetic images' step, that member takes `pool_steps` SGD steps on real
  training images of all classes (batch 256, cross-entropy, lr 0.01, momentum 0.9, weight decay
  5e-4, no augmentation: IDM's settings), batch s of iteration t drawn from (seed, t, s).

IDM (official code, CIFAR-10) pushes a network every 30 iterations (5 at IPC 1), keeps up to
100, and trains two random members 10 steps each per iteration; the defaults here are its
100 / 10 / 30, and the member trained is the one just used (the issue's "trained a little
further when it is used"), half IDM's training per iteration.

Determinism: every draw comes from (seed, iteration[, step]), and the pool's whole state (each
member's weights, buffers, momentum and birth iteration) goes into the checkpoint, so a resumed
run equals an uninterrupted one bit for bit. The members train on every class's real images, so a
class-sharded run (torchrun, 2+ processes) could not reproduce one process: it is refused there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import build_model
from .rng import Stream, generator, seeded

# IDM's network training: batch (trained_bs), SGD with its --net_decay settings.
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 256, 0.01, 0.9, 5e-4


@dataclass
class _Member:
    birth: int
    net: torch.nn.Module
    momentum: list[torch.Tensor]   # one SGD momentum buffer per parameter, in parameters() order


def random_network(cfg, channels: int, num_classes: int, iteration: int,
                   device: torch.device) -> torch.nn.Module:
    """The fresh, frozen network of one iteration, identical in every process (`cfg`: the run's
    resolved DistillConfig; this module does not import the loop's, which imports it)."""
    with seeded(cfg.seed, Stream.NET, iteration):
        net = build_model(cfg.net, channels, num_classes, cfg.image_size)
    return net.to(device).requires_grad_(False)


class NetworkPool:
    """The pool of one run: `network(t)` gives iteration t's matching network, `train(t)` trains it."""

    def __init__(self, config, channels: int, num_classes: int, train_images: torch.Tensor,
                 train_labels: torch.Tensor, device: torch.device):
        self.config, self.channels, self.num_classes, self.device = config, channels, num_classes, device
        self.train_images, self.train_labels = train_images, train_labels.to(device)
        self.members: list[_Member] = []   # oldest first
        self._current: _Member | None = None

    # ---- use ----------------------------------------------------------------------------------
    def network(self, iteration: int) -> torch.nn.Module:
        """The member that matches at `iteration` (the pool first takes in the births due by then)."""
        self._grow(iteration)
        g = generator(self.config.seed, Stream.POOL_PICK, iteration)
        pick = int(torch.randint(len(self.members), (1,), generator=g))
        self._current = self.members[pick]
        return self._current.net

    def train(self, iteration: int) -> None:
        """`pool_steps` SGD steps on real data for the member `network(iteration)` returned."""
        member, cfg = self._current, self.config
        if member is None or cfg.pool_steps == 0:
            return
        params = list(member.net.parameters())
        member.net.requires_grad_(True)
        try:
            for step in range(cfg.pool_steps):
                g = generator(cfg.seed, Stream.POOL_BATCH, iteration, step)
                idx = torch.randperm(len(self.train_labels), generator=g)[:BATCH].to(self.device)
                loss = F.cross_entropy(member.net(self.train_images[idx]), self.train_labels[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():   # torch.optim.SGD (no dampening, no Nesterov), written out
                    for p, g, buf in zip(params, grads, member.momentum):
                        buf.mul_(MOMENTUM).add_(g.add(p, alpha=WEIGHT_DECAY))
                        p.add_(buf, alpha=-LR)
        finally:
            member.net.requires_grad_(False)

    def _grow(self, iteration: int) -> None:
        refresh, size = self.config.pool_refresh, self.config.pool_size
        last = self.members[-1].birth if self.members else -refresh
        due = list(range(last + refresh, iteration + 1, refresh))[-size:]   # only the last K can stay
        for birth in due:
            self.members.append(self._born(birth))
        del self.members[:max(0, len(self.members) - size)]

    def _born(self, birth: int) -> _Member:
        net = random_network(self.config, self.channels, self.num_classes, birth, self.device)
        return _Member(birth, net, [torch.zeros_like(p) for p in net.parameters()])

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the pool will need to continue identically, as named CPU tensors."""
        out = {"births": torch.tensor([m.birth for m in self.members], dtype=torch.long)}
        for i, m in enumerate(self.members):
            out.update({f"{i}.net.{k}": v.detach().cpu().clone() for k, v in m.net.state_dict().items()})
            out.update({f"{i}.momentum.{name}": buf.cpu().clone()
                        for (name, _), buf in zip(m.net.named_parameters(), m.momentum)})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.members, self._current = [], None
        for i, birth in enumerate(tensors["births"].tolist()):
            member = self._born(int(birth))
            prefix = f"{i}.net."
            member.net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            member.momentum = [tensors[f"{i}.momentum.{name}"].to(self.device).clone()
                               for name, _ in member.net.named_parameters()]
            self.members.append(member)
