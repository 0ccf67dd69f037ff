"""Zero-shot classification heads, and turning them into a trainable `HFClipForImageClassification`.

A class is embedded as the ensemble of its prompts: the mean of the L2-normalised text embeddings of every template
filled with the class name, normalised again. `from_zero_shot` puts logit_scale × those embeddings into a linear
head, so the classifier starts with exactly the zero-shot logits; `weight_space_ensemble` interpolates fine-tuned
weights with those zero-shot ones (WiSE-FT, Wortsman et al., 2022).
"""

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .modeling_hf_clip import HFClipForImageClassification, HFClipModel
from .templates import PHOTO_TEMPLATES


def _check_class_names_and_templates(class_names: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(class_names, str) or not class_names:
        raise ValueError("`class_names` must be a non-empty list of class names.")
    duplicates = sorted({name for name in class_names if list(class_names).count(name) > 1})
    if duplicates:
        raise ValueError(f"`class_names` repeats {duplicates}; every class needs its own name.")
    check_templates(templates)


def check_templates(templates: Sequence[str]) -> None:
    """Raise `ValueError` unless `templates` is a non-empty list of prompt templates, each with exactly one '{}' (where
    the class name goes), e.g. "a photo of a {}."."""
    if isinstance(templates, str) or not templates:
        raise ValueError("`templates` must be a non-empty list of prompt templates.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"Template {template!r} must hold exactly one '{{}}' for the class name.")
        try:
            template.format("class name")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(f"Template {template!r} must hold exactly one '{{}}' for the class name and no other "
                             f"braces (write '{{{{' and '}}}}' for literal ones): {error!r}.") from None


@torch.no_grad()
def zero_shot_classifier(
    model: HFClipModel,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = PHOTO_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """(num_classes, projection_dim) float32: per class, the renormalised mean of its normalised prompt embeddings."""
    _check_class_names_and_templates(class_names, templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        text = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        text = {key: value.to(model.device) for key, value in text.items()}
        embeddings.append(F.normalize(model.get_text_features(**text).pooler_output.float(), dim=-1))
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def from_zero_shot(
    model: HFClipModel, processor, class_names: Sequence[str], templates: Sequence[str] | None = None
) -> HFClipForImageClassification:
    """An image classifier whose logits equal `model`'s zero-shot logits over `class_names`.

    It copies `model`'s image tower and projection, and sets the head's weight to clamped_logit_scale × the
    prompt-ensembled class embeddings and its bias to the model's `logit_bias` (0 for CLIP), so logits =
    scale · normalize(image embedding) · class embeddingsᵀ + bias.
    `id2label` / `label2id` name the classes. `templates` defaults to `PHOTO_TEMPLATES`.
    """
    if not isinstance(model, HFClipModel):
        raise TypeError(
            f"from_zero_shot needs an HFClipModel, got {type(model).__name__}; convert a Transformers CLIPModel with "
            "hf_clip.convert.hf_clip_from_transformers."
        )
    class_names = list(class_names)
    class_embeddings = zero_shot_classifier(model, processor.tokenizer, class_names, list(templates or PHOTO_TEMPLATES))
    config = copy.deepcopy(model.config)
    config.id2label = dict(enumerate(class_names))
    config.label2id = {name: index for index, name in enumerate(class_names)}
    classifier = HFClipForImageClassification(config)
    classifier.vision_model.load_state_dict(model.vision_model.state_dict())
    classifier.visual_projection.load_state_dict(model.visual_projection.state_dict())
    classifier.classifier.weight.copy_(model.clamped_logit_scale().float() * class_embeddings)
    classifier.classifier.bias.fill_(0.0 if model.logit_bias is None else model.logit_bias.item())
    return classifier.to(device=model.device, dtype=model.dtype).train(model.training)


@torch.no_grad()
def weight_space_ensemble(
    zero_shot_model: PreTrainedModel, finetuned_model: PreTrainedModel, alpha: float
) -> PreTrainedModel:
    """WiSE-FT: a copy of `finetuned_model` with every floating-point weight θ = (1 - alpha)·θ_zero_shot +
    alpha·θ_finetuned. alpha = 0 gives the zero-shot model, 1 the fine-tuned one. Both models must have the same
    weight names and shapes (e.g. `from_zero_shot`'s classifier before and after fine-tuning)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    zero_shot, finetuned = zero_shot_model.state_dict(), finetuned_model.state_dict()
    if zero_shot.keys() != finetuned.keys():
        different = sorted(zero_shot.keys() ^ finetuned.keys())
        raise ValueError(f"The two models do not have the same weights; names in only one of them: {different[:10]}.")
    mismatched = [name for name in finetuned if zero_shot[name].shape != finetuned[name].shape]
    if mismatched:
        raise ValueError(
            "The two models' weights differ in shape: "
            + ", ".join(f"{n} {tuple(zero_shot[n].shape)} vs {tuple(finetuned[n].shape)}" for n in mismatched[:10])
        )
    merged = {}
    for name, weight in finetuned.items():
        if weight.is_floating_point():
            merged[name] = torch.lerp(zero_shot[name].to(weight), weight, alpha)
        else:
            merged[name] = weight
    ensemble = copy.deepcopy(finetuned_model)
    ensemble.load_state_dict(merged)
    return ensemble


__all__ = ["check_templates", "from_zero_shot", "weight_space_ensemble", "zero_shot_classifier"]
