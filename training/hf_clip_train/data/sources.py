"""Where training and evaluation rows come from: loading a split of `--dataset_name` (or of the embedded dataset),
checking it has the columns and usable rows a run needs, and reading its first rows without decoding images."""

import functools
import glob
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from PIL import Image

from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image, pick_caption
from hf_clip.hub import is_hub_repo_id

from ..args import InputError, MissingInputError
from ..synthetic import build_shapes_dataset

if TYPE_CHECKING:
    from ..args import DatasetArguments

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded shapes dataset"
USABILITY_PROBE_ROWS = 64
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


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



def _load_saved_split(path: Path) -> datasets.Dataset:
    """A split saved with `save_to_disk`; one saved with no rows (`datasets` writes it with no Arrow file, and its
    `load_from_disk` then fails with IndexError) as an empty dataset of its features."""
    if not json.loads((path / "state.json").read_text()).get("_data_files"):
        features = json.loads((path / "dataset_info.json").read_text()).get("features") or {}
        return datasets.Dataset.from_dict({name: [] for name in features},
                                          features=datasets.Features.from_dict(features) if features else None)
    return datasets.load_from_disk(str(path))


def _load_saved_splits(path: Path) -> datasets.DatasetDict:
    """A dataset or dataset dict saved with `save_to_disk`, as a dict of splits (a lone dataset as "train")."""
    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return datasets.DatasetDict({name: _load_saved_split(path / name) for name in names})
    return datasets.DatasetDict({"train": _load_saved_split(path)})


def load_split(data_args: "DatasetArguments", split: str, streaming: bool = False
               ) -> datasets.Dataset | datasets.IterableDataset | None:
    """One split of `--dataset_name` (or of the embedded dataset); None if the dataset has no such split."""
    name = data_args.dataset_name
    if name is None:
        splits = _embedded_dataset(data_args.embedded_num_train)
    elif _is_saved_to_disk(Path(name)):
        splits = _load_saved_splits(Path(name))
    else:
        builder, data_files = name, None
        suffix = Path(name.replace("*", "x")).suffix
        if suffix in _FILE_BUILDERS:
            builder, data_files = _FILE_BUILDERS[suffix], name
            if "://" not in name and not glob.glob(os.path.expanduser(name)):
                raise MissingInputError(f"--dataset_name {name!r} matches no file.")
        elif "://" not in name and not glob.glob(os.path.expanduser(name)) and not is_hub_repo_id(name):
            raise MissingInputError(f"--dataset_name {name!r}: no such file or folder, and not a Hub dataset id "
                                    "('name' or 'namespace/name').")
        try:
            return datasets.load_dataset(builder, data_args.dataset_config_name, data_files=data_files, split=split,
                                         streaming=streaming)
        except datasets.exceptions.DatasetNotFoundError as error:
            raise MissingInputError(f"--dataset_name {name!r}: no such file or folder here, and {error}") from None
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



def columns_of(data_args: "DatasetArguments", caption: bool = True, label: bool = True) -> ImageTextColumns:
    """The image, caption and label columns of `--dataset_name` (caption or label None when not wanted), and where
    its relative image paths are read from. Built once per script."""
    return ImageTextColumns(image=data_args.image_column, caption=data_args.caption_column if caption else None,
                            label=data_args.label_column if label else None,
                            base_dir=base_directory(data_args.dataset_name))


def missing_split_error(dataset_name: str | None, split: str, flag: str | None = None) -> InputError:
    set_by = f" (set by --{flag})" if flag else ""
    return InputError(f"Dataset {dataset_label(dataset_name)!r} has no split {split!r}{set_by}.")


def load_checked_split(data_args: "DatasetArguments", split: str, columns: Mapping[str, str], *,
                       streaming: bool = False, max_rows: int | None = None):
    """`split` of `--dataset_name` checked to hold `columns` (flag -> column name) and cut to its first `max_rows`
    rows; None when the dataset has no such split."""
    dataset = load_split(data_args, split, streaming=streaming)
    if dataset is None:
        return None
    check_columns(dataset, data_args.dataset_name, split, columns)
    return dataset if max_rows is None else first_rows(dataset, max_rows)


def load_train_split(data_args: "DatasetArguments", columns: Mapping[str, str], max_rows: int | None = None):
    """The `--train_split` (streamed with `--streaming`), checked to hold `columns` (flag -> column name) and cut to
    its first `max_rows` rows when given."""
    split = load_checked_split(data_args, data_args.train_split, columns, streaming=data_args.streaming,
                               max_rows=max_rows)
    if split is None:
        raise missing_split_error(data_args.dataset_name, data_args.train_split, flag="train_split")
    return split


def column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(without_image_decoding(dataset).take(1)), None)
    return list(first) if first is not None else []



def check_columns(dataset, dataset_name: str | None, split: str, columns: Mapping[str, str]) -> None:
    """Raise naming the dataset, the missing column and the columns that exist. `columns`: flag -> column."""
    found = column_names(dataset)
    for flag, column in columns.items():
        if column not in found:
            raise InputError(
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


def check_usable_rows(dataset, dataset_name: str | None, split: str, columns: ImageTextColumns) -> None:
    """Fail at start-up, naming the dataset and columns, when the first rows hold no usable sample."""
    probe = prepare_columns(first_rows(dataset, USABILITY_PROBE_ROWS), columns.image, columns.caption)
    errors = []
    for row in probe:
        try:
            pick_caption(row[columns.caption], None)
            decode_image(row[columns.image], columns.base_dir)
            return
        except BAD_SAMPLE_ERRORS as error:
            errors.append(str(error))
    raise InputError(
        f"Dataset {dataset_label(dataset_name)!r} (split {split!r}) has no usable rows among the first "
        f"{len(errors)} (image column {columns.image!r}, caption column {columns.caption!r}). "
        f"First problem: {errors[0] if errors else 'the split is empty'}."
    )


def decodable_images(dataset, columns: ImageTextColumns, limit: int = USABILITY_PROBE_ROWS
                     ) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """(row, RGB image) for each row among the first `limit` whose image decodes; the others are passed over."""
    for row in without_image_decoding(first_rows(dataset, limit)):
        try:
            yield row, decode_image(row[columns.image], columns.base_dir)
        except BAD_SAMPLE_ERRORS:
            continue


def typical_image_size(dataset, columns: ImageTextColumns) -> int | None:
    """The median longer side, in pixels, of the decodable images among the first rows; None if none decodes."""
    sides = [max(image.size) for _, image in decodable_images(dataset, columns)]
    return int(np.median(sides)) if sides else None


def first_decodable_image(dataset, columns: ImageTextColumns) -> tuple[dict[str, Any], Image.Image] | None:
    """The first (row, image) among the first rows whose image decodes; None if there is none."""
    return next(decodable_images(dataset, columns), None)


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



def check_label_columns(splits: dict, dataset_name: str | None, label: str | None) -> None:
    """Refuse at start-up, naming the split and column, a `--label_column` that zero-shot evaluation cannot read
    class names from (not a `ClassLabel`); splits without the column are evaluated on retrieval only."""
    for name, dataset in splits.items():
        if not label or label not in column_names(dataset):
            continue
        feature = (dataset.features or {}).get(label)
        if not hasattr(feature, "names"):
            raise InputError(
                f"Column {label!r} of {dataset_label(dataset_name)!r} (split {name!r}) is {feature}, not a "
                f"ClassLabel, so it names no classes for zero-shot evaluation. Cast it with "
                f"dataset.cast_column({label!r}, datasets.ClassLabel(names=[...])), or pass --label_column '' to "
                "evaluate retrieval only."
            )
