"""Data collators: dataset rows in, model inputs out.

`ContrastiveDataCollator` is the one contrastive collator: `transformers.Trainer` feeds it raw dataset rows, and
the training package (`hf_clip_train`) feeds it samples that its datasets already decoded in DataLoader workers.
Either way a caption cell (one caption or a list of them) is resolved by `pick_caption`, and an image cell by
`decode_image`. Reading datasets (splits, transforms, samplers, evaluation) is the training package's job.
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .processing_hf_clip import MAX_IMAGE_PIXELS, ImageTooLargeError, decode_size, to_rgb_image

# What reading one row may raise when the row is unusable: a training stream skips the row and counts it.
# `ImageTooLargeError` (a ValueError) is an image refused before decoding, as a possible decompression bomb.
BAD_SAMPLE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
                     ImageTooLargeError)


class BadSample(ValueError):
    """A row that cannot be used: undecodable image or missing caption."""


def pick_caption(value: Any, rng: np.random.Generator | None) -> str:
    """A caption cell (str or list of str) -> one non-empty caption; drawn with `rng`, else the first."""
    if isinstance(value, (list, tuple)):
        candidates = [c for c in value if isinstance(c, str) and c.strip()]
        if not candidates:
            raise BadSample(f"no usable caption in {value!r}; a caption cell must hold a caption or a non-empty list "
                            "of captions")
        return candidates[rng.integers(len(candidates))] if rng is not None else candidates[0]
    if not isinstance(value, str) or not value.strip():
        raise BadSample(f"caption is {type(value).__name__} {value!r}, not a non-empty string")
    return value


def decode_image(value: Any, base_dir: str | os.PathLike | None, *, min_size: int | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image cell (PIL image, array, {"bytes", "path"} dict, raw bytes or a path) -> RGB PIL image, upright as its
    EXIF orientation says. Relative paths are resolved against `base_dir`. An encoded image whose header claims more
    than `max_pixels` pixels raises `ImageTooLargeError` before it is decoded; with `min_size`, a JPEG is decoded at
    the smallest reduced scale that keeps both sides at least `min_size` (`to_rgb_image`)."""
    if value is None:
        raise BadSample("missing image")
    return to_rgb_image(value, base_dir, min_size=min_size, max_pixels=max_pixels)


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
        """(batch, 3, size, size): samples' own "pixel_values", else the image column through the processor."""
        if all("pixel_values" in row for row in rows):
            return torch.stack([row["pixel_values"] for row in rows])
        min_size = decode_size(self.processor.image_processor)
        images = [decode_image(image, self.base_dir, min_size=min_size) for image in self.column(rows,
                                                                                               self.image_column)]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


class ContrastiveDataCollator(_ImageRowsCollator):
    """Image-caption rows -> `HFClipModel` inputs that make it return the contrastive loss.

    A row is either a raw dataset row, with an image under `image_column` (PIL image, array, file path, encoded bytes
    or a datasets `{"bytes", "path"}` cell; relative paths are read from `base_dir`), or a sample that a dataset of
    the training package decoded, with its "pixel_values" (3, size, size). Its caption cell under `caption_column` holds
    a caption or a list of captions: from a list, one non-empty caption is drawn at random (seeded by `seed`) when
    `sample_captions`, else the first is taken (deterministic, for evaluation).

    Returns pixel_values (batch, 3, size, size), input_ids and attention_mask (batch, seq), `padding_side` ("right"
    when no row starts with padding, else "left": read here from the mask on the host, so the model's text tower need
    not read it back from the device), return_loss=True and `gather_distributed`: True (default) makes each rank's
    loss score against the global batch under data-parallel training (a collective, as Trainer's DDP runs every rank
    in step); in a single process it changes nothing.
    Decoded samples also give "row_ids" (batch,) and "skipped" (count of unusable rows behind the batch, including
    the None samples dropped here); a batch of None samples only gives just those two.
    """

    def __init__(
        self,
        processor,
        image_column: str = "image",
        caption_column: str = "caption",
        sample_captions: bool = True,
        seed: int | None = None,
        base_dir: str | os.PathLike | None = None,
        gather_distributed: bool = True,
    ):
        super().__init__(processor, image_column, base_dir)
        self.caption_column = caption_column
        self.gather_distributed = gather_distributed
        self.sample_captions = sample_captions
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [row for row in rows if row is not None]
        batch = {}
        if len(kept) < len(rows) or any("row_id" in row for row in kept):
            batch["row_ids"] = torch.tensor([row["row_id"] for row in kept], dtype=torch.long)
            batch["skipped"] = torch.tensor(len(rows) - len(kept) + sum(row.get("skipped", 0) for row in kept))
        if not kept:
            return batch
        rng = self.rng if self.sample_captions else None
        captions = [pick_caption(value, rng) for value in self.column(kept, self.caption_column)]
        text = self.processor.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        return {
            **batch,
            "pixel_values": self.pixel_values(kept),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "padding_side": padding_side_of(text["attention_mask"]),
            "return_loss": True,
            "gather_distributed": self.gather_distributed,
        }


def padding_side_of(attention_mask: torch.Tensor) -> str:
    """The `padding_side` argument of `HFClipModel.forward` for a (batch, seq) mask on the host: "right" if no row
    starts with padding, else "left". Decided where the batch is built, so the model never reads the mask back."""
    return "right" if bool(attention_mask[:, 0].all()) else "left"


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


__all__ = [
    "BAD_SAMPLE_ERRORS",
    "BadSample",
    "ContrastiveDataCollator",
    "ImageClassificationDataCollator",
    "decode_image",
    "padding_side_of",
    "pick_caption",
]
