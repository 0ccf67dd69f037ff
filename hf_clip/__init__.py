"""hf_clip: CLIP as a native Hugging Face Transformers model.

Importing the package registers it with `AutoConfig`, `AutoModel`, `AutoModelForZeroShotImageClassification`,
`AutoModelForImageClassification` and `AutoProcessor`. It loads nothing beyond what
`from transformers import CLIPModel, CLIPProcessor` loads; reading datasets (training, dataset-level evaluation) is
the job of the training package, `hf_clip_train` (`pip install "hf-clip[train]"`).
"""

import importlib
import warnings
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .collators import ContrastiveDataCollator, ImageClassificationDataCollator
from .configuration_hf_clip import HFClipConfig, HFClipTextConfig, HFClipVisionConfig
from .grad_cache import grad_cache_backward
from .hub import PUBLISHED_HYPERPARAMETERS, ModelCardInfo, push_to_hub, render_model_card
from .loss import contrastive_loss, gather_features, image_text_loss, sigmoid_loss
from .metrics import (
    compute_classification_metrics,
    compute_contrastive_metrics,
    contrastive_accuracy_flags,
    retrieval_recall,
    top_k_accuracy,
)
from .modeling_hf_clip import (
    HFClipForImageClassification,
    HFClipModel,
    HFClipOutput,
    HFClipPreTrainedModel,
    HFClipTextModel,
    HFClipTextModelWithProjection,
    HFClipVisionModel,
    HFClipVisionModelWithProjection,
)
from .processing_hf_clip import HFClipProcessor, to_rgb_image
from .templates import PHOTO_TEMPLATES
from .tokenization import match_special_tokens, train_clip_tokenizer
from .zero_shot import from_zero_shot, weight_space_ensemble, zero_shot_classifier

__version__ = "0.1.0"

AutoConfig.register(HFClipConfig.model_type, HFClipConfig, exist_ok=True)
AutoConfig.register(HFClipTextConfig.model_type, HFClipTextConfig, exist_ok=True)
AutoConfig.register(HFClipVisionConfig.model_type, HFClipVisionConfig, exist_ok=True)
AutoModel.register(HFClipConfig, HFClipModel, exist_ok=True)
AutoModel.register(HFClipTextConfig, HFClipTextModel, exist_ok=True)
AutoModel.register(HFClipVisionConfig, HFClipVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(HFClipConfig, HFClipModel, exist_ok=True)
AutoModelForImageClassification.register(HFClipConfig, HFClipForImageClassification, exist_ok=True)
AutoProcessor.register(HFClipConfig, HFClipProcessor, exist_ok=True)

# Saved checkpoints also carry these modules and an `auto_map`, so they load with `trust_remote_code=True`
# where hf_clip is not installed.
HFClipConfig.register_for_auto_class()
HFClipModel.register_for_auto_class("AutoModel")
HFClipForImageClassification.register_for_auto_class("AutoModelForImageClassification")
HFClipProcessor.register_for_auto_class("AutoProcessor")

# Names that moved to the training package, which reads datasets: {old name: new module}.
_MOVED_TO_TRAINING_PACKAGE = {
    "ImageTextColumns": "hf_clip_train.data",
    "embed_split": "hf_clip_train.data",
    "evaluate_split": "hf_clip_train.data",
}


def __getattr__(name: str) -> Any:
    """Deprecated aliases of the names in `_MOVED_TO_TRAINING_PACKAGE`: they warn and import the training package."""
    if name not in _MOVED_TO_TRAINING_PACKAGE:
        raise AttributeError(f"module 'hf_clip' has no attribute {name!r}")
    module_name = _MOVED_TO_TRAINING_PACKAGE[name]
    warnings.warn(
        f"hf_clip.{name} moved to {module_name}.{name} (the training package, `pip install \"hf-clip[train]\"`); "
        "the hf_clip alias will be removed in the next release.",
        FutureWarning,
        stacklevel=2,
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ImportError(f"hf_clip.{name} is now {module_name}.{name}, which needs the training extra ({error}); "
                          'install it with: pip install "hf-clip[train]"') from error
    return getattr(module, name)


__all__ = [
    "PUBLISHED_HYPERPARAMETERS",
    "PHOTO_TEMPLATES",
    "ContrastiveDataCollator",
    "HFClipConfig",
    "HFClipForImageClassification",
    "HFClipModel",
    "HFClipOutput",
    "HFClipPreTrainedModel",
    "HFClipProcessor",
    "HFClipTextConfig",
    "HFClipTextModel",
    "HFClipTextModelWithProjection",
    "HFClipVisionConfig",
    "HFClipVisionModel",
    "HFClipVisionModelWithProjection",
    "ImageClassificationDataCollator",
    "ModelCardInfo",
    "compute_classification_metrics",
    "compute_contrastive_metrics",
    "contrastive_accuracy_flags",
    "contrastive_loss",
    "from_zero_shot",
    "gather_features",
    "grad_cache_backward",
    "image_text_loss",
    "match_special_tokens",
    "push_to_hub",
    "render_model_card",
    "retrieval_recall",
    "sigmoid_loss",
    "to_rgb_image",
    "top_k_accuracy",
    "train_clip_tokenizer",
    "weight_space_ensemble",
    "zero_shot_classifier",
]
