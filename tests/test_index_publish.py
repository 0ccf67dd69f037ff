"""What an index folder shows of its machine: nothing local is published by `push_index_to_hub` (which still loads
back from the Hub, by a recorded Hub model id or with `model_name_or_path`), and the HTML page of hits names no
local path, embeds only the dataset's own images and files under its folder, and fetches no URL unless asked."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import pytest
from accelerate import PartialState
from conftest import ALICE_TOKEN, CAPTIONS, hub_env
from PIL import Image
from preloaded import run_python

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip_train.search import ImageTextIndex, render_html

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def png(color, size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def build(model_dir, rows, output_dir, **kwargs) -> ImageTextIndex:
    try:
        return ImageTextIndex.build(HFClipModel.from_pretrained(model_dir), HFClipProcessor.from_pretrained(model_dir),
                                    rows, output_dir, **kwargs)
    finally:
        PartialState._reset_state()


HUB_ROUND_TRIP = """
import json, sys
import datasets
from huggingface_hub import HfApi
from hf_clip import HFClipModel, HFClipProcessor
from hf_clip_train.search import ImageTextIndex, IndexLoadError, push_index_to_hub

model_dir, local_index, data_dir, hub_index = sys.argv[1:5]
api = HfApi()
api.create_repo("alice/tiny-clip")
api.upload_folder(folder_path=model_dir, repo_id="alice/tiny-clip")
rows = datasets.load_from_disk(data_dir)["train"]
ImageTextIndex.build(HFClipModel.from_pretrained("alice/tiny-clip"), HFClipProcessor.from_pretrained("alice/tiny-clip"),
                     rows, hub_index, caption_column="caption", keep_columns=["caption"], base_dir=data_dir)
push_index_to_hub(local_index, "alice/index-local")
ImageTextIndex.load(hub_index).push_to_hub("alice/index-hub")
report = {}
report["local_model"] = ImageTextIndex.load("alice/index-local", model_name_or_path=model_dir).search(
    "a red circle", k=5).row_ids
report["hub_model"] = ImageTextIndex.load("alice/index-hub").search("a red circle", k=5).row_ids
for name, call in [("no_model", lambda: ImageTextIndex.load("alice/index-local")),
                   ("no_repo", lambda: ImageTextIndex.load("alice/no-such-index")),
                   ("no_branch", lambda: ImageTextIndex.load("alice/index-local", revision="no-such-branch")),
                   ("no_commit", lambda: ImageTextIndex.load("alice/index-local", revision="0" * 40))]:
    try:
        call()
        report[name] = None
    except IndexLoadError as error:
        report[name] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
"""


@pytest.mark.slow  # a Hub-protocol server, and a subprocess that pushes a model and two indexes (about 25 s)
def test_a_pushed_index_publishes_no_local_path_and_loads_back_from_the_hub(saved_checkpoint, hub_server, tmp_path):
    (tmp_path / "pictures").mkdir()
    for i in range(6):
        (tmp_path / "pictures" / f"{i}.png").write_bytes(png((40 * i, 200 - 30 * i, 90)))
    images = [f"pictures/{i}.png" for i in range(6)]
    images[4] = str(tmp_path / "private" / "missing.png")  # skipped: its error names a local path
    rows = datasets.Dataset.from_dict({"image": images, "caption": CAPTIONS[:6]})
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "data"))
    shutil.move(tmp_path / "pictures", tmp_path / "data" / "pictures")
    from hf_clip_train.search import index_main

    try:
        index_main(["--model_name_or_path", str(saved_checkpoint), "--dataset_name", str(tmp_path / "data"),
                    "--caption_column", "caption", "--keep_columns", "caption", "--output_dir",
                    str(tmp_path / "index"), "--dataloader_num_workers", "0"])
    finally:
        PartialState._reset_state()
    local_info = json.loads((tmp_path / "index" / "index_info.json").read_text())
    assert local_info["num_skipped_rows"] == 1 and str(tmp_path) in local_info["source"]["dataset_name"]
    result = run_python(["-c", HUB_ROUND_TRIP, str(saved_checkpoint), str(tmp_path / "index"),
                         str(tmp_path / "data"), str(tmp_path / "hub_index")], cwd=REPO,
                        env=hub_env(hub_server, tmp_path / "hf_home", ALICE_TOKEN), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    expected = ImageTextIndex.load(tmp_path / "index").search("a red circle", k=5).row_ids
    assert report["local_model"] == expected and report["hub_model"] == expected
    assert report["no_model"].startswith("IndexModelNotFoundError") and "'local model " in report["no_model"]
    assert "model_name_or_path" in report["no_model"]
    assert "the Hub (" in report["no_repo"] and "has no dataset repo 'alice/no-such-index'" in report["no_repo"]
    assert "'alice/no-such-index' is not a folder here" in report["no_repo"]
    assert "has no branch or tag 'no-such-branch' (--revision)" in report["no_branch"]
    assert f"has no commit '{'0' * 40}' (--revision)" in report["no_commit"]

    for repo in ("datasets/alice/index-local", "datasets/alice/index-hub"):
        files = hub_server.hub.repos[repo].history("main")[0].files
        assert {"index_info.json", "image.faiss", "README.md", "skipped_rows.jsonl",
                "embeddings/dataset_info.json"} <= set(files)
        for name, content in files.items():
            for local in (str(tmp_path), str(saved_checkpoint), str(REPO), "/tmp/"):
                assert local.encode() not in content, (repo, name, local)
    published = json.loads(hub_server.hub.repos["datasets/alice/index-local"].history("main")[0].files[
        "index_info.json"])
    assert published["model"]["name_or_path"] == f"local model {Path(saved_checkpoint).name}"
    assert published["source"]["dataset_name"] == "local dataset data"
    assert published["source"]["base_dir"] == "local path data" and published["files"] == local_info["files"]
    skipped = hub_server.hub.repos["datasets/alice/index-local"].history("main")[0].files["skipped_rows.jsonl"]
    assert b"local path missing.png" in skipped
    hub_info = json.loads(hub_server.hub.repos["datasets/alice/index-hub"].history("main")[0].files["index_info.json"])
    assert hub_info["model"]["name_or_path"] == "alice/tiny-clip"


@pytest.fixture
def page_index(saved_checkpoint, tmp_path) -> tuple[ImageTextIndex, datasets.Dataset, Path]:
    """An index over a dataset folder whose kept `path` column names a file inside it, one outside it (`../`), one by
    absolute path and a web URL; its `image` column holds the rows' own images."""
    data = tmp_path / "data"
    (data / "pictures").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (data / "pictures" / "inside.png").write_bytes(png((10, 200, 10)))
    (tmp_path / "private" / "photo.png").write_bytes(png((200, 10, 10)))
    paths = ["pictures/inside.png", "../private/photo.png", str(tmp_path / "private" / "photo.png"),
             "http://127.0.0.1:9/picture.png"]
    rows = datasets.Dataset.from_dict({
        "image": [{"bytes": png((60 * i, 100, 200 - 40 * i)), "path": None} for i in range(4)],
        "path": paths, "caption": CAPTIONS[:4]}, features=datasets.Features(
        {"image": datasets.Image(), "path": datasets.Value("string"), "caption": datasets.Value("string")}))
    index = build(saved_checkpoint, rows, tmp_path / "index", image_column="image", caption_column="caption",
                  keep_columns=["path", "caption"], base_dir=data)
    return index, rows, tmp_path


def thumbnails(page: str) -> dict[int, str]:
    return {int(row): source for source, row in re.findall(r'<img src="([^"]+)" alt="row (\d+)">', page)}


def test_the_html_page_names_no_local_path_and_shows_only_images_under_the_dataset_folder(page_index):
    index, rows, tmp_path = page_index
    assert index.info["source"]["base_dir"] == str(tmp_path / "data")
    results = index.search(["a red circle"], k=4)
    page = render_html(results, index)
    meta = re.search(r'<div class="meta">(.*?)</div>', page).group(1)
    assert str(tmp_path) not in meta and "/tmp/" not in meta and "local path" not in meta
    assert f"model local model {Path(index.info['model']['name_or_path']).name}" in html.unescape(meta)
    shown = thumbnails(page)
    assert list(shown) == [0]  # only pictures/inside.png, under the dataset's folder
    inside = Image.open(io.BytesIO(base64.b64decode(shown[0].removeprefix("data:image/png;base64,"))))
    assert inside.convert("RGB").getpixel((80, 80)) == (10, 200, 10)
    assert "127.0.0.1:9/picture.png\" rel=\"noreferrer noopener\">" in page  # the URL stays a link
    assert "default-src 'none'; style-src 'unsafe-inline'; img-src data:\"" in page

    with_urls = render_html(results, index, load_image_urls=True)
    assert thumbnails(with_urls)[3] == "http://127.0.0.1:9/picture.png" and "img-src data: http: https:" in with_urls

    kept_images = build(index.info["model"]["name_or_path"], rows, tmp_path / "kept", keep_columns=["image"])
    own = thumbnails(render_html(kept_images.search(["a red circle"], k=4), kept_images))
    assert sorted(own) == [0, 1, 2, 3] and all(source.startswith("data:image/png;base64,") for source in own.values())


class CountingServer:
    """An HTTP server on 127.0.0.1 that serves one PNG and counts the requests it gets."""

    def __init__(self):
        counter = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                counter.requests.append(self.path)
                body = png((0, 0, 255))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_page_opened_in_a_browser_fetches_image_urls_only_when_asked(page_index):
    index, _, tmp_path = page_index
    server = CountingServer()
    try:
        results = index.search(["a red circle"], k=4)
        for hit in results[0].rows:
            if hit["path"].startswith("http://"):
                hit["path"] = f"{server.url}/picture.png"
        fetched = {}
        for load_image_urls in (False, True):
            page = tmp_path / f"page-{load_image_urls}.html"
            page.write_text(render_html(results, index, load_image_urls=load_image_urls))
            before = len(server.requests)
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                            f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
                           capture_output=True, timeout=120, check=True)
            fetched[load_image_urls] = server.requests[before:]
    finally:
        server.close()
    assert fetched == {False: [], True: ["/picture.png"]}
