"""What an index folder records to check itself, and the checks `ImageTextIndex.load` runs before it answers.

At build time index_info.json records, beside the row count, the dimension and the index type, the size and SHA-256
of each file a query reads (`image.faiss` and every file of `embeddings/`) under "files", as a model's
`hf_clip_manifest.json` does (`hf_clip.integrity`). At load:

1. index_info.json must be valid JSON holding every entry a query needs, each of its type (`read_index_info`);
2. each recorded file must have its size and SHA-256 (`check_index_files`); a folder written before checksums were
   recorded (no "files") is checked by everything else below, and a warning says its bytes are not;
3. `embeddings/` must hold `num_rows` rows of `dimension`-long vectors and exactly the kept columns
   (`check_embeddings`);
4. `image.faiss` must be the recorded kind of index (flat inner product, or the IVF-PQ / PQ fast-scan of its
   factory) over `num_rows` vectors of `dimension`; a flat index's vectors must equal the stored image embeddings:
   all of them in a folder with no checksums, 64 rows spread over it otherwise (`check_faiss_index`).

Every refusal is a `CorruptIndexError` naming the folder and the file.
"""

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from hf_clip.integrity import CorruptFileError, file_manifest, verify_files

from .ann import INDEX_TYPES, METRIC, RowGather, embedding_chunks
from .layout import EMBEDDINGS_DIR, FAISS_FILE, FORMAT_VERSION, INFO_FILE

logger = logging.getLogger(__name__)

FILES_KEY = "files"
SPOT_CHECK_ROWS = 64
ROWS_PER_CHECK = 65_536
EMBEDDING_COLUMNS = ("row_id", "image_embedding", "text_embedding")
REBUILD = ("Copy the folder again from where it was built, or rebuild it with hf-clip-index "
           "(--overwrite_output_dir).")


class IndexLoadError(Exception):
    """An index that cannot be opened as asked: its message names the folder, file or input, and what to do."""


class IndexNotFoundError(IndexLoadError, FileNotFoundError):
    """No index where one was named: no such folder, Hub repo or revision, or a folder that holds no finished index."""


class CorruptIndexError(IndexLoadError, CorruptFileError):
    """An index folder whose files are damaged, stale or edited: they do not match index_info.json, or it is
    invalid. The message names the file."""


class UnsupportedIndexError(IndexLoadError, ValueError):
    """An index folder of a format version this hf_clip does not read."""


def index_file_names(folder: Path) -> list[str]:
    """The files of an index folder that a query reads: image.faiss (when there is one) and every file of
    embeddings/, as paths relative to the folder."""
    names = [FAISS_FILE] if (folder / FAISS_FILE).is_file() else []
    return names + sorted(path.relative_to(folder).as_posix() for path in (folder / EMBEDDINGS_DIR).rglob("*")
                          if path.is_file())


def record_index_files(folder: Path) -> dict[str, dict[str, int | str]]:
    """{relative path: {"size", "sha256"}} of the files a query reads (`index_file_names`)."""
    return file_manifest(folder, index_file_names(folder))


def _refuse(info_path: Path, message: str) -> CorruptIndexError:
    return CorruptIndexError(f"{info_path}: {message} The file was edited or damaged. {REBUILD}")


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


REQUIRED_ENTRIES: dict[str, tuple[str, Any]] = {
    "dimension": ("a positive integer", lambda value: _is_count(value, 1)),
    "num_rows": ("a row count", _is_count),
    "index_type": (f"one of {', '.join(INDEX_TYPES)}", lambda value: value in INDEX_TYPES),
    "metric": (repr(METRIC), lambda value: value == METRIC),
    "backend": ("'faiss' or 'torch'", lambda value: value in ("faiss", "torch")),
    "kept_columns": ("a list of column names", lambda value: isinstance(value, list)
                     and all(isinstance(name, str) for name in value) and len(set(value)) == len(value)),
    "text_embeddings": ("true or false", lambda value: isinstance(value, bool)),
    "model": ("the model that built the index: {name_or_path, fingerprint, ...}", lambda value: isinstance(value, dict)
              and isinstance(value.get("name_or_path"), str) and isinstance(value.get("fingerprint"), str)),
    "source": ("the dataset it was built from: {image_column, ...}", lambda value: isinstance(value, dict)),
}
APPROXIMATE_ENTRIES = ("nlist", "nprobe", "rerank")


def read_index_info(path: Path) -> dict[str, Any]:
    """The content of `path`/index_info.json, checked to hold each entry a query needs, of its type. Raises
    `IndexNotFoundError` when there is no such file, `UnsupportedIndexError` for another format version and
    `CorruptIndexError` naming the file and the entry otherwise."""
    info_path = path / INFO_FILE
    if not info_path.is_file():
        unfinished = " It holds an unfinished build: rerun hf-clip-index with the same flags to finish it." if (
            path / "shards").is_dir() else ""
        raise IndexNotFoundError(f"{path} has no {INFO_FILE}: it is not an index written by hf-clip-index.{unfinished}")
    try:
        info = json.loads(info_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refuse(info_path, f"is not valid JSON ({error}).") from None
    if not isinstance(info, dict):
        raise _refuse(info_path, f"holds a JSON {type(info).__name__}, not an object.")
    if "format_version" not in info:
        raise _refuse(info_path, "has no 'format_version'.")
    if info["format_version"] != FORMAT_VERSION:
        raise UnsupportedIndexError(f"{info_path}: format version {info['format_version']!r} is not supported by this "
                                    f"hf_clip ({FORMAT_VERSION}); open it with the hf_clip that wrote it.")
    required = dict(REQUIRED_ENTRIES)
    if info.get("index_type") == "ivf_pq":
        required.update({name: ("a positive integer", lambda value: _is_count(value, 1))
                         for name in APPROXIMATE_ENTRIES})
    for name, (expected, valid) in required.items():
        if name not in info:
            raise _refuse(info_path, f"has no {name!r} entry ({expected}).")
        if not valid(info[name]):
            raise _refuse(info_path, f"{name!r} is {info[name]!r}, not {expected}.")
    if FILES_KEY in info and not (isinstance(info[FILES_KEY], dict) and all(
            isinstance(entry, dict) and _is_count(entry.get("size")) and isinstance(entry.get("sha256"), str)
            for entry in info[FILES_KEY].values())):
        raise _refuse(info_path, f"{FILES_KEY!r} is not a mapping of file names to {{size, sha256}}.")
    return info


def check_index_files(path: Path, info: dict[str, Any], hashes: bool = True) -> None:
    """Each file index_info.json records: present, of its size and (with `hashes`) of its SHA-256. A folder
    written before checksums were recorded gets a warning saying that its bytes are not checked."""
    recorded = info.get(FILES_KEY)
    if recorded is None:
        logger.warning("%s was written before index folders recorded checksums: its row counts, dimension and index "
                       "type are checked, but nothing in it is hashed. Rebuild it with hf-clip-index to record them.",
                       path)
        return
    missing = [name for name in index_file_names(path) if name not in recorded]
    if missing:
        raise CorruptIndexError(f"{path}: {missing[0]} is not among the files index_info.json records (it was added "
                                f"or replaced after the build). {REBUILD}")
    try:
        if hashes:
            verify_files(path, recorded)
        else:
            for name, entry in recorded.items():
                if not (path / name).is_file() or (path / name).stat().st_size != entry["size"]:
                    verify_files(path, recorded, [name])
    except CorruptFileError as error:
        raise CorruptIndexError(f"{error} index_info.json records the files as they were built, so the folder was "
                                f"damaged or changed since. {REBUILD}") from None


def load_embeddings(path: Path) -> datasets.Dataset:
    """`embeddings/` loaded with `datasets.load_from_disk`; a folder it cannot read is refused naming it."""
    folder = path / EMBEDDINGS_DIR
    if not folder.is_dir():
        raise CorruptIndexError(f"{path}: {EMBEDDINGS_DIR}/ is missing. {REBUILD}")
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as error:  # pyarrow and datasets raise many types for damaged Arrow files and metadata
        raise CorruptIndexError(f"{path}: {EMBEDDINGS_DIR}/ cannot be read ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}). {REBUILD}") from error


def check_embeddings(path: Path, info: dict[str, Any], embeddings: datasets.Dataset) -> None:
    """`embeddings/` holds index_info.json's row count, its dimension, and exactly its kept columns."""
    folder = f"{path}: {EMBEDDINGS_DIR}/"
    if len(embeddings) != info["num_rows"]:
        raise CorruptIndexError(f"{folder} holds {len(embeddings)} rows; index_info.json records {info['num_rows']}. "
                                f"{REBUILD}")
    expected = ["row_id", "image_embedding"] + (["text_embedding"] if info["text_embeddings"] else [])
    absent = [name for name in expected + info["kept_columns"] if name not in embeddings.column_names]
    if absent:
        raise CorruptIndexError(f"{folder} has no column {absent[0]!r}, which index_info.json records (its columns: "
                                f"{embeddings.column_names}). {REBUILD}")
    unrecorded = [name for name in embeddings.column_names if name not in EMBEDDING_COLUMNS
                  and name not in info["kept_columns"]]
    if unrecorded or ("text_embedding" in embeddings.column_names) != info["text_embeddings"]:
        raise CorruptIndexError(f"{folder} has columns {embeddings.column_names}; index_info.json records kept "
                                f"columns {info['kept_columns']} and text_embeddings {info['text_embeddings']}. "
                                f"{REBUILD}")
    for column in expected[1:]:
        feature = embeddings.features[column]
        length = getattr(feature, "length", None)
        if length != info["dimension"]:
            raise CorruptIndexError(f"{folder} column {column!r} holds vectors of length {length}; index_info.json "
                                    f"records dimension {info['dimension']}. {REBUILD}")


def _faiss_kind(index, faiss) -> str:
    if isinstance(index, faiss.IndexFlat):
        return "flat" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "flat (not inner product)"
    return type(index).__name__


def check_faiss_index(path: Path, info: dict[str, Any], index, embeddings: datasets.Dataset, faiss) -> None:
    """`image.faiss` is the kind of index index_info.json records, over its rows and dimension, and a flat index
    holds the stored image embeddings (read back at up to SPOT_CHECK_ROWS rows spread over it)."""
    file = f"{path}: {FAISS_FILE}"
    if info["index_type"] == "flat":
        expected = "flat"
    else:
        expected = "IndexIVFPQFastScan" if info["nlist"] > 1 else "IndexPQFastScan"
    kind = _faiss_kind(index, faiss)
    if kind != expected:
        raise CorruptIndexError(f"{file} is a {kind} index, where index_info.json records index_type "
                                f"{info['index_type']!r} ({expected}). {REBUILD}")
    if index.d != info["dimension"]:
        raise CorruptIndexError(f"{file} holds {index.d}-dimensional vectors; index_info.json records "
                                f"{info['dimension']}. {REBUILD}")
    if index.ntotal != info["num_rows"] or index.ntotal != len(embeddings):
        raise CorruptIndexError(f"{file} holds {index.ntotal} rows beside {len(embeddings)} in {EMBEDDINGS_DIR}/ "
                                f"(index_info.json records {info['num_rows']}): it is stale or damaged. {REBUILD}")
    if expected == "IndexIVFPQFastScan" and faiss.extract_index_ivf(index).nlist != info["nlist"]:
        raise CorruptIndexError(f"{file} has {faiss.extract_index_ivf(index).nlist} inverted lists; index_info.json "
                                f"records {info['nlist']}. {REBUILD}")
    if expected == "flat" and index.ntotal:
        check_flat_vectors(file, index, embeddings, every_row=FILES_KEY not in info)


def check_flat_vectors(file: str, index, embeddings: datasets.Dataset, every_row: bool) -> None:
    """The vectors of a flat FAISS index equal the stored image embeddings: all of them (`every_row`, for a folder
    with no checksums: as much work as one exact query), or SPOT_CHECK_ROWS rows spread over the index."""
    stored = embedding_chunks(embeddings, "image_embedding")
    if every_row:
        offset = 0
        for chunk in stored:
            for start in range(0, len(chunk), ROWS_PER_CHECK):
                block = np.asarray(chunk[start:start + ROWS_PER_CHECK])
                differ = np.flatnonzero(~np.all(index.reconstruct_n(offset + start, len(block)) == block, axis=1))
                if len(differ):
                    _refuse_vectors(file, offset + start + int(differ[0]))
            offset += len(chunk)
        return
    positions = np.unique(np.linspace(0, index.ntotal - 1, SPOT_CHECK_ROWS).astype(np.int64))
    indexed = np.stack([index.reconstruct(int(position)) for position in positions])
    differ = np.flatnonzero(~np.all(indexed == RowGather(stored)(positions), axis=1))
    if len(differ):
        _refuse_vectors(file, int(positions[differ[0]]))


def _refuse_vectors(file: str, row: int) -> None:
    raise CorruptIndexError(f"{file}: row {row} of the index is not the stored image embedding of that row: the index "
                            f"or {EMBEDDINGS_DIR}/ is stale or damaged. {REBUILD}")
