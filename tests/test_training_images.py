"""Issue 29's image-path findings in the training package: EXIF orientation on the fast reduced-scale training path,
the full training path and the evaluation transform (checked against Transformers' `load_image`), and an image whose
header claims 12,000 x 12,000 pixels, skipped and counted in training and refused and counted at evaluation."""

import io
import json
import logging
import math
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import FAST_TRAINING_ARGS, train_in_process
from PIL import ExifTags, Image, ImageFilter
from transformers.image_utils import load_image

from hf_clip.processing_hf_clip import MAX_IMAGE_PIXELS, ImageTooLargeError
from hf_clip_train.data import ImageTransform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ROTATE_90_CLOCKWISE = 6  # EXIF Orientation: the stored pixels must turn 90 degrees clockwise to stand upright


def _upright_scene(width: int, height: int) -> Image.Image:
    """A smooth picture that looks different in every orientation: a red-to-blue ramp left to right, a dark band at
    the top."""
    ramp = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    pixels = np.stack([255 - ramp, np.full_like(ramp, 90), ramp], axis=-1)
    pixels[: height // 4] *= 0.25
    return Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))


def _phone_file(upright: Image.Image, path: Path, image_format: str) -> Path:
    """`upright` saved as a phone camera does: the pixels as the sensor read them (turned a quarter counter-clockwise)
    with an Orientation tag saying how to turn them back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = ROTATE_90_CLOCKWISE
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format=image_format, exif=exif.tobytes(), quality=95)
    return path


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _bomb_jpeg() -> bytes:
    """A valid 16 x 16 JPEG whose frame header is edited to claim 12,000 x 12,000 pixels: well under a kilobyte,
    430 MB once decoded in full."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", 12_000, 12_000)
    return bytes(data)


def test_a_phone_photo_with_an_exif_orientation_trains_and_evaluates_upright_on_every_path(tmp_path):
    """A JPEG whose Orientation tag turns it a quarter (the fast reduced-scale path), the same photo elongated beyond
    4:1 (the full-decode path) and a PNG with the tag: each gives the pixels of Transformers' `load_image` (which
    applies the tag) through the same crop, in training (with the same random crop) and at evaluation, and not those
    of the stored, sideways pixels."""
    cells = {
        "JPEG (reduced-scale path)": _phone_file(_upright_scene(240, 160), tmp_path / "phone.jpg", "JPEG"),
        "5:1 JPEG (full path)": _phone_file(_upright_scene(500, 100), tmp_path / "wide.jpg", "JPEG"),
        "PNG (full path)": _phone_file(_upright_scene(240, 160), tmp_path / "phone.png", "PNG"),
    }
    train, evaluation = ImageTransform(48, MEAN, STD, train=True), ImageTransform(48, MEAN, STD, train=False)
    for name, path in cells.items():
        upright = load_image(str(path))
        sideways = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # the stored pixels, no tag
        assert upright.size == sideways.size[::-1], name
        for seed in range(3):
            ours = train(path.name, np.random.default_rng(seed), tmp_path)
            reference = train(upright, np.random.default_rng(seed))
            stored = train(sideways, np.random.default_rng(seed))
            assert _psnr(ours, reference) >= 35 and _psnr(ours, stored) < 20, (name, seed)
        for cell in (path.name, {"bytes": path.read_bytes(), "path": None}):
            ours = evaluation(cell, base_dir=tmp_path)
            assert (ours - evaluation(upright)).abs().mean() < 0.02, name
            assert (ours - evaluation(sideways)).abs().mean() > 0.2, name


def test_an_image_claiming_12000_by_12000_pixels_is_refused_before_decoding_in_training_and_evaluation():
    bomb = _bomb_jpeg()
    assert len(bomb) < 1000 and Image.open(io.BytesIO(bomb)).size == (12_000, 12_000) > (0, 0)
    assert 12_000 * 12_000 > MAX_IMAGE_PIXELS
    for transform in (ImageTransform(224, MEAN, STD, train=True), ImageTransform(224, MEAN, STD, train=False)):
        for cell in (bomb, {"bytes": bomb, "path": None}):
            with pytest.raises(ImageTooLargeError, match=r"12000x12000 = 144000000 pixels, more than the 89478485"):
                transform(cell, np.random.default_rng(0))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_decompression_bombs_are_skipped_and_counted_in_a_training_run_and_its_evaluation(tmp_path, caplog):
    """A real run on a dataset with 3 such images among 32 training rows (one epoch: 2 steps of 16) and 2 among 12
    evaluation rows: training skips and counts the 3 (`skipped_samples`, the final line, a warning naming each
    row), the evaluation leaves out and counts the 2, and nothing of 144 million pixels is decoded."""
    bomb = _bomb_jpeg()
    train_bombs, test_bombs = {5, 17, 30}, {2, 9}

    def rows(count: int, bombs: set[int]) -> dict:
        return {"image": [{"bytes": bomb if row in bombs else _png(row), "path": None} for row in range(count)],
                "caption": [f"a photo of pattern {row}" for row in range(count)]}

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(32, train_bombs), features=features),
                          "test": datasets.Dataset.from_dict(rows(12, test_bombs), features=features)}
                         ).save_to_disk(data)
    output = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hf_clip_train"):
        results, printed = train_in_process([
            "--output_dir", str(output), *FAST_TRAINING_ARGS, "--image_size", "16", "--patch_size", "8",
            "--dataset_name", str(data), "--max_steps", "2", "--eval_splits", "test", "--label_column", "",
            "--max_eval_samples", "12"])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    skipped = [line["skipped_samples"] for line in metrics if "skipped_samples" in line]
    assert len(skipped) == 2 and skipped[0] <= skipped[1] == len(train_bombs)
    assert metrics[-1]["eval/test/skipped_samples"] == len(test_bombs) == 12 - results["test"]["num_samples"]
    assert f"{len(train_bombs)} unusable rows skipped" in printed
    warned = [record.getMessage() for record in caplog.records if "more than the 89478485 allowed" in record.message]
    assert len(warned) >= len(train_bombs) and all("12000x12000" in message for message in warned)



def test_evaluation_of_a_large_jpeg_decoded_at_a_reduced_scale_keeps_the_full_decodes_pixels():
    """The evaluation transform decodes a 3000 x 2000 JPEG at 1/8 scale for 224 pixels (still 375 x 250); its pixels
    stay those of the full-size decode through the same resize, to within JPEG's own rounding."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(6))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    evaluation = ImageTransform(224, MEAN, STD, train=False)
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    full.info.pop("exif", None)
    reduced, reference = evaluation(buffer.getvalue()), evaluation(full)
    assert (reduced - reference).abs().mean() < 0.02
