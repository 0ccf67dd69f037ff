"""hf-clip-index and hf-clip-search (the hf_clip_train.search package): embed a dataset, store, index, query it."""

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import PartialState
from conftest import ALICE_TOKEN, free_port, hub_env
from PIL import Image
from preloaded import run_python

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip.cli import UsageError
from hf_clip_train import cli, search
from hf_clip_train.data import ImageTextColumns, _embedded_dataset, embed_split
from hf_clip_train.search import ImageTextIndex, ModelMismatchError, index_main, search_main
from hf_clip_train.search import embed as search_embed
from hf_clip_train.synthetic import CLASS_NAMES, TEMPLATES

REPO = Path(__file__).resolve().parents[1]
SHAPES_FLAGS = ["--train_split", "test", "--embedded_num_train", "0", "--caption_column", "caption",
                "--keep_columns", "image", "caption", "label", "--dataloader_num_workers", "0", "--shard_size", "256"]
QUERIES = ["a red circle", "a green square", "a yellow cross", "a purple triangle"]


def build(*flags) -> dict:
    """`hf-clip-index FLAGS` in this process."""
    try:
        return index_main([str(flag) for flag in flags])
    finally:
        PartialState._reset_state()


def embeddings_of(folder: Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(folder / "embeddings"))


def assert_same_embeddings(folder: Path, reference: Path) -> None:
    """Row ids, kept columns and embeddings equal (to the last bit), skipped rows equal."""
    built, expected = embeddings_of(folder), embeddings_of(reference)
    assert built.column_names == expected.column_names
    assert built["row_id"] == expected["row_id"]
    for column in built.column_names:
        if column.endswith("_embedding"):
            assert torch.equal(torch.tensor(built[column]), torch.tensor(expected[column])), column
        elif column != "image":
            assert built[column] == expected[column], column
    assert (folder / "skipped_rows.jsonl").read_text() == (reference / "skipped_rows.jsonl").read_text()


@pytest.fixture(scope="module")
def shapes_index(trained_shapes_model, tmp_path_factory) -> Path:
    """The trained model's exact index of the embedded dataset's `test` split (1,200 scenes), captions embedded,
    image, caption and label kept."""
    output_dir = tmp_path_factory.mktemp("shapes_index")
    build("--model_name_or_path", trained_shapes_model, "--output_dir", output_dir, *SHAPES_FLAGS)
    return output_dir


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_text_query_returns_red_circles_and_image_queries_find_themselves(shapes_index, trained_shapes_model):
    index = ImageTextIndex.load(shapes_index)
    assert (index.info["index_type"], index.info["backend"], index.info["num_rows"]) == ("flat", "faiss", 1200)
    assert index.info["model"]["name_or_path"] == str(trained_shapes_model)

    result = index.search("a red circle", k=5)
    assert [CLASS_NAMES[row["label"]] for row in result.rows] == ["red circle"] * 5
    assert result.scores == sorted(result.scores, reverse=True)
    hit = result.rows[0]
    assert isinstance(hit["image"], Image.Image) and isinstance(hit["caption"], list)

    batch = index.search([*QUERIES, hit["image"]], k=5)
    assert len(batch) == len(QUERIES) + 1
    assert batch[0].row_ids == result.row_ids and np.allclose(batch[0].scores, result.scores, atol=1e-6)
    for query, single in zip(QUERIES[1:], batch[1:]):
        assert single.row_ids == index.search(query, k=5).row_ids
    assert batch[-1].row_ids[0] == result.row_ids[0] and batch[-1].scores[0] > 0.999

    embeddings = embeddings_of(shapes_index)
    assert embeddings["row_id"] == list(range(1200))
    dim = HFClipModel.config_class.from_pretrained(trained_shapes_model).projection_dim
    assert (embeddings.features["image_embedding"].length, embeddings.features["text_embedding"].length) == (dim, dim)


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_stored_embeddings_equal_the_evaluation_path(shapes_index, trained_shapes_model):
    """`embed_split` (the model's forward, through the training collator) embeds the same split to the same
    normalised vectors."""
    model = HFClipModel.from_pretrained(trained_shapes_model).eval()
    from transformers import AutoProcessor

    reference = embed_split(model, AutoProcessor.from_pretrained(trained_shapes_model), _embedded_dataset(0)["test"],
                            columns=ImageTextColumns(), batch_size=400)
    embeddings = embeddings_of(shapes_index)
    assert torch.equal(reference.row_ids, torch.tensor(embeddings["row_id"]))
    for column, expected in (("image_embedding", reference.image_embeds), ("text_embedding", reference.text_embeds)):
        torch.testing.assert_close(torch.tensor(embeddings[column]), expected, atol=2e-6, rtol=0)


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_caption_search_and_exact_search_without_faiss(shapes_index, monkeypatch):
    with_faiss = ImageTextIndex.load(shapes_index)
    query = with_faiss.embed_queries(["a red circle"])
    captions = torch.tensor(embeddings_of(shapes_index)["text_embedding"])
    expected = (query @ captions.T)[0]
    by_caption = with_faiss.search("a red circle", k=7, target="text")  # identical captions tie: compare scores
    assert np.allclose(by_caption.scores, expected.topk(7).values.numpy(), atol=1e-6)
    assert np.allclose(by_caption.scores, expected[by_caption.row_ids].numpy(), atol=1e-6)

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if the [search] extra were not installed
    without_faiss = ImageTextIndex.load(shapes_index)
    assert without_faiss.faiss_index is None
    for torch_result, faiss_result in zip(without_faiss.search(QUERIES, k=10), with_faiss.search(QUERIES, k=10)):
        assert np.allclose(torch_result.scores, faiss_result.scores, atol=1e-5)
        assert len(set(torch_result.row_ids) ^ set(faiss_result.row_ids)) <= 2  # ties at the 10th place may differ
    assert search.build_index(embeddings_of(shapes_index)).info["backend"] == "torch"
    with pytest.raises(ImportError, match=re.escape('--index_type ivf_pq needs faiss, which is not installed. Install '
                                                    'it with: pip install "hf-clip[search]"')):
        search.parse_index_args(["--model_name_or_path", str(shapes_index), "--index_type", "ivf_pq"])


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_a_model_other_than_the_index_s_is_refused(shapes_index, trained_shapes_model, saved_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_shapes_model, other)
    model = HFClipModel.from_pretrained(other)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1e-3
    model.save_pretrained(other)
    (other / "hf_clip_manifest.json").unlink()  # rewritten on purpose (the README's robustness section)
    with pytest.raises(ModelMismatchError, match=re.escape(str(trained_shapes_model)) + r".*; the query model's "
                                                 r"weights differ .*Embeddings of different models are not comparable"):
        ImageTextIndex.load(shapes_index, model_name_or_path=str(other))
    with pytest.raises(ModelMismatchError, match=r"holds 128-dimensional embeddings .*the query model embeds in 32 "
                                                 "dimensions"):
        ImageTextIndex.load(shapes_index, model_name_or_path=str(saved_checkpoint))
    with pytest.raises(UsageError, match="the query model's weights differ") as refused:  # one line from the CLI
        search_main([str(shapes_index), "a red circle", "--model_name_or_path", str(other)])
    assert isinstance(refused.value.__cause__, ModelMismatchError)


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_approximate_index_measures_its_recall_and_agrees_with_exact(shapes_index, trained_shapes_model, tmp_path,
                                                                     capsys):
    info = build("--model_name_or_path", trained_shapes_model, "--output_dir", tmp_path, *SHAPES_FLAGS,
                 "--index_type", "ivf_pq")
    assert f"Approximate index ({info['factory']}, {info['nprobe']} of 30 lists probed): recall@10 " in (
        capsys.readouterr().out)
    dim = embeddings_of(shapes_index).features["image_embedding"].length
    assert (info["index_type"], info["factory"], info["rerank"]) == ("ivf_pq", f"IVF30,PQ{dim // 2}x4fs", 300)
    assert info["recall_at_10"] >= info["target_recall"] == 0.95
    assert info["recall_queries"] == 2000  # 1,000 images and their captions
    for kind in ("image", "text"):
        assert info["recall_at_10_by_query"][kind] >= 0.95
        assert info["tail_recall_at_10"][kind] >= 0.95 - search.TAIL_MARGIN
    assert info["index_bytes_per_vector"] <= 4 * dim / 6  # dim/4-byte codes; centroids, list padding weigh on 1,200
    approximate, exact = ImageTextIndex.load(tmp_path), ImageTextIndex.load(shapes_index)
    vectors = torch.tensor(embeddings_of(shapes_index)["image_embedding"])
    picks = torch.arange(0, 1200, 7)
    truth = (vectors[picks] @ vectors.T).topk(11).indices
    found = approximate.search_embeddings(vectors[picks], k=11)
    hits = [len((set(t.tolist()) - {p}) & (set(f.row_ids) - {p})) for p, t, f in zip(picks.tolist(), truth, found)]
    assert sum(hits) / (10 * len(picks)) >= 0.95
    prompts = [template.format(name) for name in CLASS_NAMES for template in TEMPLATES]  # text the build never saw
    found, expected = approximate.search(prompts, k=10), exact.search(prompts, k=10)
    assert sum(len(set(f.row_ids) & set(e.row_ids)) for f, e in zip(found, expected)) / (10 * len(prompts)) >= 0.95
    for query in QUERIES:  # the same top 10 up to the order of rows that tie (a trained model scores alike scenes
        found, expected = approximate.search(query, k=10), exact.search(query, k=10)  # alike)
        np.testing.assert_allclose(found.scores, expected.scores, rtol=0, atol=1e-6)
        tied = {row for row, score in zip(expected.row_ids, expected.scores) if score - expected.scores[-1] < 1e-6}
        assert set(found.row_ids) - tied == set(expected.row_ids) - tied


def test_an_inverted_file_that_cannot_narrow_the_search_becomes_one_scan_of_the_codes(tmp_path):
    """Random unit vectors have no clusters, so the target recall needs every inverted list; the index is then one
    list (FAISS's plain PQ fast-scan, the same codes without the per-list cost), which meets the target too, and
    loads and searches like any other."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 64), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = datasets.Dataset.from_dict(
        {"image_embedding": vectors},
        features=datasets.Features({"image_embedding": datasets.List(datasets.Value("float32"), length=64)}))
    built = search.build_index(embeddings, "ivf_pq")
    assert (built.info["factory"], built.info["nlist"], built.info["nprobe"]) == ("PQ32x4fs", 1, 1)
    assert built.info["recall_at_10"] >= 0.95 and built.info["tail_recall_at_10"]["image"] >= 0.95 - search.TAIL_MARGIN
    inverted = search.ApproximateSettings.for_collection(len(vectors))
    assert inverted.nlist == 102  # 4000 // 39
    probe = search.RecallProbe(vectors)
    index = search.build_faiss_index(vectors, "ivf_pq", inverted)
    for nprobe in inverted.nprobe_candidates()[:-1]:
        search.ApproximateSettings(inverted.nlist, nprobe).apply(index)
        assert not probe(index, rerank=300).meets(0.95)
    faiss.write_index(built.index, str(tmp_path / "codes.faiss"))
    loaded = faiss.read_index(str(tmp_path / "codes.faiss"))
    search.ApproximateSettings(built.info["nlist"], built.info["nprobe"]).apply(loaded)
    queries = vectors[:5] + 0.05 * rng.standard_normal((5, 64), dtype=np.float32)
    _, positions = search.search_faiss(loaded, queries, 10, 300, vectors.__getitem__)
    _, exact = search.exact_top_k(torch.from_numpy(queries), [vectors], 10)
    assert positions[:, 0].tolist() == exact[:, 0].tolist() == list(range(5))


def _png(color, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_rows_are_skipped_counted_and_listed(saved_checkpoint, tmp_path, capsys):
    """Undecodable and missing images, empty and missing captions: skipped and listed by row id with the reason; a
    shard (rows 4-7) with no usable row at all is fine. Without captions, only the image problems count."""
    good = _png((200, 30, 30))
    images = [good, b"not an image", good[: len(good) // 2], good, None, good, good, b"", good, good, good, good]
    captions = ["a red square"] * 12
    captions[3], captions[5], captions[6] = "", None, "   "
    rows = datasets.Dataset.from_dict(
        {"image": [None if b is None else {"bytes": b, "path": None} for b in images], "caption": captions,
         "name": [f"row{i}" for i in range(12)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "name": datasets.Value("string")}))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "data"))
    flags = ["--model_name_or_path", saved_checkpoint, "--dataset_name", tmp_path / "data", "--keep_columns", "name",
             "--shard_size", "4", "--per_device_eval_batch_size", "3", "--dataloader_num_workers", "0"]

    info = build(*flags, "--caption_column", "caption", "--output_dir", tmp_path / "with_captions")
    listed = (tmp_path / "with_captions" / "skipped_rows.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in listed]
    assert [item["row_id"] for item in skipped] == [1, 2, 3, 4, 5, 6, 7]
    assert "UnidentifiedImageError" in skipped[0]["error"] or "cannot identify" in skipped[0]["error"]
    assert "missing image" in skipped[3]["error"] and "not a non-empty string" in skipped[2]["error"]
    assert "holds neither bytes nor a path" in skipped[6]["error"]
    assert (info["num_rows"], info["num_source_rows"], info["num_skipped_rows"]) == (5, 12, 7)
    embedded = embeddings_of(tmp_path / "with_captions")
    assert embedded["row_id"] == [0, 8, 9, 10, 11]
    assert embedded["name"] == [f"row{i}" for i in embedded["row_id"]]
    assert "Skipped 7 unusable rows (listed in skipped_rows.jsonl): 1, 2, 3, 4, 5, 6, 7" in capsys.readouterr().out
    assert ImageTextIndex.load(tmp_path / "with_captions").search("a red square", k=10).row_ids[0] in {0, 8, 9, 10, 11}
    try:  # the library call on the dataset in memory gives what the script gives on it saved to disk
        from_python = ImageTextIndex.build(
            HFClipModel.from_pretrained(saved_checkpoint), HFClipProcessor.from_pretrained(saved_checkpoint), rows,
            tmp_path / "from_python", caption_column="caption", keep_columns=["name"], shard_size=4, batch_size=3)
    finally:
        PartialState._reset_state()
    assert_same_embeddings(tmp_path / "from_python", tmp_path / "with_captions")
    assert len(from_python) == 5 and from_python.info["source"]["caption_column"] == "caption"

    info = build(*flags, "--output_dir", tmp_path / "images_only")
    assert info["num_skipped_rows"] == 4 and not info["text_embeddings"]
    assert embeddings_of(tmp_path / "images_only")["row_id"] == [0, 3, 5, 6, 8, 9, 10, 11]
    assert "text_embedding" not in embeddings_of(tmp_path / "images_only").column_names


def _webdataset(folder: Path, shards: int, rows: int) -> None:
    """WebDataset shards (`key.jpg` + `key.txt`) with an undecodable JPEG and an empty caption in each shard."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for position in range(rows):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                jpg = b"broken" if position == 3 else buffer.getvalue()
                caption = "" if position == 5 else f"picture {shard}-{position}"
                for extension, data in (("jpg", jpg), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{shard:03d}{position:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_streamed_webdataset_shards_give_the_map_style_result(saved_checkpoint, tmp_path):
    """The same tar shards read map-style (decoded in 2 DataLoader workers) and streamed (in the main process)."""
    _webdataset(tmp_path / "shards", shards=2, rows=15)
    flags = ["--model_name_or_path", saved_checkpoint, "--dataset_name", tmp_path / "shards", "--image_column", "jpg",
             "--caption_column", "txt", "--keep_columns", "__key__", "txt", "--shard_size", "8",
             "--per_device_eval_batch_size", "5"]
    build(*flags, "--dataloader_num_workers", "2", "--output_dir", tmp_path / "map_style")
    info = build(*flags, "--dataloader_num_workers", "0", "--streaming", "--output_dir", tmp_path / "streamed")
    assert info["source"]["streaming"] and (info["num_source_rows"], info["num_skipped_rows"]) == (30, 4)
    assert_same_embeddings(tmp_path / "streamed", tmp_path / "map_style")
    assert embeddings_of(tmp_path / "streamed")["__key__"][:4] == ["00000000", "00000001", "00000002", "00000004"]


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_a_resumed_or_changed_run_is_checked_against_how_it_started(shapes_index, tmp_path):
    with pytest.raises(FileExistsError, match="already holds a finished index; pass --overwrite_output_dir"):
        search.prepare_output_dir(shapes_index, {}, overwrite=False)
    search.prepare_output_dir(tmp_path, {"shard_size": 256, "keep_columns": ["image"]}, overwrite=False)
    search.prepare_output_dir(tmp_path, {"shard_size": 256, "keep_columns": ["image"]}, overwrite=False)
    with pytest.raises(ValueError, match=r"holds shards of a run with other settings: shard_size 256 \(now 128\)"):
        search.prepare_output_dir(tmp_path, {"shard_size": 128, "keep_columns": ["image"]}, overwrite=False)
    search.prepare_output_dir(tmp_path, {"shard_size": 128}, overwrite=True)


@pytest.mark.slow  # the session's trained shapes model (conftest.trained_shapes_model)
def test_search_cli_prints_a_table_and_writes_an_html_page(shapes_index, tmp_path, capsys):
    query_image = tmp_path / "query.png"
    ImageTextIndex.load(shapes_index).embeddings[17]["image"].save(query_image)
    page = tmp_path / "hits.html"
    results = search_main([str(shapes_index), "a red circle", "a blue square", "--image", str(query_image), "-k", "5",
                           "--html", str(page)])
    out = capsys.readouterr().out
    assert out.startswith("query: 'a red circle'\nrank    score    row_id  image    caption")
    first = results[0]
    assert f"   1  {first.scores[0]:7.4f}  {first.row_ids[0]:>8}  <image>  " in out
    assert "red circle\n" in out and "(+3 more)" in out and f"query: <image {query_image}>" in out
    assert results[2].row_ids[0] == 17

    text = page.read_text()
    assert text.count("<figure>") == 15 and text.count("<section>") == 3
    assert "<h2>&#x27;a red circle&#x27;</h2>" in text and "label: red circle" in text
    thumbnails = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="row (\d+)">', text)
    assert len(thumbnails) == 15
    thumbnail = Image.open(io.BytesIO(base64.b64decode(thumbnails[0][0])))
    row_image = ImageTextIndex.load(shapes_index).embeddings[int(thumbnails[0][1])]["image"]
    assert thumbnail.size == (160, 160)
    assert np.array_equal(np.asarray(thumbnail), np.asarray(row_image.convert("RGB").resize((160, 160),
                                                                                          Image.Resampling.NEAREST)))


@pytest.mark.parametrize("script", ["index", "search"])
def test_console_scripts_name_the_missing_training_extra(script, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit) as exited:
        getattr(cli, script)()
    assert str(exited.value) == (f"hf-clip-{script} needs the training extra, and datasets is not installed. Install "
                                 'it with: pip install "hf-clip[train]"')


@pytest.mark.slow
def test_sigkill_part_way_then_resume_redoes_only_unfinished_shards(shapes_index, trained_shapes_model, tmp_path,
                                                                    monkeypatch):
    """A real SIGKILL of `python -m hf_clip_train.search index` once two shards are finished (each shard write is
    followed by a pause, so the kill lands between shards or in the next one); the resumed run embeds only the
    shards that were not finished, and its result equals the uninterrupted run's."""
    output_dir = tmp_path / "index"
    flags = ["--model_name_or_path", str(trained_shapes_model), "--output_dir", str(output_dir), *SHAPES_FLAGS]
    slow_writes = ("import sys, time\nfrom hf_clip_train.search import cli, embed\n"
                   "write = embed.write_embedding_shard\n"
                   "def write_then_pause(*args, **kwargs):\n    path = write(*args, **kwargs)\n    time.sleep(1.0)\n"
                   "    return path\nembed.write_embedding_shard = write_then_pause\ncli.main(sys.argv[1:])\n")
    process = subprocess.Popen([sys.executable, "-c", slow_writes, "index", *flags], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(list((output_dir / "shards").glob("shard-?????"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finished = sorted(int(path.name[6:]) for path in (output_dir / "shards").glob("shard-?????"))
    assert 2 <= len(finished) < 5 and not (output_dir / "index_info.json").exists()

    written, write = [], search_embed.write_embedding_shard

    def recording_write(shard_dir, shard, *args):
        written.append(shard.index)
        return write(shard_dir, shard, *args)

    monkeypatch.setattr(search_embed, "write_embedding_shard", recording_write)
    build(*flags)
    assert sorted(written) == sorted(set(range(5)) - set(finished))
    assert_same_embeddings(output_dir, shapes_index)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(shapes_index, trained_shapes_model, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` (gloo; run as `python -m accelerate.commands.launch` so that the
    processes use this interpreter): each process embeds its shards, the merged index equals the one-process index."""
    output_dir = tmp_path / "index"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port",
         str(free_port()), "-m", "hf_clip_train.search", "index", "--model_name_or_path", str(trained_shapes_model),
         "--output_dir", str(output_dir), *SHAPES_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert_same_embeddings(output_dir, shapes_index)
    assert ImageTextIndex.load(output_dir).search("a red circle", k=5).row_ids == \
        ImageTextIndex.load(shapes_index).search("a red circle", k=5).row_ids


HUB_ROUND_TRIP = """
import json, sys
from huggingface_hub import HfApi
from hf_clip_train.search import ImageTextIndex, push_index_to_hub

model_dir, index_dir = sys.argv[1:3]
HfApi().create_repo("alice/shapes-model")
HfApi().upload_folder(folder_path=model_dir, repo_id="alice/shapes-model")
commit = push_index_to_hub(index_dir, "alice/shapes-index")
index = ImageTextIndex.load("alice/shapes-index", model_name_or_path="alice/shapes-model")
result = index.search("a red circle", k=5)
print(json.dumps({"commit_url": commit.commit_url, "row_ids": result.row_ids, "scores": result.scores,
                  "path": str(index.path), "rows": len(index)}))
"""


@pytest.mark.slow
def test_index_folder_pushes_to_the_hub_as_a_dataset_repo_and_loads_back(shapes_index, trained_shapes_model,
                                                                          hub_server, tmp_path):
    result = run_python(["-c", HUB_ROUND_TRIP, str(trained_shapes_model), str(shapes_index)], cwd=REPO,
                        env=hub_env(hub_server, tmp_path / "hf_home", ALICE_TOKEN), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    local = ImageTextIndex.load(shapes_index).search("a red circle", k=5)
    assert report["row_ids"] == local.row_ids and np.allclose(report["scores"], local.scores, atol=1e-6)
    assert report["rows"] == 1200 and report["path"].startswith(str(tmp_path / "hf_home"))
    assert report["commit_url"].startswith(f"{hub_server.url}/datasets/alice/shapes-index/commit/")
    files = hub_server.hub.repos["datasets/alice/shapes-index"].history("main")[0].files
    assert {"index_info.json", "image.faiss", "README.md", "skipped_rows.jsonl",
            "embeddings/dataset_info.json"} <= set(files)
    assert files["image.faiss"] == (shapes_index / "image.faiss").read_bytes()
    assert "alice/shapes-index" not in hub_server.hub.repos
