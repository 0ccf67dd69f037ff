"""Everything that reads image-caption datasets for training and evaluation, one job per module:

- `sources`: loading a split of `--dataset_name` (or of the embedded dataset) and checking its columns and rows;
- `transforms`: decoding and augmenting an image (`ImageTransform`) and `normalize_pixels`;
- `batches`: the map-style and streamed datasets, the global-batch sampler and `TrainBatches`.

Split evaluation lives in `hf_clip_train.evaluation`, and embedding a dataset for search in
`hf_clip_train.search.embed`; their names stay importable from here.
"""

import importlib

from .batches import (
    GlobalBatchSampler,
    ImageTextDataset,
    MicroBatchRows,
    ProcessShare,
    StreamingImageTextDataset,
    TrainBatches,
    build_train_dataset,
    replacement_candidates,
    worker_count,
)
from .sources import (
    EMBEDDED_DATASET,
    USABILITY_PROBE_ROWS,
    ImageTextColumns,
    _embedded_dataset,
    base_directory,
    caption_samples,
    check_columns,
    check_label_columns,
    check_usable_rows,
    column_names,
    columns_of,
    dataset_label,
    decodable_images,
    first_decodable_image,
    first_rows,
    load_checked_split,
    load_split,
    load_train_split,
    missing_split_error,
    prepare_columns,
    typical_image_size,
    without_image_decoding,
)
from .transforms import ImageTransform, decode_row, image_transform_for, normalize_pixels

# Names that live next to the code that uses them, imported on first use (the evaluation and search modules import
# this package, so importing them here would be circular): {name: module}.
_ELSEWHERE = {
    **dict.fromkeys(("SplitEmbeddings", "embed_split", "evaluate_split", "load_eval_splits"),
                    "hf_clip_train.evaluation"),
    **dict.fromkeys(("EmbeddingSettings", "EmbeddingRows", "EmbeddingCollator", "ShardEmbeddings", "ShardedEmbedder",
                     "embed_batch", "embed_dataset", "finished_shards", "merge_embedding_shards", "shard_path",
                     "write_embedding_shard", "SHARD_INFO", "SHARD_PATTERN"), "hf_clip_train.search.embed"),
}

__all__ = ["GlobalBatchSampler", "ImageTextDataset", "MicroBatchRows", "ProcessShare", "StreamingImageTextDataset",
    "TrainBatches", "build_train_dataset", "replacement_candidates", "worker_count", "EMBEDDED_DATASET",
    "USABILITY_PROBE_ROWS", "ImageTextColumns", "_embedded_dataset", "base_directory", "caption_samples",
    "check_columns", "check_label_columns", "check_usable_rows", "column_names", "columns_of", "dataset_label",
    "decodable_images", "first_decodable_image", "first_rows", "load_checked_split", "load_split", "load_train_split",
    "missing_split_error", "prepare_columns", "typical_image_size", "without_image_decoding", "ImageTransform",
    "decode_row", "image_transform_for", "normalize_pixels", *_ELSEWHERE]


def __getattr__(name: str):
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
