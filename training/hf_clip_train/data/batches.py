"""Training rows as batches: the map-style and streamed datasets that decode rows in DataLoader workers, the
global-batch sampler, and `TrainBatches`, the endless, resumable iterator of micro-batches.

Map-style data is read in global batches: each step's global batch is one slice of a seeded permutation and rank r
takes its share of it, so N processes see exactly the batches of one process with N times the batch size, and a
resumed run continues at the same row. Streamed data is split across processes with
`datasets.distributed.split_dataset_by_node` (whole shards per process when their number divides evenly, else every
process reads every shard and keeps every world_size-th row), then `datasets` gives each DataLoader worker whole
shards of that share: every row is read once per epoch. Augmentation randomness is derived from (seed, epoch, row),
or (seed, epoch, worker, position) for streams, never from worker RNG state, which makes runs reproducible and
resumable (streams: with the same number of workers).

A row whose image cannot be decoded or whose caption is empty or not a string is skipped and counted once, in the
batch it belongs to. Map-style reading fills its slot with a usable row drawn, from (seed, epoch, batch), among the
rows outside the global batch, so batch sizes stay equal across ranks as the distributed loss requires, no row
appears twice in a global batch, and a resumed run reads the same rows.
"""

import collections
import copy
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from hf_clip import ContrastiveDataCollator
from hf_clip.collators import BAD_SAMPLE_ERRORS
from hf_clip.processing_hf_clip import ImageTooLargeError

from .sources import ImageTextColumns, first_rows, prepare_columns
from .transforms import ImageTransform, decode_row

logger = logging.getLogger(__name__)

_REPLACEMENT_STREAM = 1  # keeps the replacement draws apart from a row's own augmentation stream


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the data-parallel processes."""

    index: int = 0
    count: int = 1


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


def log_skipped_row(row: str, error: Exception) -> None:
    """Log an unusable row: at debug level, or as a warning for an image refused as a possible decompression bomb
    (`ImageTooLargeError`), which is rare and worth seeing. Either way the row is counted with the skipped rows."""
    if isinstance(error, ImageTooLargeError):
        logger.warning("Skipping %s: %s", row, error)
    else:
        logger.debug("Skipping %s: %s", row, error)


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
            log_skipped_row(f"row {row_id}", error)
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
                log_skipped_row(f"streamed row {position} of stream {stream}", error)
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



def build_train_dataset(dataset, columns: ImageTextColumns, transform: ImageTransform, seed: int,
                        process: ProcessShare = ProcessShare(), *, max_rows: int | None = None,
                        shuffle_buffer_size: int = 10_000) -> ImageTextDataset | StreamingImageTextDataset:
    """The training split as decoded samples: cut to its first `max_rows` (`--max_train_samples`); a streamed split
    shuffled in a buffer of `shuffle_buffer_size` rows and split between processes."""
    if max_rows is not None:
        dataset = first_rows(dataset, max_rows)
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=process.index, world_size=process.count)
        return StreamingImageTextDataset(dataset, transform, columns, seed=seed)
    return ImageTextDataset(dataset, transform, columns, seed=seed)


def worker_count(requested: int) -> int:
    """`--dataloader_num_workers`, at most the CPU count."""
    return max(0, min(requested, os.cpu_count() or 1))
