"""FAISS settings and recall tuning: the exact and IVF-PQ indexes over the image embeddings, exact top-k in torch
(without faiss), and the recall@10 probe that tunes an approximate index's `nprobe` at build time."""

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np
import torch

INDEX_TYPES = ("flat", "ivf_pq")
METRIC = "inner_product"
SEARCH_EXTRA = 'pip install "hf-clip[search]"'
RECALL_QUERIES = 1_000


def check_index_type(index_type: str) -> None:
    """Refuse, naming the flag and the choices, an index type this package does not build."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"--index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}.")


def import_faiss(reason: str | None = None):
    """The `faiss` module; None when it is not installed, or an ImportError naming `reason` and the extra."""
    try:
        import faiss
    except ImportError:
        if reason is None:
            return None
        raise ImportError(f"{reason} needs faiss, which is not installed. Install it with: {SEARCH_EXTRA}") from None
    return faiss


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
    nothing, and one list (a single scan of the same codes) replaces it if it meets the target too. `index_type` is
    one of INDEX_TYPES, checked where it enters (`IndexArguments`, `build_search_index`)."""
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
