"""The training data path (issue 19): reduced-scale JPEG decoding against the full-size path it replaces, uint8
samples normalised on the device, a stream split across ranks and workers, and exact streamed resumes."""

import importlib.util
import io
import json
import math
import re
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import FAST_TRAINING_ARGS, free_port, start_two_ranks
from PIL import Image, ImageFilter

from hf_clip import ContrastiveDataCollator, HFClipProcessor
from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image, pick_caption
from hf_clip_train.args import DatasetArguments
from hf_clip_train.data import (
    ImageTransform,
    TrainBatches,
    build_train_dataset,
    columns_of,
    image_transform_for,
    load_split,
    normalize_pixels,
)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _bench_data():
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "benchmarks" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _full_decode_pixels(transform: ImageTransform, cell, rng, base_dir=None) -> torch.Tensor:
    """The path before issue 19, up to its uint8 resample: a full-size RGB decode, the crop box drawn from its size,
    one bicubic resample."""
    image = decode_image(cell, base_dir)
    box = transform.crop_box(*image.size, rng)
    resized = image.resize((transform.size, transform.size), resample=Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def _host_floats(pixels: torch.Tensor) -> torch.Tensor:
    """The host normalisation of the path before issue 19, on uint8 (3, H, W) pixels."""
    array = np.asarray(pixels.permute(1, 2, 0), dtype=np.float32) / 255.0
    array = (array - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _psnr(errors: list[torch.Tensor]) -> float:
    mse = torch.cat([error.flatten() for error in errors]).double().pow(2).mean().item()
    return 10 * math.log10(255**2 / mse)


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def test_reduced_jpeg_decoding_is_within_35_db_of_the_full_decode_on_the_same_crop_boxes():
    """The benchmark's photo corpus (12 photos), at 224 px with training's crops (80-100% of the area) and at 64 px
    with crops of 30-100%, where 1/4 and 1/8 scales are used: PSNR >= 35 dB over the corpus against the full-size
    decode with the same crop boxes and filter; crops too narrow for a reduced scale give the very same pixels."""
    corpus = _bench_data().photo_corpus(count=12)
    for size, scales_expected in ((224, {1, 2}), (64, {4, 8})):
        transform = ImageTransform(size, MEAN, STD, train=True, crop_scale=(0.8, 1.0) if size == 224 else (0.3, 1.0))
        errors, scales = [], set()
        for row, jpeg in enumerate(corpus):
            fast = transform(jpeg, np.random.default_rng([0, 0, row]))
            cell = {"bytes": jpeg, "path": None}
            reference = _full_decode_pixels(transform, cell, np.random.default_rng([0, 0, row]))
            assert fast.dtype == torch.uint8 and fast.shape == (3, size, size)
            width, height = Image.open(io.BytesIO(jpeg)).size
            left, top, right, bottom = transform.crop_box(width, height, np.random.default_rng([0, 0, row]))
            scale = min(8, 2 ** math.floor(math.log2(min(right - left, bottom - top) / size)))
            scales.add(scale)
            if scale == 1:
                assert torch.equal(fast, reference), row
            else:
                errors.append(fast.float() - reference.float())
        assert scales_expected <= scales, scales
        assert _psnr(errors) >= 35, (size, _psnr(errors))


def test_odd_images_keep_working_and_match_the_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (600, 720, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    (tmp_path / "photo.jpg").write_bytes(_jpeg(photo, quality=90))
    png16 = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (300, 400), dtype=np.uint16)).save(png16, format="PNG")
    rgba = io.BytesIO()
    photo.convert("RGBA").save(rgba, format="PNG")
    cells = {
        "greyscale JPEG": _jpeg(photo.convert("L")),
        "CMYK JPEG": _jpeg(photo.convert("CMYK")),
        "progressive JPEG": _jpeg(photo, progressive=True),
        "RGBA PNG": rgba.getvalue(),
        "16-bit PNG": png16.getvalue(),
        "1x1 JPEG": _jpeg(photo.resize((1, 1))),
        "3x2 JPEG": _jpeg(photo.resize((3, 2))),
        "3000x2000 JPEG": _jpeg(photo.resize((3000, 2000))),
        "4:1 JPEG": _jpeg(photo.resize((1200, 300))),
        "20:1 JPEG": _jpeg(photo.resize((2000, 100))),
        "relative path cell": {"bytes": None, "path": "photo.jpg"},
        "relative path": "photo.jpg",
    }
    transform = ImageTransform(48, MEAN, STD, train=True)
    for name, cell in cells.items():
        fast = transform(cell, np.random.default_rng(1), tmp_path)
        reference = _full_decode_pixels(transform, cell, np.random.default_rng(1), tmp_path)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 48, 48), name
        assert torch.equal(fast, reference) or _psnr([fast.float() - reference.float()]) >= 35, name
    for bad in (cells["3000x2000 JPEG"][:5000], b"garbage", "no-such.jpg"):
        with pytest.raises(BAD_SAMPLE_ERRORS):
            transform(bad, np.random.default_rng(1), tmp_path)


def test_normalize_pixels_gives_the_host_values_bit_for_bit():
    pixels = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    channels_last = pixels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    expected = torch.stack([_host_floats(image) for image in pixels])
    for batch in (pixels, channels_last):
        normalised = normalize_pixels(batch, MEAN, STD)
        assert normalised.dtype == torch.float32 and normalised.is_contiguous()
        assert torch.equal(normalised, expected)
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(expected, MEAN, STD)


@pytest.mark.slow
def test_the_training_step_sees_the_host_paths_values_under_bf16_and_grad_cache(tmp_path, monkeypatch,
                                                                                saved_checkpoint):
    """`hf_clip_train.train` in-process with --mixed_precision bf16 and 2 GradCache micro-batches: the patch embedding
    receives, in both GradCache passes, exactly the floats the host computed before issue 19 for the step's rows."""
    from hf_clip_train import train

    received, build = [], train.build_model_and_processor

    def build_and_watch(*args, **kwargs):
        model, processor = build(*args, **kwargs)
        model.vision_model.embeddings.patch_embedding.register_forward_pre_hook(
            lambda module, inputs: received.append(inputs[0].detach().clone()))
        return model, processor

    monkeypatch.setattr(train, "build_model_and_processor", build_and_watch)
    out = tmp_path / "run"
    train.main([*FAST_TRAINING_ARGS, "--output_dir", str(out), "--max_steps", "1", "--mixed_precision", "bf16",
                "--grad_cache_micro_batches", "2", "--log_sample_ids", "--model_name_or_path", str(saved_checkpoint),
                "--eval_splits", "none"])
    rows = json.loads((out / "sample_ids_rank0.jsonl").read_text().splitlines()[0])["row_ids"]
    split = load_split(DatasetArguments(embedded_num_train=512), "train")
    transform = image_transform_for(HFClipProcessor.from_pretrained(out), train=True)
    assert (transform.mean, transform.std) == (MEAN, STD)
    expected = []
    for row in rows:
        rng = np.random.default_rng([42, 0, row])
        pick_caption(split[row]["caption"], rng)
        expected.append(_host_floats(_full_decode_pixels(transform, split[row]["image"], rng)))
    expected = torch.stack(expected)
    assert all(tensor.dtype == torch.float32 for tensor in received[:4])
    assert torch.equal(torch.cat(received[:2]), expected)  # the no-grad pass over both micro-batches
    assert torch.equal(torch.cat(received[2:4]), expected)  # the pass with gradients


def _captioned_rows(count: int, bad=()) -> datasets.Dataset:
    images = [{"bytes": b"not an image" if i in bad else _jpeg(Image.new("RGB", (40, 30), (i % 256, 60, 90))),
               "path": None} for i in range(count)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "caption": [f"a photo of row {i}" for i in range(count)]},
                                      features=features)


def _row_number(text: str) -> int:
    """The row number in a decoded "a photo of row 317" (the test tokenizer decodes digits one by one)."""
    return int(re.search(r"row(\d+)", re.sub(r"\s", "", text)).group(1))


def _rows_of(batch: dict, tokenizer) -> list[int]:
    return [_row_number(text) for text in tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)]


@pytest.fixture(scope="module")
def processor(tokenizer):
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=24)


@pytest.mark.slow
def test_streamed_batches_resume_exactly_from_their_state(processor):
    """4 shards of 12 rows, 2 workers, 3 bad rows, batches of 5 over 2 epochs: each worker's stream ends in a
    leftover that is merged with the other's. Resumed from the state after a batch (mid-epoch, after the merged
    batch that ends an epoch, in the next epoch), the batches that follow are the uninterrupted run's, bit for bit,
    with the same skip counts."""
    split = _captioned_rows(48, bad={3, 17, 30}).to_iterable_dataset(num_shards=4)
    data_args = DatasetArguments(streaming=True, shuffle_buffer_size=8)

    def batches(state=None):
        dataset = build_train_dataset(split, columns_of(data_args), image_transform_for(processor, train=True), seed=5,
                                      shuffle_buffer_size=data_args.shuffle_buffer_size)
        loader = TrainBatches(dataset, ContrastiveDataCollator(processor, seed=0), 5, seed=5, num_workers=2)
        return loader, loader.iterate(state=state)

    loader, iterator = batches()
    straight, states = [], []
    for _ in range(20):
        straight.append(next(iterator))
        states.append(loader.state_dict())
    iterator.close()
    epochs = [epoch for epoch, _ in straight]
    per_epoch = epochs.index(1)
    assert per_epoch == (48 - 3) // 5 and epochs[2 * per_epoch] == 2
    first_epoch_rows = [row for _, batch in straight[:per_epoch] for row in _rows_of(batch, processor.tokenizer)]
    assert len(set(first_epoch_rows)) == len(first_epoch_rows) == 5 * per_epoch
    assert sum(int(batch["skipped"]) for _, batch in straight[:per_epoch]) <= 3
    merged = [k for k, state in enumerate(states) if state["merged_batches"] > 0]
    assert merged, "no batch of merged leftovers"
    for k in sorted({2, merged[0], per_epoch - 1, per_epoch + 3}):
        _, resumed = batches(json.loads(json.dumps(states[k])))
        for expected_epoch, expected in straight[k + 1 : k + 4]:
            epoch, batch = next(resumed)
            assert epoch == expected_epoch, k
            for key in ("pixel_values", "input_ids", "attention_mask", "skipped"):
                assert torch.equal(batch[key], expected[key]), (k, key)
        resumed.close()


def _webdataset_shards(folder: Path, shards: int, rows: int) -> None:
    folder.mkdir()
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for position in range(rows):
                row = shard * rows + position
                files = {"jpg": _jpeg(Image.new("RGB", (32, 24), (row % 256, 40, 80))),
                         "txt": f"a photo of row {row}".encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{row:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_read_every_row_once_per_epoch(tmp_path, saved_checkpoint):
    """Two gloo ranks, each `TrainBatches` with 2 DataLoader workers over WebDataset shards, 2 epochs of batches of
    12. 4 shards of 30 rows: each rank reads 2 shards, one per worker (30 rows: 2 batches and 6 leftover rows, which
    the rank merges into a fifth batch). 5 shards of 24 rows: 5 is not a multiple of 2 ranks, so every rank reads
    every shard and keeps every other row. Either way, per epoch, the ranks' batches hold every row exactly once."""
    cases = {"even": (4, 30), "uneven": (5, 24)}
    for name, (shards, rows) in cases.items():
        _webdataset_shards(tmp_path / name, shards, rows)
    start_two_ranks(__import__("distributed_workers").streamed_rows_of_each_rank,
                    2, free_port(), str(tmp_path), str(saved_checkpoint), list(cases), 12, 10)
    for name, (shards, rows) in cases.items():
        seen = {}
        for rank in range(2):
            for epoch, texts in json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()):
                seen.setdefault(epoch, []).extend(_row_number(text) for text in texts)
        assert sorted(seen) == [0, 1], name
        for epoch, found in seen.items():
            assert sorted(found) == list(range(shards * rows)), (name, epoch)
