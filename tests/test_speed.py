"""The speed paths compute what the reference paths compute; the precision option."""
import pytest
import torch

from atomdistill import DistillConfig, distill
from atomdistill import runtime
from atomdistill.augment import DSA
from atomdistill.errors import ConfigError
from atomdistill.evaluate import EvalProtocol, train_and_test
from atomdistill import loss as loss_module
from atomdistill.loss import abs_pow, attention_sums
from atomdistill.models import build_model
from conftest import make_dataset

FAST = dict(iterations=3, batch_real=6, log_every=1, progress=False, device="cpu", seed=3)


def _plain_attention_sums(f, power, spatial=True, channel=True):
    """The attention sums as plain autograd expressions, whole tensor at once."""
    a = f.abs().pow(power)
    return a.sum(1).flatten(1), a.flatten(2).sum(2)


def _reference_paths(monkeypatch):
    """Today's code with the speed paths switched off: DSA always gathers per family, |f|^p out of
    place, the attention sums by autograd over the whole tensor, activations not in place."""
    import importlib
    dist = importlib.import_module("atomdistill.distill")
    loss = importlib.import_module("atomdistill.loss")
    monkeypatch.setattr(DSA, "_single_family", lambda self, p: None)
    monkeypatch.setattr(loss, "abs_pow", lambda f, p: f.square().square() if p == 4 else f.abs().pow(p))
    monkeypatch.setattr(loss, "attention_sums", _plain_attention_sums)
    build = dist.random_network

    def random_network(*a, **k):
        net = build(*a, **k)
        for m in net.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        return net
    monkeypatch.setattr(dist, "random_network", random_network)


@pytest.mark.parametrize("method", ["atom", "dm"])
def test_a_few_iterations_match_the_reference_paths(method, monkeypatch):
    data = make_dataset(per_class=10)
    fast = distill(data, ipc=2, method=method, **FAST).images
    _reference_paths(monkeypatch)
    ref = distill(data, ipc=2, method=method, **FAST).images
    # The fused attention backward rounds differently from autograd: equal within float tolerance.
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5)


def test_single_family_fast_path_equals_the_per_family_gather():
    dsa = DSA()
    x = torch.randn(7, 3, 8, 8)
    for k in range(len(dsa.families)):
        params = dsa.sample(8, torch.Generator().manual_seed(k), families=torch.tensor([k] * 7 + [(k + 1) % 6]))
        mixed = dsa.apply(torch.cat([x, x[:1]]), params)            # two families: per-family gather
        alone = dsa.apply(x, params.index(torch.arange(7)))          # one family: fast path
        assert torch.equal(alone, mixed[:7]), dsa.families[k]


@pytest.mark.parametrize("power", [4.0, 2.0, 3.0, 1.5])
@pytest.mark.parametrize("spatial,channel", [(True, True), (True, False), (False, True)])
def test_fused_attention_sums_equal_autograd_values_and_gradients(power, spatial, channel, monkeypatch):
    # A small slice size, so that the batch is cut into several slices as on the real activations.
    monkeypatch.setattr(loss_module, "ATTENTION_SLICE_BYTES", 2 * 4 * 5 * 5 * 8)
    f = torch.randn(5, 4, 5, 5, dtype=torch.double, requires_grad=True)
    s, c = attention_sums(f, power, spatial, channel)
    ref_s, ref_c = _plain_attention_sums(f, power)
    assert (s.numel() > 0) == spatial and (c.numel() > 0) == channel
    if spatial:
        torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=0)
    if channel:
        torch.testing.assert_close(c, ref_c, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: tuple(t for t in attention_sums(x, power, spatial, channel)
                                                    if t.numel()), (f,))


def test_abs_pow_in_place_without_graph_equals_with_graph():
    f = torch.randn(4, 5, 6, 6)
    with torch.no_grad():
        a = abs_pow(f, 4)
    g = f.clone().requires_grad_(True)
    b = abs_pow(g, 4)
    assert torch.equal(a, b.detach()) and torch.equal(a, f.pow(2).pow(2))
    b.sum().backward()
    torch.testing.assert_close(g.grad, 4 * f ** 3)


@pytest.mark.parametrize("name", ["convnet", "convnet-bn", "convnet-leakyrelu", "convnet-nn", "alexnet"])
def test_in_place_activations_give_the_same_features_and_gradients(name):
    size = 16
    torch.manual_seed(0)
    net = build_model(name, 3, 4, size)
    ref = build_model(name, 3, 4, size)
    ref.load_state_dict(net.state_dict())
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(3, 3, size, size)
    outs = []
    for n in (net, ref):
        xi = x.clone().requires_grad_(True)
        acts, emb = n.features(xi)
        (sum(a.square().sum() for a in acts) + emb.sum()).backward()
        outs.append((acts, emb, xi.grad))
    for u, v in zip(outs[0][0] + [outs[0][1], outs[0][2]], outs[1][0] + [outs[1][1], outs[1][2]]):
        torch.testing.assert_close(u, v)


def test_precision_is_validated_and_bf16_changes_the_set_a_little(capsys, monkeypatch):
    with pytest.raises(ConfigError, match="precision"):
        DistillConfig(precision="fp16")
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    data = make_dataset(per_class=10)
    fp32 = distill(data, ipc=2, method="atom", **FAST)
    bf16 = distill(data, ipc=2, method="atom", precision="bf16", **FAST)
    assert bf16.config["precision"] == "bf16" and fp32.config["precision"] == "fp32"
    assert torch.isfinite(bf16.images).all() and not torch.equal(bf16.images, fp32.images)
    assert (bf16.images - fp32.images).norm() < 0.1 * fp32.images.norm()   # close, not equal
    err = capsys.readouterr().err
    assert err.count("avx512_bf16 or amx_bf16") == 1   # one line, once per process


def test_no_warning_where_the_cpu_has_bf16(capsys, monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16"})
    runtime.check_precision("bf16", torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_evaluation_runs_in_bf16():
    data = make_dataset(per_class=10)
    accs = train_and_test(data.train_images, data.train_labels, data.test_images, data.test_labels, "convnet",
                          EvalProtocol(runs=1, epochs=2, precision="bf16"), device="cpu", progress=False)
    assert 0.0 <= accs[0] <= 1.0
    with pytest.raises(ConfigError, match="precision"):
        EvalProtocol(precision="half")


def test_compiled_iterations_equal_the_eager_ones_within_float_rounding():
    data = make_dataset(per_class=10)
    eager = distill(data, ipc=2, method="atom", **FAST)
    compiled = distill(data, ipc=2, method="atom", compile=True, **FAST)
    assert compiled.config["compile"] is True and eager.config["compile"] is False
    torch.testing.assert_close(compiled.images, eager.images, rtol=1e-4, atol=1e-4)


def test_compile_without_a_cxx_compiler_is_one_clear_error(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="--compile needs a C\\+\\+ compiler"):
        distill(make_dataset(), ipc=1, compile=True, **FAST)


@pytest.mark.parametrize("batched", [False, True])
def test_compiled_evaluation_equals_the_eager_one(batched):
    data = make_dataset(per_class=6)
    args = (data.train_images, data.train_labels, data.test_images, data.test_labels, "convnet")
    kw = dict(device="cpu", progress=False, batched=batched)
    eager = train_and_test(*args, EvalProtocol(runs=2, epochs=4), **kw)
    compiled = train_and_test(*args, EvalProtocol(runs=2, epochs=4, compile=True), **kw)
    assert compiled == pytest.approx(eager, abs=1.5 / len(data.test_labels))   # at most one test image apart
