"""Search a dataset by text or image: embed every row with a CLIP model, index the embeddings, query the index.

    hf-clip-index --model_name_or_path M --dataset_name D --caption_column caption --keep_columns caption \
        --output_dir OUT                                       # python -m hf_clip_train.search index ...
    accelerate launch -m hf_clip_train.search index ...             # each process embeds its share of the shards
    hf-clip-search OUT "a red circle" -k 5 --html hits.html    # python -m hf_clip_train.search query ...

`hf-clip-index` reads the dataset with the flags of `hf_clip_train.train` (`--dataset_name`, `--train_split` names the
split to embed, `--image_column`, `--caption_column`: only when it is given are captions embedded, `--streaming`,
`--max_train_samples`) and writes an index folder:

    embeddings/         a `datasets` dataset (save_to_disk): row_id, image_embedding, text_embedding, kept columns
    image.faiss         a FAISS index over image_embedding, whose id i is row i of embeddings/ (needs faiss)
    index_info.json     how it was built: the model and the fingerprint of its weights, dtype, metric, index type,
                        dimension, row count, and for an approximate index its recall@10 against exact search
    skipped_rows.jsonl  the rows that could not be embedded (undecodable image, empty caption), with the reason
    README.md           a dataset card, so the folder can be pushed to the Hub as a dataset repo

Search is exact inner product (cosine similarity: the embeddings are L2-normalised) by default, through FAISS when
it is installed (`pip install "hf-clip[search]"`) and through a matrix product in torch otherwise. `--index_type
ivf_pq` builds an approximate FAISS index for large collections: an inverted file of 4-bit product-quantised codes
(one scan of them where the lists cannot narrow the search) whose candidates are re-ranked exactly against the
stored embeddings.
"""

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from transformers import AutoModel, AutoProcessor

from hf_clip import __version__ as hf_clip_version
from hf_clip.hub import is_hub_repo_id

from .args import (
    DatasetArguments,
    LoaderArguments,
    ModelArguments,
    check_at_least_one,
    check_model_name_or_path,
    parse_with_config_file,
)
from .data import (
    EmbeddingSettings,
    ImageTextColumns,
    ProcessShare,
    base_directory,
    check_columns,
    dataset_label,
    embed_dataset,
    first_rows,
    image_transform_for,
    load_split,
    merge_embedding_shards,
    worker_count,
)

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAISS_FILE = "image.faiss"
INFO_FILE = "index_info.json"
SKIPPED_FILE = "skipped_rows.jsonl"
SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "ivf_pq")
METRIC = "inner_product"
SEARCH_EXTRA = 'pip install "hf-clip[search]"'
RECALL_QUERIES = 1_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def import_faiss(reason: str | None = None):
    """The `faiss` module; None when it is not installed, or an ImportError naming `reason` and the extra."""
    try:
        import faiss
    except ImportError:
        if reason is None:
            return None
        raise ImportError(f"{reason} needs faiss, which is not installed. Install it with: {SEARCH_EXTRA}") from None
    return faiss


def model_fingerprint(model) -> str:
    """sha256 over the model's state dict (names, shapes, dtypes and bytes, in order): two models embed alike
    exactly when their fingerprints are equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def describe_model(model, model_name_or_path: str) -> dict[str, Any]:
    """What an index records of the model that built it."""
    path = Path(model_name_or_path).expanduser()
    return {"name_or_path": str(path.resolve()) if path.exists() else model_name_or_path,
            "revision": getattr(model.config, "_commit_hash", None), "model_type": model.config.model_type,
            "fingerprint": model_fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
            "dimension": model.config.projection_dim}


# Index building -----------------------------------------------------------------------------------------------------


@dataclass
class ApproximateSettings:
    """An IVF-PQ index for n vectors of dimension d: `nlist` inverted lists (about 2·√n, at most n/39 so k-means has
    39 training points per list), codes of d/2 sub-vectors of 4 bits (d/4 bytes, 1/16 of fp32) scanned with FAISS's
    fast-scan kernels, `nprobe` lists probed per query (tuned at build time to reach the target recall) and the best
    `rerank` candidates re-scored exactly against the stored embeddings. One list (`nlist` 1) is a single pass over
    all codes, FAISS's plain PQ fast-scan, which skips the per-list cost of probing every list."""

    nlist: int
    nprobe: int
    rerank: int = 300

    @classmethod
    def for_collection(cls, num_vectors: int) -> "ApproximateSettings":
        nlist = max(1, min(2 ** round(math.log2(2 * math.sqrt(num_vectors))), num_vectors // 39))
        return cls(nlist=nlist, nprobe=nlist)

    def factory(self, dim: int) -> str:
        codes = f"PQ{dim // 2}x4fs"
        return f"IVF{self.nlist},{codes}" if self.nlist > 1 else codes

    def nprobe_candidates(self) -> list[int]:
        """Probe counts to try, cheapest first: nlist/32, nlist/16, ..., nlist."""
        return sorted({max(1, self.nlist // 2**shift) for shift in range(6)})

    def apply(self, index) -> None:
        """Set this `nprobe` on a FAISS index built from `factory` (one list has nothing to probe)."""
        if self.nlist > 1:
            import_faiss("An approximate index").extract_index_ivf(index).nprobe = self.nprobe


MIN_APPROXIMATE_ROWS = 64
TRAINING_ROWS = 65_536


def build_faiss_index(vectors: np.ndarray, index_type: str, approximate: ApproximateSettings | None = None):
    """A FAISS inner-product index over `vectors` (n, d) float32: flat (exact) or IVF-PQ (`approximate`, trained on
    a sample of max(64 per list, TRAINING_ROWS) rows)."""
    faiss = import_faiss(f"--index_type {index_type}" if index_type != "flat" else "A FAISS index")
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        if dim % 2 or len(vectors) < MIN_APPROXIMATE_ROWS:
            raise ValueError(f"--index_type {index_type} needs an even embedding dimension and at least "
                             f"{MIN_APPROXIMATE_ROWS} rows (got dimension {dim}, {len(vectors)} rows); use "
                             "--index_type flat.")
        index = faiss.index_factory(dim, approximate.factory(dim), faiss.METRIC_INNER_PRODUCT)
        training = vectors
        num_training = max(64 * approximate.nlist, TRAINING_ROWS)
        if len(vectors) > num_training:
            training = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), num_training, replace=False))]
        index.train(training)
    index.add(vectors)
    return index


def exact_top_k(queries: torch.Tensor, chunks: Sequence[np.ndarray], k: int, rows_per_step: int = 65_536
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of `queries` (q, d) over the rows of `chunks` (arrays (n_i, d), in order):
    scores (q, k') and row positions (q, k'), best first, with k' = min(k, n). A matrix product in torch, a block of
    rows at a time, so memory stays bounded for any collection size."""
    queries_array = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    best_scores = torch.empty(len(queries), 0)
    best_positions = torch.empty(len(queries), 0, dtype=torch.long)
    offset = 0
    for chunk in chunks:
        for start in range(0, len(chunk), rows_per_step):
            block = np.asarray(chunk[start:start + rows_per_step], dtype=np.float32)  # a view of the mmap
            scores = torch.from_numpy(queries_array @ block.T)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores = torch.cat([best_scores, top.values], dim=1)
            best_positions = torch.cat([best_positions, top.indices + offset + start], dim=1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
            best_scores, best_positions = keep.values, best_positions.gather(1, keep.indices)
        offset += len(chunk)
    return best_scores, best_positions


TAIL_SHARE = 0.05
TAIL_MARGIN = 0.15


@dataclass
class RecallReport:
    """Recall@10 against exact search of each probe query, by kind of query ("image", "text")."""

    per_query: dict[str, np.ndarray]

    @property
    def mean(self) -> float:
        return float(np.concatenate(list(self.per_query.values())).mean())

    def by_kind(self) -> dict[str, float]:
        return {kind: round(float(recalls.mean()), 4) for kind, recalls in self.per_query.items()}

    def tail(self) -> dict[str, float]:
        """The recall that all but the worst TAIL_SHARE of each kind's queries reach."""
        return {kind: round(float(np.quantile(recalls, TAIL_SHARE)), 4) for kind, recalls in self.per_query.items()}

    def meets(self, target: float) -> bool:
        """Each kind's mean recall reaches `target`, and its worst TAIL_SHARE of queries fall no lower than
        `target - TAIL_MARGIN`: an average alone hides the queries that straddle lists (short, generic text
        prompts do more often than the probe's images and captions), which lose most of their neighbours."""
        return all(recalls.mean() >= target and np.quantile(recalls, TAIL_SHARE) >= target - TAIL_MARGIN
                   for recalls in self.per_query.values())


class RecallProbe:
    """Recall@10 of an index against exact search. Its queries are a sample of the collection's own vectors (n, d),
    each one's own row left out of both result lists, and, when the rows' caption embeddings `text_vectors` (n, d)
    are given, the same rows' captions, as text queries search images. The exact neighbours are computed once."""

    def __init__(self, vectors: np.ndarray, num_queries: int = RECALL_QUERIES, text_vectors: np.ndarray | None = None):
        self.vectors = vectors
        picks = np.random.default_rng(0).choice(len(vectors), min(num_queries, len(vectors)), replace=False)
        self.k = min(11, len(vectors))
        self.kinds = {"image": (vectors[picks], picks)}
        if text_vectors is not None:
            self.kinds["text"] = (text_vectors[picks], np.full(len(picks), -1))
        self.truth = {}
        for kind, (queries, excluded) in self.kinds.items():
            _, exact = exact_top_k(torch.from_numpy(queries), [vectors], self.k)
            self.truth[kind] = [[p for p in row if p != skip][:10] for skip, row in zip(excluded, exact.tolist())]

    @property
    def num_queries(self) -> int:
        return sum(len(queries) for queries, _ in self.kinds.values())

    def __call__(self, index, rerank: int | None = None) -> RecallReport:
        per_query = {}
        for kind, (queries, excluded) in self.kinds.items():
            _, found = search_faiss(index, queries, self.k, rerank, self.vectors.__getitem__)
            per_query[kind] = np.array([len(set(truth) & {p for p in row.tolist() if p != skip}) / max(1, len(truth))
                                        for skip, truth, row in zip(excluded, self.truth[kind], found)])
        return RecallReport(per_query)


def search_faiss(index, queries: np.ndarray, k: int, rerank: int | None, gather) -> tuple[np.ndarray, np.ndarray]:
    """Top-k scores and positions (q, k) of `queries` (q, d) in a FAISS index, -1 where it finds fewer. With
    `rerank`, the index's best `rerank` candidates are re-scored exactly on the vectors `gather(positions)` returns
    (rows of the stored embeddings)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not rerank:
        return index.search(queries, k)
    _, candidates = index.search(queries, max(k, rerank))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (query, found) in enumerate(zip(queries, candidates)):
        found = np.sort(found[found >= 0])
        exact = gather(found) @ query
        best = np.argsort(-exact, kind="stable")[:k]
        scores[row, :len(best)], positions[row, :len(best)] = exact[best], found[best]
    return scores, positions


def embedding_chunks(embeddings: datasets.Dataset, column: str) -> list[np.ndarray]:
    """The (n_i, d) float32 arrays of `column` in the dataset's Arrow chunks, without a copy: views of the memory-mapped
    files of a dataset loaded with `load_from_disk`."""
    chunks = []
    for chunk in embeddings.data.column(column).chunks:
        dim = chunk.type.list_size
        chunks.append(chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim))
    return chunks


class RowGather:
    """Rows of a column split in chunks, gathered by position: `gather(positions)` -> (len(positions), d)."""

    def __init__(self, chunks: Sequence[np.ndarray]):
        self.chunks = list(chunks)
        self.offsets = np.cumsum([0] + [len(chunk) for chunk in self.chunks])

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if len(self.chunks) == 1:
            return self.chunks[0][positions]
        which = np.searchsorted(self.offsets, positions, side="right") - 1
        return np.stack([self.chunks[c][p - self.offsets[c]] for c, p in zip(which, positions)])


@dataclass
class BuiltIndex:
    """A FAISS index (None without faiss) and what index_info.json says of it."""

    index: Any
    info: dict[str, Any]


def build_index(embeddings: datasets.Dataset, index_type: str = "flat", target_recall: float = 0.95) -> BuiltIndex:
    """The search index over `image_embedding`: flat (exact; None without faiss, searched by a torch matrix
    product) or `ivf_pq`, whose `nprobe` is twice the smallest that meets `target_recall` (`RecallReport.meets`:
    recall@10 against exact search, measured on the collection itself with image queries and, when captions were
    embedded, their text queries; all lists if none does). The doubling is headroom for queries unlike the probe's:
    short generic prompts straddle more lists than captions do. When that is all lists, the inverted file narrows
    nothing, and one list (a single scan of the same codes) replaces it if it meets the target too."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"--index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}.")
    vectors = np.concatenate(embedding_chunks(embeddings, "image_embedding")) if len(embeddings) else None
    info: dict[str, Any] = {"index_type": index_type, "metric": METRIC}
    if index_type == "flat":
        if vectors is None or import_faiss() is None:
            return BuiltIndex(None, {**info, "backend": "torch"})
        return BuiltIndex(build_faiss_index(vectors, "flat"), {**info, "backend": "faiss"})
    if vectors is None:
        raise ValueError("--index_type ivf_pq: no row could be embedded, so there is nothing to index.")
    faiss = import_faiss(f"--index_type {index_type}")
    text_vectors = (np.concatenate(embedding_chunks(embeddings, "text_embedding"))
                    if "text_embedding" in embeddings.column_names else None)
    probe = RecallProbe(vectors, text_vectors=text_vectors)

    def tuned(approximate: ApproximateSettings) -> tuple[Any, RecallReport, float]:
        started = time.perf_counter()
        index = build_faiss_index(vectors, index_type, approximate)
        build_seconds = time.perf_counter() - started

        def probed(nprobe: int) -> RecallReport:
            approximate.nprobe = nprobe
            approximate.apply(index)
            return probe(index, rerank=approximate.rerank)

        candidates = approximate.nprobe_candidates()
        for position, nprobe in enumerate(candidates):
            report = probed(nprobe)
            if report.meets(target_recall):
                if position + 1 < len(candidates):
                    report = probed(candidates[position + 1])
                break
        return index, report, build_seconds

    approximate = ApproximateSettings.for_collection(len(vectors))
    index, report, build_seconds = tuned(approximate)
    if approximate.nprobe == approximate.nlist > 1:
        one_list = ApproximateSettings(nlist=1, nprobe=1, rerank=approximate.rerank)
        scan = tuned(one_list)
        if scan[1].meets(target_recall):
            approximate, (index, report, build_seconds) = one_list, scan
    info.update(backend="faiss", factory=approximate.factory(vectors.shape[1]), **asdict(approximate),
                build_seconds=round(build_seconds, 2), target_recall=target_recall, recall_at_10=round(report.mean, 4),
                recall_at_10_by_query=report.by_kind(), tail_recall_at_10=report.tail(), tail_share=TAIL_SHARE,
                recall_queries=probe.num_queries,
                index_bytes_per_vector=round(faiss.serialize_index(index).nbytes / len(vectors), 1))
    return BuiltIndex(index, info)


# Querying -----------------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """The k rows nearest to one query, best first: their dataset row ids, cosine similarities and kept columns."""

    query: Any
    row_ids: list[int]
    scores: list[float]
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.row_ids)


class ModelMismatchError(ValueError):
    """A query model that is not the model an index was built with."""


class ImageTextIndex:
    """A dataset's image (and caption) embeddings, their index and the CLIP model that embeds queries.

        index = ImageTextIndex.load("OUT")                  # a folder written by hf-clip-index, or a Hub dataset repo
        index.search("a red circle", k=10)                  # -> SearchResult (row_ids, scores, kept columns)
        index.search(pil_image, k=10)                       # image -> similar images
        index.search(["a red circle", pil_image], k=10)     # a batch -> list[SearchResult]

    Text and image queries are searched against the image embeddings by default, or against the caption embeddings
    with `target="text"`.
    """

    def __init__(self, path: str | Path, embeddings: datasets.Dataset, info: dict[str, Any], model, processor,
                 faiss_index=None):
        self.path, self.embeddings, self.info = Path(path), embeddings, info
        self.model, self.processor, self.faiss_index = model.eval(), processor, faiss_index
        self.kept_columns = list(info["kept_columns"])
        self.transform = image_transform_for(processor, train=False)
        self.row_ids = np.asarray(embeddings.data.column("row_id").to_numpy())
        self._chunks: dict[str, list[np.ndarray]] = {}

    @classmethod
    def load(cls, path_or_repo_id: str | Path, model=None, processor=None, *, model_name_or_path: str | None = None,
             revision: str | None = None, token: str | None = None) -> "ImageTextIndex":
        """Open an index folder (or download a Hub dataset repo holding one) with the model it was built with: `model`
        and `processor`, or `model_name_or_path`, or by default the model recorded in index_info.json. A model other
        than the one that built the index (different weights) is refused with `ModelMismatchError`."""
        path = Path(path_or_repo_id).expanduser()
        if not path.is_dir():
            if not is_hub_repo_id(str(path_or_repo_id)):
                raise FileNotFoundError(f"{path_or_repo_id!r} is neither an index folder nor a Hub dataset repo id.")
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(path_or_repo_id), repo_type="dataset", revision=revision, token=token))
        info_path = path / INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{path} has no {INFO_FILE}: it is not an index written by hf-clip-index.")
        info = json.loads(info_path.read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{info_path}: format version {info.get('format_version')} is not supported by this "
                             f"hf_clip ({FORMAT_VERSION}).")
        if model is None:
            source = model_name_or_path or info["model"]["name_or_path"]
            try:
                model = AutoModel.from_pretrained(source)
                processor = processor or AutoProcessor.from_pretrained(source)
            except OSError as error:
                raise OSError(f"Cannot load the index's model {source!r} ({error}). Pass model_name_or_path= (or "
                              "--model_name_or_path) naming where that model is now.") from error
        elif processor is None:
            raise ValueError("Pass the processor with the model: ImageTextIndex.load(path, model, processor).")
        check_model_matches(model, info, path)
        embeddings = datasets.load_from_disk(str(path / EMBEDDINGS_DIR))
        faiss_index = None
        if (path / FAISS_FILE).is_file():
            faiss = import_faiss(None if info["index_type"] == "flat" else f"The {info['index_type']} index in {path}")
            if faiss is not None:
                faiss_index = faiss.read_index(str(path / FAISS_FILE))
                if info["index_type"] != "flat":
                    ApproximateSettings(info["nlist"], info["nprobe"], info["rerank"]).apply(faiss_index)
        return cls(path, embeddings, info, model, processor, faiss_index)

    @classmethod
    def build(cls, model, processor, dataset: datasets.Dataset | datasets.IterableDataset, output_dir: str | Path, *,
              image_column: str = "image", caption_column: str | None = None, keep_columns: Sequence[str] = (),
              base_dir: str | Path | None = None, index_type: str = "flat", batch_size: int = 256,
              num_workers: int = 0, shard_size: int = 10_000, overwrite: bool = False) -> "ImageTextIndex":
        """Embed `dataset` (map-style or streamed) into `output_dir`, index it and open the index: what `hf-clip-index`
        does with a dataset already loaded. Images come from `image_column` (relative paths read from `base_dir`),
        captions from `caption_column` when given; `keep_columns` are stored with the embeddings. A stopped build
        resumes from its finished shards."""
        columns = ImageTextColumns(image=image_column, caption=caption_column, label=None, base_dir=base_dir)
        settings = EmbeddingSettings(columns, keep_columns, shard_size, batch_size, num_workers)
        build_search_index(model, processor, dataset, output_dir, settings, index_type=index_type,
                           overwrite=overwrite)
        return cls.load(output_dir, model, processor)

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def kept_features(self) -> datasets.Features:
        """The kept columns and their `datasets` features."""
        return datasets.Features({name: self.embeddings.features[name] for name in self.kept_columns})

    @property
    def has_text_embeddings(self) -> bool:
        return "text_embedding" in self.embeddings.column_names

    def chunks(self, column: str) -> list[np.ndarray]:
        if column not in self._chunks:
            self._chunks[column] = embedding_chunks(self.embeddings, column)
        return self._chunks[column]

    @torch.no_grad()
    def embed_queries(self, queries: Sequence[str | Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings (q, d) of text and image queries (images with the evaluation transform the
        index was built with), in the order given."""
        from hf_clip import to_rgb_image

        texts = [(i, q) for i, q in enumerate(queries) if isinstance(q, str)]
        images = [(i, q) for i, q in enumerate(queries) if not isinstance(q, str)]
        embeds = torch.empty(len(queries), self.info["dimension"])
        device, dtype = self.model.device, self.model.dtype
        if texts:
            tokens = self.processor.tokenizer([q for _, q in texts], padding=True, truncation=True,
                                              return_tensors="pt").to(device)
            features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"]).pooler_output
            embeds[[i for i, _ in texts]] = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
        if images:
            pixels = torch.stack([self.transform(to_rgb_image(q)) for _, q in images]).to(device, dtype=dtype)
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
            embeds[[i for i, _ in images]] = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
        return embeds

    def search(self, queries: str | Image.Image | Sequence[str | Image.Image], k: int = 10, target: str = "image"
               ) -> SearchResult | list[SearchResult]:
        """The `k` rows nearest to each query (text or PIL image) among the `target` embeddings ("image" or "text");
        one `SearchResult` for one query, a list for a list of queries."""
        single = isinstance(queries, (str, Image.Image))
        batch = [queries] if single else list(queries)
        results = self.search_embeddings(self.embed_queries(batch), k, target, batch)
        return results[0] if single else results

    def search_embeddings(self, embeds: torch.Tensor, k: int = 10, target: str = "image",
                          queries: Sequence[Any] | None = None) -> list[SearchResult]:
        """Search with query embeddings (q, d), L2-normalised; `queries` only labels the results."""
        if target not in ("image", "text"):
            raise ValueError(f"target must be 'image' or 'text', got {target!r}.")
        if target == "text" and not self.has_text_embeddings:
            raise ValueError(f"{self.path} holds no caption embeddings: it was built without --caption_column.")
        if embeds.shape[-1] != self.info["dimension"]:
            raise ValueError(f"Query embeddings have dimension {embeds.shape[-1]}; the index holds "
                             f"{self.info['dimension']}.")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        column = f"{target}_embedding"
        if len(self) == 0:
            positions = np.zeros((len(embeds), 0), dtype=np.int64)
            scores = np.zeros((len(embeds), 0), dtype=np.float32)
        elif target == "image" and self.faiss_index is not None:
            rerank = self.info.get("rerank") if self.info["index_type"] != "flat" else None
            scores, positions = search_faiss(self.faiss_index, embeds.numpy(), min(k, len(self)), rerank,
                                             RowGather(self.chunks(column)))
        else:
            top_scores, top_positions = exact_top_k(embeds.float(), self.chunks(column), k)
            scores, positions = top_scores.numpy(), top_positions.numpy()
        labels = list(queries) if queries is not None else [None] * len(embeds)
        return [self._result(label, row_scores, row_positions)
                for label, row_scores, row_positions in zip(labels, scores, positions)]

    def _result(self, query: Any, scores: np.ndarray, positions: np.ndarray) -> SearchResult:
        positions = [int(p) for p in positions if p >= 0]
        kept = self.embeddings.select_columns(self.kept_columns)[positions] if self.kept_columns else {}
        rows = [{name: kept[name][i] for name in self.kept_columns} for i in range(len(positions))]
        return SearchResult(query, [int(self.row_ids[p]) for p in positions],
                            [float(s) for s in scores[:len(positions)]], rows)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload hf_clip search index"):
        """Upload the index folder as a Hub dataset repo (created if missing) in one commit; returns the
        `CommitInfo`. `ImageTextIndex.load(repo_id)` loads it back."""
        return push_index_to_hub(self.path, repo_id, private=private, token=token, revision=revision,
                                 commit_message=commit_message)


def check_model_matches(model, info: dict[str, Any], path: Path) -> None:
    """Raise `ModelMismatchError` unless `model` is the model (same dimension, same weights) that built the index."""
    built = info["model"]
    dim = model.config.projection_dim
    if dim != info["dimension"]:
        raise ModelMismatchError(
            f"The index at {path} holds {info['dimension']}-dimensional embeddings of {built['name_or_path']!r}; the "
            f"query model embeds in {dim} dimensions. Query with the model the index was built with, or rebuild the "
            "index with this model (hf-clip-index).")
    fingerprint = model_fingerprint(model)
    if fingerprint != built["fingerprint"]:
        raise ModelMismatchError(
            f"The index at {path} was built with {built['name_or_path']!r} (weights {built['fingerprint'][:19]}…, "
            f"{built['dtype']}); the query model's weights differ ({fingerprint[:19]}…, "
            f"{str(model.dtype).removeprefix('torch.')}). Embeddings of different models are not comparable: query "
            "with the model the index was built with, or rebuild the index with this model (hf-clip-index).")


def push_index_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                      revision: str | None = None, commit_message: str = "Upload hf_clip search index"):
    """Upload an index folder (without its shards/ working folder) to the Hub dataset repo `repo_id` in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset", revision=revision,
                             commit_message=commit_message, ignore_patterns=[f"{SHARDS_DIR}/*", "*.tmp-*"])


# hf-clip-index -----------------------------------------------------------------------------------------------------


@dataclass
class IndexArguments:
    output_dir: str = field(default="outputs/index", metadata={"help": "The index folder to write."})
    keep_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Dataset columns copied beside the embeddings and returned with each hit (a path, a URL, "
                          "the caption; an image column gives the HTML page its thumbnails)."},
    )
    shard_size: int = field(
        default=10_000,
        metadata={"help": "Rows per shard. Each finished shard is written at once, so a killed run redoes at most "
                          "one shard per process."},
    )
    index_type: str = field(
        default="flat",
        metadata={"help": "flat: exact inner-product search (FAISS if installed, else a torch matrix product). "
                          "ivf_pq: approximate FAISS index for large collections (needs faiss); its recall@10 against "
                          "exact search is measured and written to index_info.json."},
    )
    target_recall: float = field(
        default=0.95,
        metadata={"help": "With --index_type ivf_pq: probe twice the fewest inverted lists at which the recall@10 "
                          "against exact search of the collection's image and caption queries reaches this on "
                          "average, with their worst 5% no more than 0.15 below it (all lists if none does)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished or half-built index in --output_dir."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Push the finished index folder to this Hub dataset repo ('name' or "
                                        "'namespace/name'; token from HF_TOKEN or `hf auth login`)."},
    )


INDEX_ARGUMENT_CLASSES = (ModelArguments, DatasetArguments, LoaderArguments, IndexArguments)
INDEX_DEFAULTS = {"caption_column": None}


def parse_index_args(argv: list[str] | None = None
                     ) -> tuple[ModelArguments, DatasetArguments, LoaderArguments, IndexArguments]:
    model_args, data_args, loader_args, index_args = parse_with_config_file(INDEX_ARGUMENT_CLASSES, argv,
                                                                            defaults=INDEX_DEFAULTS)
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the hf_clip or Transformers CLIP model to embed with.")
    check_model_name_or_path(model_args.model_name_or_path)
    check_at_least_one(loader_args, "per_device_eval_batch_size")
    check_at_least_one(index_args, "shard_size")
    check_at_least_one(data_args, "max_train_samples")
    if index_args.index_type not in INDEX_TYPES:
        raise ValueError(f"--index_type must be one of {', '.join(INDEX_TYPES)}, got {index_args.index_type!r}.")
    if index_args.index_type != "flat":
        import_faiss(f"--index_type {index_args.index_type}")
    return model_args, data_args, loader_args, index_args


def prepare_output_dir(output_dir: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Start or resume: refuse a finished index (unless `overwrite`) and shards begun with other settings (`plan`:
    what decides the shards' contents)."""
    shard_dir = output_dir / SHARDS_DIR
    if overwrite:
        for name in (EMBEDDINGS_DIR, SHARDS_DIR):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (FAISS_FILE, INFO_FILE, SKIPPED_FILE, "README.md"):
            (output_dir / name).unlink(missing_ok=True)
    if (output_dir / INFO_FILE).exists():
        raise FileExistsError(f"{output_dir} already holds a finished index; pass --overwrite_output_dir "
                              "(overwrite=True) to rebuild it, or choose another output folder.")
    plan_path = shard_dir / PLAN_FILE
    if plan_path.exists():
        started = json.loads(plan_path.read_text())
        changed = [f"{key} {started.get(key)!r} (now {value!r})" for key, value in plan.items()
                   if started.get(key) != value]
        if changed:
            raise ValueError(f"{shard_dir} holds shards of a run with other settings: {'; '.join(changed)}. Resume "
                             "with the same settings, or pass --overwrite_output_dir (overwrite=True) to start over.")
        logger.info("Resuming the shards in %s", shard_dir)
        return
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2))


def dataset_card(info: dict[str, Any]) -> str:
    """The README.md of an index folder, for the Hub."""
    source = info["source"]
    name = source.get("dataset_name") or "the hf_clip embedded shapes dataset"
    split = f"the `{source['split']}` split of " if source.get("split") else ""
    lines = ["---", "tags:", "- hf_clip", "- clip", "- embeddings", "- image-retrieval", "---", "",
             f"# Search index of {name}", "",
             f"CLIP embeddings of {split}{name} ({info['num_rows']} rows embedded, {info['num_skipped_rows']} "
             f"skipped), made with `{info['model']['name_or_path']}` by hf_clip {info['hf_clip_version']}: "
             "`image_embedding`" + (" and `text_embedding`" if info["text_embeddings"] else "")
             + f" ({info['dimension']} dimensions, L2-normalised), the dataset's `row_id` and the kept columns "
             + f"{info['kept_columns']}, with a {info['index_type']} index over the image embeddings.", "",
             "```python", "from hf_clip_train.search import ImageTextIndex", "",
             "index = ImageTextIndex.load(REPO_ID, model_name_or_path=MODEL)  # the model that built the index",
             'print(index.search("a photo of a dog", k=5))', "```", ""]
    return "\n".join(lines)


def finish_index(output_dir: Path, num_rows: int, model_info: dict[str, Any], source: dict[str, Any],
                 keep_columns: Sequence[str], index_type: str, target_recall: float) -> dict[str, Any]:
    """Merge the shards into embeddings/, build the search index, write skipped_rows.jsonl, README.md and, last,
    index_info.json (its presence marks a finished index); the shards are then removed."""
    shard_dir = output_dir / SHARDS_DIR
    merged, skipped = merge_embedding_shards(shard_dir, num_rows)
    shutil.rmtree(output_dir / EMBEDDINGS_DIR, ignore_errors=True)
    merged.save_to_disk(str(output_dir / EMBEDDINGS_DIR))
    embeddings = datasets.load_from_disk(str(output_dir / EMBEDDINGS_DIR))
    built = build_index(embeddings, index_type, target_recall)
    if built.index is not None:
        import_faiss("Writing the index").write_index(built.index, str(output_dir / FAISS_FILE))
    with open(output_dir / SKIPPED_FILE, "w") as handle:
        handle.writelines(json.dumps(item) + "\n" for item in skipped)
    info = {
        "format_version": FORMAT_VERSION, "hf_clip_version": hf_clip_version, "model": model_info,
        "dtype": model_info["dtype"], "embedding_dtype": "float32", "metric": METRIC, "normalized": True,
        "dimension": model_info["dimension"], "num_rows": len(embeddings), "num_source_rows": num_rows,
        "num_skipped_rows": len(skipped), "text_embeddings": "text_embedding" in embeddings.column_names,
        "kept_columns": list(keep_columns), "source": source, **built.info,
    }
    (output_dir / "README.md").write_text(dataset_card(info))
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(shard_dir)
    return info


def build_search_index(model, processor, dataset: datasets.Dataset | datasets.IterableDataset,
                       output_dir: str | Path, settings: EmbeddingSettings, *, index_type: str = "flat",
                       target_recall: float = 0.95, overwrite: bool = False, source: dict[str, Any] | None = None,
                       model_name_or_path: str | None = None) -> dict[str, Any] | None:
    """Embed `dataset` into `output_dir` (resuming its finished shards), merge the shards and index them; returns
    index_info.json's content on the main process, None on the others. Under `accelerate launch` / `torchrun` every
    process must call it: each embeds its share of the shards. `source` (recorded in index_info.json, and checked
    when resuming) describes the dataset; `model_name_or_path` (default: the model's own) is where
    `ImageTextIndex.load` finds the model again."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}.")
    state = PartialState(cpu=not torch.accelerator.is_available())
    output_dir = Path(output_dir)
    model_info = describe_model(model, model_name_or_path or model.name_or_path)
    columns = settings.columns
    source = {**(source or {}), "image_column": columns.image, "caption_column": columns.caption,
              "base_dir": None if columns.base_dir is None else str(Path(columns.base_dir).resolve()),
              "streaming": isinstance(dataset, datasets.IterableDataset)}
    plan = {"format_version": FORMAT_VERSION, "model_fingerprint": model_info["fingerprint"], "source": source,
            "num_rows": None if source["streaming"] else len(dataset), "keep_columns": list(settings.keep_columns),
            "shard_size": settings.shard_size}
    if state.is_main_process:
        prepare_output_dir(output_dir, plan, overwrite)
    state.wait_for_everyone()
    started = time.perf_counter()
    num_rows = embed_dataset(model, processor, dataset, output_dir / SHARDS_DIR, settings,
                             ProcessShare(state.process_index, state.num_processes))
    logger.info("Embedded this process's shards in %.1f s", time.perf_counter() - started)
    state.wait_for_everyone()
    info = None
    if state.is_main_process:
        info = finish_index(output_dir, num_rows, model_info, source, settings.keep_columns, index_type,
                            target_recall)
    state.wait_for_everyone()
    return info


def index_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """`hf-clip-index`: embed a dataset split, store it and index it; returns index_info.json's content on the main
    process (None on the others)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # 1. Arguments, processes, the model.
    model_args, data_args, loader_args, index_args = parse_index_args(argv)
    state = PartialState(cpu=not torch.accelerator.is_available())
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    model = AutoModel.from_pretrained(model_args.model_name_or_path).to(state.device)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)

    # 2. The split, checked for its columns.
    dataset = load_split(data_args, data_args.train_split, streaming=data_args.streaming)
    if dataset is None:
        raise ValueError(f"Dataset {dataset_label(data_args.dataset_name)!r} has no split {data_args.train_split!r} "
                         "(set by --train_split).")
    needed = {"image_column": data_args.image_column}
    if data_args.caption_column is not None:
        needed["caption_column"] = data_args.caption_column
    needed.update({f"keep_columns ({name})": name for name in index_args.keep_columns})
    check_columns(dataset, data_args.dataset_name, data_args.train_split, needed)
    if data_args.max_train_samples is not None:
        dataset = first_rows(dataset, data_args.max_train_samples)

    # 3. Embed (each process its shards), merge and index.
    columns = ImageTextColumns(image=data_args.image_column, caption=data_args.caption_column, label=None,
                               base_dir=base_directory(data_args.dataset_name))
    settings = EmbeddingSettings(columns, index_args.keep_columns, index_args.shard_size,
                                 loader_args.per_device_eval_batch_size,
                                 worker_count(loader_args.dataloader_num_workers))
    source = {"dataset_name": data_args.dataset_name, "dataset_config_name": data_args.dataset_config_name,
              "split": data_args.train_split, "max_rows": data_args.max_train_samples,
              "embedded_num_train": data_args.embedded_num_train if data_args.dataset_name is None else None}
    info = build_search_index(model, processor, dataset, index_args.output_dir, settings,
                              index_type=index_args.index_type, target_recall=index_args.target_recall,
                              overwrite=index_args.overwrite_output_dir, source=source,
                              model_name_or_path=model_args.model_name_or_path)

    # 4. Report, and push.
    if info is not None:
        print(format_index_summary(Path(index_args.output_dir), info))
        if index_args.hub_dataset_id:
            commit = push_index_to_hub(index_args.output_dir, index_args.hub_dataset_id)
            print(f"Pushed to the Hub: {commit.commit_url}")
    state.wait_for_everyone()
    return info


def format_index_summary(output_dir: Path, info: dict[str, Any]) -> str:
    lines = [f"Indexed {info['num_rows']} of {info['num_source_rows']} rows into {output_dir} ({info['index_type']} "
             f"{info['metric']} index, {info['dimension']} dimensions, {info['backend']})."]
    if info.get("recall_at_10") is not None:
        by_kind = ", ".join(f"{kind} queries {recall:.3f}" for kind, recall in info["recall_at_10_by_query"].items())
        lines.append(f"Approximate index ({info['factory']}, {info['nprobe']} of {info['nlist']} lists probed): "
                     f"recall@10 {info['recall_at_10']:.3f} against exact search ({by_kind}; "
                     f"{info['recall_queries']} queries).")
    if info["num_skipped_rows"]:
        ids = [json.loads(line)["row_id"] for line in (output_dir / SKIPPED_FILE).read_text().splitlines()[:10]]
        more = ", ..." if info["num_skipped_rows"] > len(ids) else ""
        lines.append(f"Skipped {info['num_skipped_rows']} unusable rows (listed in {SKIPPED_FILE}): "
                     f"{', '.join(map(str, ids))}{more}")
    return "\n".join(lines)


# hf-clip-search ----------------------------------------------------------------------------------------------------


def cell_text(value: Any, feature: Any = None, width: int = 60) -> str:
    """A kept cell as one short line of text: images as <image>, class ids by name, a list by its first item."""
    if isinstance(value, Image.Image) or isinstance(feature, datasets.Image):
        return "<image>"
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    if isinstance(value, (list, tuple)):
        value = f"{value[0]} (+{len(value) - 1} more)" if len(value) > 1 else (value[0] if value else "")
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def query_label(query: Any) -> str:
    return repr(query) if isinstance(query, str) else f"<image {getattr(query, 'filename', '') or 'query'}>"


def format_hits_table(results: Sequence[SearchResult], features: datasets.Features) -> str:
    """One block per query: rank, score, row id and the kept columns (`features`) of each hit."""
    blocks = []
    for result in results:
        cells = [[cell_text(row[name], feature) for name, feature in features.items()] for row in result.rows]
        widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(features)]
        header = f"{'rank':>4}  {'score':>7}  {'row_id':>8}" + "".join(
            f"  {name:<{width}}" for name, width in zip(features, widths))
        lines = [f"query: {query_label(result.query)}", header.rstrip(), "-" * len(header.rstrip())]
        for rank, (row_id, score, row) in enumerate(zip(result.row_ids, result.scores, cells), start=1):
            line = f"{rank:>4}  {score:>7.4f}  {row_id:>8}" + "".join(
                f"  {text:<{width}}" for text, width in zip(row, widths))
            lines.append(line.rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _thumbnail_uri(image: Image.Image, size: int = 160) -> str:
    image = image.convert("RGB")
    scale = size / max(image.size)
    if scale < 1 or max(image.size) < size // 2:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail_source(value: Any, base_dir: str | None) -> str | None:
    """An <img src> for a kept cell that is an image, an image file path or an image URL; None for other cells."""
    from hf_clip import to_rgb_image

    if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
        return html.escape(value, quote=True) if value.lower().endswith(IMAGE_SUFFIXES) else None
    if isinstance(value, str) and not value.lower().endswith(IMAGE_SUFFIXES):
        return None
    if not isinstance(value, (str, Image.Image, dict)):
        return None
    try:
        return _thumbnail_uri(to_rgb_image(value, base_dir))
    except (OSError, ValueError, TypeError):
        return None


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } .meta { color: #666; font-size: 13px; margin-bottom: 20px; }
section { margin-bottom: 28px; }
h2 { font-size: 16px; margin: 0 0 10px; display: flex; align-items: center; gap: 10px; }
h2 img { width: 48px; height: 48px; image-rendering: pixelated; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 172px); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
figure img { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.noimg { width: 160px; height: 160px; background: #eee; display: flex; align-items: center; justify-content: center;
         color: #999; font-size: 12px; }
figcaption { font-size: 12px; line-height: 1.35; margin-top: 4px; word-break: break-word; }
.score { font-weight: 600; } .row { color: #777; }
"""


def render_html(results: Sequence[SearchResult], index: ImageTextIndex) -> str:
    """A static, self-contained page: per query, its hits as thumbnails (from the first kept column holding images,
    image paths or image URLs) with rank, score, row id and the other kept columns."""
    base_dir = index.info["source"].get("base_dir")
    info = index.info
    sections = []
    for result in results:
        title = html.escape(query_label(result.query))
        if not isinstance(result.query, str):
            title = f'<img src="{_thumbnail_uri(result.query)}" alt="query image"> image query'
        figures = []
        for rank, (row_id, score, row) in enumerate(zip(result.row_ids, result.scores, result.rows), start=1):
            source, texts = None, []
            for name, feature in index.kept_features.items():
                candidate = thumbnail_source(row[name], base_dir) if source is None else None
                if candidate is not None:
                    source = candidate
                elif not isinstance(feature, datasets.Image):
                    texts.append(f"{html.escape(name)}: {html.escape(cell_text(row[name], feature, 80))}")
            picture = (f'<img src="{source}" alt="row {row_id}">' if source
                       else '<div class="noimg">no image column kept</div>')
            caption = "<br>".join([f'<span class="score">#{rank} · {score:.3f}</span> '
                                   f'<span class="row">row {row_id}</span>', *texts])
            figures.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
        sections.append(f"<section><h2>{title}</h2><div class=\"grid\">{''.join(figures)}</div></section>")
    source = info["source"]
    name = source.get("dataset_name") or ("the embedded shapes dataset" if "dataset_name" in source else "a dataset")
    split = f" ({source['split']})" if source.get("split") else ""
    meta = html.escape(f"{info['num_rows']} rows of {name}{split} · model {info['model']['name_or_path']} · "
                       f"{info['index_type']} {info['metric']} index · cosine similarity")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>hf_clip search</title>"
            f"<style>{HTML_STYLE}</style></head><body><h1>hf_clip search</h1><div class=\"meta\">{meta}</div>"
            + "".join(sections) + "</body></html>\n")


def search_main(argv: list[str] | None = None) -> list[SearchResult]:
    """`hf-clip-search`: query an index by text or image, print the hits as a table, optionally write an HTML page."""
    parser = argparse.ArgumentParser(prog="hf-clip-search", description="Query an index built by hf-clip-index.")
    parser.add_argument("index", help="Index folder written by hf-clip-index, or a Hub dataset repo id holding one.")
    parser.add_argument("queries", nargs="*", help="Text queries.")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="An image file to query with (repeat for several).")
    parser.add_argument("-k", "--k", type=int, default=10, help="Hits per query (default 10).")
    parser.add_argument("--target", choices=("image", "text"), default="image",
                        help="Search the image embeddings (default) or the caption embeddings.")
    parser.add_argument("--model_name_or_path", default=None,
                        help="Where the index's model is, when not where index_info.json says.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub dataset repo.")
    parser.add_argument("--html", default=None, metavar="PAGE", help="Also write the hits as a static HTML page.")
    args = parser.parse_args(argv)
    if not args.queries and not args.image:
        parser.error("give at least one text query or --image PATH.")
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}.")
    from hf_clip import to_rgb_image

    images = []
    for path in args.image:
        image = to_rgb_image(path)
        image.filename = path
        images.append(image)
    index = ImageTextIndex.load(args.index, model_name_or_path=args.model_name_or_path, revision=args.revision)
    results = index.search([*args.queries, *images], k=args.k, target=args.target)
    print(format_hits_table(results, index.kept_features))
    if args.html:
        Path(args.html).write_text(render_html(results, index))
        print(f"Wrote {args.html}")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_clip_train.search index ...` or `python -m hf_clip_train.search query ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("index", "query"):
        sys.exit("usage: python -m hf_clip_train.search index [hf-clip-index flags] | query INDEX QUERY... [flags]")
    (index_main if argv[0] == "index" else search_main)(argv[1:])


if __name__ == "__main__":
    main()
