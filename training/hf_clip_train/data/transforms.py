"""Decoding and augmenting one image: `ImageTransform` (training crops to uint8 pixels, decoded at a reduced JPEG
scale where the crop allows; CLIP's evaluation preprocessing), and `normalize_pixels`, which turns a batch of
training pixels into the model's input on the device."""

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from hf_clip.collators import BAD_SAMPLE_ERRORS, decode_image, pick_caption
from hf_clip.processing_hf_clip import ImageTooLargeError, apply_exif_orientation, open_image, oriented_size

from .sources import ImageTextColumns


@dataclass
class ImageTransform:
    """An image -> a (3, size, size) tensor.

    Every image is turned upright as its EXIF orientation says (as `datasets` and Transformers' `load_image` do), and
    an encoded image whose header claims more than `hf_clip.processing_hf_clip.MAX_IMAGE_PIXELS` pixels is refused
    with `ImageTooLargeError` before it is decoded.
    Training (`train=True`): a random resized crop to uint8 pixels, resampled once (bicubic) from the crop box, which
    is drawn with `rng` from the original upright size. An encoded JPEG (bytes, a path, a datasets {"bytes", "path"}
    cell) is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's reduced DCT through `Image.draft`) whenever the crop still
    spans at least `size` pixels at that scale, so no full-size image is built. `normalize_pixels` turns a batch of
    them into the model's input, on the device.
    Evaluation (`train=False`): the image processor's preprocessing: with `center_crop` (CLIP's), resize the short
    side and centre-crop; without (ViT's), resize the whole image to `size`; then normalise; float32. A JPEG is
    decoded at the smallest reduced scale that keeps both sides at least `size` pixels.
    `resample` is the PIL filter of every resize (the image processor's).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1 / 0.9)
    center_crop: bool = True
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def crop_box(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
        if self.train and rng is not None:
            area = width * height
            for _ in range(10):
                target = area * rng.uniform(*self.crop_scale)
                aspect = math.exp(rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    return left, top, left + w, top + h
        if not self.center_crop:
            return 0, 0, width, height
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Any, rng: np.random.Generator | None = None,
                 base_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """`image`: anything `hf_clip.decode_image` reads; relative paths are read from `base_dir`. Returns uint8
        (training) or normalised float32 (evaluation) pixels (3, size, size), upright as the image's EXIF orientation
        says. An encoded image whose header claims more than `MAX_IMAGE_PIXELS` raises `ImageTooLargeError` (one of
        BAD_SAMPLE_ERRORS) before anything is decoded."""
        if self.train:
            jpeg = _lazy_jpeg(image, base_dir)
            if jpeg is not None:
                with jpeg:
                    return self._reduced_crop(jpeg, rng)
        image = decode_image(image, base_dir, min_size=None if self.train else self.size)
        box = self.crop_box(*image.size, rng)
        resized = image.resize((self.size, self.size), resample=self.resample, box=box)
        if self.train:
            return _uint8_pixels(resized)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def _reduced_crop(self, jpeg: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        """The crop of a not yet decoded JPEG, decoded at the smallest DCT scale that keeps `size` pixels across it.
        The crop box is drawn from the upright size, and the reduced decode turned upright before it is cropped."""
        width, height = oriented_size(jpeg)
        box = self.crop_box(width, height, rng)
        wanted = (math.ceil(width * self.size / (box[2] - box[0])), math.ceil(height * self.size / (box[3] - box[1])))
        turned = (width, height) != jpeg.size
        drafted = jpeg.draft("RGB", wanted[::-1] if turned else wanted)
        if drafted is not None:  # libjpeg's scale is width / reduced_width exactly; the decoded size rounds it up
            _, (_, _, reduced_width, reduced_height) = drafted
            if turned:
                reduced_width, reduced_height = reduced_height, reduced_width
            box = (box[0] * reduced_width / width, box[1] * reduced_height / height,
                   box[2] * reduced_width / width, box[3] * reduced_height / height)
        upright = apply_exif_orientation(jpeg)
        resized = upright.resize((self.size, self.size), resample=self.resample, box=box)
        return _uint8_pixels(resized if resized.mode == "RGB" else resized.convert("RGB"))


# A JPEG is cropped from its reduced-scale decode only when it is at most this elongated; `hf_clip.decode_image` cuts
# far more elongated images (beyond 16:1) to their centre first, and such images take that path so that their crop
# box is drawn from the same size as before.
REDUCED_DECODE_MAX_ASPECT_RATIO = 4


def _lazy_jpeg(image: Any, base_dir: str | os.PathLike | None) -> Image.Image | None:
    """`image` opened by `hf_clip.processing_hf_clip.open_image` but not decoded, when it is an encoded RGB or
    greyscale JPEG (bytes, a path, or a datasets {"bytes", "path"} cell) of moderate aspect ratio; None otherwise,
    and when it cannot be opened (`decode_image` then names the problem). Raises `ImageTooLargeError` when its
    header claims more than `MAX_IMAGE_PIXELS` pixels."""
    if not isinstance(image, (bytes, bytearray, str, os.PathLike, dict)):
        return None
    try:
        opened = open_image(image, base_dir)
    except ImageTooLargeError:
        raise
    except BAD_SAMPLE_ERRORS:
        return None
    width, height = opened.size
    if (opened.format == "JPEG" and opened.mode in ("RGB", "L") and min(width, height) > 0
            and max(width, height) <= REDUCED_DECODE_MAX_ASPECT_RATIO * min(width, height)):
        return opened
    opened.close()
    return None


def _uint8_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W): a view of its (H, W, 3) pixels; stacking a batch makes the one copy."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@functools.cache
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def normalize_pixels(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (batch, 3, H, W) from the training transform -> the model's float32 input
    (pixel_values / 255 - mean) / std, computed where the pixels are (on the device in training, so a batch crosses
    to it as bytes). The values are those the host computed from the same pixels before, bit for bit."""
    if pixel_values.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes the training transform's uint8 pixels, got {pixel_values.dtype}.")
    pixels = pixel_values.float() / 255.0
    device = pixels.device
    return ((pixels - _channel_constants(tuple(mean), device)) / _channel_constants(tuple(std), device)).contiguous()


def image_transform_for(processor, train: bool, crop_scale_min: float = 0.8) -> ImageTransform:
    """The `ImageTransform` with the size, crop, resampling filter and normalisation of `processor`'s image processor
    (CLIP's, or a composed vision tower's own: a ViT's resizes the whole image, normalised with mean and std 0.5)."""
    image_processor = processor.image_processor
    crop_size = getattr(image_processor, "crop_size", None)
    center_crop = bool(getattr(image_processor, "do_center_crop", False) and crop_size)
    size = crop_size if center_crop else image_processor.size
    height, width = (size.get("height"), size.get("width")) if size.get("height") else (size.get("shortest_edge"),) * 2
    if height is None or height != width:
        raise ValueError(f"{type(image_processor).__name__} makes {size} images; the training and evaluation "
                         "transforms make square ones (an image processor with a square crop_size, or size "
                         "{'height': N, 'width': N} or {'shortest_edge': N}).")
    try:
        resample = Image.Resampling(int(getattr(image_processor, "resample", Image.Resampling.BICUBIC)))
    except (TypeError, ValueError):
        resample = Image.Resampling.BICUBIC
    return ImageTransform(
        size=height,
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        train=train,
        crop_scale=(crop_scale_min, 1.0),
        center_crop=center_crop,
        resample=resample,
    )


def decode_row(row: dict[str, Any], columns: ImageTextColumns, transform: ImageTransform,
               rng: np.random.Generator | None) -> tuple[torch.Tensor, str]:
    """One dataset row -> (pixel_values (3, size, size), caption); the image cell reaches `transform` undecoded.
    Raises one of BAD_SAMPLE_ERRORS if unusable."""
    caption = pick_caption(row[columns.caption], rng)
    return transform(row[columns.image], rng, columns.base_dir), caption
