"""Pieces for fine-tuning with `transformers.Trainer`: data collators, evaluation metrics and a special-token check.

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

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from .processing_hf_clip import to_rgb_image


class _ImageRowsCollator:
    """Reads images (PIL images, arrays, paths, bytes or `{"bytes", "path"}` cells) from dataset rows."""

    def __init__(self, processor, image_column: str, base_dir: str | os.PathLike | None):
        self.processor = processor
        self.image_column = image_column
        self.base_dir = base_dir

    def column(self, rows: Sequence[dict[str, Any]], name: str) -> list[Any]:
        for row in rows:
            if name not in row:
                raise KeyError(
                    f"{type(self).__name__}: a row has no column {name!r} (it has {sorted(row)}). With "
                    "transformers.Trainer, set remove_unused_columns=False so the raw columns reach the collator."
                )
        return [row[name] for row in rows]

    def pixel_values(self, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
        """(batch, 3, size, size), preprocessed by the processor's image processor."""
        images = [to_rgb_image(image, self.base_dir) for image in self.column(rows, self.image_column)]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


class ContrastiveDataCollator(_ImageRowsCollator):
    """Image-caption rows -> `HFClipModel` inputs that make it return the contrastive loss.

    Each row holds an image under `image_column` (PIL image, array, file path, encoded bytes or a datasets
    `{"bytes", "path"}` cell; relative paths are read from `base_dir`) and a caption or a list of captions under
    `caption_column`. From a list, one caption is drawn at random (seeded by `seed`) when `sample_captions`, else the
    first is taken (deterministic, for evaluation).

    Returns pixel_values (batch, 3, size, size), input_ids and attention_mask (batch, seq) and return_loss=True.
    """

    def __init__(
        self,
        processor,
        image_column: str = "image",
        caption_column: str = "caption",
        sample_captions: bool = True,
        seed: int | None = None,
        base_dir: str | os.PathLike | None = None,
    ):
        super().__init__(processor, image_column, base_dir)
        self.caption_column = caption_column
        self.sample_captions = sample_captions
        self.rng = np.random.default_rng(seed)

    def caption(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value:
            return value[self.rng.integers(len(value))] if self.sample_captions else value[0]
        raise ValueError(
            f"Column {self.caption_column!r} must hold a caption or a non-empty list of captions, got {value!r}."
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captions = [self.caption(value) for value in self.column(rows, self.caption_column)]
        text = self.processor(text=captions, padding=True, truncation=True, return_tensors="pt")
        return {
            "pixel_values": self.pixel_values(rows),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "return_loss": True,
        }


class ImageClassificationDataCollator(_ImageRowsCollator):
    """Labelled image rows -> `HFClipForImageClassification` inputs: pixel_values (batch, 3, size, size) and
    labels (batch,) from the integer class ids in `label_column`."""

    def __init__(
        self,
        processor,
        image_column: str = "image",
        label_column: str = "label",
        base_dir: str | os.PathLike | None = None,
    ):
        super().__init__(processor, image_column, base_dir)
        self.label_column = label_column

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = self.column(rows, self.label_column)
        if not all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
            raise ValueError(f"Column {self.label_column!r} must hold integer class ids, got {labels[:5]!r}.")
        return {"pixel_values": self.pixel_values(rows), "labels": torch.tensor(labels, dtype=torch.long)}


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
    "ContrastiveDataCollator",
    "ImageClassificationDataCollator",
    "compute_classification_metrics",
    "compute_contrastive_metrics",
    "contrastive_accuracy_flags",
    "match_special_tokens",
]
