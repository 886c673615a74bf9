"""Tests for atomdistill.models: registry, shapes, features/forward consistency, NAS overrides."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from atomdistill.errors import ConfigError
from atomdistill.models import (
    _REGISTRY,
    Pool2x2,
    build_model,
    list_models,
    model_info,
    register_model,
)

B = 2  # tiny batches keep the whole file fast on 2 cores
ALL = list_models()
REQUIRED = [
    "convnet", "convnet-d1", "convnet-d2", "convnet-d3", "convnet-d4",
    "convnet-w32", "convnet-w64", "convnet-w256",
    "convnet-bn", "convnet-ln", "convnet-gn", "convnet-nn",
    "convnet-max", "convnet-nopool", "convnet-sigmoid", "convnet-leakyrelu",
    "alexnet", "alexnet-bn", "vgg11", "vgg11-bn", "resnet18", "resnet18-bn",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _check_model(model: nn.Module, channels: int, size: int, classes: int) -> None:
    """Shapes of logits/embedding/activations, and logits == classifier(embedding)."""
    x = torch.randn(B, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        acts, emb = model.features(x)
        head = model.classifier(emb)
    assert logits.shape == (B, classes)
    assert isinstance(model.embed_dim, int)
    assert emb.shape == (B, model.embed_dim)
    assert len(acts) == model.num_blocks - 1
    assert all(a.dim() == 4 and a.shape[0] == B for a in acts)
    torch.testing.assert_close(logits, head, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits).all()


def test_required_names_registered() -> None:
    missing = [n for n in REQUIRED if n not in ALL]
    assert not missing, missing
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", ALL)
def test_every_model_shapes_and_consistency(name: str, size: int) -> None:
    model = build_model(name, 3, 7, size)
    _check_model(model, 3, size, 7)


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("name", ["convnet", "convnet-bn", "convnet-ln", "alexnet", "vgg11", "resnet18-bn"])
def test_small_images_one_channel(name: str, size: int) -> None:
    model = build_model(name, 1, 10, size)
    _check_model(model, 1, size, 10)


def test_convnet_layout_matches_dc() -> None:
    model = build_model("convnet", 3, 10, 32)
    x = torch.randn(B, 3, 32, 32)
    acts, emb = model.features(x)
    assert [tuple(a.shape) for a in acts] == [(B, 128, 32, 32), (B, 128, 16, 16)]
    assert model.embed_dim == 2048 and emb.shape == (B, 2048)
    # conv3x3 -> instance norm (GroupNorm, one group per channel, affine) -> ReLU -> avgpool 2
    body = model.blocks[0].body
    assert isinstance(body[0], nn.Conv2d) and body[0].kernel_size == (3, 3) and body[0].padding == (1, 1)
    assert isinstance(body[1], nn.GroupNorm) and body[1].num_groups == 128 and body[1].affine
    assert isinstance(body[2], nn.ReLU)
    assert isinstance(model.blocks[0].post, Pool2x2) and model.blocks[0].post.mode == "avg"
    # Block activations are post-activation: ReLU output is non-negative.
    assert all((a >= 0).all() for a in acts)
    # Reference parameter count (DC ConvNet, CIFAR-10): 320,010.
    assert sum(p.numel() for p in model.parameters()) == 320_010


def test_reference_parameter_counts() -> None:
    """Counts of the standard CIFAR-10 versions of the reference architectures."""
    counts = {"alexnet": 1_872_202, "vgg11-bn": 9_231_114, "resnet18": 11_173_962, "resnet18-bn": 11_173_962}
    for name, n in counts.items():
        model = build_model(name, 3, 10, 32, device="meta")  # meta: no memory, no init cost
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_convnet_embed_dims() -> None:
    assert build_model("convnet", 3, 10, 32).embed_dim == 2048
    assert build_model("convnet-d4", 3, 10, 64).embed_dim == 2048
    assert build_model("convnet", 3, 10, 64, depth=4).embed_dim == 2048
    assert build_model("convnet-d1", 3, 10, 32).embed_dim == 128 * 16 * 16
    assert build_model("convnet-nopool", 3, 10, 8).embed_dim == 128 * 8 * 8
    assert build_model("convnet-w32", 3, 10, 32).embed_dim == 32 * 4 * 4


def test_other_embed_dims() -> None:
    assert build_model("alexnet", 3, 10, 32).embed_dim == 192 * 4 * 4
    assert build_model("alexnet", 1, 10, 8).embed_dim == 192
    assert build_model("vgg11", 3, 10, 32).embed_dim == 512
    assert build_model("vgg11", 3, 10, 64).embed_dim == 512 * 2 * 2
    assert build_model("vgg11", 1, 10, 8).embed_dim == 512
    assert build_model("resnet18", 3, 10, 64).embed_dim == 512


def test_block_counts() -> None:
    assert build_model("convnet-d4", 3, 10, 32).num_blocks == 4
    assert build_model("alexnet", 3, 10, 32).num_blocks == 5
    assert build_model("vgg11", 3, 10, 32).num_blocks == 8
    acts, _ = build_model("resnet18", 3, 10, 32).features(torch.randn(B, 3, 32, 32))
    assert [a.shape[1:] for a in acts] == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]


def test_override_build() -> None:
    model = build_model("convnet", 3, 10, 32, depth=4, width=64, norm="batch", act="sigmoid", pool="max")
    mods = list(model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in mods) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == 4
    assert sum(isinstance(m, nn.Sigmoid) for m in mods) == 4
    assert sum(isinstance(m, Pool2x2) and m.mode == "max" for m in mods) == 4
    assert not any(isinstance(m, (nn.GroupNorm, nn.ReLU)) or (isinstance(m, Pool2x2) and m.mode == "avg") for m in mods)
    assert model.embed_dim == 64 * 2 * 2
    _check_model(model, 3, 32, 10)
    # Overrides win over a preset's defaults too.
    assert build_model("convnet-bn", 3, 10, 32, norm="none").embed_dim == 2048
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model("convnet-bn", 3, 10, 32, norm="none").modules())


def test_norm_kinds() -> None:
    ln = build_model("convnet-ln", 3, 10, 32).blocks[1].body[1]
    assert isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (128, 16, 16) and ln.elementwise_affine
    gn = build_model("convnet-gn", 3, 10, 32).blocks[0].body[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    lrelu = build_model("convnet-leakyrelu", 3, 10, 32).blocks[0].body[2]
    assert isinstance(lrelu, nn.LeakyReLU) and lrelu.negative_slope == 0.01
    nn_body = build_model("convnet-nn", 3, 10, 32).blocks[0].body
    assert [type(m) for m in nn_body] == [nn.Conv2d, nn.ReLU]
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("vgg11-bn", 3, 10, 32).modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model("vgg11", 3, 10, 32).modules())
    # DC-style option names are accepted as aliases.
    m = build_model("convnet", 3, 10, 32, norm="batchnorm", pool="maxpooling")
    assert isinstance(m.blocks[0].body[1], nn.BatchNorm2d) and isinstance(m.blocks[0].post, Pool2x2) and m.blocks[0].post.mode == "max"


def test_nas_space_builds() -> None:
    """All 720 candidates of the DC/DM NAS space construct (meta device: shapes only)."""
    space = itertools.product([1, 2, 3, 4], [32, 64, 128, 256], ["sigmoid", "relu", "leakyrelu"],
                              ["none", "batch", "layer", "instance", "group"], ["none", "max", "avg"])
    n = 0
    for depth, width, act, norm, pool in space:
        m = build_model("convnet", 3, 10, 32, device="meta", depth=depth, width=width, act=act, norm=norm, pool=pool)
        side = 32 if pool == "none" else 32 >> depth
        assert m.embed_dim == width * side * side
        n += 1
    assert n == 720


def test_nas_space_forward_sample() -> None:
    for act, norm, pool in itertools.product(["sigmoid", "relu", "leakyrelu"],
                                             ["none", "batch", "layer", "instance", "group"],
                                             ["none", "max", "avg"]):
        m = build_model("convnet", 3, 5, 16, depth=2, width=32, act=act, norm=norm, pool=pool)
        _check_model(m, 3, 16, 5)


@pytest.mark.parametrize("name", ["convnet", "convnet-bn", "alexnet", "vgg11", "resnet18", "resnet18-bn"])
def test_gradient_reaches_input(name: str) -> None:
    model = build_model(name, 3, 10, 16)
    x = torch.randn(B, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    # The matching loss uses intermediate activations as well: they must reach the input too.
    x.grad = None
    acts, emb = model.features(x)
    for a in acts:
        (g,) = torch.autograd.grad(a.square().mean(), x, retain_graph=True)
        assert g.abs().sum() > 0


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="convnet") as info:
        build_model("convnett", 3, 10, 32)
    assert "resnet18" in str(info.value)
    with pytest.raises(ConfigError):
        model_info("nope")


def test_name_case_insensitive() -> None:
    assert build_model("ConvNet-BN", 3, 10, 32).blocks[0].body[1].__class__ is nn.BatchNorm2d


@pytest.mark.parametrize("name,kw", [
    ("convnet", {"widht": 64}),           # unknown option
    ("resnet18", {"depth": 3}),           # option of another model
    ("convnet", {"norm": "foo"}),
    ("convnet", {"act": "tanh"}),
    ("convnet", {"pool": "min"}),
    ("convnet", {"width": 0}),
    ("convnet", {"depth": True}),
    ("convnet", {"depth": 2.0}),
    ("convnet", {"width": 30, "norm": "group"}),
    ("alexnet", {"norm": "instance"}),
    ("vgg11", {"norm": "layer"}),
])
def test_bad_override(name: str, kw: dict) -> None:
    with pytest.raises(ConfigError):
        build_model(name, 3, 10, 32, **kw)


def test_too_deep_for_image() -> None:
    with pytest.raises(ConfigError, match="depth"):
        build_model("convnet-d4", 3, 10, 8)
    with pytest.raises(ConfigError):
        build_model("convnet-d5", 3, 10, 16)
    with pytest.raises(ConfigError):
        build_model("alexnet", 3, 10, 4)
    with pytest.raises(ConfigError):
        build_model("convnet", 3, 10, 0)
    build_model("convnet-d4", 3, 10, 8, pool="none")  # no pooling: fine


def test_model_info() -> None:
    info = model_info("convnet-bn")
    assert info == {"width": 128, "depth": 3, "norm": "batch", "act": "relu", "pool": "avg"}
    info["width"] = 1  # a copy: the registry is unaffected
    assert model_info("convnet-bn")["width"] == 128
    assert model_info("convnet-d2")["depth"] == 2
    assert model_info("vgg11")["norm"] == "instance"
    assert model_info("resnet18-bn")["norm"] == "batch"
    assert model_info("alexnet")["norm"] == "none"


def test_register_model_custom() -> None:
    class Tiny(nn.Module):
        def __init__(self, channels: int, num_classes: int, image_size: int, hidden: int = 4) -> None:
            super().__init__()
            self.hidden = hidden
            self.classifier = nn.Linear(channels * image_size * image_size, num_classes)

    try:
        assert register_model("test-tiny", hidden=8)(Tiny) is Tiny
        assert "test-tiny" in list_models()
        assert model_info("test-tiny") == {"hidden": 8}
        assert build_model("test-tiny", 1, 3, 4).hidden == 8
        assert build_model("test-tiny", 1, 3, 4, hidden=2).hidden == 2
        with pytest.raises(ValueError):
            register_model("test-tiny")(Tiny)  # duplicate name
        with pytest.raises(ValueError):
            register_model("test-tiny2", nope=1)(Tiny)  # default for a nonexistent option
    finally:
        _REGISTRY.pop("test-tiny", None)
        _REGISTRY.pop("test-tiny2", None)


def test_fresh_and_seeded() -> None:
    torch.manual_seed(1)
    a = build_model("convnet", 3, 10, 32)
    torch.manual_seed(1)
    b = build_model("convnet", 3, 10, 32)
    c = build_model("convnet", 3, 10, 32)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.blocks[0].body[0].weight, c.blocks[0].body[0].weight)


def test_device_argument() -> None:
    m = build_model("convnet", 3, 10, 32, device="cpu")
    assert all(p.device.type == "cpu" for p in m.parameters())
    m = build_model("resnet18", 3, 10, 32, device="meta")
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 5, 16, 6), (2, 2, 7, 7)])
def test_pool2x2_equals_the_library_pooling(mode, shape):
    from atomdistill.models import Pool2x2
    import torch.nn.functional as F
    x = torch.randn(*shape, requires_grad=True)
    ref = F.avg_pool2d(x, 2) if mode == "avg" else F.max_pool2d(x, 2)
    out = Pool2x2(mode)(x)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gref, atol=1e-6)


def test_images_too_small_for_the_pooling_name_the_models_that_fit():
    # The message spoke of depth and pool arguments, which a CLI user sets by model name.
    with pytest.raises(ConfigError, match=r"at least 8px, depth <= 2 \(model convnet-d2\) or .*convnet-nopool"):
        build_model("convnet", 3, 10, 7)
    for name in ("convnet-d2", "convnet-nopool"):   # what it names does build
        assert build_model(name, 3, 10, 7)(torch.zeros(1, 3, 7, 7)).shape == (1, 10)
