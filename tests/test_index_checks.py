"""What `ImageTextIndex.load` checks before an index answers (hf_clip_train.search.checks): a folder whose files are
stale, damaged or edited is refused with a message naming the file, whether or not it recorded checksums; and the
search CLIs' refusals of bad input (one line, exit status 2)."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import PartialState
from conftest import CAPTIONS
from PIL import Image
from preloaded import run_python

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip.cli import UsageError
from hf_clip_train.search import (
    CorruptIndexError,
    ImageTextIndex,
    IndexNotFoundError,
    NothingToIndexError,
    index_main,
    parse_index_args,
    search_main,
)

faiss = pytest.importorskip("faiss")
REPO = Path(__file__).resolve().parents[1]
NUM_ROWS, STALE_ROWS = 300, 50


def image_rows(count: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]
    return datasets.Dataset.from_dict(
        {"image": images, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))


def build_index(model_dir: Path, rows: datasets.Dataset, output_dir: Path, **kwargs) -> ImageTextIndex:
    try:
        return ImageTextIndex.build(HFClipModel.from_pretrained(model_dir), HFClipProcessor.from_pretrained(model_dir),
                                    rows, output_dir, caption_column="caption", keep_columns=["caption"], **kwargs)
    finally:
        PartialState._reset_state()


@pytest.fixture(scope="module")
def indexes(saved_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Two flat indexes of the tiny random model: 300 rows, and 50 other rows (an earlier build's stale copy)."""
    root = tmp_path_factory.mktemp("indexes")
    build_index(saved_checkpoint, image_rows(NUM_ROWS), root / "full")
    build_index(saved_checkpoint, image_rows(STALE_ROWS, seed=1), root / "stale")
    return {"full": root / "full", "stale": root / "stale"}


def copy_of(folder: Path, tmp_path: Path, hashed: bool = True) -> Path:
    """A copy of an index folder; `hashed=False` removes its checksums, as in a folder written before they were
    recorded."""
    copy = tmp_path / f"copy-{'hashed' if hashed else 'unhashed'}"
    shutil.copytree(folder, copy)
    if not hashed:
        info = json.loads((copy / "index_info.json").read_text())
        del info["files"]
        (copy / "index_info.json").write_text(json.dumps(info))
    return copy


def edit_info(folder: Path, edit) -> None:
    info = json.loads((folder / "index_info.json").read_text())
    edit(info)
    (folder / "index_info.json").write_text(json.dumps(info))


def test_an_intact_folder_records_every_queried_file_and_loads(indexes, saved_checkpoint, caplog):
    info = json.loads((indexes["full"] / "index_info.json").read_text())
    assert sorted(info["files"]) == ["embeddings/data-00000-of-00001.arrow", "embeddings/dataset_info.json",
                                     "embeddings/state.json", "image.faiss"]
    assert info["files"]["image.faiss"]["size"] == (indexes["full"] / "image.faiss").stat().st_size
    index = ImageTextIndex.load(indexes["full"])
    assert len(index) == NUM_ROWS and index.faiss_index.ntotal == NUM_ROWS
    own = torch.tensor(index.embeddings[7]["image_embedding"])[None]
    assert index.search_embeddings(own, k=1)[0].row_ids == [7]
    assert "nothing in it is hashed" not in caplog.text


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "written_before_checksums"])
def test_a_stale_image_faiss_of_fewer_rows_is_refused(indexes, tmp_path, hashed, caplog):
    folder = copy_of(indexes["full"], tmp_path, hashed)
    shutil.copy(indexes["stale"] / "image.faiss", folder / "image.faiss")
    expected = ("image.faiss has \\d+ bytes, \\d+ were saved" if hashed
                else f"image.faiss holds {STALE_ROWS} rows beside {NUM_ROWS} in embeddings/")
    with pytest.raises(CorruptIndexError, match=expected):
        ImageTextIndex.load(folder)
    assert ("nothing in it is hashed" in caplog.text) != hashed


def _overwritten(path: Path, vectors: np.ndarray) -> None:
    data = bytearray(path.read_bytes())
    data[-400:-200] = b"\xff" * 200
    path.write_bytes(bytes(data))


def _random_bytes(path: Path, vectors: np.ndarray) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _flat_index_of(vectors: np.ndarray):
    def write(path: Path, _) -> None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(path))
    return write


def _zeroed(path: Path, vectors: np.ndarray) -> None:
    _flat_index_of(np.zeros_like(vectors))(path, vectors)


def _other_vectors(path: Path, vectors: np.ndarray) -> None:
    other = np.random.default_rng(0).standard_normal(vectors.shape).astype(np.float32)
    _flat_index_of(other / np.linalg.norm(other, axis=1, keepdims=True))(path, vectors)


NOT_STORED = "image.faiss: row {} of the index is not the stored image embedding"


@pytest.mark.parametrize(("damage", "unhashed"), [
    (_overwritten, NOT_STORED.format(296)), (_random_bytes, "image.faiss is not a FAISS index FAISS can read"),
    (_zeroed, NOT_STORED.format(0)), (_other_vectors, NOT_STORED.format(0))],
    ids=["overwritten_bytes", "random_bytes", "zeroed_vectors", "another_valid_faiss_file"])
@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "written_before_checksums"])
def test_damaged_or_replaced_image_faiss_is_refused_naming_it(indexes, tmp_path, damage, unhashed, hashed):
    folder = copy_of(indexes["full"], tmp_path, hashed)
    vectors = np.asarray(datasets.load_from_disk(str(folder / "embeddings"))["image_embedding"], dtype=np.float32)
    damage(folder / "image.faiss", vectors)
    expected = "image.faiss (does not match its saved SHA-256|has \\d+ bytes)" if hashed else unhashed
    with pytest.raises(CorruptIndexError, match=expected):
        ImageTextIndex.load(folder)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda info: info.update(index_type="ivf_pq"), "has no 'nlist' entry"),
    (lambda info: info.update(index_type="hnsw"), "'index_type' is 'hnsw', not one of flat, ivf_pq"),
    (lambda info: info.pop("index_type"), "has no 'index_type' entry"),
    (lambda info: info.update(kept_columns=["caption", "label"]), "embeddings/ has no column 'label'"),
    (lambda info: info.update(kept_columns=[]), r"embeddings/ has columns .*; index_info.json records kept columns "
                                                r"\[\]"),
    (lambda info: info.pop("kept_columns"), "has no 'kept_columns' entry"),
    (lambda info: info.pop("model"), "has no 'model' entry"),
    (lambda info: info["model"].pop("fingerprint"), "'model' is .*, not the model that built the index"),
    (lambda info: info.update(num_rows=299), "embeddings/ holds 300 rows; index_info.json records 299"),
    (lambda info: info.update(dimension=16),
     "column 'image_embedding' holds vectors of length 32; index_info.json records dimension 16"),
], ids=["index_type_flat_to_ivf_pq", "index_type_unknown", "index_type_deleted", "kept_columns_added",
        "kept_columns_emptied", "kept_columns_deleted", "model_deleted", "model_fingerprint_deleted", "num_rows_edited",
        "dimension_edited"])
def test_an_edited_index_info_is_refused_naming_the_entry(indexes, tmp_path, edit, expected):
    folder = copy_of(indexes["full"], tmp_path)
    edit_info(folder, edit)
    with pytest.raises((CorruptIndexError, ValueError), match=expected):
        ImageTextIndex.load(folder)


@pytest.mark.parametrize("content", [b"{\"format_version\": 1, ", b"[1, 2]", b"\xff\xfe not text"],
                         ids=["truncated_json", "not_an_object", "not_utf8"])
def test_an_invalid_index_info_is_refused_naming_it(indexes, tmp_path, content):
    folder = copy_of(indexes["full"], tmp_path)
    (folder / "index_info.json").write_bytes(content)
    with pytest.raises(CorruptIndexError, match="index_info.json: .*The file was edited or damaged"):
        ImageTextIndex.load(folder)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "written_before_checksums"])
def test_a_truncated_or_overwritten_embeddings_arrow_file_is_refused(indexes, tmp_path, damage, hashed):
    folder = copy_of(indexes["full"], tmp_path, hashed)
    arrow = folder / "embeddings" / "data-00000-of-00001.arrow"
    data = bytearray(arrow.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # zeroes over row 10's image embedding (without checksums, only those can be checked: against image.faiss)
        first = np.asarray(datasets.load_from_disk(str(folder / "embeddings"))[0]["image_embedding"], np.float32)
        offset = bytes(data).find(first.tobytes()) + 10 * first.nbytes
        data[offset: offset + 64] = b"\x00" * 64
    arrow.write_bytes(bytes(data))
    if hashed:
        expected = "embeddings/data-00000-of-00001.arrow (has \\d+ bytes|does not match its saved SHA-256)"
    else:
        expected = ("image.faiss: row 10 of the index is not the stored image embedding" if damage == "overwritten"
                    else "embeddings/ cannot be read")
    with pytest.raises(CorruptIndexError, match=expected):
        ImageTextIndex.load(folder)


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "written_before_checksums"])
def test_embeddings_with_fewer_rows_than_the_index_are_refused(indexes, tmp_path, hashed):
    folder = copy_of(indexes["full"], tmp_path, hashed)
    shutil.rmtree(folder / "embeddings")
    shutil.copytree(indexes["stale"] / "embeddings", folder / "embeddings")
    expected = ("embeddings/data-00000-of-00001.arrow (has \\d+ bytes|does not match)" if hashed
                else f"embeddings/ holds {STALE_ROWS} rows; index_info.json records {NUM_ROWS}")
    with pytest.raises(CorruptIndexError, match=expected):
        ImageTextIndex.load(folder)


def test_an_approximate_index_is_checked_for_its_kind_and_rows(indexes, saved_checkpoint, tmp_path):
    approximate = build_index(saved_checkpoint, image_rows(NUM_ROWS), tmp_path / "ivf_pq", index_type="ivf_pq")
    assert type(approximate.faiss_index).__name__ in ("IndexIVFPQFastScan", "IndexPQFastScan")
    folder = copy_of(tmp_path / "ivf_pq", tmp_path, hashed=False)
    shutil.copy(indexes["full"] / "image.faiss", folder / "image.faiss")
    with pytest.raises(CorruptIndexError, match="image.faiss is a flat index, where index_info.json records "
                                                "index_type 'ivf_pq'"):
        ImageTextIndex.load(folder)


def test_a_file_added_beside_the_recorded_ones_is_refused(indexes, tmp_path):
    folder = copy_of(indexes["full"], tmp_path)
    shutil.copy(folder / "embeddings" / "data-00000-of-00001.arrow", folder / "embeddings" / "data-extra.arrow")
    with pytest.raises(CorruptIndexError, match="embeddings/data-extra.arrow is not among the files"):
        ImageTextIndex.load(folder)


def test_check_hashes_false_still_checks_sizes_and_rows(indexes, tmp_path):
    folder = copy_of(indexes["full"], tmp_path)
    _other_vectors(folder / "image.faiss", np.zeros((NUM_ROWS, 32), dtype=np.float32))
    with pytest.raises(CorruptIndexError, match="row 0 of the index is not the stored image embedding"):
        ImageTextIndex.load(folder, check_hashes=False)
    shutil.copy(indexes["stale"] / "image.faiss", folder / "image.faiss")
    with pytest.raises(CorruptIndexError, match="image.faiss has \\d+ bytes"):
        ImageTextIndex.load(folder, check_hashes=False)


def test_index_help_prints_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_index_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--target_recall" in out and "worst 5% no more than" in " ".join(out.split()) and "--keep_columns" in out


def test_search_refuses_an_empty_query(indexes, capsys):
    with pytest.raises(SystemExit) as exited:
        search_main([str(indexes["full"]), "a red circle", "  "])
    assert exited.value.code == 2 and "text query 2 is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Query 0 is an empty text"):
        ImageTextIndex.load(indexes["full"]).search("")


def test_search_names_a_missing_folder_even_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexNotFoundError, match=r"'outputs/index' is not a folder here \(.*outputs/index does not "
                                                 r"exist\), and fetching the Hub dataset repo 'outputs/index'"):
        ImageTextIndex.load("outputs/index")
    with pytest.raises(IndexNotFoundError, match="No index folder at './outputs/index'"):
        ImageTextIndex.load("./outputs/index")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shards").mkdir()
    with pytest.raises(UsageError, match="has no index_info.json.*unfinished build: rerun hf-clip-index"):
        search_main(["half", "a red circle"])


SEARCH_ERRORS = """
import sys
from hf_clip_train.search import cli
cli.main(sys.argv[1:])
"""


def test_python_m_search_on_a_missing_index_prints_one_line_and_exits_2(tmp_path, capsys):
    from hf_clip_train.search import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["query", str(tmp_path / "missing"), "a red circle"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"hf-clip-search: error: No index folder at '{tmp_path / 'missing'}'")


@pytest.mark.slow  # two interpreters that import the search stack (about 20 s)
def test_search_cli_on_a_missing_index_or_another_model_prints_one_line(indexes, tmp_path):
    """`python -m hf_clip_train.search query` (the console scripts' code path): a user error is one line on stderr
    and exit status 2, with no traceback."""
    other = tmp_path / "other-model"
    info = json.loads((indexes["full"] / "index_info.json").read_text())
    shutil.copytree(info["model"]["name_or_path"], other)
    weights = HFClipModel.from_pretrained(other)
    weights.logit_scale.data += 1
    weights.save_pretrained(other)
    refusals = [([str(tmp_path / "missing"), "a red circle"], "No index folder at"),
                ([str(indexes["full"]), "a red circle", "--model_name_or_path", str(other)],
                 "the query model's weights differ")]
    for args, expected in refusals:
        result = run_python(["-c", SEARCH_ERRORS, "query", *args], cwd=REPO, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("hf-clip-search: error: ")]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_dataset_with_no_rows_is_refused_with_a_message(saved_checkpoint, tmp_path):
    datasets.DatasetDict({"train": image_rows(0)}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="the 'train' split of .*empty has no rows: there is nothing to index"):
        try:
            index_main(["--model_name_or_path", str(saved_checkpoint), "--dataset_name", str(tmp_path / "empty"),
                        "--caption_column", "caption", "--output_dir", str(tmp_path / "index")])
        finally:
            PartialState._reset_state()
    assert not (tmp_path / "index").exists()
    with pytest.raises(NothingToIndexError, match="has no rows"):
        build_index(saved_checkpoint, image_rows(0), tmp_path / "from_python")


def test_a_dataset_whose_rows_are_all_bad_leaves_only_its_skipped_rows(saved_checkpoint, tmp_path):
    rows = datasets.Dataset.from_dict({"image": [{"bytes": b"junk", "path": None}] * 5, "caption": ["a"] * 5},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "caption": datasets.Value("string")}))
    with pytest.raises(NothingToIndexError, match=r"all 5 were skipped \(listed in .*skipped_rows.jsonl; row 0: "):
        build_index(saved_checkpoint, rows, tmp_path / "index", shard_size=2)
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == ["skipped_rows.jsonl"]
    skipped = [json.loads(line) for line in (tmp_path / "index" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [item["row_id"] for item in skipped] == [0, 1, 2, 3, 4]
    assert build_index(saved_checkpoint, image_rows(3), tmp_path / "index").info["num_rows"] == 3  # the folder is free
