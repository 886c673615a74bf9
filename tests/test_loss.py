import dataclasses

import pytest
import torch

from atomdistill.errors import ConfigError
from atomdistill.loss import PRESETS, ClassMeans, LossWeights, MatchingLoss, loss_weights


def _direct_loss(w: LossWeights, real_acts, real_emb, real_y, syn_acts, syn_emb, syn_y, K):
    """The formula of docs/method.md ("The loss"), written with loops over classes, layers and images."""
    total = {"spatial": 0.0, "channel": 0.0, "mmd": 0.0}
    layers = range(len(real_acts)) if w.layers is None else [i - 1 for i in w.layers]
    for k in range(K):
        r, s = real_y == k, syn_y == k
        for l in layers:
            for name, dims_sum in (("spatial", 0), ("channel", (1, 2))):
                def att(f):
                    vecs = []
                    for img in f:
                        a = (img.abs() ** w.power).sum(dims_sum).flatten()
                        vecs.append(a / a.norm())
                    return torch.stack(vecs).mean(0)
                total[name] = total[name] + ((att(real_acts[l][r]) - att(syn_acts[l][s])) ** 2).sum()
        total["mmd"] = total["mmd"] + ((real_emb[r].mean(0) - syn_emb[s].mean(0)) ** 2).sum()
    return w.scale * (w.spatial * total["spatial"] + w.channel * total["channel"] + w.mmd * total["mmd"]), total


def _features(n, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    acts = [torch.randn(n, 4, 6, 6, generator=g), torch.randn(n, 8, 3, 3, generator=g)]
    emb = torch.randn(n, 10, generator=g)
    if requires_grad:
        for t in acts + [emb]:
            t.requires_grad_(True)
    return acts, emb


@pytest.mark.parametrize("weights", [
    PRESETS["atom"], PRESETS["datadam"], PRESETS["dm"], PRESETS["channel"],
    LossWeights(spatial=0.3, channel=2.0, mmd=0.5, power=2.0, scale=7.0, layers=(2,)),
    LossWeights(spatial=1.0, channel=1.0, mmd=0.0, power=1.0, scale=1.0, layers=(1,)),
])
def test_loss_matches_direct_computation(weights):
    K = 3
    real_y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    syn_y = torch.tensor([0, 1, 2, 0, 1, 2])
    real_acts, real_emb = _features(len(real_y), 0)
    syn_acts, syn_emb = _features(len(syn_y), 1)
    fn = MatchingLoss(weights)
    real = ClassMeans(K).add(fn.vectors(real_acts, real_emb), real_y).means()
    syn = ClassMeans(K).add(fn.vectors(syn_acts, syn_emb), syn_y).means()
    loss, terms = fn(real, syn)
    expected, expected_terms = _direct_loss(weights, real_acts, real_emb, real_y, syn_acts, syn_emb, syn_y, K)
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5, atol=1e-7)
    for name, value in terms.items():
        assert torch.allclose(value, torch.as_tensor(expected_terms[name]), rtol=1e-5, atol=1e-7)


def test_chunked_real_means_equal_one_pass():
    K = 3
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    acts, emb = _features(len(y), 3)
    fn = MatchingLoss(PRESETS["atom"])
    whole = ClassMeans(K).add(fn.vectors(acts, emb), y).means()
    chunked = ClassMeans(K)
    for sl in (slice(0, 3), slice(3, 8)):
        chunked.add(fn.vectors([a[sl] for a in acts], emb[sl]), y[sl])
    for name in whole:
        assert torch.allclose(whole[name], chunked.means()[name], atol=1e-6)


def test_attention_maps_are_unit_vectors_of_the_right_size():
    f = torch.randn(5, 4, 6, 7)
    v = MatchingLoss(LossWeights(spatial=1, channel=1, mmd=0, power=4.0)).vectors([f], torch.zeros(5, 1))
    s, c = v["spatial"], v["channel"]
    assert s.shape == (5, 42) and c.shape == (5, 4)
    assert torch.allclose(s.norm(dim=1), torch.ones(5)) and torch.allclose(c.norm(dim=1), torch.ones(5))
    # the spatial map is a sum over channels of |f|^p, the channel map a sum over positions: check one image
    a = (f[0].abs() ** 4).sum(0).flatten()
    assert torch.allclose(s[0], a / a.norm())
    a = (f[0].abs() ** 4).flatten(1).sum(1)
    assert torch.allclose(c[0], a / a.norm())


def test_gradient_reaches_synthetic_pixels_only():
    """Through a real network: the loss's gradient lands on the synthetic pixels, never on the real ones."""
    from atomdistill.models import build_model
    torch.manual_seed(0)
    net = build_model("convnet", 3, 4, 16).requires_grad_(False)
    real = torch.randn(8, 3, 16, 16, requires_grad=True)   # would get a grad if the loss leaked into it
    syn = torch.randn(4, 3, 16, 16, requires_grad=True)
    real_y, syn_y = torch.arange(4).repeat(2), torch.arange(4)
    fn = MatchingLoss(PRESETS["atom"])
    with torch.no_grad():
        real_means = ClassMeans(4).add(fn.vectors(*net.features(real)), real_y).means()
    loss, _ = fn(real_means, ClassMeans(4).add(fn.vectors(*net.features(syn)), syn_y).means())
    loss.backward()
    assert real.grad is None
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_presets_are_only_weights():
    assert loss_weights("dm") == LossWeights(spatial=0, channel=0, mmd=1, power=4, scale=1)
    assert loss_weights("datadam") == LossWeights(spatial=1, channel=0, mmd=0.01, power=4, scale=100)
    assert loss_weights("channel") == LossWeights(spatial=0, channel=1, mmd=0.01, power=4, scale=100)
    assert loss_weights("atom") == PRESETS["atom"]
    # a preset with its weights changed is the other preset: methods differ by data only
    assert loss_weights("atom", channel=0) == PRESETS["datadam"]
    assert dataclasses.replace(PRESETS["atom"], spatial=0, channel=1) == PRESETS["channel"]
    assert loss_weights("atom", layers=[1]).layers == (1,)


def test_inactive_terms_are_not_computed():
    acts, emb = _features(2, 0)
    assert set(MatchingLoss(PRESETS["dm"]).vectors(acts, emb)) == {"mmd"}
    assert set(MatchingLoss(PRESETS["datadam"]).vectors(acts, emb)) == {"spatial", "mmd"}


def test_bad_weights_and_names_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        loss_weights("nope")
    with pytest.raises(ConfigError, match="all loss weights are zero"):
        LossWeights(spatial=0, channel=0, mmd=0)
    with pytest.raises(ConfigError, match="out of range"):
        MatchingLoss(LossWeights(layers=(5,))).vectors(*_features(2, 0))
