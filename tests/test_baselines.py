import pytest
import torch

from atomdistill.baselines import BASELINES, herding, kcenter, select_coreset
from atomdistill.data import ImageDataset, check_ipc
from atomdistill.distill import initial_images
from atomdistill.errors import ConfigError
from atomdistill.synset import SyntheticSet

COUNTS = (12, 9, 14)   # unequal on purpose: the greedy steps pad classes to a common length


def make_data(name: str = "tiny") -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    labels = labels[torch.randperm(len(labels), generator=g)]    # classes interleaved, as in real data
    x = torch.randn(len(labels), 1, 8, 8, generator=g) + labels.view(-1, 1, 1, 1).float()
    tx = torch.randn(6, 1, 8, 8, generator=g)
    return ImageDataset(name=name, class_names=["a", "b", "c"], train_images=x, train_labels=labels,
                        test_images=tx, test_labels=torch.tensor([0, 1, 2, 0, 1, 2]), mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def data():
    return make_data()


def _check_real(s: SyntheticSet, data: ImageDataset, ipc: int):
    idx = torch.tensor(s.info["indices"])
    assert len(idx) == len(s) == ipc * data.num_classes
    assert torch.equal(s.labels, torch.arange(3).repeat_interleave(ipc))
    assert torch.equal(data.train_labels[idx], s.labels)            # each image from its own class
    assert len(set(idx.tolist())) == len(idx)                         # no image twice
    assert torch.equal(s.images, data.train_images[idx])              # real images, untouched
    assert s.ipc == ipc and s.zca is None


@pytest.mark.parametrize("method", BASELINES)
def test_selection_shape_labels_real_images(data, method):
    s = select_coreset(data, 4, method, embedding="pixels", device="cpu")
    _check_real(s, data, 4)
    assert s.method == method and s.dataset == "tiny"
    assert s.config["ipc"] == 4 and s.config["method"] == method
    assert s.info["embedding"] == (None if method == "random" else "pixels")
    assert s.mean == data.mean and s.class_names == data.class_names


def test_ipc_equal_to_smallest_class_takes_it_all(data):
    for method in BASELINES:
        s = select_coreset(data, 9, method, embedding="pixels", device="cpu")
        idx = torch.tensor(s.info["indices"])
        assert sorted(idx[s.labels == 1].tolist()) == data.class_indices()[1].tolist()


def test_ipc_above_the_smallest_class_names_it(data):
    # class 'a' (12) comes first, but 'b' (9) is the one that sets the limit
    for ipc, factor in ((10, 1), (3, 2)):
        with pytest.raises(ConfigError, match="smallest class, 'b'.*use --ipc 9 or less" if factor == 1
                           else "smallest class, 'b', has \\(9\\); use --ipc 2 or less"):
            check_ipc(data, ipc, factor)
    with pytest.raises(ConfigError, match="smallest class, 'b'.*use --ipc 9 or less"):
        select_coreset(data, 10, "random", device="cpu")
    check_ipc(data, 9)
    check_ipc(data, 2, 2)


@pytest.mark.parametrize("method", BASELINES)
def test_deterministic_for_a_seed(data, method):
    a = select_coreset(data, 3, method, seed=5, embedding="random", device="cpu")
    b = select_coreset(data, 3, method, seed=5, embedding="random", device="cpu")
    assert a.info["indices"] == b.info["indices"]


def test_random_differs_across_seeds_and_equals_distill_real_init(data):
    picks = {tuple(select_coreset(data, 3, "random", seed=s).info["indices"]) for s in range(4)}
    assert len(picks) == 4
    s = select_coreset(data, 3, "random", seed=2)
    assert torch.equal(s.images, initial_images(data.train_images, data.class_indices(), [0, 1, 2], 3, "real", 2))


def _reference_herding(e: torch.Tensor, ipc: int) -> list[int]:
    e = e.double()
    mu, chosen = e.mean(0), []
    for t in range(1, ipc + 1):
        best, best_d = None, None
        for i in range(len(e)):
            if i in chosen:
                continue
            d = torch.linalg.norm(mu - (e[chosen].sum(0) + e[i]) / t)
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def _reference_kcenter(e: torch.Tensor, ipc: int) -> list[int]:
    e = e.double()
    chosen = [int(torch.linalg.norm(e - e.mean(0), dim=1).argmin())]
    while len(chosen) < ipc:
        d = torch.cdist(e, e[chosen]).min(1).values
        d[chosen] = -1
        chosen.append(int(d.argmax()))
    return chosen


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_greedy_matches_brute_force_reference(data, method):
    s = select_coreset(data, 5, method, embedding="pixels", device="cpu")
    ref = _reference_herding if method == "herding" else _reference_kcenter
    idx = torch.tensor(s.info["indices"]).view(3, 5)
    for k, cls_idx in enumerate(data.class_indices()):
        pos = ref(data.train_images[cls_idx].flatten(1), 5)
        assert idx[k].tolist() == cls_idx[pos].tolist()


def test_herding_first_pick_is_closest_to_class_mean(data):
    s = select_coreset(data, 2, "herding", embedding="pixels", device="cpu")
    for k, cls_idx in enumerate(data.class_indices()):
        e = data.train_images[cls_idx].flatten(1)
        closest = cls_idx[torch.linalg.norm(e - e.mean(0), dim=1).argmin()]
        assert s.info["indices"][2 * k] == int(closest)


def test_kcenter_distinct_and_second_pick_farthest_from_first(data):
    s = select_coreset(data, 6, "kcenter", embedding="pixels", device="cpu")
    idx = torch.tensor(s.info["indices"]).view(3, 6)
    for k, cls_idx in enumerate(data.class_indices()):
        assert len(set(idx[k].tolist())) == 6
        e = data.train_images[cls_idx].flatten(1)
        first = data.train_images[idx[k, 0]].flatten()
        farthest = cls_idx[torch.linalg.norm(e - first, dim=1).argmax()]
        assert int(idx[k, 1]) == int(farthest)


def test_batched_greedy_equals_per_class():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(2, 7, 4, generator=g)
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    e[1, 5:] = 0.0
    for fn in (herding, kcenter):
        both = fn(e, 3, valid)
        assert both[0].tolist() == fn(e[0], 3).tolist()
        assert both[1].tolist() == fn(e[1, :5], 3).tolist()
        assert (both[1] < 5).all()     # padding never selected


def test_trained_embedding_is_seeded_and_recorded(data):
    a = select_coreset(data, 2, "herding", embedding="trained", embed_epochs=1, seed=3, device="cpu")
    b = select_coreset(data, 2, "herding", embedding="trained", embed_epochs=1, seed=3, device="cpu")
    _check_real(a, data, 2)
    assert a.info["indices"] == b.info["indices"]
    assert a.info["embedding"] == "trained" and a.info["embed_net"] == "convnet"
    assert a.config["embedding"] == "trained" and a.config["embed_epochs"] == 1


def test_zca_path_stores_whitened_images_and_the_zca(data, tmp_path):
    s = select_coreset(data, 3, "kcenter", embedding="pixels", zca=True, device="cpu")
    plain = select_coreset(data, 3, "kcenter", embedding="pixels", zca=False, device="cpu")
    assert s.info["indices"] == plain.info["indices"]      # selection happens before whitening
    idx = torch.tensor(s.info["indices"])
    assert s.zca is not None and s.config["zca"] is True
    assert torch.allclose(s.images, s.zca(data.train_images[idx]), atol=1e-5)
    assert not torch.allclose(s.images, data.train_images[idx], atol=1e-2)
    assert torch.allclose(s.to_pixels(), (data.train_images[idx] * 0.25 + 0.5).clamp(0, 1), atol=1e-3)
    back = SyntheticSet.load(s.save(tmp_path / "kc.safetensors"))
    assert back.zca is not None and back.info["indices"] == s.info["indices"] and back.method == "kcenter"


def test_zca_default_follows_dataset_name():
    assert select_coreset(make_data("tiny"), 2, "random").zca is None
    assert select_coreset(make_data("cifar10"), 2, "random").zca is not None


def test_errors(data):
    with pytest.raises(ConfigError, match=r"smallest class, 'b', which has 9 training images; use --ipc 9"):
        select_coreset(data, 10, "random")
    with pytest.raises(ConfigError, match="unknown baseline"):
        select_coreset(data, 2, "bogus")
    with pytest.raises(ConfigError, match="unknown embedding"):
        select_coreset(data, 2, "herding", embedding="bogus")
    with pytest.raises(ConfigError):
        select_coreset(data, 0, "random")


def test_embeddings_are_cached_and_reused(data, tmp_path, monkeypatch):
    import atomdistill.baselines as baselines
    calls = []
    real = baselines.compute_embeddings
    monkeypatch.setattr(baselines, "compute_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = select_coreset(data, 2, "herding", embedding="trained", embed_epochs=1, device="cpu", cache_dir=tmp_path)
    b = select_coreset(data, 3, "kcenter", embedding="trained", embed_epochs=1, device="cpu", cache_dir=tmp_path)
    c = select_coreset(data, 2, "herding", embedding="trained", embed_epochs=1, device="cpu")
    assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1   # b read the cache
    assert a.info["indices"] == c.info["indices"] and len(b) == 3 * data.num_classes
