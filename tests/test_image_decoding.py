"""The library's image decoding (`to_rgb_image`, the processor, the collators' `decode_image`): EXIF orientation is
applied as Transformers' `load_image` and `datasets` apply it; an image whose header claims more than
`MAX_IMAGE_PIXELS` pixels is refused before it is decoded (`ImageTooLargeError`, a `BadSample`-style error the
training stream skips and counts); a JPEG is decoded at a reduced DCT scale when the target size allows."""

import io
import math
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image
from transformers.image_utils import load_image

from hf_clip import ContrastiveDataCollator, HFClipProcessor
from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image
from hf_clip.processing_hf_clip import (
    MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    apply_exif_orientation,
    exif_orientation,
    open_image,
    oriented_size,
    to_rgb_image,
)

SAMPLE_PHOTO = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"  # scikit-learn's sample photo
ORIENTATION = 0x0112


def _jpeg(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_kwargs)
    return buffer.getvalue()


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with the frame header (SOF0) patched to claim width x height pixels; the scan data stays as small."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A JPEG of under 1 KB whose header claims 12,000 x 12,000 pixels."""
    small = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    return _claiming(small, 12_000, 12_000)


def _phone_photo(orientation: int) -> bytes:
    """A 48x24 landscape sensor image (red left, blue right, a green top-left corner) saved as a camera does:
    the pixels as the sensor read them, and an EXIF Orientation tag saying how to turn them for display."""
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (220, 20, 20)
    pixels[:, 24:] = (20, 20, 220)
    pixels[:8, :8] = (20, 200, 20)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "PhoneMaker"
    return _jpeg(Image.fromarray(pixels), exif=exif.tobytes())


def test_the_bomb_fixture_is_a_small_file_claiming_144_megapixels(bomb):
    assert len(bomb) < 1100
    with Image.open(io.BytesIO(bomb)) as opened:
        assert opened.size == (12_000, 12_000)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_transformers_load_image_and_datasets_do(orientation, tmp_path):
    """WEAK (image path): a phone photo was read sideways. Every input form turns it as `load_image` does."""
    photo = _phone_photo(orientation)
    path = tmp_path / "phone.jpg"
    path.write_bytes(photo)
    expected = np.asarray(load_image(str(path)).convert("RGB"))
    from_datasets = datasets.Image().decode_example({"path": None, "bytes": photo})
    np.testing.assert_array_equal(np.asarray(from_datasets.convert("RGB")), expected)
    assert expected.shape[:2] == ((24, 48) if orientation <= 4 else (48, 24))
    for cell in (photo, str(path), path, {"bytes": photo, "path": None}, {"bytes": None, "path": str(path)},
                 Image.open(path)):
        np.testing.assert_array_equal(np.asarray(to_rgb_image(cell)), expected)
        np.testing.assert_array_equal(np.asarray(decode_image(cell, None)), expected)
        np.testing.assert_array_equal(np.asarray(to_rgb_image(cell, min_size=24)), expected)  # no smaller scale fits
        if not isinstance(cell, Image.Image):  # decoded at 1/2 scale, then turned
            assert to_rgb_image(cell, min_size=8).size == (expected.shape[1] // 2, expected.shape[0] // 2)
    with open_image(photo) as opened:
        assert exif_orientation(opened) == orientation
        assert oriented_size(opened) == expected.shape[1::-1]
        np.testing.assert_array_equal(np.asarray(apply_exif_orientation(opened).convert("RGB")), expected)


def test_processor_and_collator_read_a_phone_photo_upright(tokenizer, tmp_path):
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=16)
    photo = _phone_photo(6)
    upright = load_image(_saved(tmp_path, photo))
    expected = processor(images=[upright], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(images=[photo], return_tensors="pt")["pixel_values"], expected)
    sideways = processor(images=[Image.open(io.BytesIO(photo)).copy()], return_tensors="pt")["pixel_values"]
    assert not torch.allclose(sideways, processor(images=[_phone_photo(1)], return_tensors="pt")["pixel_values"])
    collator = ContrastiveDataCollator(processor, sample_captions=False)
    batch = collator([{"image": {"bytes": photo, "path": None}, "caption": "a photo"}])
    torch.testing.assert_close(batch["pixel_values"], expected)


def _saved(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    return str(path)


def test_an_image_claiming_more_pixels_than_the_limit_is_refused_before_decoding(bomb, tmp_path, tokenizer):
    """WEAK (image path): a 977-byte JPEG claiming 12,000 x 12,000 pixels was decoded in full (1.1 s, 430 MB).
    It is refused from its header, before any decoding."""
    assert 12_000 * 12_000 > MAX_IMAGE_PIXELS
    path = Path(_saved(tmp_path, bomb))
    message = f"has 12000x12000 = 144000000 pixels, more than the {MAX_IMAGE_PIXELS} allowed"
    for cell in (bomb, str(path), {"bytes": bomb, "path": None}, {"bytes": None, "path": str(path)}):
        with pytest.raises(ImageTooLargeError, match=message):
            to_rgb_image(cell)
        with pytest.raises(ImageTooLargeError, match=message):
            decode_image(cell, None)
    with pytest.raises(ImageTooLargeError, match=f"image file {str(path)!r} has 12000x12000"):
        to_rgb_image(path)
    assert issubclass(ImageTooLargeError, BAD_SAMPLE_ERRORS)  # the training stream skips and counts it
    # allowed by a higher limit, it is decoded, at 1/8 scale where the target size allows (not at 430 MB)
    assert to_rgb_image(bomb, max_pixels=12_000 * 12_000, min_size=1500).size == (1500, 1500)

    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=16)
    with pytest.raises(ImageTooLargeError):
        processor(images=[bomb], return_tensors="pt")
    with pytest.raises(ImageTooLargeError):
        ContrastiveDataCollator(processor)([{"image": bomb, "caption": "a photo"}])
    with pytest.raises(ImageTooLargeError, match="1152 pixels, more than the 1000 allowed"):
        open_image(_phone_photo(1), max_pixels=1000)


def test_pillows_own_bomb_error_is_reported_as_image_too_large(bomb):
    """Pillow refuses images above twice its own limit while opening them; that is the same error here."""
    claimed = _claiming(bomb, 30_000, 30_000)
    with pytest.raises(ImageTooLargeError, match=r"has more pixels than Pillow opens \(Image size \(900000000"):
        to_rgb_image(claimed, max_pixels=None)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    span = float(max(a.max() - a.min(), b.max() - b.min()))
    return 10 * math.log10(span**2 / float(((a - b) ** 2).mean()))


def test_a_large_jpeg_is_decoded_at_reduced_scale_when_the_target_allows(tokenizer):
    photo = Image.open(SAMPLE_PHOTO).convert("RGB")  # 640x427
    large = _jpeg(photo.resize((2560, 1708), Image.Resampling.BICUBIC))
    assert to_rgb_image(large).size == (2560, 1708)
    assert to_rgb_image(large, min_size=224).size == (640, 427)  # 1/4 scale: the short side still spans 224
    assert to_rgb_image(large, min_size=500).size == (1280, 854)
    assert to_rgb_image(large, min_size=2000).size == (2560, 1708)
    assert to_rgb_image(_phone_photo(6), min_size=24).size == (24, 48)

    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=224)
    reduced = processor(images=[large], return_tensors="pt")["pixel_values"]
    full = processor(images=[to_rgb_image(large)], return_tensors="pt")["pixel_values"]
    assert not torch.equal(reduced, full)
    assert _psnr(reduced, full) > 35, _psnr(reduced, full)
