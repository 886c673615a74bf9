"""atomdistill: dataset distillation with ATOM, the Attention Mixer.

    import atomdistill as ad
    data = ad.load_dataset("digits")
    synset = ad.distill(data, ipc=10, method="atom", iterations=200)
    results = ad.evaluate(synset, data, models=["convnet"], runs=3, epochs=300)
"""
__version__ = "0.1.0"

from .errors import AtomDistillError, ConfigError, DatasetError
from .data import ImageDataset, list_datasets, load_dataset
from .models import build_model, list_models
from .augment import DSA
from .zca import ZCA
from .loss import PRESETS, LossWeights, MatchingLoss, loss_weights
from .synset import SyntheticSet
from .distill import DistillConfig, distill, resume

__all__ = [
    "AtomDistillError", "ConfigError", "DatasetError",
    "ImageDataset", "load_dataset", "list_datasets",
    "build_model", "list_models", "DSA", "ZCA",
    "LossWeights", "MatchingLoss", "PRESETS", "loss_weights",
    "SyntheticSet", "DistillConfig", "distill", "resume",
]


def __getattr__(name):
    # Evaluation, baselines and reports import lazily: `import atomdistill` stays fast.
    if name in ("evaluate", "evaluation_record", "full_training_set"):
        from . import evaluate as _evaluate_module
        return getattr(_evaluate_module, name) if name != "evaluate" else _evaluate_module.evaluate
    if name == "select_coreset":
        from .baselines import select_coreset
        return select_coreset
    raise AttributeError(f"module 'atomdistill' has no attribute {name!r}")
