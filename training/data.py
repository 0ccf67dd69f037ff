"""Image-caption data from HF datasets: loading, validation, decoding and augmentation in DataLoader workers.

Map-style data is read in global batches: each step's global batch is one slice of a seeded permutation and rank r
takes its share of it, so N processes see exactly the batches of one process with N times the batch size, and a
resumed run continues at the same row. Streamed data is split across processes with
`datasets.distributed.split_dataset_by_node`. Augmentation randomness is derived from (seed, epoch, row), never
from worker RNG state, which makes runs reproducible and resumable whatever the worker count.

A row whose image cannot be decoded or whose caption is empty or not a string is skipped and counted; map-style
reading then takes the next row, so batch sizes stay equal across ranks as the distributed loss requires.
"""

import functools
import glob
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError

from hf_clip import to_rgb_image

from .synthetic import build_shapes_dataset

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded shapes dataset"
MAX_CONSECUTIVE_BAD_ROWS = 64
USABILITY_PROBE_ROWS = 64
BAD_SAMPLE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class BadSample(ValueError):
    """A row that cannot be used for training: undecodable image or missing caption."""


def dataset_label(dataset_name: str | None) -> str:
    return dataset_name or EMBEDDED_DATASET


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


@functools.lru_cache(maxsize=2)
def _embedded_dataset(num_train: int) -> datasets.DatasetDict:
    return build_shapes_dataset(num_train=num_train, seed=0)


def load_split(data_args, split: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset | None:
    """One split of `--dataset_name` (or of the embedded dataset); None if the dataset has no such split."""
    name = data_args.dataset_name
    if name is None:
        splits = _embedded_dataset(data_args.embedded_num_train)
    elif _is_saved_to_disk(Path(name)):
        splits = datasets.load_from_disk(name)
        if isinstance(splits, datasets.Dataset):
            splits = datasets.DatasetDict({"train": splits})
    else:
        builder, data_files = name, None
        suffix = Path(name.replace("*", "x")).suffix
        if suffix in _FILE_BUILDERS:
            builder, data_files = _FILE_BUILDERS[suffix], name
            if "://" not in name and not glob.glob(os.path.expanduser(name)):
                raise FileNotFoundError(f"--dataset_name {name!r} matches no file.")
        try:
            return datasets.load_dataset(builder, data_args.dataset_config_name, data_files=data_files, split=split,
                                         streaming=streaming)
        except ValueError as error:
            if "Unknown split" in str(error) or "Bad split" in str(error):
                return None
            raise
    if split not in splits:
        return None
    dataset = splits[split]
    return dataset.to_iterable_dataset(num_shards=8) if streaming else dataset


def base_directory(dataset_name: str | None) -> Path:
    """Where relative image paths in a file-based dataset are resolved."""
    if dataset_name is None:
        return Path.cwd()
    path = Path(dataset_name.split("*")[0])
    return path if path.is_dir() else path.parent


def first_rows(dataset, count: int):
    """The first `count` rows (all of them when there are fewer) of a map-style or streamed dataset."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def load_train_split(data_args, columns: dict[str, str]):
    """The `--train_split` (streamed with `--streaming`), checked to hold `columns` (flag -> column name)."""
    split = load_split(data_args, data_args.train_split, streaming=data_args.streaming)
    if split is None:
        raise ValueError(f"Dataset {dataset_label(data_args.dataset_name)!r} has no split {data_args.train_split!r}.")
    check_columns(split, data_args.dataset_name, data_args.train_split, columns)
    return split


def without_image_decoding(dataset):
    """`dataset` with every `Image` column left undecoded ({"bytes", "path"} dicts), so that reading a row never
    decodes an image: a corrupt file fails only in `decode_image`, where it becomes a skipped row."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.decode(False)
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(without_image_decoding(dataset).take(1)), None)
    return list(first) if first is not None else []


def check_columns(dataset, dataset_name: str | None, split: str, columns: dict[str, str]) -> None:
    """Raise naming the dataset, the missing column and the columns that exist. `columns`: flag -> column."""
    found = column_names(dataset)
    for flag, column in columns.items():
        if column not in found:
            raise ValueError(
                f"Dataset {dataset_label(dataset_name)!r} (split {split!r}) has no column {column!r} (set by "
                f"--{flag}); found columns: {found}."
            )


def prepare_columns(dataset, image_column: str, caption_column: str):
    """Only the image and caption columns, with images undecoded until a worker reads them, so a corrupt file
    becomes a skipped row, not a crash."""
    return without_image_decoding(dataset.select_columns([image_column, caption_column]))


def decode_image(value: Any, base_dir: Path) -> Image.Image:
    """An image cell (PIL image, {"bytes", "path"} dict, raw bytes or a path) -> RGB PIL image. Relative paths are
    resolved against `base_dir`."""
    if value is None:
        raise BadSample("missing image")
    return to_rgb_image(value, base_dir)


def pick_caption(value: Any, rng: np.random.Generator | None) -> str:
    """A caption cell (str or list of str) -> one non-empty caption; random with `rng`, else the first."""
    if isinstance(value, (list, tuple)):
        candidates = [c for c in value if isinstance(c, str) and c.strip()]
        if not candidates:
            raise BadSample("no usable caption in the list")
        return candidates[rng.integers(len(candidates))] if rng is not None else candidates[0]
    if not isinstance(value, str) or not value.strip():
        raise BadSample(f"caption is {type(value).__name__} {value!r}, not a non-empty string")
    return value


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
    image_processor = processor.image_processor
    return ImageTransform(
        size=image_processor.crop_size["height"],
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        train=train,
        crop_scale=(crop_scale_min, 1.0),
    )


def decode_row(row: dict[str, Any], image_column: str, caption_column: str, transform: ImageTransform,
               base_dir: Path, rng: np.random.Generator | None) -> tuple[torch.Tensor, str]:
    """One dataset row -> (pixel_values (3, size, size), caption). Raises one of BAD_SAMPLE_ERRORS if unusable."""
    caption = pick_caption(row[caption_column], rng)
    return transform(decode_image(row[image_column], base_dir), rng), caption


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style rows -> {"pixel_values", "caption", "row_id", "skipped"}, decoded in the worker.

    With `replace_bad_rows`, a bad row is replaced by the next usable one and counted in "skipped"; without it
    (evaluation), a bad row yields None, which the collator drops and counts.
    """

    def __init__(self, dataset: datasets.Dataset, image_column: str, caption_column: str, transform: ImageTransform,
                 base_dir: Path, seed: int, replace_bad_rows: bool = True):
        self.dataset = prepare_columns(dataset, image_column, caption_column)
        self.image_column, self.caption_column = image_column, caption_column
        self.transform, self.base_dir, self.seed = transform, base_dir, seed
        self.replace_bad_rows = replace_bad_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, row_id: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, row_id]) if self.transform.train else None
        pixel_values, caption = decode_row(self.dataset[row_id], self.image_column, self.caption_column,
                                           self.transform, self.base_dir, rng)
        return {"pixel_values": pixel_values, "caption": caption, "row_id": row_id}

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


class StreamingImageTextDataset(torch.utils.data.IterableDataset):
    """Streamed rows (already split across processes) -> the same samples as `ImageTextDataset`."""

    def __init__(self, dataset: datasets.IterableDataset, image_column: str, caption_column: str,
                 transform: ImageTransform, base_dir: Path, seed: int):
        self.dataset = prepare_columns(dataset, image_column, caption_column)
        self.image_column, self.caption_column = image_column, caption_column
        self.transform, self.base_dir, self.seed = transform, base_dir, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        skipped = 0
        for position, row in enumerate(self.dataset):
            rng = np.random.default_rng([self.seed, self.epoch, worker_id, position])
            try:
                pixel_values, caption = decode_row(row, self.image_column, self.caption_column, self.transform,
                                                   self.base_dir, rng)
            except BAD_SAMPLE_ERRORS as error:
                logger.debug("Skipping streamed row %d: %s", position, error)
                skipped += 1
                continue
            yield {"pixel_values": pixel_values, "caption": caption, "row_id": -1, "skipped": skipped}
            skipped = 0


class ImageTextCollator:
    """Samples -> model inputs plus "row_ids" (batch,) and "skipped" (scalar count of bad rows behind them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        dropped = sum(sample is None for sample in samples)
        samples = [sample for sample in samples if sample is not None]
        batch = {
            "row_ids": torch.tensor([s["row_id"] for s in samples], dtype=torch.long),
            "skipped": torch.tensor(dropped + sum(s["skipped"] for s in samples)),
        }
        if not samples:  # an evaluation batch of unusable rows only
            return batch
        text = self.tokenizer([s["caption"] for s in samples], padding=True, truncation=True, return_tensors="pt")
        return {**batch, "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's row ids for each micro-batch of an epoch, starting at `start_batch`.

    Global micro-batch k of epoch e is rows perm[k·G:(k+1)·G] of a permutation seeded by (seed, e), with
    G = batch_size × num_processes; rank r reads its slice [r·batch_size, (r+1)·batch_size).
    """

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{num_rows} rows are fewer than one global batch ({batch_size} x {num_processes} processes)."
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_rows // (self.batch_size * self.num_processes)

    def __iter__(self) -> Iterator[list[int]]:
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        global_batch = self.batch_size * self.num_processes
        offset = self.process_index * self.batch_size
        for batch in range(self.start_batch, len(self)):
            start = batch * global_batch + offset
            yield permutation[start : start + self.batch_size].tolist()


class TrainBatches:
    """Endless iterator of training micro-batches over epochs, resumable at any micro-batch."""

    def __init__(self, dataset, collator: ImageTextCollator, batch_size: int, num_workers: int, num_processes: int,
                 process_index: int, seed: int, streaming: bool):
        self.dataset, self.streaming = dataset, streaming
        self.loader_kwargs = {"collate_fn": collator, "num_workers": num_workers, "pin_memory": False,
                              "persistent_workers": False}
        if streaming:
            self.sampler = None
            self.loader_kwargs.update(batch_size=batch_size, drop_last=True)
        else:
            self.sampler = GlobalBatchSampler(len(dataset), batch_size, num_processes, process_index, seed)
            self.loader_kwargs.update(batch_sampler=self.sampler)
        if num_workers > 0:
            self.loader_kwargs["prefetch_factor"] = 4

    def iterate(self, start_micro_batch: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yields (epoch, batch) from micro-batch `start_micro_batch` (counted from the start of training) on,
        forever. Map-style data jumps straight to it; streamed data is read and discarded up to it."""
        if self.streaming:
            epoch, to_discard = 0, start_micro_batch
        else:
            epoch, start_batch = divmod(start_micro_batch, len(self.sampler))
        while True:
            self.dataset.set_epoch(epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch, start_batch=start_batch)
                start_batch = 0
            batches_in_epoch = 0
            for batch in torch.utils.data.DataLoader(self.dataset, **self.loader_kwargs):
                batches_in_epoch += 1
                if self.streaming and to_discard > 0:
                    to_discard -= 1
                    continue
                yield epoch, batch
            if self.streaming and batches_in_epoch == 0:
                raise RuntimeError("The streamed training split gave this process no complete batch.")
            epoch += 1


def build_train_dataset(dataset, data_args, transform: ImageTransform, seed: int, num_processes: int,
                        process_index: int):
    base_dir = base_directory(data_args.dataset_name)
    if data_args.max_train_samples is not None:
        dataset = first_rows(dataset, data_args.max_train_samples)
    if data_args.streaming:
        dataset = dataset.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        return StreamingImageTextDataset(dataset, data_args.image_column, data_args.caption_column, transform,
                                         base_dir, seed)
    return ImageTextDataset(dataset, data_args.image_column, data_args.caption_column, transform, base_dir, seed)


def check_usable_rows(dataset, data_args, split: str) -> None:
    """Fail at start-up, naming the dataset and columns, when the first rows hold no usable sample."""
    base_dir = base_directory(data_args.dataset_name)
    probe = prepare_columns(first_rows(dataset, USABILITY_PROBE_ROWS), data_args.image_column,
                            data_args.caption_column)
    errors = []
    for row in probe:
        try:
            pick_caption(row[data_args.caption_column], None)
            decode_image(row[data_args.image_column], base_dir)
            return
        except BAD_SAMPLE_ERRORS as error:
            errors.append(str(error))
    raise ValueError(
        f"Dataset {dataset_label(data_args.dataset_name)!r} (split {split!r}) has no usable rows among the first "
        f"{len(errors)} (image column {data_args.image_column!r}, caption column {data_args.caption_column!r}). "
        f"First problem: {errors[0] if errors else 'the split is empty'}."
    )


def caption_samples(dataset, caption_column: str, limit: int = 200_000) -> Iterator[str]:
    """Captions for tokenizer training (lists flattened), from the first `limit` rows; no image is decoded."""
    if isinstance(dataset, datasets.IterableDataset):
        rows = (row[caption_column] for row in dataset.select_columns([caption_column]).take(limit))
    else:
        rows = dataset.select(range(min(limit, len(dataset))))[caption_column]
    for value in rows:
        for caption in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(caption, str) and caption.strip():
                yield caption


def worker_count(requested: int) -> int:
    return max(0, min(requested, os.cpu_count() or 1))
