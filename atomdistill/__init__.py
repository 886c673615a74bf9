"""atomdistill: dataset distillation with ATOM, the Attention Mixer.

    import atomdistill as ad
    data = ad.load_dataset("digits")
    synset = ad.distill(data, ipc=10, method="atom", iterations=200)
    results = ad.evaluate(synset, data, models=["convnet"], runs=3, epochs=300)

The functions ``distill`` and ``evaluate`` share their names with the modules that define them:
``atomdistill.evaluate`` is the function; ``from atomdistill.evaluate import ...`` reaches the module.
"""
__version__ = "0.1.0"

from .errors import AtomDistillError, ConfigError, DatasetError
from .data import ImageDataset, list_datasets, load_dataset
from .models import build_model, list_models
from .augment import DSA
from .zca import ZCA
from .loss import PRESETS, LossWeights, MatchingLoss, loss_weights
from .synset import SyntheticSet
from .evaluate import EvalProtocol, evaluate, evaluation_record, full_training_set
from .distill import DistillConfig, distill, resume
from .baselines import select_coreset
from .interop import export_set, import_set

__all__ = [
    "AtomDistillError", "ConfigError", "DatasetError",
    "ImageDataset", "load_dataset", "list_datasets",
    "build_model", "list_models", "DSA", "ZCA",
    "LossWeights", "MatchingLoss", "PRESETS", "loss_weights",
    "SyntheticSet", "EvalProtocol", "evaluate", "evaluation_record", "full_training_set",
    "DistillConfig", "distill", "resume", "select_coreset", "import_set", "export_set",
]
