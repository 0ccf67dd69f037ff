"""Pieces for fine-tuning with `transformers.Trainer`: evaluation metrics and a special-token check (the data
collators are in `hf_clip.data`).

    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., remove_unused_columns=False),
        data_collator=ContrastiveDataCollator(processor),
        preprocess_logits_for_metrics=contrastive_accuracy_flags,
        compute_metrics=compute_contrastive_metrics,
        ...
    )

Trainer removes the dataset columns that the model's `forward` does not name before collating, which would drop the
raw `image` and `caption` columns these collators read: `remove_unused_columns=False` is the one flag to set.
"""

from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction


def contrastive_accuracy_flags(logits: tuple[torch.Tensor, ...], labels: Any = None) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for `HFClipModel`: reduces one evaluation batch of outputs (logits_per_image
    (n, n) first, logits_per_text second) to (n, 2) flags: whether image i ranks caption i first among the batch's
    captions, and whether caption i ranks image i first. Rows of different batches then concatenate."""
    logits_per_image, logits_per_text = logits[0], logits[1]
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return torch.stack(
        [logits_per_image.argmax(dim=-1) == targets, logits_per_text.argmax(dim=-1) == targets], dim=-1
    ).float()


def compute_contrastive_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` over `contrastive_accuracy_flags`: in-batch image→text and text→image top-1 accuracy.
    Trainer reports them next to the evaluation loss (`eval_loss`)."""
    flags = np.asarray(eval_prediction.predictions)
    return {"image_to_text_accuracy": float(flags[:, 0].mean()), "text_to_image_accuracy": float(flags[:, 1].mean())}


def compute_classification_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `HFClipForImageClassification`: top-1 accuracy of the logits against the labels."""
    predictions = np.asarray(eval_prediction.predictions).argmax(axis=-1)
    return {"accuracy": float((predictions == np.asarray(eval_prediction.label_ids)).mean())}


def match_special_tokens(model, tokenizer) -> None:
    """Set the text config's eos/bos/pad ids to the tokenizer's where it defines them, as
    `Trainer(processing_class=...)` would, after checking that the text tower still pools at the same token.

    Legacy CLIP configs (eos_token_id 2) pool at the highest token id, which is the first end-of-text token only when
    end-of-text is the tokenizer's last id. Any other disagreement raises `ValueError`, since the model and the
    tokenizer would then disagree on where a text ends.
    """
    text_config = model.config.get_text_config()
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; the text tower pools at the end-of-text token.")
    legacy_equivalent = text_config.eos_token_id == 2 and eos_token_id == len(tokenizer) - 1
    if text_config.eos_token_id != eos_token_id and not legacy_equivalent:
        raise ValueError(
            f"The text config pools at eos_token_id {text_config.eos_token_id} but the tokenizer ends text with id "
            f"{eos_token_id}; fix text_config.eos_token_id in config.json."
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            setattr(text_config, name, token_id)


__all__ = [
    "compute_classification_metrics",
    "compute_contrastive_metrics",
    "contrastive_accuracy_flags",
    "match_special_tokens",
]
