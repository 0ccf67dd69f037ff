"""Image-caption rows -> model inputs: caption choice, image decoding and transforms, and the data collators.

`ContrastiveDataCollator` is the one contrastive collator: `transformers.Trainer` feeds it raw dataset rows, and
the Accelerate training loop and `hf_clip.evaluation` feed it samples that `ImageTextDataset` already decoded in
DataLoader workers. Either way a caption cell (one caption or a list of them) is resolved by `pick_caption`.
"""

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .processing_hf_clip import to_rgb_image

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD_ROWS = 64
BAD_SAMPLE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


class BadSample(ValueError):
    """A row that cannot be used: undecodable image or missing caption."""


@dataclass(frozen=True)
class ImageTextColumns:
    """Where a dataset keeps its images, captions and class labels, and the folder relative image paths are read
    from (None: the working directory)."""

    image: str = "image"
    caption: str = "caption"
    label: str | None = "label"
    base_dir: str | os.PathLike | None = None


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


def decode_image(value: Any, base_dir: str | os.PathLike | None) -> Image.Image:
    """An image cell (PIL image, array, {"bytes", "path"} dict, raw bytes or a path) -> RGB PIL image. Relative paths
    are resolved against `base_dir`."""
    if value is None:
        raise BadSample("missing image")
    return to_rgb_image(value, base_dir)


def without_image_decoding(dataset):
    """A datasets `Dataset` or `IterableDataset` with every `Image` column left undecoded ({"bytes", "path"} cells),
    so that reading a row never decodes an image: a corrupt file fails only in `decode_image`, as a skipped row."""
    if hasattr(dataset, "decode"):  # IterableDataset
        return dataset.decode(False)
    for name, feature in (dataset.features or {}).items():
        if type(feature).__name__ == "Image" and feature.decode:
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def prepare_columns(dataset, image_column: str, caption_column: str):
    """Only the image and caption columns, with images undecoded until a worker reads them, so a corrupt file becomes
    a skipped row, not a crash."""
    return without_image_decoding(dataset.select_columns([image_column, caption_column]))


@dataclass
class ImageTransform:
    """PIL image -> normalised (3, size, size) tensor. Training uses a random resized crop; evaluation resizes the
    short side and centre-crops, like the CLIP image processor."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1 / 0.9)

    def crop_box(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
        if self.train and rng is not None:
            area = width * height
            for _ in range(10):
                target = area * rng.uniform(*self.crop_scale)
                aspect = math.exp(rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        box = self.crop_box(*image.size, rng)
        resized = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC, box=box)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def image_transform_for(processor, train: bool, crop_scale_min: float = 0.8) -> ImageTransform:
    """The `ImageTransform` with the size and normalisation of `processor`'s image processor."""
    image_processor = processor.image_processor
    return ImageTransform(
        size=image_processor.crop_size["height"],
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        train=train,
        crop_scale=(crop_scale_min, 1.0),
    )


def decode_row(row: dict[str, Any], columns: ImageTextColumns, transform: ImageTransform,
               rng: np.random.Generator | None) -> tuple[torch.Tensor, str]:
    """One dataset row -> (pixel_values (3, size, size), caption). Raises one of BAD_SAMPLE_ERRORS if unusable."""
    caption = pick_caption(row[columns.caption], rng)
    return transform(decode_image(row[columns.image], columns.base_dir), rng), caption


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style rows -> samples {"pixel_values", caption column, "row_id", "skipped"}, decoded in the worker.

    With `replace_bad_rows`, a bad row is replaced by the next usable one and counted in "skipped"; without it
    (evaluation), a bad row yields None, which `ContrastiveDataCollator` drops and counts. Augmentation randomness
    comes from (seed, epoch, row), so samples do not depend on the worker that decodes them.
    """

    def __init__(self, dataset, transform: ImageTransform, columns: ImageTextColumns = ImageTextColumns(), *,
                 seed: int = 0, replace_bad_rows: bool = True):
        self.dataset = prepare_columns(dataset, columns.image, columns.caption)
        self.transform, self.columns, self.seed = transform, columns, seed
        self.replace_bad_rows = replace_bad_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, row_id: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, row_id]) if self.transform.train else None
        pixel_values, caption = decode_row(self.dataset[row_id], self.columns, self.transform, rng)
        return {"pixel_values": pixel_values, self.columns.caption: caption, "row_id": row_id}

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        attempts = MAX_CONSECUTIVE_BAD_ROWS if self.replace_bad_rows else 1
        for attempt in range(attempts):
            row_id = (index + attempt) % len(self.dataset)
            try:
                return {**self.load(row_id), "skipped": attempt}
            except BAD_SAMPLE_ERRORS as error:
                logger.debug("Skipping row %d: %s", row_id, error)
        if not self.replace_bad_rows:
            return None
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD_ROWS} consecutive unusable rows from row {index}; check the data.")


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
        images = [decode_image(image, self.base_dir) for image in self.column(rows, self.image_column)]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


class ContrastiveDataCollator(_ImageRowsCollator):
    """Image-caption rows -> `HFClipModel` inputs that make it return the contrastive loss.

    A row is either a raw dataset row, with an image under `image_column` (PIL image, array, file path, encoded bytes
    or a datasets `{"bytes", "path"}` cell; relative paths are read from `base_dir`), or a sample that
    `ImageTextDataset` decoded, with its "pixel_values" (3, size, size). Its caption cell under `caption_column` holds
    a caption or a list of captions: from a list, one non-empty caption is drawn at random (seeded by `seed`) when
    `sample_captions`, else the first is taken (deterministic, for evaluation).

    Returns pixel_values (batch, 3, size, size), input_ids and attention_mask (batch, seq) and return_loss=True.
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
    ):
        super().__init__(processor, image_column, base_dir)
        self.caption_column = caption_column
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


__all__ = [
    "BAD_SAMPLE_ERRORS",
    "BadSample",
    "ContrastiveDataCollator",
    "ImageClassificationDataCollator",
    "ImageTextColumns",
    "ImageTextDataset",
    "ImageTransform",
    "decode_image",
    "decode_row",
    "image_transform_for",
    "pick_caption",
    "prepare_columns",
    "without_image_decoding",
]
