"""Embedding a whole dataset for search, in resumable shards: the one module that reads and writes the shard format.

Rows are embedded in shards of `shard_size` consecutive row ids; shard s belongs to process s mod N, so N processes
write exactly the shards one process writes. Each shard is a `datasets` dataset (`row_id`, `image_embedding`,
`text_embedding`, the kept columns) with its `shard.json` (row range, skipped rows), written to a temporary folder and
renamed when complete, so a killed run leaves only whole shards and redoes only the unfinished ones.
`merge_embedding_shards` gives the whole dataset's embeddings once every shard is finished.
"""

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image

from ..data.batches import ProcessShare
from ..data.sources import ImageTextColumns, without_image_decoding
from ..data.transforms import ImageTransform, decode_row, image_transform_for

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
