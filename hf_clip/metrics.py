"""Evaluation metrics: zero-shot accuracy and image-text retrieval recall from embeddings, and the
`compute_metrics` pieces for `transformers.Trainer`.

    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., remove_unused_columns=False),
        data_collator=ContrastiveDataCollator(processor),
        preprocess_logits_for_metrics=contrastive_accuracy_flags,
        compute_metrics=compute_contrastive_metrics,
        ...
    )

Trainer removes the dataset columns that the model's `forward` does not name before collating, which would drop the
raw `image` and `caption` columns the collators read: `remove_unused_columns=False` is the one flag to set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import EvalPrediction


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """logits (n, classes), labels (n,) -> {"top1": ..., "top5": ...} in [0, 1]."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Paired, normalised (n, dim) embeddings -> image→text and text→image recall@k (the pair is the target)."""
    similarity = image_embeds @ text_embeds.T
    targets = torch.arange(len(similarity))
    results = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        results.update({f"{direction}_R@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks})
    return results


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


__all__ = [
    "compute_classification_metrics",
    "compute_contrastive_metrics",
    "contrastive_accuracy_flags",
    "retrieval_recall",
    "top_k_accuracy",
]
