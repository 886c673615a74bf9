import pytest
import torch

from atomdistill.data import ImageDataset


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state, so an unseeded torch.randn in a test gives the
    same values whichever tests ran before it (a test must not pass or fail with the test order)."""
    torch.manual_seed(0)


def make_dataset(num_classes: int = 3, per_class: int = 12, size: int = 8, channels: int = 1, test_per_class: int = 6,
                 seed: int = 0, name: str = "toy") -> ImageDataset:
    """Separable toy images: each class has its own mean brightness pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, size, size, generator=g)

    def split(n):
        labels = torch.arange(num_classes).repeat_interleave(n)
        images = protos[labels] + 0.5 * torch.randn(len(labels), channels, size, size, generator=g)
        return images, labels

    (xtr, ytr), (xte, yte) = split(per_class), split(test_per_class)
    return ImageDataset(name=name, class_names=[f"c{k}" for k in range(num_classes)], train_images=xtr,
                        train_labels=ytr, test_images=xte, test_labels=yte, mean=(0.0,) * channels,
                        std=(1.0,) * channels)


def interrupt_run(monkeypatch, at: int, **distill_options):
    """Start distill(make_dataset(), ...) and stop it with a KeyboardInterrupt (a user's Ctrl-C) when it
    reaches iteration `at`: its folder keeps the last checkpoint before that."""
    from atomdistill import distill
    from atomdistill.distill import Distiller
    original = Distiller.step_loss

    def crash(self, syn, iteration):
        if iteration == at:
            raise KeyboardInterrupt
        return original(self, syn, iteration)

    monkeypatch.setattr(Distiller, "step_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        distill(make_dataset(), **distill_options)
    monkeypatch.setattr(Distiller, "step_loss", original)


@pytest.fixture
def toy():
    return make_dataset()
