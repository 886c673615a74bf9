import pytest
import torch

from atomdistill.data import ImageDataset


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


@pytest.fixture
def toy():
    return make_dataset()
