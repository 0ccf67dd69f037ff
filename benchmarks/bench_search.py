"""Search: the embedding rate of `hf-clip-index` against a bare `get_image_features` loop, and the approximate index
against exact search (recall@10, one-query latency, memory per vector).

    python benchmarks/bench_search.py                       # both parts
    python benchmarks/bench_search.py --parts index --num_vectors 50000

Embedding: `hf_clip_train.search.embed.embed_dataset` (what `hf-clip-index` runs: rows decoded from JPEG bytes in
DataLoader workers with the evaluation transform, embedded in eval mode under no_grad, normalised, written in shards)
against a loop of `model.get_image_features` over the same images already decoded to tensors, same model and batch,
runs alternating, median of the repeats. Compute-bound: ViT-B-32 at 224 px; data-bound: the `tiny` preset at 64 px on
the same photos (scikit-learn's two sample photos re-encoded at several sizes, about 430x640 px, quality 90).

Index: `--index_type ivf_pq` (an inverted file of 4-bit PQ fast-scan codes, or one scan of them where the lists
cannot narrow the search, exact re-ranking of 300 candidates on the stored embeddings, nprobe tuned at build time)
over random unit vectors (d = 512), against FAISS's exact flat search, one query at a time on one thread (the build
on one thread too); recall@10 on fresh random queries. Latency is timed in alternating blocks of 50 queries per
index (each index warm in cache, as in a server that holds one), and also interleaved query by query, where each
search starts after the other index's scan has evicted its data.
"""

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from common import make_config

from hf_clip import HFClipModel, HFClipProcessor, to_rgb_image, train_clip_tokenizer
from hf_clip_train.data import ImageTextColumns, image_transform_for
from hf_clip_train.search import RowGather, build_index, embedding_chunks, search_faiss
from hf_clip_train.search.embed import EmbeddingSettings, embed_dataset


def photo_dataset(num_rows: int) -> datasets.Dataset:
    """JPEG bytes of scikit-learn's two sample photos at scales 0.6-1.0, in an `Image` column."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rows = []
    for index in range(num_rows):
        photo = photos[index % 2]
        scale = 0.6 + 0.4 * ((index * 7) % 10) / 10
        buffer = io.BytesIO()
        photo.resize((round(photo.width * scale), round(photo.height * scale))).save(buffer, format="JPEG", quality=90)
        rows.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))


def embedding_rate(preset: str, image_size: int, patch_size: int, batch_size: int, num_rows: int, repeats: int,
                   num_workers: int) -> dict[str, float]:
    """Rows/s of embed_dataset and of the bare loop, alternating, medians."""
    tokenizer = train_clip_tokenizer(["a photo"] * 4, vocab_size=600, model_max_length=16)
    config = make_config(preset)
    config.vision_config.image_size, config.vision_config.patch_size = image_size, patch_size
    model = HFClipModel(config).eval()
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=image_size)
    dataset = photo_dataset(num_rows)
    transform = image_transform_for(processor, train=False)
    decoded = torch.stack([transform(to_rgb_image(cell)) for cell in dataset.cast_column(
        "image", datasets.Image(decode=False))["image"]])
    settings = EmbeddingSettings(ImageTextColumns(caption=None), shard_size=num_rows, batch_size=batch_size,
                                 num_workers=num_workers)

    def indexer() -> None:
        with tempfile.TemporaryDirectory() as shard_dir:
            embed_dataset(model, processor, dataset, shard_dir, settings, description=None)

    @torch.no_grad()
    def bare_loop() -> None:
        for start in range(0, num_rows, batch_size):
            features = model.get_image_features(pixel_values=decoded[start:start + batch_size]).pooler_output
            torch.nn.functional.normalize(features, dim=-1)

    steps = {"hf-clip-index (embed_dataset)": indexer, "bare get_image_features loop": bare_loop}
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: num_rows / statistics.median(values) for name, values in times.items()}


def seconds(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def approximate_index(num_vectors: int, dim: int, num_queries: int) -> dict[str, float]:
    """Build the ivf_pq index as hf-clip-index does, then time and score it against exact flat search."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num_vectors, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as folder:
        datasets.Dataset.from_dict(
            {"image_embedding": vectors},
            features=datasets.Features({"image_embedding": datasets.List(datasets.Value("float32"), length=dim)}),
        ).save_to_disk(folder)
        embeddings = datasets.load_from_disk(folder)
        faiss.omp_set_num_threads(1)
        started = time.perf_counter()
        built = build_index(embeddings, "ivf_pq")
        build_seconds = time.perf_counter() - started
        gather = RowGather(embedding_chunks(embeddings, "image_embedding"))
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        _, truth = flat.search(queries, 10)
        _, found = search_faiss(built.index, queries, 10, built.info["rerank"], gather)
        recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
        searches = {"exact": lambda query: flat.search(query, 10),
                    "approximate": lambda query: search_faiss(built.index, query, 10, built.info["rerank"], gather)}
        interleaved, blocks = {name: [] for name in searches}, {name: [] for name in searches}
        for query in queries[:200]:
            for name, run in searches.items():
                interleaved[name].append(seconds(run, query[None]))
        for start in range(0, 200, 50):
            for name, run in searches.items():
                blocks[name].extend(seconds(run, query[None]) for query in queries[start:start + 50])
    p50 = {f"{name}_{order}_p50_ms": 1000 * statistics.median(times[name])
           for order, times in (("interleaved", interleaved), ("blocks", blocks)) for name in searches}
    return {"build_seconds": build_seconds, "nlist": built.info["nlist"], "nprobe": built.info["nprobe"],
            "build_recall": built.info["recall_at_10"], "recall": float(recall), **p50,
            "bytes_per_vector": built.info["index_bytes_per_vector"], "flat_bytes_per_vector": 4 * dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["embed", "index"], choices=["embed", "index"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--num_vectors", type=int, default=200_000)
    parser.add_argument("--num_queries", type=int, default=1_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cpu = "AVX512-BF16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no AVX512-BF16"
    print(f"{torch.get_num_threads()} torch threads, {cpu}, fp32")
    if "embed" in args.parts:
        cases = [("compute-bound: ViT-B-32, 224 px, batch 32", "ViT-B-32", 224, 32, 32, 128),
                 ("data-bound: tiny, 64 px / patch 16, batch 64", "tiny", 64, 16, 64, 512)]
        for title, preset, size, patch, batch, rows in cases:
            rates = embedding_rate(preset, size, patch, batch, rows, args.repeats, args.num_workers)
            (indexer, indexer_rate), (bare, bare_rate) = rates.items()
            print(f"{title} ({args.num_workers} workers): {indexer} {indexer_rate:.1f} rows/s, {bare} "
                  f"{bare_rate:.1f} rows/s: {indexer_rate / bare_rate:.2f}x", flush=True)
    if "index" in args.parts:
        result = approximate_index(args.num_vectors, 512, args.num_queries)
        print(f"ivf_pq over {args.num_vectors:,} random unit vectors (d = 512), built in "
              f"{result['build_seconds']:.0f} s with nlist {result['nlist']}, nprobe {result['nprobe']} (recall@10 "
              f"measured at build: {result['build_recall']:.3f})")
        print(f"  recall@10 vs exact on {args.num_queries} fresh queries: {result['recall']:.3f}")
        for order, how in (("blocks", "in alternating blocks of 50 queries"),
                           ("interleaved", "interleaved query by query (each index's data cold in cache)")):
            approximate, exact = result[f"approximate_{order}_p50_ms"], result[f"exact_{order}_p50_ms"]
            print(f"  one query, one thread, p50, {how}: {approximate:.2f} ms vs exact flat {exact:.2f} ms: "
                  f"{approximate / exact:.3f}x")
        memory = result["bytes_per_vector"] / result["flat_bytes_per_vector"]
        print(f"  index memory per vector: {result['bytes_per_vector']:.0f} bytes vs fp32 flat "
              f"{result['flat_bytes_per_vector']} bytes: {memory:.3f}x")


if __name__ == "__main__":
    main()
