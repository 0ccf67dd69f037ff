"""HFClipProcessor: a CLIP image processor and a CLIP BPE tokenizer behind one call."""

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torch_available, is_torchvision_available

if is_torch_available():
    import torch

_BACKGROUND = (255, 255, 255)
# CLIP preprocessing keeps a centred square of the short side, so beyond this aspect ratio the rest is cut before
# resizing (a 1x100000 strip would otherwise be upsampled to a multi-gigapixel image first).
_MAX_ASPECT_RATIO = 16


def _crop_extreme_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= _MAX_ASPECT_RATIO * short:
        return image
    new_width, new_height = min(width, _MAX_ASPECT_RATIO * short), min(height, _MAX_ASPECT_RATIO * short)
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white; 16/32-bit grey is scaled, not clipped."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image has no pixels ({image.width}x{image.height}).")
    image = _crop_extreme_aspect(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale PNGs open as "I;16" or "I"; map 0..65535 onto 0..255.
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; uint8, uint16, bool, or float in [0, 1]."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot read an image from an array of shape {array.shape}: expected (H, W), (H, W, C) or (C, H, W) "
            "with 1, 3 or 4 channels."
        )
    if array.size == 0:
        raise ValueError(f"Image array of shape {array.shape} has no pixels.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("Float image arrays must hold finite values in [0, 1].")
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"Unsupported image array dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1].")
    mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode=mode))


def _open_rgb(source: str | os.PathLike | io.BytesIO, description: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()
            return _pil_to_rgb(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot decode {description}: {error}") from error


def to_rgb_image(image: Any, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """Turn one image into an 8-bit RGB PIL image. It may be a PIL image, a numpy array, a torch tensor, a local file
    path (relative ones are read from `base_dir` when given), encoded bytes, or a `datasets.Image(decode=False)` cell
    `{"bytes": ..., "path": ...}`.

    Raises `ValueError` / `TypeError` that name what was wrong with the input.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        if base_dir is not None and not os.path.isabs(image):
            image = os.path.join(base_dir, image)
        return _open_rgb(image, f"image file {os.fspath(image)!r}")
    if isinstance(image, (bytes, bytearray)):
        return _open_rgb(io.BytesIO(image), f"image bytes ({len(image)} bytes)")
    if isinstance(image, dict) and image.keys() & {"bytes", "path"}:
        if image.get("bytes"):
            return to_rgb_image(image["bytes"])
        if image.get("path"):
            return to_rgb_image(image["path"], base_dir)
        raise ValueError(f"Image cell {image!r} holds neither bytes nor a path.")
    if is_torch_available() and isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype == torch.bfloat16 or image.dtype == torch.float16:
            image = image.float()
        image = image.numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}: pass a PIL image, a numpy array, a torch tensor, a file path "
        "or encoded bytes."
    )


def _image_list(images: Any) -> list[Any]:
    """One image or a batch (list/tuple, or a 4-D array/tensor) -> a list of single images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("`images` is an empty list.")
        return list(images)
    is_tensor = is_torch_available() and isinstance(images, torch.Tensor)
    if (isinstance(images, np.ndarray) or is_tensor) and images.ndim == 4:
        return list(images)
    return [images]


def _text_list(text: str | Sequence[str]) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("`text` is an empty list.")
    for index, caption in enumerate(texts):
        if not isinstance(caption, str):
            raise TypeError(f"text[{index}] is a {type(caption).__name__}, not a str.")
        if not caption.strip():
            raise ValueError(f"text[{index}] is empty; every caption needs at least one word.")
    return texts


class HFClipProcessor(ProcessorMixin):
    """Pairs a CLIP image processor (torchvision or PIL backend) with a CLIP BPE tokenizer.

    `processor(text=..., images=...)` returns `input_ids` and `attention_mask` (batch, seq), right-padded and
    truncated to the tokenizer's `model_max_length`, and `pixel_values` (batch, 3, size, size).
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_tokenizer(cls, tokenizer, image_size: int = 224) -> "HFClipProcessor":
        """A processor with CLIP's image preprocessing (bicubic resize, centre crop, OpenAI mean/std) at
        `image_size`."""
        if is_torchvision_available():
            from transformers import CLIPImageProcessor as image_processor_class
        else:
            from transformers import CLIPImageProcessorPil as image_processor_class
        image_processor = image_processor_class(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("Pass `text`, `images` or both.")
        data: dict[str, Any] = {}
        if text is not None:
            texts = _text_list(text)
            encoding = self.tokenizer(
                texts, padding=padding, truncation=truncation, max_length=max_length, return_tensors=None, **kwargs
            )
            limit = max_length or self.tokenizer.model_max_length
            longest = max(len(ids) for ids in encoding["input_ids"])
            if longest > limit:
                raise ValueError(
                    f"A caption has {longest} tokens, more than the model's {limit}; use truncation=True."
                )
            data.update(encoding)
        if images is not None:
            rgb_images = [to_rgb_image(image) for image in _image_list(images)]
            data["pixel_values"] = self.image_processor(rgb_images, return_tensors=None)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["HFClipProcessor", "to_rgb_image"]
