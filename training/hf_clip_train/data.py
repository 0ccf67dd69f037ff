"""Everything that reads image-caption datasets: loading and checking splits, decoding and augmenting rows in
DataLoader workers, the map-style and streamed datasets, the global-batch sampler, and dataset-level embedding and
evaluation.

Map-style data is read in global batches: each step's global batch is one slice of a seeded permutation and rank r
takes its share of it, so N processes see exactly the batches of one process with N times the batch size, and a
resumed run continues at the same row. Streamed data is split across processes with
`datasets.distributed.split_dataset_by_node` (whole shards per process when their number divides evenly, else every
process reads every shard and keeps every world_size-th row), then `datasets` gives each DataLoader worker whole
shards of that share: every row is read once per epoch. Augmentation randomness is derived from (seed, epoch, row),
or (seed, epoch, worker, position) for streams, never from worker RNG state, which makes runs reproducible and
resumable (streams: with the same number of workers).

Training samples are uint8 pixels, normalised on the device (`normalize_pixels`); JPEGs are decoded at the smallest
DCT scale that keeps the crop sharp (`ImageTransform`).

A row whose image cannot be decoded or whose caption is empty or not a string is skipped and counted once, in the
batch it belongs to. Map-style reading fills its slot with a usable row drawn, from (seed, epoch, batch), among the
rows outside the global batch, so batch sizes stay equal across ranks as the distributed loss requires, no row
appears twice in a global batch, and a resumed run reads the same rows.

Evaluation (`evaluate_split`): zero-shot classification, where each class embedding is the mean of the
L2-normalised embeddings of its prompts (`hf_clip.zero_shot_classifier`) and an image's prediction is its most
similar class, and image-text retrieval, which pairs each image with its first caption.
"""

import collections
import copy
import functools
import glob
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from PIL import Image
from tqdm.auto import tqdm

from hf_clip import PHOTO_TEMPLATES, ContrastiveDataCollator, retrieval_recall, top_k_accuracy, zero_shot_classifier
from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image, pick_caption

from .args import DatasetArguments, EvalArguments
from .synthetic import build_shapes_dataset

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded shapes dataset"
_REPLACEMENT_STREAM = 1  # keeps the replacement draws apart from a row's own augmentation stream
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")
USABILITY_PROBE_ROWS = 64
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the data-parallel processes."""

    index: int = 0
    count: int = 1


@dataclass(frozen=True)
class ImageTextColumns:
    """Where a dataset keeps its images, captions and class labels, and the folder relative image paths are read
    from (None: the working directory)."""

    image: str = "image"
    caption: str = "caption"
    label: str | None = "label"
    base_dir: str | os.PathLike | None = None


def dataset_label(dataset_name: str | None) -> str:
    return dataset_name or EMBEDDED_DATASET


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


@functools.lru_cache(maxsize=2)
def _embedded_dataset(num_train: int) -> datasets.DatasetDict:
    return build_shapes_dataset(num_train=num_train, seed=0)


def load_split(data_args: DatasetArguments, split: str, streaming: bool = False
               ) -> datasets.Dataset | datasets.IterableDataset | None:
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


def columns_of(data_args: DatasetArguments) -> ImageTextColumns:
    """The image, caption and label columns of `--dataset_name`, and where its relative image paths are read from."""
    return ImageTextColumns(image=data_args.image_column, caption=data_args.caption_column,
                            label=data_args.label_column, base_dir=base_directory(data_args.dataset_name))


def load_train_split(data_args: DatasetArguments, columns: dict[str, str]):
    """The `--train_split` (streamed with `--streaming`), checked to hold `columns` (flag -> column name)."""
    split = load_split(data_args, data_args.train_split, streaming=data_args.streaming)
    if split is None:
        raise ValueError(f"Dataset {dataset_label(data_args.dataset_name)!r} has no split {data_args.train_split!r}.")
    check_columns(split, data_args.dataset_name, data_args.train_split, columns)
    return split


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
    """An image -> a (3, size, size) tensor.

    Training (`train=True`): a random resized crop to uint8 pixels, resampled once (bicubic) from the crop box, which
    is drawn with `rng` from the original size. An encoded JPEG (bytes, a path, a datasets {"bytes", "path"} cell) is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's reduced DCT through `Image.draft`) whenever the crop still spans at
    least `size` pixels at that scale, so no full-size image is built. `normalize_pixels` turns a batch of them into
    the model's input, on the device.
    Evaluation (`train=False`): CLIP's preprocessing, as the CLIP image processor: resize the short side,
    centre-crop, normalise; float32.
    """

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

    def __call__(self, image: Any, rng: np.random.Generator | None = None,
                 base_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """`image`: anything `hf_clip.decode_image` reads; relative paths are read from `base_dir`. Returns uint8
        (training) or normalised float32 (evaluation) pixels (3, size, size)."""
        if self.train:
            jpeg = _lazy_jpeg(image, base_dir)
            if jpeg is not None:
                with jpeg:
                    return self._reduced_crop(jpeg, rng)
        image = decode_image(image, base_dir)
        box = self.crop_box(*image.size, rng)
        resized = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC, box=box)
        if self.train:
            return _uint8_pixels(resized)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def _reduced_crop(self, jpeg: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        """The crop of a not yet decoded JPEG, decoded at the smallest DCT scale that keeps `size` pixels across it."""
        width, height = jpeg.size
        box = self.crop_box(width, height, rng)
        wanted = (math.ceil(width * self.size / (box[2] - box[0])), math.ceil(height * self.size / (box[3] - box[1])))
        drafted = jpeg.draft("RGB", wanted)
        if drafted is not None:
            _, (_, _, reduced_width, reduced_height) = drafted
            box = (box[0] * reduced_width / width, box[1] * reduced_height / height,
                   box[2] * reduced_width / width, box[3] * reduced_height / height)
        resized = jpeg.resize((self.size, self.size), resample=Image.Resampling.BICUBIC, box=box)
        return _uint8_pixels(resized if resized.mode == "RGB" else resized.convert("RGB"))


# A JPEG is cropped from its reduced-scale decode only when it is at most this elongated; `hf_clip.decode_image` cuts
# far more elongated images (beyond 16:1) to their centre first, and such images take that path so that their crop
# box is drawn from the same size as before.
REDUCED_DECODE_MAX_ASPECT_RATIO = 4


def _lazy_jpeg(image: Any, base_dir: str | os.PathLike | None) -> Image.Image | None:
    """`image` opened but not decoded, when it is an encoded RGB or greyscale JPEG (bytes, a path, or a datasets
    {"bytes", "path"} cell) of moderate aspect ratio; None otherwise, and when it cannot be opened (`decode_image`
    then names the problem)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        source = os.path.join(base_dir, image) if base_dir is not None else image
    else:
        return None
    try:
        opened = Image.open(source)
    except BAD_SAMPLE_ERRORS:
        return None
    width, height = opened.size
    if (opened.format == "JPEG" and opened.mode in ("RGB", "L") and min(width, height) > 0
            and max(width, height) <= REDUCED_DECODE_MAX_ASPECT_RATIO * min(width, height)):
        return opened
    opened.close()
    return None


def _uint8_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W): a view of its (H, W, 3) pixels; stacking a batch makes the one copy."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@functools.cache
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def normalize_pixels(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (batch, 3, H, W) from the training transform -> the model's float32 input
    (pixel_values / 255 - mean) / std, computed where the pixels are (on the device in training, so a batch crosses
    to it as bytes). The values are those the host computed from the same pixels before, bit for bit."""
    if pixel_values.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes the training transform's uint8 pixels, got {pixel_values.dtype}.")
    pixels = pixel_values.float() / 255.0
    device = pixels.device
    return ((pixels - _channel_constants(tuple(mean), device)) / _channel_constants(tuple(std), device)).contiguous()


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
    """One dataset row -> (pixel_values (3, size, size), caption); the image cell reaches `transform` undecoded.
    Raises one of BAD_SAMPLE_ERRORS if unusable."""
    caption = pick_caption(row[columns.caption], rng)
    return transform(row[columns.image], rng, columns.base_dir), caption


class MicroBatchRows(list):
    """This process's row ids of one micro-batch (a list: what `ImageTextDataset.__getitems__` receives from the
    DataLoader), with what replacing an unusable row needs: the micro-batch's number in its epoch, the rows of the
    whole global batch, and this process's place."""

    def __init__(self, rows: Sequence[int], batch: int, global_rows: Sequence[int], process: ProcessShare):
        super().__init__(rows)
        self.batch, self.global_rows, self.process = batch, list(global_rows), process


def replacement_candidates(num_rows: int, excluded: set[int], rng: np.random.Generator, process: ProcessShare,
                           random_draws: int) -> Iterator[int]:
    """Rows that may fill the slots of unusable rows of one batch, each at most once: up to `random_draws` rows drawn
    at random, then every remaining row once, from a random start. Only rows outside `excluded` (the global batch)
    and, among several processes, rows r with r % count == index (so two processes never pick the same row)."""
    own = range(process.index, num_rows, process.count)
    if len(own) == 0:
        return
    seen = set(excluded)
    for _ in range(random_draws):
        row = own[int(rng.integers(len(own)))]
        if row not in seen:
            seen.add(row)
            yield row
    start = int(rng.integers(len(own)))
    for offset in range(len(own)):
        row = own[(start + offset) % len(own)]
        if row not in seen:
            seen.add(row)
            yield row


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style rows -> samples {"pixel_values", caption column, "row_id", "skipped"}, decoded in the worker.

    The DataLoader reads a micro-batch at once (`__getitems__`). With `replace_bad_rows`, an unusable row is counted
    in its slot's "skipped" and its slot filled with a usable row from `replacement_candidates`, drawn from (seed,
    epoch, batch): rows outside the global batch, never one twice, so the batch stays full and resumes read the same
    rows; a failed candidate is not counted (it is counted in its own batch). Only when a whole pass finds no usable
    row does it raise. Without `replace_bad_rows` (evaluation), an unusable row yields None, which
    `ContrastiveDataCollator` drops and counts. Augmentation randomness comes from (seed, epoch, row), so samples do
    not depend on the worker that decodes them.
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

    def load(self, row_id: int) -> dict[str, Any] | None:
        """The sample of `row_id`, or None (logged at debug level) when the row is unusable."""
        rng = np.random.default_rng([self.seed, self.epoch, row_id]) if self.transform.train else None
        try:
            pixel_values, caption = decode_row(self.dataset[row_id], self.columns, self.transform, rng)
        except BAD_SAMPLE_ERRORS as error:
            logger.debug("Skipping row %d: %s", row_id, error)
            return None
        return {"pixel_values": pixel_values, self.columns.caption: caption, "row_id": row_id}

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.__getitems__([index])[0]

    def __getitems__(self, rows: Sequence[int]) -> list[dict[str, Any] | None]:
        """The samples of one micro-batch, in the order of `rows` (a `MicroBatchRows` from `GlobalBatchSampler`, or
        any list of row ids, taken as a whole global batch of one process)."""
        samples, candidates = [], None
        for row_id in rows:
            sample = self.load(row_id)
            if sample is None and self.replace_bad_rows:
                if candidates is None:
                    batch = getattr(rows, "batch", rows[0])
                    candidates = replacement_candidates(
                        len(self.dataset), set(getattr(rows, "global_rows", rows)),
                        np.random.default_rng([self.seed, self.epoch, batch, _REPLACEMENT_STREAM]),
                        getattr(rows, "process", ProcessShare()), random_draws=4 * len(rows))
                sample = {**self.replacement_for(row_id, candidates), "skipped": 1}
            samples.append(sample if sample is None or "skipped" in sample else {**sample, "skipped": 0})
        return samples

    def replacement_for(self, row_id: int, candidates: Iterator[int]) -> dict[str, Any]:
        for candidate in candidates:
            sample = self.load(candidate)
            if sample is not None:
                return sample
        raise RuntimeError(
            f"No usable row is left to replace unusable row {row_id}: a whole pass over the {len(self.dataset)} rows "
            f"of the training split found none outside this batch (image column {self.columns.image!r}, caption "
            f"column {self.columns.caption!r}). Check the data."
        )


class StreamingImageTextDataset(torch.utils.data.IterableDataset):
    """Streamed rows (already split across processes) -> the same samples as `ImageTextDataset`, each with its
    "stream" and "position": the DataLoader worker that read it (`datasets` gives worker w of W the shards w, w + W,
    ... of this process's shards) and how many rows of that worker's stream were read up to and including it.

    `set_epoch(epoch, positions)` makes worker w pass over the first positions[w] rows of its stream without decoding
    them: a resumed run reads on from where each worker stood."""

    def __init__(self, dataset: datasets.IterableDataset, transform: ImageTransform, columns: ImageTextColumns, *,
                 seed: int):
        self.dataset = prepare_columns(dataset, columns.image, columns.caption)
        self.transform, self.columns, self.seed = transform, columns, seed
        self.epoch, self.start_positions = 0, None

    def set_epoch(self, epoch: int, positions: Sequence[int] | None = None) -> None:
        self.epoch, self.start_positions = epoch, positions
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        stream = worker.id if worker is not None else 0
        start = self.start_positions[stream] if self.start_positions else 0
        skipped = 0
        for position, row in enumerate(itertools.islice(self.dataset, start, None), start=start):
            rng = np.random.default_rng([self.seed, self.epoch, stream, position])
            try:
                pixel_values, caption = decode_row(row, self.columns, self.transform, rng)
            except BAD_SAMPLE_ERRORS as error:
                logger.debug("Skipping streamed row %d: %s", position, error)
                skipped += 1
                continue
            yield {"pixel_values": pixel_values, self.columns.caption: caption, "row_id": -1, "skipped": skipped,
                   "stream": stream, "position": position + 1}
            skipped = 0


class _StreamBatches(torch.utils.data.IterableDataset):
    """One DataLoader worker's stream as micro-batches, collated in the worker: {"batch", "stream", "position"} for
    each full one, then {"tail", "stream"} with the samples left over at the end of the stream (perhaps none),
    uncollated, so that `TrainBatches` merges the workers' leftovers instead of dropping them."""

    def __init__(self, samples: StreamingImageTextDataset, collator: ContrastiveDataCollator, batch_size: int):
        self.samples, self.collator, self.batch_size = samples, collator, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        stream = worker.id if worker is not None else 0
        group = []
        for sample in self.samples:
            group.append(sample)
            if len(group) == self.batch_size:
                yield {"batch": self.collator(group), "stream": stream, "position": sample["position"]}
                group = []
        yield {"tail": group, "stream": stream}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's row ids (`MicroBatchRows`) for each micro-batch of an epoch, starting at `start_batch`.

    Global micro-batch k of epoch e is rows perm[k·G:(k+1)·G] of a permutation seeded by (seed, e), with
    G = batch_size × num_processes; rank r reads its slice [r·batch_size, (r+1)·batch_size).
    """

    def __init__(self, num_rows: int, batch_size: int, process: ProcessShare, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.num_processes, self.process_index = process.count, process.index
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{num_rows} rows are fewer than one global batch ({batch_size} x {process.count} processes)."
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_rows // (self.batch_size * self.num_processes)

    def __iter__(self) -> Iterator[MicroBatchRows]:
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        global_batch = self.batch_size * self.num_processes
        offset = self.process_index * self.batch_size
        process = ProcessShare(self.process_index, self.num_processes)
        for batch in range(self.start_batch, len(self)):
            rows = permutation[batch * global_batch : (batch + 1) * global_batch].tolist()
            yield MicroBatchRows(rows[offset : offset + self.batch_size], batch, rows, process)


class TrainBatches:
    """Endless iterator of training micro-batches over epochs, resumable at any micro-batch.

    `dataset` is an `ImageTextDataset` (read in global batches by `GlobalBatchSampler`; its place is the micro-batch
    count) or a `StreamingImageTextDataset` (already split across processes). A stream is read by W = max(1,
    num_workers) workers, each from its own shards; their micro-batches are handed out in turn (worker 0, 1, ...,
    skipping workers whose stream has ended), then the samples left over at the ends of the W streams are merged
    into further micro-batches; only the last < batch_size samples of an epoch wait for no batch. `state_dict()`
    says where the stream stands after the last micro-batch handed out, and `iterate(state=...)` continues exactly
    there: each worker passes over the rows it had read without decoding them.
    """

    def __init__(self, dataset: ImageTextDataset | StreamingImageTextDataset, collator: ContrastiveDataCollator,
                 batch_size: int, *, seed: int, num_workers: int = 0, process: ProcessShare = ProcessShare()):
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.streams = max(1, num_workers)
        self.loader_kwargs = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
                              "persistent_workers": False}
        if self.streaming:
            self.sampler = None
            self.loader_kwargs.update(batch_size=None)
        else:
            self.sampler = GlobalBatchSampler(len(dataset), batch_size, process, seed)
            self.loader_kwargs.update(batch_sampler=self.sampler, collate_fn=collator)
        if num_workers > 0:
            self.loader_kwargs["prefetch_factor"] = 4
        self._stream_state = None

    def iterate(self, start_micro_batch: int = 0, state: dict | None = None
                ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yields (epoch, batch) from micro-batch `start_micro_batch` (counted from the start of training) on,
        forever. Map-style data jumps straight to it. Streamed data continues from `state` (a `state_dict()`); without
        one, it is read and discarded up to `start_micro_batch`."""
        if self.streaming:
            yield from self._iterate_stream(start_micro_batch, state)
            return
        epoch, start_batch = divmod(start_micro_batch, len(self.sampler))
        while True:
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start_batch=start_batch)
            start_batch = 0
            for batch in torch.utils.data.DataLoader(self.dataset, **self.loader_kwargs):
                yield epoch, batch
            epoch += 1

    def state_dict(self) -> dict | None:
        """For streamed data, where it stands after the last micro-batch handed out: {"epoch", "streams",
        "positions" (rows read by each worker up to its last batch handed out), "next_stream", "merged_batches"
        (batches of leftovers handed out)}; None for map-style data."""
        return None if self._stream_state is None else copy.deepcopy(self._stream_state)

    def _iterate_stream(self, start_micro_batch: int, state: dict | None) -> Iterator[tuple[int, dict]]:
        if state is not None and state["streams"] != self.streams:
            logger.warning("The checkpoint's stream was read by %d DataLoader workers, this run has %d: epoch %d "
                           "starts again from its beginning.", state["streams"], self.streams, state["epoch"])
            state = {"epoch": state["epoch"], "streams": self.streams, "positions": [0] * self.streams,
                     "next_stream": 0, "merged_batches": 0}
        epoch = state["epoch"] if state is not None else 0
        to_discard = start_micro_batch if state is None else 0
        while True:
            handed_out = 0
            for batch in self._stream_epoch(epoch, state):
                handed_out += 1
                if to_discard > 0:
                    to_discard -= 1
                    continue
                yield epoch, batch
            if handed_out == 0 and state is None:
                raise RuntimeError("The streamed training split gave this process no complete batch.")
            state = None
            epoch += 1

    def _stream_epoch(self, epoch: int, state: dict | None) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of streamed micro-batches in their fixed order, from `state` (None: from the start)."""
        positions = list(state["positions"]) if state is not None else [0] * self.streams
        stream = state["next_stream"] if state is not None else 0
        merged_done = state["merged_batches"] if state is not None else 0
        self.dataset.set_epoch(epoch, positions)
        loader = iter(torch.utils.data.DataLoader(_StreamBatches(self.dataset, self.collator, self.batch_size),
                                                  **self.loader_kwargs))
        waiting, tails, ended = [collections.deque() for _ in range(self.streams)], {}, set()
        while len(ended) < self.streams:
            while not waiting[stream] and stream not in tails:
                item = next(loader)
                if "tail" in item:
                    tails[item["stream"]] = item["tail"]
                else:
                    waiting[item["stream"]].append(item)
            if not waiting[stream]:
                ended.add(stream)
                stream = (stream + 1) % self.streams
                continue
            item = waiting[stream].popleft()
            positions[stream] = item["position"]
            stream = (stream + 1) % self.streams
            self._stream_state = {"epoch": epoch, "streams": self.streams, "positions": list(positions),
                                  "next_stream": stream, "merged_batches": 0}
            yield item["batch"]
        leftovers = [sample for index in range(self.streams) for sample in tails[index]]
        for merged in range(merged_done, len(leftovers) // self.batch_size):
            self._stream_state = {"epoch": epoch, "streams": self.streams, "positions": list(positions),
                                  "next_stream": stream, "merged_batches": merged + 1}
            yield self.collator(leftovers[merged * self.batch_size : (merged + 1) * self.batch_size])


def build_train_dataset(dataset, data_args: DatasetArguments, transform: ImageTransform, seed: int,
                        process: ProcessShare = ProcessShare()) -> ImageTextDataset | StreamingImageTextDataset:
    """The training split as decoded samples: cut to `--max_train_samples`; streamed data shuffled in a buffer and
    split between processes."""
    if data_args.max_train_samples is not None:
        dataset = first_rows(dataset, data_args.max_train_samples)
    if data_args.streaming:
        dataset = dataset.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=process.index, world_size=process.count)
        return StreamingImageTextDataset(dataset, transform, columns_of(data_args), seed=seed)
    return ImageTextDataset(dataset, transform, columns_of(data_args), seed=seed)


def check_usable_rows(dataset, data_args: DatasetArguments, split: str) -> None:
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


def decodable_images(dataset, data_args: DatasetArguments, limit: int = USABILITY_PROBE_ROWS
                     ) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """(row, RGB image) for each row among the first `limit` whose image decodes; the others are passed over."""
    base_dir = base_directory(data_args.dataset_name)
    for row in without_image_decoding(first_rows(dataset, limit)):
        try:
            yield row, decode_image(row[data_args.image_column], base_dir)
        except BAD_SAMPLE_ERRORS:
            continue


def typical_image_size(dataset, data_args: DatasetArguments) -> int | None:
    """The median longer side, in pixels, of the decodable images among the first rows; None if none decodes."""
    sides = [max(image.size) for _, image in decodable_images(dataset, data_args)]
    return int(np.median(sides)) if sides else None


def first_decodable_image(dataset, data_args: DatasetArguments) -> tuple[dict[str, Any], Image.Image] | None:
    """The first (row, image) among the first rows whose image decodes; None if there is none."""
    return next(decodable_images(dataset, data_args), None)


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


def load_eval_splits(data_args: DatasetArguments, eval_args: EvalArguments, columns: dict[str, str] | None = None
                     ) -> dict:
    """The `--eval_splits` that exist, checked for `columns` (flag -> column; default: the image and caption columns)
    and cut to `--max_eval_samples`."""
    columns = columns or {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    splits = {}
    for name in eval_args.eval_splits:
        dataset = load_split(data_args, name)
        if dataset is None:
            logger.warning("Dataset %r has no split %r; not evaluating on it.", dataset_label(data_args.dataset_name),
                           name)
            continue
        check_columns(dataset, data_args.dataset_name, name, columns)
        if eval_args.max_eval_samples is not None:
            dataset = first_rows(dataset, eval_args.max_eval_samples)
        splits[name] = dataset
    return splits


def check_label_columns(splits: dict, data_args: DatasetArguments) -> None:
    """Refuse at start-up, naming the split and column, a `--label_column` that zero-shot evaluation cannot read
    class names from (not a `ClassLabel`); splits without the column are evaluated on retrieval only."""
    label = data_args.label_column
    for name, dataset in splits.items():
        if not label or label not in column_names(dataset):
            continue
        feature = (dataset.features or {}).get(label)
        if not hasattr(feature, "names"):
            raise ValueError(
                f"Column {label!r} of {dataset_label(data_args.dataset_name)!r} (split {name!r}) is {feature}, not a "
                f"ClassLabel, so it names no classes for zero-shot evaluation. Cast it with "
                f"dataset.cast_column({label!r}, datasets.ClassLabel(names=[...])), or pass --label_column '' to "
                "evaluate retrieval only."
            )


@dataclass
class SplitEmbeddings:
    """A split's normalised image and first-caption embeddings (n, dim), the dataset row of each (n,), and the
    number of rows left out as unusable."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    row_ids: torch.Tensor
    skipped: int


def _shared(split_across_processes: bool) -> bool:
    return split_across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _process_share(num_rows: int) -> range:
    """This process's contiguous share of `num_rows` rows; the first `num_rows % world_size` get one more."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    per_process, extra = divmod(num_rows, world_size)
    start = rank * per_process + min(rank, extra)
    return range(start, start + per_process + (1 if rank < extra else 0))


@torch.no_grad()
def embed_split(model, processor, dataset, *, columns: ImageTextColumns = ImageTextColumns(), batch_size: int = 256,
                num_workers: int = 0, split_across_processes: bool = False, description: str | None = None
                ) -> SplitEmbeddings:
    """Embed every usable row of a map-style `dataset` (images with the evaluation transform, first captions)."""
    shared = _shared(split_across_processes)
    rows = _process_share(len(dataset)) if shared else range(len(dataset))
    local = ImageTextDataset(dataset.select(rows), image_transform_for(processor, train=False), columns,
                             replace_bad_rows=False)
    loader = torch.utils.data.DataLoader(
        local, batch_size=batch_size, num_workers=num_workers,
        collate_fn=ContrastiveDataCollator(processor, columns.image, columns.caption, sample_captions=False))
    image_embeds, text_embeds, row_ids, skipped = [], [], [], 0
    show = description is not None and (not shared or dist.get_rank() == 0)
    for batch in tqdm(loader, desc=description, disable=not show, leave=False):
        skipped += int(batch["skipped"])
        if batch["row_ids"].numel() == 0:
            continue
        outputs = model(**{key: batch[key].to(model.device) for key in MODEL_INPUTS})
        image_embeds.append(outputs.image_embeds.float().cpu())
        text_embeds.append(outputs.text_embeds.float().cpu())
        row_ids.append(torch.tensor(rows)[batch["row_ids"]])
    parts = [(torch.cat(image_embeds) if image_embeds else None, torch.cat(text_embeds) if text_embeds else None,
              torch.cat(row_ids) if row_ids else None, skipped)]
    if shared:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    usable = [part for part in parts if part[0] is not None]
    if not usable:
        raise ValueError(f"No usable row among the {len(dataset)} rows of the split (image column "
                         f"{columns.image!r}, caption column {columns.caption!r}).")
    return SplitEmbeddings(torch.cat([p[0] for p in usable]), torch.cat([p[1] for p in usable]),
                           torch.cat([p[2] for p in usable]), sum(p[3] for p in parts))


def evaluate_split(model, processor, dataset, *, columns: ImageTextColumns = ImageTextColumns(),
                   class_names: Sequence[str] | None = None, templates: Sequence[str] = PHOTO_TEMPLATES,
                   batch_size: int = 256, num_workers: int = 0, split_across_processes: bool = False,
                   description: str | None = None) -> dict[str, float]:
    """Retrieval recall@1/5/10 on one split and, when it has the `columns.label` column, zero-shot top-1/top-5 over
    `class_names` (default: the column's `ClassLabel` names) with prompt ensembling over `templates`.

    Returns {"num_samples", "skipped_samples", "image_to_text_R@k", "text_to_image_R@k", "zero_shot_top1",
    "zero_shot_top5"}, accuracies in [0, 1].
    """
    was_training = model.training
    model.eval()
    embedded = embed_split(model, processor, dataset, columns=columns, batch_size=batch_size,
                           num_workers=num_workers, split_across_processes=split_across_processes,
                           description=description)
    results = {"num_samples": len(embedded.row_ids), "skipped_samples": embedded.skipped}
    results.update(retrieval_recall(embedded.image_embeds, embedded.text_embeds))
    if columns.label and columns.label in dataset.column_names:
        names = list(class_names or dataset.features[columns.label].names)
        classifier = zero_shot_classifier(model, processor.tokenizer, names, list(templates))
        labels = torch.tensor(dataset[columns.label])[embedded.row_ids]
        accuracy = top_k_accuracy(embedded.image_embeds @ classifier.cpu().T, labels)
        results.update({f"zero_shot_{key}": value for key, value in accuracy.items()})
    model.train(was_training)
    return results


# Embedding a whole dataset for search (`hf_clip_train.search`). Rows are embedded in shards of `shard_size`
# consecutive row ids; shard s belongs to process s mod N, so N processes write exactly the shards one process
# writes. Each shard is written to a temporary folder and renamed when complete, so a killed run leaves only whole
# shards and redoes only the unfinished ones.

SHARD_INFO = "shard.json"
SHARD_PATTERN = "shard-{:05d}"


class EmbeddingRows(torch.utils.data.Dataset):
    """Rows -> samples {"row_id", "pixel_values" (3, size, size), and "caption" when `columns.caption` is set},
    decoded in the DataLoader worker with the evaluation transform. An unusable row (undecodable image, empty
    caption) gives {"row_id", "error"}, so it is skipped and listed, never fatal.

    `rows` is a map-style `datasets.Dataset` or a list of streamed rows, images undecoded; sample i is row
    `first_row_id + i`. Unlike `ImageTextDataset`, a caption is optional (image-only indexes) and a bad row keeps its
    id and the reason it is unusable.
    """

    def __init__(self, rows, transform: ImageTransform, columns: ImageTextColumns, first_row_id: int = 0):
        self.rows, self.transform, self.columns, self.first_row_id = rows, transform, columns, first_row_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_id = self.first_row_id + index
        row = self.rows[index]
        try:
            if self.columns.caption is None:
                return {"row_id": row_id,
                        "pixel_values": self.transform(decode_image(row[self.columns.image], self.columns.base_dir))}
            pixel_values, caption = decode_row(row, self.columns, self.transform, None)
            return {"row_id": row_id, "pixel_values": pixel_values, "caption": caption}
        except BAD_SAMPLE_ERRORS as error:
            return {"row_id": row_id, "error": re.sub(r" at 0x[0-9a-f]+", "", f"{type(error).__name__}: {error}")}


class EmbeddingCollator:
    """`EmbeddingRows` samples -> {"row_ids" (b,), "skipped" [(row_id, error)], and for b > 0 usable rows
    "pixel_values" (b, 3, size, size) plus, with a tokenizer, "input_ids" and "attention_mask" (b, seq)}."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        usable = [sample for sample in samples if "error" not in sample]
        batch = {"row_ids": torch.tensor([sample["row_id"] for sample in usable], dtype=torch.long),
                 "skipped": [(sample["row_id"], sample["error"]) for sample in samples if "error" in sample]}
        if usable:
            batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in usable])
        if usable and self.tokenizer is not None:
            text = self.tokenizer([sample["caption"] for sample in usable], padding=True, truncation=True,
                                  return_tensors="pt")
            batch.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        return batch


@torch.no_grad()
def embed_batch(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised projected image embeddings (b, dim) and, when the batch has captions, text embeddings (b, dim),
    as float32 on the CPU."""
    pixel_values = batch["pixel_values"].to(model.device, dtype=model.dtype)
    image = model.get_image_features(pixel_values=pixel_values).pooler_output
    text = None
    if "input_ids" in batch:
        text = model.get_text_features(input_ids=batch["input_ids"].to(model.device),
                                       attention_mask=batch["attention_mask"].to(model.device)).pooler_output
        text = torch.nn.functional.normalize(text.float(), dim=-1).cpu()
    return torch.nn.functional.normalize(image.float(), dim=-1).cpu(), text


@dataclass
class ShardEmbeddings:
    """One shard's embeddings while it is being filled: rows [start, stop) of the dataset."""

    index: int
    start: int
    stop: int
    row_ids: list[torch.Tensor]
    image_embeds: list[torch.Tensor]
    text_embeds: list[torch.Tensor]
    skipped: list[dict[str, Any]]

    @classmethod
    def empty(cls, index: int, shard_size: int, num_rows: int | None = None) -> "ShardEmbeddings":
        stop = (index + 1) * shard_size
        return cls(index, index * shard_size, stop if num_rows is None else min(stop, num_rows), [], [], [], [])

    def add(self, batch: dict[str, Any], model) -> int:
        """Embed `batch` into the shard; returns the number of rows it covered (usable or not)."""
        self.skipped.extend({"row_id": row_id, "error": error} for row_id, error in batch["skipped"])
        if batch["row_ids"].numel():
            image, text = embed_batch(model, batch)
            self.row_ids.append(batch["row_ids"])
            self.image_embeds.append(image)
            if text is not None:
                self.text_embeds.append(text)
        return batch["row_ids"].numel() + len(batch["skipped"])


def shard_path(shard_dir: str | os.PathLike, index: int) -> Path:
    return Path(shard_dir) / SHARD_PATTERN.format(index)


def finished_shards(shard_dir: str | os.PathLike) -> set[int]:
    """Indices of the shards whose folder was completed (renamed from its temporary name)."""
    found = set()
    for path in Path(shard_dir).glob("shard-*"):
        if path.name[len("shard-"):].isdigit() and (path / SHARD_INFO).is_file():
            found.add(int(path.name[len("shard-"):]))
    return found


def _embedding_features(dim: int, with_text: bool) -> datasets.Features:
    vector = datasets.List(datasets.Value("float32"), length=dim)
    features = {"row_id": datasets.Value("int64"), "image_embedding": vector}
    if with_text:
        features["text_embedding"] = vector
    return datasets.Features(features)


def write_embedding_shard(shard_dir: str | os.PathLike, shard: ShardEmbeddings, kept: datasets.Dataset | None,
                          dim: int, with_text: bool) -> Path:
    """Save the shard as a `datasets` dataset (`row_id`, `image_embedding`, `text_embedding`, the kept columns)
    with its `shard.json` (row range, skipped rows) in a temporary folder, then rename it into place."""
    row_ids = torch.cat(shard.row_ids) if shard.row_ids else torch.zeros(0, dtype=torch.long)
    values = {"row_id": row_ids.numpy(),
              "image_embedding": torch.cat(shard.image_embeds).numpy() if shard.image_embeds else np.zeros((0, dim))}
    if with_text:
        values["text_embedding"] = torch.cat(shard.text_embeds).numpy() if shard.text_embeds else np.zeros((0, dim))
    embeddings = datasets.Dataset.from_dict(values, features=_embedding_features(dim, with_text))
    if kept is not None:
        embeddings = datasets.concatenate_datasets([embeddings, kept], axis=1)
    final = shard_path(shard_dir, shard.index)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    embeddings.save_to_disk(str(temporary), num_shards=1)
    info = {"index": shard.index, "start": shard.start, "stop": shard.stop, "num_embedded": len(row_ids),
            "skipped": sorted(shard.skipped, key=lambda item: item["row_id"])}
    (temporary / SHARD_INFO).write_text(json.dumps(info))
    os.replace(temporary, final)
    return final


def _batch_slices(start: int, stop: int, batch_size: int) -> list[list[int]]:
    return [list(range(first, min(first + batch_size, stop))) for first in range(start, stop, batch_size)]


@dataclass
class EmbeddingSettings:
    """How `embed_dataset` reads and embeds: the columns (caption None: images only), the columns copied into the
    embeddings dataset, rows per shard and per batch, and DataLoader workers."""

    columns: ImageTextColumns
    keep_columns: Sequence[str] = ()
    shard_size: int = 10_000
    batch_size: int = 256
    num_workers: int = 0


class ShardedEmbedder:
    """Embeds this process's unfinished shards of a dataset into `shard_dir` (see `embed_dataset`)."""

    def __init__(self, model, processor, shard_dir: str | os.PathLike, settings: EmbeddingSettings,
                 process: ProcessShare, progress: tqdm):
        self.model, self.shard_dir, self.settings, self.progress = model, Path(shard_dir), settings, progress
        self.transform = image_transform_for(processor, train=False)
        self.with_text = settings.columns.caption is not None
        self.dim = model.config.projection_dim
        self.loader_kwargs = {"collate_fn": EmbeddingCollator(processor.tokenizer if self.with_text else None),
                              "num_workers": settings.num_workers}
        if settings.num_workers > 0:
            self.loader_kwargs["prefetch_factor"] = 4
        self.process = process
        self.done = finished_shards(shard_dir)
        for stale in self.shard_dir.glob("shard-*.tmp-*"):
            if self.owns(int(stale.name.split(".")[0][len("shard-"):])):
                shutil.rmtree(stale)

    @property
    def read_columns(self) -> list[str]:
        columns = self.settings.columns
        return [columns.image] + ([columns.caption] if columns.caption else [])

    def owns(self, index: int) -> bool:
        return index % self.process.count == self.process.index

    def pending(self, index: int) -> bool:
        return self.owns(index) and index not in self.done

    def write(self, shard: ShardEmbeddings, kept: datasets.Dataset | None) -> None:
        write_embedding_shard(self.shard_dir, shard, kept, self.dim, self.with_text)

    def embed_map_style(self, dataset: datasets.Dataset) -> int:
        """One DataLoader over the batches of every pending shard (batches never cross a shard boundary)."""
        size, num_rows = self.settings.shard_size, len(dataset)
        source = without_image_decoding(dataset)
        plan = [(index, ids) for index in range(math.ceil(num_rows / size)) if self.pending(index)
                for ids in _batch_slices(index * size, min((index + 1) * size, num_rows), self.settings.batch_size)]
        if not plan:
            return num_rows
        self.progress.reset(total=sum(len(ids) for _, ids in plan))
        rows = EmbeddingRows(source.select_columns(self.read_columns), self.transform, self.settings.columns)
        loader = torch.utils.data.DataLoader(rows, batch_sampler=[ids for _, ids in plan], **self.loader_kwargs)
        shard = None
        for position, ((index, _), batch) in enumerate(zip(plan, loader)):
            shard = shard or ShardEmbeddings.empty(index, size, num_rows)
            self.progress.update(shard.add(batch, self.model))
            if position + 1 == len(plan) or plan[position + 1][0] != index:
                kept = None
                if self.settings.keep_columns:
                    kept_ids = torch.cat(shard.row_ids).tolist() if shard.row_ids else []
                    kept = dataset.select(kept_ids).select_columns(list(self.settings.keep_columns))
                self.write(shard, kept)
                shard = None
        return num_rows

    def embed_streamed(self, dataset: datasets.IterableDataset) -> int:
        """Read the stream to its end (images undecoded), buffering the rows of each pending shard, and embed each
        buffered shard as it fills."""
        size, keep = self.settings.shard_size, list(self.settings.keep_columns)
        stream = without_image_decoding(dataset.select_columns(list(dict.fromkeys(self.read_columns + keep))))
        buffer, num_rows = [], 0
        for position, row in enumerate(stream):
            num_rows = position + 1
            if self.pending(position // size):
                buffer.append(row)
            if num_rows % size == 0 and buffer:
                self.embed_rows(buffer, num_rows // size - 1, dataset.features)
                buffer = []
        if buffer:
            self.embed_rows(buffer, num_rows // size, dataset.features)
        return num_rows

    def embed_rows(self, buffer: list[dict], index: int, features: datasets.Features | None) -> None:
        """Embed and write shard `index` from its buffered streamed rows."""
        shard = ShardEmbeddings.empty(index, self.settings.shard_size)
        shard.stop = shard.start + len(buffer)
        rows = EmbeddingRows(buffer, self.transform, self.settings.columns, first_row_id=shard.start)
        for batch in torch.utils.data.DataLoader(rows, batch_size=self.settings.batch_size, **self.loader_kwargs):
            self.progress.update(shard.add(batch, self.model))
        kept = None
        keep = list(self.settings.keep_columns)
        if keep:
            usable = set(torch.cat(shard.row_ids).tolist()) if shard.row_ids else set()
            kept_rows = [{name: row[name] for name in keep} for offset, row in enumerate(buffer)
                         if shard.start + offset in usable]
            kept_features = datasets.Features({name: features[name] for name in keep}) if features else None
            kept = (datasets.Dataset.from_list(kept_rows, features=kept_features) if kept_rows
                    else datasets.Dataset.from_dict({name: [] for name in keep}, features=kept_features))
        self.write(shard, kept)


@torch.no_grad()
def embed_dataset(model, processor, dataset: datasets.Dataset | datasets.IterableDataset,
                  shard_dir: str | os.PathLike, settings: EmbeddingSettings, process: ProcessShare = ProcessShare(),
                  description: str | None = "embedding") -> int:
    """Embed this process's unfinished shards of `dataset` (map-style or streamed) into `shard_dir`, in eval mode
    with the evaluation transform, decoding in DataLoader workers; returns the dataset's row count. Every process
    reads a streamed dataset to its end (images undecoded) and embeds only its own shards. Once every process has
    returned, `merge_embedding_shards` gives the whole dataset's embeddings."""
    Path(shard_dir).mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with tqdm(desc=description, unit="rows", disable=description is None or process.index != 0) as progress:
        embedder = ShardedEmbedder(model, processor, shard_dir, settings, process, progress)
        if isinstance(dataset, datasets.IterableDataset):
            num_rows = embedder.embed_streamed(dataset)
        else:
            num_rows = embedder.embed_map_style(dataset)
    model.train(was_training)
    return num_rows


def merge_embedding_shards(shard_dir: str | os.PathLike, num_rows: int) -> tuple[datasets.Dataset, list[dict]]:
    """The finished shards of `shard_dir` as one dataset in row order, and the skipped rows ({"row_id", "error"}).
    Raises if the shards do not cover rows [0, num_rows) exactly."""
    shards = []
    expected = 0
    for index in sorted(finished_shards(shard_dir)):
        info = json.loads((shard_path(shard_dir, index) / SHARD_INFO).read_text())
        if info["start"] != expected:
            raise RuntimeError(f"{shard_dir}: rows {expected}..{info['start'] - 1} have no finished shard.")
        shards.append((shard_path(shard_dir, index), info))
        expected = info["stop"]
    if expected != num_rows:
        raise RuntimeError(f"{shard_dir}: the finished shards cover rows 0..{expected - 1} of {num_rows}.")
    parts = [datasets.load_from_disk(str(path)) for path, _ in shards]
    skipped = [item for _, info in shards for item in info["skipped"]]
    return datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({}), skipped
