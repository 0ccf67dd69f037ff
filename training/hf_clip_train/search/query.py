"""`ImageTextIndex`: an index folder (or a Hub dataset repo holding one) opened with the model that built it, and
searched by text or image. Imports nothing that only training needs: `pip install "hf-clip[search]"` suffices."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from hf_clip.hub import is_hub_repo_id

from ..data.transforms import image_transform_for
from .ann import ApproximateSettings, RowGather, embedding_chunks, exact_top_k, import_faiss, search_faiss
from .checks import (
    REBUILD,
    CorruptIndexError,
    IndexLoadError,
    IndexNotFoundError,
    check_embeddings,
    check_faiss_index,
    check_index_files,
    load_embeddings,
    read_index_info,
)
from .hub import download_index, is_local_model_name, push_index_to_hub
from .layout import FAISS_FILE, model_fingerprint


@dataclass
class SearchResult:
    """The k rows nearest to one query, best first: their dataset row ids, cosine similarities and kept columns."""

    query: Any
    row_ids: list[int]
    scores: list[float]
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.row_ids)


class ModelMismatchError(IndexLoadError, ValueError):
    """A query model that is not the model an index was built with."""


class IndexModelNotFoundError(IndexLoadError, OSError):
    """The model an index was built with cannot be loaded from where index_info.json (or the caller) says."""


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
             revision: str | None = None, token: str | None = None, check_hashes: bool = True) -> "ImageTextIndex":
        """Open an index folder (or download a Hub dataset repo holding one) with the model it was built with: `model`
        and `processor`, or `model_name_or_path`, or by default the model recorded in index_info.json.

        The folder is checked against index_info.json before it answers (`search.checks`): its files' sizes and
        SHA-256 (`check_hashes=False` skips hashing, about a second per GB), the row counts, dimension and index type
        of `embeddings/` and `image.faiss`. A damaged, stale or edited folder raises `CorruptIndexError` naming the
        file; a missing one `IndexNotFoundError`; a model other than the one that built the index (different
        weights) `ModelMismatchError`, and one that cannot be loaded `IndexModelNotFoundError`. All are
        `IndexLoadError`s, the errors a command reports as the user's to fix."""
        path = Path(path_or_repo_id).expanduser()
        if not path.is_dir():
            if not is_hub_repo_id(str(path_or_repo_id)):
                raise IndexNotFoundError(f"No index folder at {path_or_repo_id!r} ({path.absolute()} does not exist), "
                                         "and it is not a Hub dataset repo id ('name' or 'namespace/name').")
            path = download_index(str(path_or_repo_id), revision=revision, token=token)
        info = read_index_info(path)
        check_index_files(path, info, hashes=check_hashes)
        embeddings = load_embeddings(path)
        check_embeddings(path, info, embeddings)
        if model is None:
            model, processor = load_index_model(info, path, model_name_or_path, processor)
        elif processor is None:
            raise ValueError("Pass the processor with the model: ImageTextIndex.load(path, model, processor).")
        check_model_matches(model, info, path)
        faiss_index = None
        if info["backend"] == "faiss":
            faiss = import_faiss(None if info["index_type"] == "flat" else f"The {info['index_type']} index in {path}")
            if faiss is not None:
                if not (path / FAISS_FILE).is_file():
                    raise CorruptIndexError(f"{path}: {FAISS_FILE} is missing; index_info.json records a FAISS "
                                            f"index. {REBUILD}")
                try:
                    faiss_index = faiss.read_index(str(path / FAISS_FILE))
                except RuntimeError as error:
                    raise CorruptIndexError(f"{path}: {FAISS_FILE} is not a FAISS index FAISS can read "
                                            f"({str(error).splitlines()[-1][:200]}). {REBUILD}") from None
                check_faiss_index(path, info, faiss_index, embeddings, faiss)
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
        from ..data.sources import ImageTextColumns
        from .embed import EmbeddingSettings
        from .folder import build_search_index  # needs accelerate, which only building needs

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
        empty = [i for i, q in texts if not q.strip()]
        if empty:
            raise ValueError(f"Query {empty[0]} is an empty text: give words to search for, or an image.")
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


def load_index_model(info: dict[str, Any], path: Path, model_name_or_path: str | None, processor=None):
    """The model and processor of an index: from `model_name_or_path`, else where index_info.json says. An index
    pushed from a local model names it "local model NAME"; `model_name_or_path` must then say where it is."""
    recorded = info["model"]["name_or_path"]
    source = model_name_or_path or recorded
    if model_name_or_path is None and is_local_model_name(recorded):
        raise IndexModelNotFoundError(
            f"The index at {path} was built with a model from a local folder ({recorded!r}), which was not "
            "published with it: pass model_name_or_path= (or --model_name_or_path) naming that model's folder or "
            "Hub id.")
    try:
        return AutoModel.from_pretrained(source), processor or AutoProcessor.from_pretrained(source)
    except OSError as error:
        raise IndexModelNotFoundError(
            f"Cannot load the index's model {source!r} ({' '.join(str(error).split())[:300]}). Pass "
            "model_name_or_path= (or --model_name_or_path) naming where that model is now.") from error
