"""The training data path against the pipelines CLIP trainers use, on realistic JPEGs, in one process, side by side.

Corpus (built offline): scikit-learn's two sample photos (427×640), re-encoded as JPEG at quality 90 at scales 0.6 to
2.4 and with crops, about 720 px on a side on average (`photo_corpus`). Every pipeline reads the same rows: undecoded
image cells of one datasets split, the way DataLoader workers receive them.

1. Samples per CPU core (one thread; time.process_time, so other jobs on the machine do not count), alternating the
   pipelines round by round, medians over the rounds:
   - hf_clip: `build_train_dataset` + `image_transform_for(train=True)` samples: the crop box drawn from the original
     size, the JPEG decoded at 1/2, 1/4 or 1/8 scale where the crop allows, one bicubic resample, uint8 pixels;
   - hf_clip before: the same crop boxes from a full-size decode, normalised floats on the host (the path until
     issue 19);
   - open_clip: `open_clip.image_transform(size, is_train=True)` on the decoded PIL image;
   - run_clip.py: Transformers' example's `Transform` (Resize([size], BICUBIC), CenterCrop, ConvertImageDtype,
     Normalize) on `torchvision.io.decode_image` tensors;
   - torchvision v2 uint8: the same with transforms.v2 and Resize's default bilinear, which v2 runs on uint8 (the
     fastest tensor path; run_clip.py's v1 BICUBIC Resize converts to floats first);
   - decode alone: PIL, full size.
2. DataLoader workers: the data-only rate (`TrainBatches`, batches collated, no model) with 2 workers against 1,
   map-style and streamed, wall clock after the workers started; medians of alternating runs. On a machine shared
   with other jobs the wall clock measures the share of the cores the workers got (the load average is printed);
   samples per CPU-second (this process and its workers) shows whether a second worker costs extra work.

    python benchmarks/bench_data.py                 # 224 px, 48 photos per round
    python benchmarks/bench_data.py --image_size 256 --rounds 9
"""

import argparse
import io
import itertools
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import datasets
import numpy as np
import torch
from PIL import Image

from hf_clip import ContrastiveDataCollator, HFClipProcessor, train_clip_tokenizer
from hf_clip.collators import decode_image
from hf_clip_train.args import DatasetArguments
from hf_clip_train.data import (
    ImageTextColumns,
    TrainBatches,
    build_train_dataset,
    columns_of,
    image_transform_for,
    without_image_decoding,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def photo_corpus(count: int = 48, seed: int = 0) -> list[bytes]:
    """`count` JPEGs (quality 90) of scikit-learn's two sample photos: each scaled by a factor drawn from [0.6, 2.4],
    half of them then cropped to 70-100% of each side; about 720 px on a side on average."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(seed)
    corpus = []
    for index in range(count):
        photo = photos[index % len(photos)]
        scale = rng.uniform(0.6, 2.4)
        image = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
        if index % 4 >= 2:
            width, height = round(image.width * rng.uniform(0.7, 1.0)), round(image.height * rng.uniform(0.7, 1.0))
            left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
            image = image.crop((left, top, left + width, top + height))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        corpus.append(buffer.getvalue())
    return corpus


def corpus_split(corpus: list[bytes], repeats: int = 1) -> datasets.Dataset:
    """The corpus as an image-caption split with a datasets `Image` column, `repeats` times over."""
    rows = len(corpus) * repeats
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": corpus[i % len(corpus)], "path": None} for i in range(rows)],
         "caption": [f"a photo, number {i}" for i in range(rows)]}, features=features)


def make_processor(image_size: int) -> HFClipProcessor:
    tokenizer = train_clip_tokenizer([f"a photo, number {i}" for i in range(100)], vocab_size=600,
                                     model_max_length=16)
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=image_size)


def per_core_pipelines(split: datasets.Dataset, processor: HFClipProcessor) -> dict[str, Callable[[int], object]]:
    """name -> function(row) that reads `split`'s row and returns one training tensor."""
    import open_clip
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode_tensor
    from torchvision.transforms import CenterCrop, ConvertImageDtype, InterpolationMode, Normalize, Resize, v2

    size = processor.image_processor.crop_size["height"]
    ours = build_train_dataset(split, ImageTextColumns(), image_transform_for(processor, train=True), seed=0)
    transform = image_transform_for(processor, train=True)
    rows = without_image_decoding(split)

    def cell_bytes(row: int) -> bytes:
        return rows[row]["image"]["bytes"]

    def before(row: int) -> torch.Tensor:
        image = decode_image(rows[row]["image"], None)
        box = transform.crop_box(*image.size, np.random.default_rng([0, 0, row]))
        resized = image.resize((size, size), resample=Image.Resampling.BICUBIC, box=box)
        array = (np.asarray(resized, dtype=np.float32) / 255.0 - np.asarray(transform.mean, dtype=np.float32))
        return torch.from_numpy((array / np.asarray(transform.std, dtype=np.float32)).transpose(2, 0, 1).copy())

    open_clip_transform = open_clip.image_transform(size, is_train=True)
    run_clip = torch.nn.Sequential(Resize([size], interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                                   ConvertImageDtype(torch.float), Normalize(OPENAI_MEAN, OPENAI_STD))
    uint8_resize = v2.Compose([v2.Resize([size]), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def tensor(row: int) -> torch.Tensor:
        return decode_tensor(torch.frombuffer(bytearray(cell_bytes(row)), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def full_decode(row: int) -> Image.Image:
        with Image.open(io.BytesIO(cell_bytes(row))) as image:
            image.load()
            return image

    return {
        "hf_clip (build_train_dataset + image_transform_for(train=True))": lambda row: ours[row],
        "hf_clip before (full decode, floats on the host)": before,
        "open_clip training transform (PIL)": lambda row: open_clip_transform(
            Image.open(io.BytesIO(cell_bytes(row)))),
        "run_clip.py (torchvision decode_image, Resize BICUBIC, CenterCrop, on tensors)": lambda row: run_clip(
            tensor(row)),
        "torchvision v2 uint8 (decode_image, Resize bilinear, CenterCrop, on tensors)": lambda row: uint8_resize(
            tensor(row)),
        "decode alone (PIL, full size)": full_decode,
    }


def per_core_rates(pipelines: dict[str, Callable[[int], object]], num_rows: int, rounds: int) -> dict[str, float]:
    """Samples per CPU-second of each pipeline over all rows, alternating pipelines round by round; medians."""
    for pipeline in pipelines.values():
        pipeline(0)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    names = list(pipelines)
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.process_time()
            for row in range(num_rows):
                pipelines[name](row)
            rates[name].append(num_rows / (time.process_time() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def psnr_against_full_decode(corpus: list[bytes], processor: HFClipProcessor) -> tuple[float, float]:
    """PSNR (dB) of the training samples against a full-size decode with the same crop boxes and the same bicubic
    resample: over the whole corpus, and of the worst photo (photos decoded at full scale anyway are left out)."""
    transform = image_transform_for(processor, train=True)
    errors = []
    for row, jpeg in enumerate(corpus):
        fast = transform(jpeg, np.random.default_rng([0, 0, row])).double()
        image = decode_image(jpeg, None)
        box = transform.crop_box(*image.size, np.random.default_rng([0, 0, row]))
        resized = image.resize((transform.size, transform.size), resample=Image.Resampling.BICUBIC, box=box)
        error = fast - torch.from_numpy(np.array(resized)).permute(2, 0, 1).double()
        if error.any():
            errors.append(error.pow(2).mean().item())
    return 10 * np.log10(255**2 / np.mean(errors)), 10 * np.log10(255**2 / max(errors))


def loader_rate(split, processor: HFClipProcessor, streaming: bool, num_workers: int, batch_size: int,
                batches: int) -> tuple[float, float]:
    """`TrainBatches` (data only): samples/s after its first batch (worker start-up), wall clock; and samples per
    CPU-second of the whole run, this process and its workers together (the workers' time is counted once they
    exit)."""
    data_args = DatasetArguments(streaming=streaming, shuffle_buffer_size=64)
    source = split.to_iterable_dataset(num_shards=8) if streaming else split
    dataset = build_train_dataset(source, columns_of(data_args), image_transform_for(processor, train=True), seed=0,
                                  shuffle_buffer_size=data_args.shuffle_buffer_size)
    collator = ContrastiveDataCollator(processor)
    cpu_before = _cpu_seconds()
    iterator = TrainBatches(dataset, collator, batch_size, seed=0, num_workers=num_workers).iterate()
    first = len(next(iterator)[1]["pixel_values"])
    start = time.perf_counter()
    seen = sum(len(batch["pixel_values"]) for _, batch in itertools.islice(iterator, batches))
    rate = seen / (time.perf_counter() - start)
    iterator.close()
    return rate, (first + seen) / (_cpu_seconds() - cpu_before)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker_scaling(split, processor: HFClipProcessor, batch_size: int, batches: int, repeats: int
                   ) -> dict[str, dict[int, tuple[float, float]]]:
    """{"map-style" | "streamed": {workers: (median samples/s, median samples per CPU-second)}} for 1 and 2
    workers, runs alternating."""
    runs = {kind: {1: [], 2: []} for kind in ("map-style", "streamed")}
    for _ in range(repeats):
        for kind in runs:
            for workers in (1, 2):
                runs[kind][workers].append(loader_rate(split, processor, kind == "streamed", workers, batch_size,
                                                       batches))
    return {kind: {workers: tuple(statistics.median(values) for values in zip(*measured))
                   for workers, measured in by_workers.items()} for kind, by_workers in runs.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} cores, AVX512-BF16: {'yes' if 'avx512_bf16' in text else 'no'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=224, help="training image size")
    parser.add_argument("--photos", type=int, default=48, help="corpus size (JPEGs per round)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the per-core comparison")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size of the worker comparison")
    parser.add_argument("--batches", type=int, default=24, help="batches timed per worker-comparison run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the worker comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = photo_corpus(args.photos)
    sides = [sum(Image.open(io.BytesIO(jpeg)).size) / 2 for jpeg in corpus]
    processor = make_processor(args.image_size)
    print(f"{cpu_name()}; torch {torch.__version__}, Pillow {Image.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}; {len(corpus)} JPEGs, {np.mean(sides):.0f} px on a side on average, "
          f"{args.image_size} px samples")

    rates = per_core_rates(per_core_pipelines(corpus_split(corpus), processor), len(corpus), args.rounds)
    ours = rates["hf_clip (build_train_dataset + image_transform_for(train=True))"]
    print("\n| pipeline | samples/s per core | hf_clip / it |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {ours / rate:.2f}x |", flush=True)

    overall, worst = psnr_against_full_decode(corpus, processor)
    print(f"\nquality: PSNR {overall:.1f} dB over the corpus (worst photo {worst:.1f} dB) against a full-size decode "
          "with the same crop boxes", flush=True)

    split = corpus_split(corpus, repeats=max(1, (args.batch_size * (args.batches + 2) * 2) // len(corpus)))
    scaling = worker_scaling(split, processor, args.batch_size, args.batches, args.repeats)

    print(f"\n| data only, batch {args.batch_size} | 1 worker | 2 workers | 2 / 1 |\n|---|---|---|---|")
    for kind, by_workers in scaling.items():
        (wall_1, cpu_1), (wall_2, cpu_2) = by_workers[1], by_workers[2]
        print(f"| {kind}, wall clock | {wall_1:.0f} samples/s | {wall_2:.0f} samples/s | {wall_2 / wall_1:.2f}x |")
        print(f"| {kind}, per CPU-second | {cpu_1:.0f} samples | {cpu_2:.0f} samples | {cpu_2 / cpu_1:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
