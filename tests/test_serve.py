"""hf-clip-serve (hf_clip_train/serve/): the server in a subprocess on a loopback port, called over real HTTP, against
`get_*_features` and `ImageTextIndex.search` in this process; its dynamic batching; its refusals of bad input."""

import asyncio
import base64
import http.client
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import datasets
import httpx
import numpy as np
import pytest
import torch
from accelerate import PartialState
from conftest import free_port
from PIL import Image

from hf_clip_train.search import ImageTextIndex, index_main
from hf_clip_train.serve.batching import BatchingSettings, DynamicBatcher
from hf_clip_train.serve.process import ServerProcess
from hf_clip_train.synthetic import COLORS, POSITIONS, SHAPES, captions_for, render_scene

REPO = Path(__file__).resolve().parents[1]
NUM_ROWS = 48
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def scene(i: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
    size, position = ("small", "big")[i % 2], list(POSITIONS)[(i // 2) % len(POSITIONS)]
    return render_scene(color, shape, size, position, rng), captions_for(color, shape, size, position)[0]


@pytest.fixture(scope="module")
def served_index(saved_checkpoint, tmp_path_factory) -> Path:
    """`hf-clip-index` (in this process) of 48 rendered scenes with the tiny random `saved_checkpoint`: captions
    embedded, image and caption kept."""
    folder = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    images, captions = zip(*(scene(i, rng) for i in range(NUM_ROWS)))
    rows = datasets.Dataset.from_dict({"image": list(images), "caption": list(captions)}, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(folder / "data"))
    try:
        index_main([str(flag) for flag in [
            "--model_name_or_path", saved_checkpoint, "--dataset_name", folder / "data", "--caption_column", "caption",
            "--keep_columns", "image", "caption", "--output_dir", folder / "index", "--dataloader_num_workers", "0"]])
    finally:
        PartialState._reset_state()
    return folder / "index"


@pytest.fixture(scope="module")
def index(served_index) -> ImageTextIndex:
    return ImageTextIndex.load(served_index)


@pytest.fixture(scope="module")
def server(served_index, tmp_path_factory):
    """The server over the index, with small limits so that the refusals are cheap to reach."""
    with ServerProcess(["--index", served_index, "--port", "0", "--max_inputs", "8", "--max_body_mb", "1",
                        "--max_image_pixels", "1000000"], log_dir=tmp_path_factory.mktemp("server_logs")) as process:
        yield process
        assert process.process.poll() is None, f"the server died:\n{process.output()[-5000:]}"


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def reference_text(index: ImageTextIndex, texts: list[str]) -> torch.Tensor:
    """`get_text_features` one text at a time (no padding), truncated to the context, normalised."""
    rows = []
    for text in texts:
        tokens = index.processor.tokenizer([text], truncation=True, return_tensors="pt")
        rows.append(normalized(index.model.get_text_features(**tokens).pooler_output)[0])
    return torch.stack(rows)


@torch.no_grad()
def reference_image(index: ImageTextIndex, images: list[Image.Image]) -> torch.Tensor:
    """`get_image_features` one image at a time with the index's evaluation transform, normalised."""
    return torch.stack([normalized(index.model.get_image_features(
        pixel_values=index.transform(image.convert("RGB"))[None]).pooler_output)[0] for image in images])


def embeddings_of(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([item["embedding"] for item in response.json()["data"]])


def assert_refused(response: httpx.Response, status: int, *phrases: str) -> None:
    """The status, and an OpenAI-shaped error whose message holds each phrase."""
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, message


# The batching worker ------------------------------------------------------------------------------------------------


class RecordingForward:
    """A forward that records the batches it gets (each item is a number; its "embedding" is [item, kind code])."""

    def __init__(self, fail_on: int | None = None, delay: float = 0.0):
        self.batches: list[tuple[str, list[int]]] = []
        self.fail_on, self.delay = fail_on, delay

    def __call__(self, kind: str, items: list[int]) -> torch.Tensor:
        self.batches.append((kind, list(items)))
        time.sleep(self.delay)
        if self.fail_on in items:
            raise RuntimeError(f"item {self.fail_on} fails")
        return torch.tensor([[float(item), 0.0 if kind == "text" else 1.0] for item in items])


def run_async(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_forwards_up_to_the_batch_size_and_kinds_never_mix():
    """12 requests of 2 inputs queued before the worker starts (so that timing cannot split them): image requests
    (i % 3 == 0) fill one forward of 8, text ones two."""
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, BatchingSettings(max_batch_size=8, max_wait_ms=200))

    async def clients():
        requests = [asyncio.ensure_future(batcher.submit("text" if i % 3 else "image", [10 * i, 10 * i + 1]))
                    for i in range(12)]
        await asyncio.sleep(0.05)
        batcher.start()
        return await asyncio.gather(*requests)

    results = run_async(clients())
    batcher.stop()
    for i, result in enumerate(results):
        assert result.tolist() == [[10 * i, float(i % 3 == 0)], [10 * i + 1, float(i % 3 == 0)]]
    sizes = {kind: [len(items) for name, items in forward.batches if name == kind] for kind in ("text", "image")}
    assert sizes == {"text": [8, 8], "image": [8]}
    assert all(item % 30 < 10 if kind == "image" else item % 30 >= 10
               for kind, items in forward.batches for item in items)


def test_max_batch_size_one_runs_every_input_alone_and_a_failed_batch_fails_only_its_requests():
    forward = RecordingForward(fail_on=20)
    batcher = DynamicBatcher(forward, BatchingSettings(max_batch_size=1, max_wait_ms=50))
    batcher.start()

    async def clients():
        return await asyncio.gather(*(batcher.submit("text", [10 * i]) for i in range(4)), return_exceptions=True)

    results = run_async(clients())
    assert [len(items) for _, items in forward.batches] == [1, 1, 1, 1]
    assert isinstance(results[2], RuntimeError) and "item 20 fails" in str(results[2])
    assert [result.tolist() for i, result in enumerate(results) if i != 2] == [[[0, 0]], [[10, 0]], [[30, 0]]]
    assert run_async(batcher.submit("text", [7])).tolist() == [[7, 0]]  # the worker kept serving
    batcher.stop()


def test_a_cancelled_request_never_reaches_the_model_and_a_batch_waits_at_most_max_wait_ms():
    forward = RecordingForward(delay=0.3)
    batcher = DynamicBatcher(forward, BatchingSettings(max_batch_size=64, max_wait_ms=100))
    batcher.start()

    async def clients():
        busy = asyncio.ensure_future(batcher.submit("text", [1]))  # holds the worker for 0.3 s
        await asyncio.sleep(0.15)
        cancelled = asyncio.ensure_future(batcher.submit("text", [2, 3]))
        kept = asyncio.ensure_future(batcher.submit("text", [4]))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        started = time.monotonic()
        await asyncio.gather(busy, kept)
        return time.monotonic() - started

    waited = run_async(clients())
    batcher.stop()
    assert forward.batches == [("text", [1]), ("text", [4])]
    assert waited < 5  # the lone input's batch closed after max_wait_ms, not when 64 inputs had arrived


# Over HTTP -----------------------------------------------------------------------------------------------------------


def test_embeddings_of_texts_and_images_equal_get_features_and_search_equals_the_index(client, index, served_index):
    """One round trip of each route: /v1/embeddings (texts and images in one batch, float and base64), /search,
    /thumbnails, /health, the page and the OpenAPI schema."""
    rng = np.random.default_rng(1)
    images = [scene(i, rng)[0] for i in (3, 17)]
    texts = ["a red circle", "a big blue square at the top"]
    inputs = [texts[0], data_uri(png_bytes(images[0])), texts[1], data_uri(png_bytes(images[1]))]
    response = client.post("/v1/embeddings", json={"input": inputs, "model": "tiny"})
    got = embeddings_of(response)
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny" and body["truncated"] == []
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3] and got.shape == (4, 32)
    expected_text, expected_image = reference_text(index, texts), reference_image(index, images)
    torch.testing.assert_close(got[[0, 2]], expected_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[[1, 3]], expected_image, atol=1e-5, rtol=0)
    tokens = sum(len(index.processor.tokenizer(text)["input_ids"]) for text in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    alone = embeddings_of(client.post("/v1/embeddings", json={"input": texts[0]}))[0]
    encoded = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, alone.numpy())  # float32 as little-endian bytes, as OpenAI's base64

    for target in ("image", "text"):
        hits = client.post("/search", json={"query": "a red circle", "k": 5, "target": target}).json()
        expected = index.search("a red circle", k=5, target=target)
        assert [hit["row_id"] for hit in hits["hits"]] == expected.row_ids
        np.testing.assert_allclose([hit["score"] for hit in hits["hits"]], expected.scores, atol=1e-5)
        assert [hit["columns"]["caption"] for hit in hits["hits"]] == [row["caption"] for row in expected.rows]
    page = client.post("/search", json={"query": "a red circle", "k": 5, "offset": 5}).json()
    assert [hit["row_id"] for hit in page["hits"]] == index.search("a red circle", k=10).row_ids[5:]
    assert page["next_offset"] == 10 and [hit["rank"] for hit in page["hits"]] == [6, 7, 8, 9, 10]
    image_hits = client.post("/search", json={"query": data_uri(png_bytes(images[0])), "k": 3}).json()
    assert [hit["row_id"] for hit in image_hits["hits"]] == index.search(images[0], k=3).row_ids

    row_id = hits["hits"][0]["row_id"]
    thumbnail = client.get(f"/thumbnails/{row_id}/image")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    stored = datasets.load_from_disk(str(served_index / "embeddings"))
    original = stored[int(np.flatnonzero(np.asarray(stored["row_id"]) == row_id)[0])]["image"].convert("RGB")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumbnail.content))), np.asarray(original))

    health = client.get("/health").json()
    assert health["ready"] and health["model"]["dimension"] == 32 and health["index"]["num_rows"] == NUM_ROWS
    assert health["versions"]["fastapi"] and health["versions"]["transformers"]
    assert '<input id="query"' in client.get("/").text
    assert {"/v1/embeddings", "/search", "/health"} <= set(client.get("/openapi.json").json()["paths"])


def test_malformed_json_and_wrong_types_are_refused(client):
    assert_refused(client.post("/v1/embeddings", content=b'{"input": ["a red', headers={
        "content-type": "application/json"}), 400, "malformed JSON")
    assert_refused(client.post("/v1/embeddings", content=b"{input: 1}"), 400, "malformed JSON")
    assert_refused(client.post("/v1/embeddings", json={"input": 5}), 422, "input", "valid string", "got int")
    assert_refused(client.post("/v1/embeddings", json={"input": [["a"], 3]}), 422, "input", "valid string")
    assert_refused(client.post("/v1/embeddings", json={"inputs": "a"}), 422, "input: Field required")
    assert_refused(client.post("/v1/embeddings", json={"input": "a", "encoding_format": "int8"}), 422,
                   "encoding_format", "'float' or 'base64'")
    assert_refused(client.post("/search", json={"query": "a", "k": "ten"}), 422, "k: Input should be a valid integer")
    assert_refused(client.post("/search", json={"query": "a", "target": "audio"}), 422, "target", "'image' or 'text'")


def test_empty_and_oversized_input_lists_are_refused(client):
    assert_refused(client.post("/v1/embeddings", json={"input": []}), 400, "input is an empty list")
    assert_refused(client.post("/v1/embeddings", json={"input": ["a"] * 9}), 400, "input holds 9 items",
                   "at most 8", "--max_inputs")
    assert_refused(client.post("/v1/embeddings", json={"input": ["a", "  "]}), 400, "input[1] is an empty string")


def test_a_text_longer_than_the_context_is_truncated_and_the_response_says_so(client, index):
    long_text = " ".join(["a big red circle on the left"] * 8)
    assert len(index.processor.tokenizer(long_text)["input_ids"]) > 24
    response = client.post("/v1/embeddings", json={"input": ["a red circle", long_text]})
    assert response.json()["truncated"] == [1]
    torch.testing.assert_close(embeddings_of(response)[1], reference_text(index, [long_text])[0], atol=1e-5, rtol=0)
    assert client.post("/search", json={"query": long_text, "k": 3}).json()["query"]["truncated"] is True


def test_images_that_are_not_images_or_too_large_are_refused(client):
    assert_refused(client.post("/v1/embeddings", json={"input": ["a", data_uri(b"hello, not a picture")]}), 400,
                   "input[1] is base64 that does not decode to an image", "20 bytes")
    assert_refused(client.post("/v1/embeddings", json={"input": "data:image/png;base64,%%%not-base64%%%"}), 400,
                   "input is a data URI whose payload is not valid base64")
    assert_refused(client.post("/v1/embeddings", json={"input": data_uri(b"text", "text/plain")}), 400,
                   "media type 'text/plain', not an image")
    png = png_bytes(Image.new("RGB", (40, 30), "red"))
    assert_refused(client.post("/v1/embeddings", json={"input": data_uri(png[: len(png) // 2])}), 400,
                   "PNG, 40×30", "cannot be decoded")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)  # claims 30,000 x 30,000 RGB
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")
    with pytest.raises(Image.DecompressionBombError, match="900000000 pixels"):  # PIL reads the claim
        Image.open(io.BytesIO(bomb))
    assert_refused(client.post("/v1/embeddings", json={"input": data_uri(bomb)}), 413, "30000×30000",
                   "900,000,000 pixels", "--max_image_pixels")
    assert_refused(client.post("/search", json={"query": data_uri(bomb)}), 413, "query is an image of 30000×30000")


def test_a_body_over_max_body_mb_is_refused_with_or_without_a_content_length(client):
    body = json.dumps({"input": "x" * (1_100_000)}).encode()
    assert_refused(client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"}), 413,
                   "over 1 MB", "--max_body_mb")

    def chunked():
        for start in range(0, len(body), 65_536):
            yield body[start:start + 65_536]

    assert_refused(client.post("/v1/embeddings", content=chunked(), headers={"content-type": "application/json"}),
                   413, "over 1 MB", "--max_body_mb")


def test_k_outside_one_to_the_index_size_and_bad_offsets_are_refused(client):
    for k in (0, -3, NUM_ROWS + 1):
        assert_refused(client.post("/search", json={"query": "a", "k": k}), 400,
                       f"k must be between 1 and the index size, {NUM_ROWS}; got {k}")
    assert_refused(client.post("/search", json={"query": "a", "k": 5, "offset": NUM_ROWS}), 400, "offset must be")
    assert len(client.post("/search", json={"query": "a", "k": NUM_ROWS}).json()["hits"]) == NUM_ROWS


def test_missing_thumbnails_and_unknown_routes_are_404(client):
    assert_refused(client.get("/thumbnails/999/image"), 404, "no row 999")
    assert_refused(client.get("/thumbnails/abc/image"), 404, "'abc' is not a number")
    assert_refused(client.get("/thumbnails/3/caption"), 404, "no image column 'caption'", "['image']")
    assert_refused(client.get("/setup.cfg"), 404, "No route GET /setup.cfg")


@pytest.mark.parametrize("path", [
    "/thumbnails/../../setup.cfg", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
    "/thumbnails/3/..%2f..%2f..%2fsetup.cfg", "/thumbnails/%252e%252e/image", "/thumbnails/3/..%5c..%5csetup.cfg",
    "/./health", "/openapi.json/..",
])
def test_path_traversal_in_any_url_is_refused(server, path):
    """Sent as written (http.client normalises nothing), GET and POST."""
    address = urlsplit(server.url)
    for method in ("GET", "POST"):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        assert response.status == 400, body
        assert "traversal" in json.loads(body)["error"]["message"]
        assert "[metadata]" not in body and "root:" not in body


def test_the_server_keeps_serving_after_every_refusal(server, client):
    """Runs after the refusals above: the process is alive and answers."""
    assert server.process.poll() is None
    assert client.get("/health").json()["ready"] is True
    assert client.post("/v1/embeddings", json={"input": "a red circle"}).status_code == 200


@pytest.fixture(scope="module")
def bare_server(saved_checkpoint, tmp_path_factory):
    """The model alone, no index; texts longer than the context are refused."""
    with ServerProcess(["--model_name_or_path", saved_checkpoint, "--port", "0", "--long_text", "refuse"],
                       log_dir=tmp_path_factory.mktemp("bare_logs")) as process:
        yield process


@pytest.mark.slow  # starts a second server
def test_without_an_index_search_is_refused_and_long_texts_are_refused_when_asked(bare_server, index):
    with httpx.Client(base_url=bare_server.url, timeout=60) as session:
        assert_refused(session.post("/search", json={"query": "a red circle"}), 404, "started without an index",
                       "--index")
        assert_refused(session.get("/thumbnails/1/image"), 404, "without an index")
        long_text = " ".join(["a big red circle on the left"] * 8)
        tokens = len(index.processor.tokenizer(long_text)["input_ids"])
        assert_refused(session.post("/v1/embeddings", json={"input": ["a", long_text]}), 400,
                       f"input[1] has {tokens} tokens; the model's context is 24", "--long_text refuse")
        image = scene(5, np.random.default_rng(2))[0]
        inputs = ["a red circle", data_uri(png_bytes(image))]
        got = embeddings_of(session.post("/v1/embeddings", json={"input": inputs}))
        torch.testing.assert_close(got[0], reference_text(index, ["a red circle"])[0], atol=1e-5, rtol=0)
        pixels = index.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = normalized(index.model.get_image_features(pixel_values=pixels).pooler_output)[0]
        torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=0)  # the processor's own image path
        health = session.get("/health").json()
        assert health["index"] is None and health["limits"]["long_text"] == "refuse"


def test_the_openai_client_gets_the_same_vectors(server, index):
    """The `openai` package's `embeddings.create` with `base_url` at the server: its default base64 encoding and
    float, one string and a batch with an image."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)
    image = scene(9, np.random.default_rng(3))[0]
    texts = ["a small green triangle", "a yellow cross at the top"]
    created = client.embeddings.create(model="hf-clip", input=[texts[0], data_uri(png_bytes(image)), texts[1]])
    got = torch.tensor([item.embedding for item in created.data])
    torch.testing.assert_close(got[[0, 2]], reference_text(index, texts), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], reference_image(index, [image])[0], atol=1e-5, rtol=0)
    single = client.embeddings.create(model="hf-clip", input=texts[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(single.data[0].embedding), got[0], atol=1e-6, rtol=0)
    with pytest.raises(openai.BadRequestError, match="input is an empty list"):
        client.embeddings.create(model="hf-clip", input=[])


# Process life: SIGTERM, API key, the console script ----------------------------------------------------------------


def wait_for_queued(url: str, count: int, timeout: float = 60) -> dict:
    """/health's batching section once exactly `count` text inputs wait for a forward."""
    deadline = time.monotonic() + timeout
    while (batching := httpx.get(f"{url}/health").json()["batching"])["waiting"]["text"] != count:
        assert time.monotonic() < deadline, batching
        time.sleep(0.05)
    return batching


@pytest.mark.slow  # starts a server of its own
def test_a_client_that_leaves_costs_no_forward_and_sigterm_finishes_the_requests_in_flight(saved_checkpoint,
                                                                                          tmp_path, index):
    """Batches wait 3 s for company. A client that disconnects while its input waits has it dropped: no forward
    runs. A request waiting when SIGTERM arrives is answered, then the process exits 0 and accepts nothing more."""
    with ServerProcess(["--model_name_or_path", saved_checkpoint, "--port", "0", "--max_wait_ms", "3000",
                        "--max_batch_size", "64"], log_dir=tmp_path) as server:
        address = urlsplit(server.url)
        leaving = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        leaving.request("POST", "/v1/embeddings", body=json.dumps({"input": ["a red circle", "a blue square"]}),
                        headers={"content-type": "application/json"})
        wait_for_queued(server.url, 2)
        left_at = time.monotonic()
        leaving.close()
        wait_for_queued(server.url, 0)
        time.sleep(max(0.0, 3.5 - (time.monotonic() - left_at)))  # past the batch's deadline
        assert httpx.get(f"{server.url}/health").json()["batching"]["batches"] == {}

        answers = []
        request = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{server.url}/v1/embeddings", json={"input": "a red circle"}, timeout=60)))
        request.start()
        wait_for_queued(server.url, 1)
        server.terminate()
        request.join(60)
        assert server.process.wait(60) == 0
        assert "hf-clip-serve: stopped by SIGTERM, after answering the requests in flight" in server.stdout()
    torch.testing.assert_close(embeddings_of(answers[0])[0], reference_text(index, ["a red circle"])[0], atol=1e-5,
                               rtol=0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


@pytest.mark.slow  # starts a server of its own
def test_an_api_key_is_required_beyond_loopback_checked_and_never_logged(saved_checkpoint, served_index, tmp_path):
    key = "sk-serve-test-0123456789abcdef"
    refused = subprocess.run([sys.executable, "-m", "hf_clip_train.serve", "--index", str(served_index), "--host",
                              "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "HF_CLIP_SERVE_API_KEY"})
    assert refused.returncode == 2 and "--host 0.0.0.0 opens the server beyond this machine" in refused.stderr
    assert "--api_key or set HF_CLIP_SERVE_API_KEY" in refused.stderr
    import openai

    env = {**os.environ, "HF_CLIP_SERVE_API_KEY": key}
    with ServerProcess(["--index", served_index, "--port", "0", "--access_log"], env=env, log_dir=tmp_path) as server:
        with httpx.Client(base_url=server.url, timeout=60) as session:
            assert_refused(session.post("/search", json={"query": "a"}), 401, "Authorization: Bearer KEY")
            assert_refused(session.get("/health", headers={"Authorization": f"Bearer {key[:-1]}x"}), 401, "API key")
            assert_refused(session.get("/thumbnails/1/image", headers={"Authorization": key}), 401, "API key")
            good = {"Authorization": f"Bearer {key}"}
            assert session.post("/search", json={"query": "a", "k": 2}, headers=good).status_code == 200
            assert session.get("/thumbnails/1/image", headers=good).status_code == 200
            assert session.get("/").status_code == 200  # the page itself holds no data; it asks for the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="m", input="a")
        created = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).embeddings.create(
            model="m", input="a")
        assert len(created.data[0].embedding) == 32
        server.stop()
        assert "POST /search" in server.output() and key not in server.output()


def test_the_console_script_names_the_missing_serve_extra(monkeypatch):
    from hf_clip_train import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the [serve] extra were half installed
    with pytest.raises(SystemExit) as exited:
        cli.serve()
    assert 'hf-clip-serve needs the serve extra, and fastapi is not installed' in str(exited.value)
    assert 'pip install "hf-clip[serve]"' in str(exited.value)


# Under load, and in a browser ----------------------------------------------------------------------------------------

LOAD_CLIENTS, LOAD_SECONDS = 16, 20


@pytest.mark.slow  # 20 s of load
def test_sixteen_concurrent_clients_get_no_failure_and_the_right_vectors(server, index):
    """16 clients on loopback for 20 s (a bounded load: each waits for its answer before the next request) send
    texts, images and searches; a slow client trickles a body and another goes away mid-request meanwhile. Every
    request succeeds, forwards hold several clients' inputs, and a sample of answers equals `get_*_features`."""
    rng = np.random.default_rng(4)
    pictures = [scene(i, rng)[0] for i in range(8)]
    uris = [data_uri(png_bytes(picture)) for picture in pictures]
    words = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "cross", "big", "small", "left", "top"]
    failures, samples, counts = [], [], [0] * LOAD_CLIENTS
    before = httpx.get(f"{server.url}/health").json()["batching"]
    deadline = time.monotonic() + LOAD_SECONDS

    def worker(number: int) -> None:
        local = np.random.default_rng(number)
        with httpx.Client(base_url=server.url, timeout=60) as session:
            while time.monotonic() < deadline:
                choice = counts[number] % 5
                try:
                    if choice == 4:
                        response = session.post("/search", json={"query": " ".join(local.choice(words, 3)), "k": 5})
                        ok = response.status_code == 200 and len(response.json()["hits"]) == 5
                    else:
                        n = int(local.integers(1, 4))
                        inputs = ([uris[int(i)] for i in local.integers(0, 8, n)] if choice == 3 else
                                  [" ".join(local.choice(words, int(local.integers(2, 6)))) for _ in range(n)])
                        response = session.post("/v1/embeddings", json={"input": inputs})
                        ok = response.status_code == 200 and len(response.json()["data"]) == n
                        if ok and counts[number] % 7 == 0:
                            samples.append((inputs, response.json()))
                except httpx.HTTPError as error:
                    failures.append(repr(error))
                    continue
                if not ok:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                counts[number] += 1

    def slow_and_vanishing_clients() -> None:
        address = urlsplit(server.url)
        while time.monotonic() < deadline - 3:
            slow = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            slow.putrequest("POST", "/v1/embeddings")
            slow.putheader("content-type", "application/json")
            slow.putheader("content-length", "40")
            slow.endheaders(b'{"input": ["a red')  # the rest never comes
            gone = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            gone.request("POST", "/v1/embeddings", body=json.dumps({"input": ["a blue square"] * 8}),
                         headers={"content-type": "application/json"})
            gone.close()  # goes away before its answer
            time.sleep(2.0)
            slow.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(LOAD_CLIENTS)]
    threads.append(threading.Thread(target=slow_and_vanishing_clients))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 120)
    after = httpx.get(f"{server.url}/health").json()["batching"]
    assert failures == [] and min(counts) > 0, failures[:5]
    batches = sum(after["batches"].values()) - sum(before["batches"].values())
    inputs = sum(after["inputs"].values()) - sum(before["inputs"].values())
    assert inputs / batches > 2, (inputs, batches)  # concurrent requests did share forwards
    assert len(samples) >= 10
    for inputs, body in samples[:: max(1, len(samples) // 40)]:
        got = torch.tensor([item["embedding"] for item in body["data"]])
        expected = (reference_image(index, [pictures[uris.index(value)] for value in inputs])
                    if inputs[0].startswith("data:") else reference_text(index, inputs))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert server.process.poll() is None


def browser_or_skip():
    """Selenium's Chrome driver on Debian's chromium, headless; skipped without them, except in CI (CI=true), where
    `make test` installs them and their absence is a failure."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = ("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
                  "`make install` does it)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true: the browser test must run in CI.")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", "--no-proxy-server"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.slow  # a real browser
def test_the_search_page_in_a_headless_browser_shows_the_index_s_hits_in_order(server, index, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        wait.until(lambda d: "rows" in d.find_element(By.ID, "meta").text)
        query = driver.find_element(By.ID, "query")
        query.send_keys("a red circle")
        driver.find_element(By.ID, "search").click()

        def shown_rows():
            """The row ids of the hits shown, once every thumbnail has loaded (read in one script: no stale nodes)."""
            return driver.execute_script("""
                const figures = [...document.querySelectorAll('#hits figure.hit')];
                const loaded = [...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth);
                return figures.length && loaded ? figures.map(f => Number(f.dataset.rowId)) : null;""")

        first_page = wait.until(lambda d: shown_rows())
        assert first_page == index.search("a red circle", k=12).row_ids
        scores = [f.text.split("·")[1].split()[0] for f in driver.find_elements(By.CSS_SELECTOR, "figcaption")]
        assert scores == [f"{s:.3f}" for s in index.search("a red circle", k=12).scores]
        assert "a " in driver.find_element(By.CSS_SELECTOR, "figcaption").text  # the caption column
        screenshot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("HF_CLIP_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(screenshot, REPO / "docs" / "serve-page.png")

        driver.find_element(By.CSS_SELECTOR, "#pager a.next").click()
        wait.until(lambda d: (rows := shown_rows()) is not None and rows != first_page)
        assert shown_rows() == index.search("a red circle", k=24).row_ids[12:]
        assert "offset=12" in driver.current_url

        picture = scene(6, np.random.default_rng(5))[0]
        picture.save(tmp_path / "query.png")
        driver.find_element(By.ID, "image-file").send_keys(str(tmp_path / "query.png"))
        wait.until(lambda d: "for the image" in d.find_element(By.ID, "status").text and shown_rows())
        assert shown_rows() == index.search(picture, k=12).row_ids
    finally:
        driver.quit()


# docs/serve.md -------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts the server as the docs do, and runs every command
def test_docs_serve_md_commands_run(served_index, tmp_path):
    """Every ```bash block of docs/serve.md in order, in one shell, then its ```python block (the OpenAI client)
    against the server they started: the index is the test's, the port a free one; everything else as written."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    text = (REPO / "docs" / "serve.md").read_text()
    shell = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    python = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(shell) >= 5 and python
    port = str(free_port())
    rng = np.random.default_rng(6)
    scene(2, rng)[0].save(tmp_path / "photo.png")
    script = "\n".join(shell).replace("outputs/index", str(served_index)).replace("8000", port)
    script = script.replace("hf-clip-serve ", f"{sys.executable} -m hf_clip_train.serve ")
    (tmp_path / "client.py").write_text(python[0].replace("8000", port))
    wrapped = ("set -euo pipefail\ntrap 'kill %1 2>/dev/null || true' EXIT\n"
               + script.replace("\ncurl ", "\ncurl --fail-with-body ")
               + f"\n{sys.executable} client.py\nkill -TERM %1\nwait %1\n")
    result = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    decoder, answers = json.JSONDecoder(), []
    for match in re.finditer(r'\{"', result.stdout):
        try:
            answers.append(decoder.raw_decode(result.stdout, match.start())[0])
        except ValueError:
            continue
    kinds = [("data" in a and "embeddings") or ("hits" in a and "search") or ("ready" in a and "health") or "other"
             for a in answers]
    assert kinds.count("embeddings") == 2 and kinds.count("search") == 2 and "health" in kinds, result.stdout[-3000:]
    assert Image.open(tmp_path / "thumbnail.png").size[0] > 0
    assert "hf-clip-serve: stopped" in result.stdout
    assert re.search(r"(^|\})2 32$", result.stdout, flags=re.MULTILINE), result.stdout[-3000:]  # the OpenAI client
