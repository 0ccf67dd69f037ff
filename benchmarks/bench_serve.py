"""hf-clip-serve: dynamic batching against none, the HTTP round trip of a search against the in-process call, and
images per second through /v1/embeddings against in-process batching. Ratios, side by side, on the same machine.

    python benchmarks/bench_serve.py                       # tiny and ViT-B-32, 8 s per measurement
    python benchmarks/bench_serve.py --presets tiny --seconds 4

1. Throughput of text clients (each sends one 4-8 word caption per request, waits for the answer, sends the next;
   1, 4 and 16 of them at once, each on its own keep-alive connection, from one asyncio loop in this process)
   against a server with dynamic batching (`--max_batch_size 32 --max_wait_ms 2`, the defaults) and one without
   (`--max_batch_size 1`), same model, for each preset (random init; a 1,000-token BPE trained here stands in for
   CLIP's 49,408-token one). Latency p50/p95/p99 at each concurrency. Goal: >= 3x at 16 clients.
2. p50 latency of one text query to `/search` (k = 10, an index of 512 rendered scenes, image and caption kept) on
   an idle server, one request at a time, against `ImageTextIndex.search` in this process, alternating blocks of
   50 queries. Goal: <= 1.5x + 5 ms.
3. Images per second through `/v1/embeddings` (16 clients, one JPEG photo of about 430x640 px per request, as a
   base64 data URI) against the in-process path of `embed_split`: decode, the same image preparation, batched
   forward of 32, normalise. Goal: >= 0.8x.

The servers run in child processes with the threads of this one (OMP_NUM_THREADS, default 1: on a 2-core machine
shared with other work, two OpenMP threads per process spin against each other and one tiny forward took 10x
longer); the clients share the cores with them, as they would on one machine.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import datasets
import httpx
import numpy as np
import torch
from PIL import Image

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, train_clip_tokenizer
from hf_clip_train.search import ImageTextIndex
from hf_clip_train.serve.embedding import Embedder
from hf_clip_train.serve.process import ServerProcess
from hf_clip_train.synthetic import COLORS, POSITIONS, SHAPES, SIZES, captions_for, render_scene

CONCURRENCY = (1, 4, 16)
WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "yellow", "small", "big", "circle", "square", "triangle",
         "cross", "on", "left", "right", "top", "bottom", "dog", "cat", "street", "tree", "car"]


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = np.sort(np.asarray(latencies)) * 1000
    return {f"p{q}": float(np.percentile(ordered, q)) for q in (50, 95, 99)}


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(4, 9))))


def save_model(preset: str, folder: Path) -> Path:
    """A random-init model of `preset` with a 1,000-token BPE trained on the scene captions, saved."""
    captions = [c for color in COLORS for shape in SHAPES for size in SIZES for where in POSITIONS
                for c in captions_for(color, shape, size, where)] + [" ".join(WORDS)]
    tokenizer = train_clip_tokenizer(captions, vocab_size=1000, model_max_length=77)
    torch.manual_seed(0)
    config = HFClipConfig.from_preset(preset, tokenizer=tokenizer)
    path = folder / preset
    HFClipModel(config).eval().save_pretrained(path)
    HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size).save_pretrained(path)
    return path


def build_scene_index(model_path: Path, folder: Path, num_rows: int = 512) -> Path:
    rng = np.random.default_rng(0)
    rows = {"image": [], "caption": []}
    colors, positions = list(COLORS), list(POSITIONS)
    for i in range(num_rows):
        color, shape = colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]
        size, where = list(SIZES)[i % 2], positions[(i // 2) % len(positions)]
        rows["image"].append(render_scene(color, shape, size, where, rng))
        rows["caption"].append(captions_for(color, shape, size, where)[0])
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    ImageTextIndex.build(HFClipModel.from_pretrained(model_path), HFClipProcessor.from_pretrained(model_path), dataset,
                         folder / "index", caption_column="caption", keep_columns=["image", "caption"], batch_size=64)
    return folder / "index"


class LoopbackConnection:
    """A keep-alive HTTP/1.1 connection over asyncio streams that posts pre-encoded JSON: a client light enough
    that the server, not the client, is what the throughput measures (httpx spent more CPU per request here than
    the tiny model's server did)."""

    def __init__(self, url: str):
        address = urlsplit(url)
        self.host, self.port = address.hostname, address.port

    async def open(self) -> "LoopbackConnection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def post(self, path: str, body: bytes) -> bytes:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        payload = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"{status}: {payload[:300]!r}")
        return payload

    def close(self) -> None:
        self.writer.close()


async def closed_loop(url: str, path: str, bodies: list[dict], clients: int, seconds: float
                      ) -> tuple[int, list[float], float]:
    """`clients` concurrent clients, each on its own connection, posting the next body as soon as its answer came,
    for `seconds`: (requests answered, their latencies, elapsed seconds). Any non-200 answer raises."""
    encoded = [json.dumps(body).encode() for body in bodies]
    latencies: list[float] = []
    counter = iter(range(10**9))
    connections = [await LoopbackConnection(url).open() for _ in range(clients)]
    for connection, body in zip(connections, encoded):  # warm-up
        await connection.post(path, body)
    start = time.perf_counter()
    deadline = start + seconds

    async def client(connection: LoopbackConnection) -> None:
        while time.perf_counter() < deadline:
            body = encoded[next(counter) % len(encoded)]
            sent = time.perf_counter()
            await connection.post(path, body)
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(client(connection) for connection in connections))
    elapsed = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return len(latencies), latencies, elapsed


def text_throughput(url: str, seconds: float) -> dict[int, dict[str, float]]:
    rng = np.random.default_rng(1)
    bodies = [{"input": caption(rng)} for _ in range(512)]
    results = {}
    for clients in CONCURRENCY:
        answered, latencies, elapsed = asyncio.run(closed_loop(url, "/v1/embeddings", bodies, clients, seconds))
        results[clients] = {"requests_per_s": answered / elapsed, **percentiles(latencies)}
    return results


def photos() -> list[bytes]:
    from sklearn.datasets import load_sample_images

    encoded = []
    for array in load_sample_images().images:
        for scale in (0.7, 1.0):
            image = Image.fromarray(array)
            buffer = io.BytesIO()
            image.resize((round(image.width * scale), round(image.height * scale))).save(buffer, format="JPEG",
                                                                                            quality=90)
            encoded.append(buffer.getvalue())
    return encoded


def image_throughput_served(url: str, jpegs: list[bytes], seconds: float) -> dict[str, float]:
    bodies = [{"input": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()} for jpeg in jpegs]
    answered, latencies, elapsed = asyncio.run(closed_loop(url, "/v1/embeddings", bodies, 16, seconds))
    return {"images_per_s": answered / elapsed, **percentiles(latencies)}


def image_throughput_in_process(model_path: Path, jpegs: list[bytes], seconds: float, batch_size: int = 32) -> float:
    """`embed_split`'s path in this process: decode, prepare (as the server does), batched forward, normalise."""
    embedder = Embedder(HFClipModel.from_pretrained(model_path).eval(), HFClipProcessor.from_pretrained(model_path))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        pixels = [embedder.prepare_image(Image.open(io.BytesIO(jpegs[(done + i) % len(jpegs)])).convert("RGB"))
                  for i in range(batch_size)]
        embedder.forward("image", pixels)
        done += batch_size
    return done / (time.perf_counter() - start)


def search_latency(url: str, index_path: Path, blocks: int = 4, per_block: int = 50) -> dict[str, float]:
    index = ImageTextIndex.load(index_path)
    rng = np.random.default_rng(2)
    queries = [caption(rng) for _ in range(per_block)]
    served, local = [], []
    with httpx.Client(base_url=url, timeout=60) as session:
        for query in queries[:5]:
            session.post("/search", json={"query": query, "k": 10}).raise_for_status()
            index.search(query, k=10)
        for _ in range(blocks):
            for query in queries:
                sent = time.perf_counter()
                response = session.post("/search", json={"query": query, "k": 10})
                served.append(time.perf_counter() - sent)
                response.raise_for_status()
            for query in queries:
                sent = time.perf_counter()
                index.search(query, k=10)
                local.append(time.perf_counter() - sent)
    return {"served_p50_ms": statistics.median(served) * 1000, "in_process_p50_ms": statistics.median(local) * 1000,
            "served": percentiles(served), "in_process": percentiles(local)}


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model}, avx512_bf16: {'avx512_bf16' in flags}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each throughput measurement.")
    args = parser.parse_args(argv)
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads))
    report = {"cpu": cpu_kind(), "threads": int(threads), "load_average_before": os.getloadavg(), "presets": {}}
    print(f"CPU: {report['cpu']}; {threads} threads; load average {os.getloadavg()}", flush=True)
    jpegs = photos()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        for preset in args.presets:
            model_path = save_model(preset, folder)
            index_path = build_scene_index(model_path, folder / f"{preset}-index") if preset == "tiny" else None
            result = {}
            for name, batch in (("batching", "32"), ("no_batching", "1")):
                source = ["--index", index_path] if index_path else []
                with ServerProcess(["--model_name_or_path", model_path, *source, "--port", "0", "--max_batch_size",
                                    batch], log_dir=folder / f"logs-{preset}-{name}") as server:
                    result[name] = text_throughput(server.url, args.seconds)
                    if name == "batching":
                        result["images_served"] = image_throughput_served(server.url, jpegs, args.seconds)
                        if index_path:
                            result["search"] = search_latency(server.url, index_path)
                print(json.dumps({preset: {name: result[name]}}), flush=True)
            result["images_in_process_per_s"] = image_throughput_in_process(model_path, jpegs, args.seconds)
            top = CONCURRENCY[-1]
            result["ratios"] = {
                f"throughput_batching_vs_none_at_{top}": (result["batching"][top]["requests_per_s"]
                                                          / result["no_batching"][top]["requests_per_s"]),
                "images_served_vs_in_process": (result["images_served"]["images_per_s"]
                                                / result["images_in_process_per_s"]),
            }
            if "search" in result:
                search = result["search"]
                result["ratios"]["search_p50_served_vs_in_process"] = (search["served_p50_ms"]
                                                                       / search["in_process_p50_ms"])
                result["ratios"]["search_p50_budget_ms"] = 1.5 * search["in_process_p50_ms"] + 5
            report["presets"][preset] = result
            print_table(preset, result)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return report


def print_table(preset: str, result: dict) -> None:
    print(f"\n## {preset}\n\n| server | clients | requests/s | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|")
    for name in ("batching", "no_batching"):
        for clients, row in result[name].items():
            print(f"| {name} | {clients} | {row['requests_per_s']:.1f} | {row['p50']:.1f} | {row['p95']:.1f} | "
                  f"{row['p99']:.1f} |")
    images = result["images_served"]
    print(f"| images (batching) | 16 | {images['images_per_s']:.1f} | {images['p50']:.1f} | {images['p95']:.1f} | "
          f"{images['p99']:.1f} |")
    print(f"\nimages/s in process: {result['images_in_process_per_s']:.1f}")
    if "search" in result:
        search = result["search"]
        print(f"search p50: served {search['served_p50_ms']:.2f} ms, in process {search['in_process_p50_ms']:.2f} ms "
              f"(budget 1.5x + 5 ms = {result['ratios']['search_p50_budget_ms']:.2f} ms)")
    print("ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in result["ratios"].items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
