"""Model registry: ConvNet (and its NAS variants), AlexNet, VGG-11 and ResNet-18, timm-style.

Layouts follow the DC/DM reference code (VICO-UoE/DatasetCondensation, ``utils.py`` /
``networks.py``); PyTorch default initialisation, as there.

Every model exposes the same interface, which the matching loss relies on:

* ``forward(x) -> logits [B, num_classes]``
* ``features(x) -> (acts, embedding)``: ``acts`` are the activations of blocks 1..L-1
  (after the block's activation function, before its pooling), ``embedding`` is the flattened
  output of the last block ``[B, embed_dim]``; ``forward(x) == classifier(features(x)[1])``.
* ``embed_dim`` (int) and ``classifier`` (the linear head).

Use ``build_model(name, channels, num_classes, image_size, **overrides)``; ``list_models()``
lists the names and ``model_info(name)`` the defaults each name builds with.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atomdistill.errors import ConfigError, did_you_mean

__all__ = [
    "register_model",
    "build_model",
    "list_models",
    "model_info",
    "ConvNet",
    "AlexNet",
    "VGG11",
    "ResNet18",
]

# The three arguments every builder takes positionally; they are not overridable options.
_POSITIONAL = ("channels", "num_classes", "image_size")

# Aliases accepted for option values, so DC-style names ('instancenorm', 'avgpooling') work too.
_NORM_ALIASES = {
    "instance": "instance", "instancenorm": "instance",
    "batch": "batch", "batchnorm": "batch", "bn": "batch",
    "layer": "layer", "layernorm": "layer",
    "group": "group", "groupnorm": "group",
    "none": "none",
}
_ACT_ALIASES = {
    "relu": "relu",
    "sigmoid": "sigmoid",
    "leakyrelu": "leakyrelu", "leaky_relu": "leakyrelu", "lrelu": "leakyrelu",
}
_POOL_ALIASES = {
    "avg": "avg", "avgpooling": "avg", "avgpool": "avg",
    "max": "max", "maxpooling": "max", "maxpool": "max",
    "none": "none",
}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

class _Entry:
    """A registered name: its builder and the full set of option defaults it builds with."""

    __slots__ = ("builder", "defaults", "options")

    def __init__(self, builder: Callable[..., nn.Module], defaults: dict[str, Any],
                 options: tuple[str, ...]) -> None:
        self.builder = builder
        self.defaults = defaults
        self.options = options


_REGISTRY: dict[str, _Entry] = {}


def _builder_options(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """Keyword options of a builder (everything after channels/num_classes/image_size)."""
    sig = inspect.signature(builder)
    names = list(sig.parameters)
    if tuple(names[:3]) != _POSITIONAL:
        raise TypeError(f"model builder {builder!r} must take {_POSITIONAL} as its first arguments")
    return {n: p.default for n, p in sig.parameters.items() if n not in _POSITIONAL}


def register_model(name: str, **defaults: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` with option ``defaults``; use as a decorator or call.

    ``@register_model('convnet')`` on a class/function, or ``register_model('convnet-bn',
    norm='batch')(ConvNet)`` to add a preset of an existing builder. Returns the builder.
    """
    key = name.strip().lower()

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in _REGISTRY:
            raise ValueError(f"model name {key!r} is already registered")
        options = _builder_options(builder)
        unknown = sorted(set(defaults) - set(options))
        if unknown:
            raise ValueError(f"{key!r}: {builder.__name__} has no option(s) {unknown}")
        full = {**options, **defaults}
        missing = [k for k, v in full.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"{key!r}: option(s) {missing} have no default")
        _REGISTRY[key] = _Entry(builder, full, tuple(options))
        return builder

    return decorator


def _entry(name: str) -> _Entry:
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {name!r}{did_you_mean(key, list_models())}; "
                          f"choose one of: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> dict[str, Any]:
    """The option defaults ``name`` builds with (a copy; e.g. ``{'width': 128, 'depth': 3, ...}``)."""
    return dict(_entry(name).defaults)


def build_model(name: str, channels: int, num_classes: int, image_size: int,
                device: torch.device | str | None = None, **overrides: Any) -> nn.Module:
    """Build a fresh (randomly initialised) model by registered name, with option overrides.

    ``device``: where to allocate and initialise the parameters. Building directly on the GPU
    skips the CPU random-number generation (which dominates construction time: ~1 ms per
    128x128 conv) and the host-to-device copy.
    """
    entry = _entry(name)
    bad = sorted(set(overrides) - set(entry.options))
    if bad:
        opts = ", ".join(entry.options) if entry.options else "none"
        raise ConfigError(
            f"Model {name!r} has no option(s) {', '.join(bad)}; valid options: {opts}."
        )
    _check_int("channels", channels)
    _check_int("num_classes", num_classes)
    _check_int("image_size", image_size)
    kwargs = {**entry.defaults, **overrides}
    if device is None:
        return entry.builder(channels, num_classes, image_size, **kwargs)
    with torch.device(device):  # factory functions (incl. default init) allocate there
        return entry.builder(channels, num_classes, image_size, **kwargs)


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------

def _check_int(what: str, value: Any, minimum: int = 1) -> int:
    # bool is an int subclass; 'depth=True' is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}; got {value!r}.")
    return value


def _choice(what: str, value: Any, aliases: dict[str, str], allowed: tuple[str, ...]) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    canon = aliases.get(key) if isinstance(key, str) else None
    if canon is None or canon not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}; got {value!r}.")
    return canon


def _norm(kind: str, c: int, h: int, w: int) -> nn.Module | None:
    """Normalisation layer as in DC's ``_get_normlayer`` (None for 'none')."""
    if kind == "instance":
        return nn.GroupNorm(c, c, affine=True)  # one group per channel = instance norm with affine
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "layer":
        return nn.LayerNorm([c, h, w], elementwise_affine=True)  # over [C,H,W], as DC
    if kind == "group":
        return nn.GroupNorm(4, c, affine=True)
    return None


def _act(kind: str, inplace: bool = False) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=inplace)
    if kind == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01, inplace=inplace)


def _conv_block(c_in: int, c_out: int, size: int, *, kernel: int = 3, padding: int = 1, norm: str = "none",
                act: str = "relu", pool: str = "none") -> tuple["_Block", int]:
    """conv -> norm -> act (the block's reported activation), then optional 2x2 pooling.
    Returns the block and the spatial size after it."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=padding)]
    n = _norm(norm, c_out, size, size)
    if n is not None:
        layers.append(n)
    # In place: the activation overwrites the conv/norm output, which no backward needs (conv and
    # norm backward read their inputs), so a block holds one activation-sized tensor, not two.
    layers.append(_act(act, inplace=True))
    post = None
    if pool != "none":
        post = Pool2x2(pool)
        size //= 2
    return _Block(nn.Sequential(*layers), post), size


class Pool2x2(nn.Module):
    """2x2, stride 2 average or max pooling; the same values as nn.AvgPool2d(2) / nn.MaxPool2d(2).

    Written as two reductions over adjacent pairs (rows, then columns) of the contiguous NCHW
    tensor: in torch 2.14 on CPU this runs about 7x faster than the pooling kernels, which showed
    up as a fifth of a distillation iteration. Odd sizes fall back to the library kernels."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if h % 2 or w % 2 or not x.is_contiguous():
            return F.avg_pool2d(x, 2) if self.mode == "avg" else F.max_pool2d(x, 2)
        rows = x.reshape(b, c, h // 2, 2 * w)
        top, bottom = rows[..., :w], rows[..., w:]
        pairs = (top + bottom if self.mode == "avg" else torch.maximum(top, bottom)).reshape(b, c, h // 2, w // 2, 2)
        left, right = pairs[..., 0], pairs[..., 1]
        return (left + right) * 0.25 if self.mode == "avg" else torch.maximum(left, right)

    def extra_repr(self) -> str:
        return self.mode


class _Block(nn.Module):
    """One feature block: ``body`` gives the activation features() reports; ``post`` (a pooling
    or None) follows it before the next block."""

    def __init__(self, body: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.post = post


class _FeatureNet(nn.Module):
    """Base: a stack of ``_Block`` s, then flatten, then ``classifier``.

    forward and features share ``_run`` so logits are by construction ``classifier`` applied to
    the embedding, and collecting the activations costs only list appends.
    """

    blocks: nn.ModuleList
    classifier: nn.Linear
    embed_dim: int

    def _run(self, x: Tensor, collect: bool) -> tuple[list[Tensor], Tensor]:
        acts: list[Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.body(x)
            if collect and i < last:
                acts.append(x)
            if block.post is not None:
                x = block.post(x)
        return acts, x.flatten(1)

    def features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(activations of blocks 1..L-1 before pooling, embedding [B, embed_dim])."""
        return self._run(x, True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self._run(x, False)[1])

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks; features() returns L-1 intermediate activations."""
        return len(self.blocks)


# --------------------------------------------------------------------------------------------
# ConvNet
# --------------------------------------------------------------------------------------------

class ConvNet(_FeatureNet):
    """DC ConvNet: ``depth`` x [conv3x3(pad 1) -> norm -> act -> pool(2)], flatten, linear.

    Unlike DC we use padding 1 also for 1-channel input (DC pads 3 to lift 28px MNIST to 32).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128,
                 depth: int = 3, norm: str = "instance", act: str = "relu",
                 pool: str = "avg") -> None:
        super().__init__()
        _check_int("ConvNet width", width)
        _check_int("ConvNet depth", depth)
        norm = _choice("ConvNet norm", norm, _NORM_ALIASES, ("instance", "batch", "layer", "group", "none"))
        act = _choice("ConvNet act", act, _ACT_ALIASES, ("relu", "sigmoid", "leakyrelu"))
        pool = _choice("ConvNet pool", pool, _POOL_ALIASES, ("avg", "max", "none"))
        if norm == "group" and width % 4:
            raise ConfigError(f"ConvNet norm 'group' uses 4 groups, so width must be a multiple of 4; got {width}.")
        if pool != "none" and image_size >> depth < 1:
            fits = image_size.bit_length() - 1   # the deepest ConvNet whose pooling these images survive
            raise ConfigError(
                f"ConvNet depth {depth} pools {image_size}px images below 1 pixel; use images of at least "
                f"{1 << depth}px" + (f", depth <= {fits} (model convnet-d{fits})" if fits else "")
                + " or pool='none' (model convnet-nopool)."
            )

        size, c_in, blocks = image_size, channels, []
        for _ in range(depth):
            block, size = _conv_block(c_in, width, size, norm=norm, act=act, pool=pool)
            blocks.append(block)
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = width * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)


register_model("convnet")(ConvNet)
for _d in (1, 2, 3, 4, 5):  # d5 needs image_size >= 32 (pools 32 -> 1)
    register_model(f"convnet-d{_d}", depth=_d)(ConvNet)
for _w in (32, 64, 256):
    register_model(f"convnet-w{_w}", width=_w)(ConvNet)
register_model("convnet-bn", norm="batch")(ConvNet)
register_model("convnet-ln", norm="layer")(ConvNet)
register_model("convnet-gn", norm="group")(ConvNet)
register_model("convnet-in", norm="instance")(ConvNet)
register_model("convnet-nn", norm="none")(ConvNet)
register_model("convnet-max", pool="max")(ConvNet)
register_model("convnet-avg", pool="avg")(ConvNet)
register_model("convnet-nopool", pool="none")(ConvNet)
register_model("convnet-sigmoid", act="sigmoid")(ConvNet)
register_model("convnet-leakyrelu", act="leakyrelu")(ConvNet)


# --------------------------------------------------------------------------------------------
# AlexNet
# --------------------------------------------------------------------------------------------

class AlexNet(_FeatureNet):
    """DC AlexNet (``norm='batch'``: AlexNetBN, BatchNorm after each conv, before ReLU).

    conv5x5 128 (pad 2) -> ReLU -> maxpool2 -> conv5x5 192 (pad 2) -> ReLU -> maxpool2 ->
    conv3x3 256 -> ReLU -> conv3x3 192 -> ReLU -> conv3x3 192 -> ReLU -> maxpool2 -> linear.
    Each conv(+norm)+ReLU is a block (L = 5). DC pads the first conv by 4 for 1-channel 28px
    input; we always pad 2. Embedding: 192 * (image_size/8)^2 (3072 at 32px).
    """

    _LAYOUT = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False),
               (192, 3, 1, False), (192, 3, 1, True))  # (out channels, kernel, padding, pool after)

    def __init__(self, channels: int, num_classes: int, image_size: int,
                 norm: str = "none") -> None:
        super().__init__()
        norm = _choice("AlexNet norm", norm, _NORM_ALIASES, ("none", "batch"))
        if image_size < 8:
            raise ConfigError(f"AlexNet pools three times and needs image_size >= 8; got {image_size}.")
        size, c_in, blocks = image_size, channels, []
        for c_out, k, pad, pool in self._LAYOUT:
            block, size = _conv_block(c_in, c_out, size, kernel=k, padding=pad, norm=norm,
                                      pool="max" if pool else "none")
            blocks.append(block)
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = c_in * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)


register_model("alexnet")(AlexNet)
register_model("alexnet-bn", norm="batch")(AlexNet)


# --------------------------------------------------------------------------------------------
# VGG-11
# --------------------------------------------------------------------------------------------

class VGG11(_FeatureNet):
    """DC VGG-11: 64,M,128,M,256,256,M,512,512,M,512,512,M; conv3x3 -> norm -> ReLU, maxpool M.

    Default norm is instance (GroupNorm(C, C)), as DC's VGG11; ``norm='batch'`` is VGG11BN.
    Each conv+norm+ReLU is a block (L = 8). At 32px the five pools end at 1x1 (embedding 512,
    as DC); at 64px the embedding is 512*2*2. For images smaller than 32px, the trailing pools
    that would go below 1x1 are skipped (8px: the last two, 16px: the last one).
    """

    _CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels: int, num_classes: int, image_size: int,
                 norm: str = "instance") -> None:
        super().__init__()
        norm = _choice("VGG11 norm", norm, _NORM_ALIASES, ("instance", "batch", "none"))
        size, c_in, blocks = image_size, channels, []
        cfg = self._CFG
        for i, v in enumerate(cfg):
            if v == "M":
                continue
            c_out = int(v)
            pool = "max" if i + 1 < len(cfg) and cfg[i + 1] == "M" and size >= 2 else "none"
            block, size = _conv_block(c_in, c_out, size, norm=norm, pool=pool)
            blocks.append(block)
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = c_in * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)


register_model("vgg11")(VGG11)
register_model("vgg11-bn", norm="batch")(VGG11)


# --------------------------------------------------------------------------------------------
# ResNet-18
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """DC/CIFAR ResNet basic block: conv3x3-norm-ReLU-conv3x3-norm + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(norm, c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          _norm2d(norm, c_out))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


def _norm2d(kind: str, c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True) if kind == "instance" else nn.BatchNorm2d(c)


class ResNet18(_FeatureNet):
    """CIFAR-style ResNet-18 (DC): 3x3 stem 64 (stride 1), no max-pool, 4 stages of 2 basic
    blocks (64/128/256/512, strides 1,2,2,2), global average pool -> 512, linear.

    Default norm is instance (GroupNorm(C, C)) as DC's ResNet18; ``norm='batch'`` is ResNet18BN.
    Blocks for features(): stem, stage1..stage4 (L = 5). DC uses avg_pool2d(out, 4), which is
    global only at 32px; we pool globally so the embedding is 512 at every image size.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int,
                 norm: str = "instance") -> None:
        super().__init__()
        norm = _choice("ResNet18 norm", norm, _NORM_ALIASES, ("instance", "batch"))
        stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _norm2d(norm, 64), nn.ReLU())
        blocks = [_Block(stem)]
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stage = nn.Sequential(BasicBlock(c_in, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm))
            blocks.append(_Block(stage))
            c_in = c_out
        blocks[-1].post = nn.AdaptiveAvgPool2d(1)
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = c_in
        self.classifier = nn.Linear(self.embed_dim, num_classes)


register_model("resnet18")(ResNet18)
register_model("resnet18-bn", norm="batch")(ResNet18)
