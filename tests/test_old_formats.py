"""Folders written by an earlier release still load: an index folder from `hf-clip-index` and a training checkpoint
from `hf-clip-train`, both made with the code of commit 10c3f40 (before the training package's data and search
modules were split into packages) and checked in under tests/fixtures/old_formats/ (see make_old_formats.py there)."""

import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import script_in_process

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip_train.checkpointing import verify_checkpoint
from hf_clip_train.search import CorruptIndexError, ImageTextIndex, index_main, search_main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "old_formats"
MODEL = OLD / "model"


def _generator():
    spec = importlib.util.spec_from_file_location("make_old_formats", FIXTURES / "make_old_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _losses(path: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _text_embedding(text: str) -> torch.Tensor:
    model = HFClipModel.from_pretrained(MODEL).eval()
    tokens = HFClipProcessor.from_pretrained(MODEL).tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens).pooler_output
    return torch.nn.functional.normalize(features, dim=-1)[0]


def test_an_old_index_folder_loads_and_answers_as_exact_search_over_its_stored_embeddings(capsys, caplog):
    index = ImageTextIndex.load(OLD / "index", model_name_or_path=str(MODEL))
    assert "written before index folders recorded checksums" in caplog.text and "nothing in it is hashed" in caplog.text
    stored = datasets.load_from_disk(str(OLD / "index" / "embeddings"))
    query = "a red circle"
    scores = torch.tensor(stored["image_embedding"]) @ _text_embedding(query)
    expected = scores.topk(5)
    result = index.search(query, k=5)
    assert result.row_ids == [stored["row_id"][i] for i in expected.indices.tolist()]
    torch.testing.assert_close(torch.tensor(result.scores), expected.values, rtol=1e-5, atol=1e-6)
    assert [row["caption"] for row in result.rows] == [stored["caption"][i] for i in expected.indices.tolist()]

    text_hits = index.search(query, k=3, target="text")
    text_scores = torch.tensor(stored["text_embedding"]) @ _text_embedding(query)
    assert text_hits.row_ids == [stored["row_id"][i] for i in text_scores.topk(3).indices.tolist()]
    printed = search_main([str(OLD / "index"), query, "-k", "2", "--model_name_or_path", str(MODEL)])
    assert [hit.row_ids for hit in printed] == [result.row_ids[:2]]
    table = capsys.readouterr().out
    assert f"query: {query!r}" in table and all(f"  {row_id}  " in table for row_id in result.row_ids[:2])


def test_the_same_index_built_now_matches_the_old_folder(tmp_path):
    made = _generator()
    index_main(["--model_name_or_path", str(MODEL), *made.INDEX_ARGS, "--output_dir", str(tmp_path / "index")])
    old_info = json.loads((OLD / "index" / "index_info.json").read_text())
    new_info = json.loads((tmp_path / "index" / "index_info.json").read_text())
    paths = {("model", "name_or_path"), ("source", "base_dir")}
    for key, value in old_info.items():
        if isinstance(value, dict):
            assert {k: v for k, v in value.items() if (key, k) not in paths} == {
                k: v for k, v in new_info[key].items() if (key, k) not in paths}, key
        else:
            assert new_info[key] == value, key
    old = datasets.load_from_disk(str(OLD / "index" / "embeddings"))
    new = datasets.load_from_disk(str(tmp_path / "index" / "embeddings"))
    assert new.features == old.features and new["row_id"] == old["row_id"] and new["caption"] == old["caption"]
    for column in ("image_embedding", "text_embedding"):
        torch.testing.assert_close(torch.tensor(new[column]), torch.tensor(old[column]), rtol=1e-5, atol=1e-6)
    # the card names the model as a published index does, with no local path
    old_card = (OLD / "index" / "README.md").read_text().replace(old_info["model"]["name_or_path"], "local model model")
    assert (tmp_path / "index" / "README.md").read_text() == old_card


def test_an_old_checkpoint_verifies_and_resumes_with_the_old_runs_losses(tmp_path):
    from hf_clip_train import train

    made = _generator()
    run = tmp_path / "run"
    shutil.copytree(OLD / "run" / "checkpoint-2", run / "checkpoint-2")
    assert verify_checkpoint(run / "checkpoint-2")["step"] == 2
    script_in_process(train.main, ["--model_name_or_path", MODEL, *made.TRAIN_ARGS, "--max_steps", "4",
                                   "--output_dir", run, "--resume_from_checkpoint", "latest"])
    old, resumed = _losses(OLD / "run" / "metrics.jsonl"), _losses(run / "metrics.jsonl")
    assert sorted(resumed) == [3, 4]
    # The old losses were computed on this kind of CPU; another one may round the last bits of its sums otherwise.
    torch.testing.assert_close(torch.tensor([resumed[3], resumed[4]]), torch.tensor([old[3], old[4]]), rtol=1e-4,
                               atol=0)


def test_an_old_index_folder_with_a_stale_or_damaged_file_is_refused_without_checksums(tmp_path):
    """The old folder recorded no checksums: its row counts, dimension and index type are still checked, and its flat
    index's vectors against the stored embeddings."""
    import faiss

    folder = tmp_path / "index"
    shutil.copytree(OLD / "index", folder)
    stale = faiss.read_index(str(folder / "image.faiss"))
    stale.remove_ids(np.arange(4, 12, dtype=np.int64))
    faiss.write_index(stale, str(folder / "image.faiss"))
    with pytest.raises(CorruptIndexError, match="image.faiss holds 4 rows beside 12 in embeddings/"):
        ImageTextIndex.load(folder, model_name_or_path=str(MODEL))
    shutil.copy(OLD / "index" / "image.faiss", folder / "image.faiss")
    vectors = faiss.read_index(str(folder / "image.faiss"))
    zeroed = faiss.IndexFlatIP(vectors.d)
    zeroed.add(np.zeros((vectors.ntotal, vectors.d), dtype=np.float32))
    faiss.write_index(zeroed, str(folder / "image.faiss"))
    with pytest.raises(CorruptIndexError, match="image.faiss: row 0 of the index is not the stored image embedding"):
        ImageTextIndex.load(folder, model_name_or_path=str(MODEL))
