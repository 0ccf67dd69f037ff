"""Search a dataset by text or image: embed every row with a CLIP model, index the embeddings, query the index.

    hf-clip-index --model_name_or_path M --dataset_name D --caption_column caption --keep_columns caption \
        --output_dir OUT                                       # python -m hf_clip_train.search index ...
    accelerate launch -m hf_clip_train.search index ...        # each process embeds its share of the shards
    hf-clip-search OUT "a red circle" -k 5 --html hits.html    # python -m hf_clip_train.search query ...

`hf-clip-index` reads the dataset with the flags of `hf_clip_train.train` (`--dataset_name`, `--train_split` names the
split to embed, `--image_column`, `--caption_column`: only when it is given are captions embedded, `--streaming`,
`--max_train_samples`) and writes an index folder (`layout`).

Search is exact inner product (cosine similarity: the embeddings are L2-normalised) by default, through FAISS when
it is installed (`pip install "hf-clip[search]"`) and through a matrix product in torch otherwise. `--index_type
ivf_pq` builds an approximate FAISS index for large collections: an inverted file of 4-bit product-quantised codes
(one scan of them where the lists cannot narrow the search) whose candidates are re-ranked exactly against the
stored embeddings.

One job per module:

- `layout`: the index folder's files and the model fingerprint it records;
- `embed`: embedding a dataset in resumable shards, and the shard format;
- `ann`: FAISS settings, exact top-k, and the recall probe that tunes an approximate index;
- `folder`: building an index folder (plan, shards, merge, index);
- `checks`: what index_info.json records to check the folder (row counts, dimension, index type, each file's
  SHA-256), and the checks `ImageTextIndex.load` runs before it answers;
- `hub`: what an index publishes (no local path), its dataset card, the push, and the download of a repo id;
- `query`: `ImageTextIndex`, which loads and searches an index (it needs only the `[search]` extra);
- `render`: the hits as a text table or an HTML page;
- `index_cli`: `hf-clip-index`;
- `cli`: `hf-clip-search`, and `python -m hf_clip_train.search index|query`.

The query side is imported here; the building side (which needs the `[train]` extra) on first use of its names.
"""

import importlib

from .ann import (
    INDEX_TYPES,
    METRIC,
    SEARCH_EXTRA,
    TAIL_MARGIN,
    TAIL_SHARE,
    ApproximateSettings,
    BuiltIndex,
    RecallProbe,
    RecallReport,
    RowGather,
    build_faiss_index,
    build_index,
    embedding_chunks,
    exact_top_k,
    import_faiss,
    search_faiss,
)
from .checks import CorruptIndexError, IndexLoadError, IndexNotFoundError, UnsupportedIndexError
from .hub import dataset_card, public_index_info, push_index_to_hub
from .layout import FORMAT_VERSION, INFO_FILE, model_fingerprint
from .query import ImageTextIndex, IndexModelNotFoundError, ModelMismatchError, SearchResult, check_model_matches
from .render import cell_text, format_hits_table, query_label, render_html, thumbnail_source

_BUILDING = {
    **dict.fromkeys(("index_main", "parse_index_args", "format_index_summary", "INDEX_ARGUMENT_CLASSES"), "index_cli"),
    **dict.fromkeys(("search_main", "main"), "cli"),
    **dict.fromkeys(("build_search_index", "prepare_output_dir", "finish_index", "NothingToIndexError",
                     "FinishedIndexError", "ChangedSettingsError"), "folder"),
    **dict.fromkeys(("EmbeddingSettings", "embed_dataset", "merge_embedding_shards"), "embed"),
}

__all__ = ["INDEX_TYPES", "METRIC", "SEARCH_EXTRA", "TAIL_MARGIN", "TAIL_SHARE", "ApproximateSettings", "BuiltIndex",
    "RecallProbe", "RecallReport", "RowGather", "build_faiss_index", "build_index", "embedding_chunks", "exact_top_k",
    "import_faiss", "search_faiss", "CorruptIndexError", "IndexLoadError", "IndexNotFoundError",
    "UnsupportedIndexError", "dataset_card", "public_index_info", "push_index_to_hub", "FORMAT_VERSION", "INFO_FILE",
    "model_fingerprint", "ImageTextIndex", "IndexModelNotFoundError", "ModelMismatchError", "SearchResult",
    "check_model_matches", "cell_text",
    "format_hits_table", "query_label", "render_html", "thumbnail_source", *_BUILDING]


def __getattr__(name: str):
    if name in _BUILDING:
        return getattr(importlib.import_module(f"{__name__}.{_BUILDING[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
