"""HFClipProcessor: a CLIP image processor and a CLIP BPE tokenizer behind one call."""

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import PROCESSOR_NAME, is_torch_available, is_torchvision_available

if is_torch_available():
    import torch

_BACKGROUND = (255, 255, 255)
# An encoded image whose header claims more pixels than this is refused before it is decoded (`ImageTooLargeError`):
# Pillow's own decompression-bomb threshold (`PIL.Image.MAX_IMAGE_PIXELS` by default, about 9,459 x 9,459), beyond
# which Pillow only warns (it refuses at twice as many). CLIP looks at 224-336 pixels; larger photos than this are
# rare outside panoramas, while a kilobyte-sized file that claims 12,000 x 12,000 pixels would take 430 MB and a
# second to decode. Pass `max_pixels` to the functions below to set another limit (None: Pillow's only).
MAX_IMAGE_PIXELS = 89_478_485
_ORIENTATION_TAG = ExifTags.Base.Orientation
_AXES_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class ImageTooLargeError(ValueError):
    """An encoded image whose header claims more pixels than allowed (`MAX_IMAGE_PIXELS`), refused before decoding
    as a possible decompression bomb. A `ValueError`, so a training stream that skips unusable rows skips it; its
    own type lets it be counted apart."""


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


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation of `image` (1 to 8; 1, upright, when it has none), read from the header."""
    return image.getexif().get(_ORIENTATION_TAG) or 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """`image` turned upright as its EXIF Orientation tag says (`PIL.ImageOps.exif_transpose`, as Transformers'
    `load_image` and `datasets` do), without the tag; `image` itself when it has no tag or says it is upright."""
    return image if exif_orientation(image) == 1 else ImageOps.exif_transpose(image)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` once `apply_exif_orientation` turns it; read from the header, nothing decoded."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _AXES_SWAPPING_ORIENTATIONS else (width, height)


def _encoded_source(image: Any, base_dir: str | os.PathLike | None) -> tuple[str | io.BytesIO, str]:
    """An encoded image cell -> what `Image.open` reads, and how to name it in errors."""
    if isinstance(image, dict) and image.keys() & {"bytes", "path"}:
        if image.get("bytes"):
            return _encoded_source(image["bytes"], None)
        if image.get("path"):
            return _encoded_source(image["path"], base_dir)
        raise ValueError(f"Image cell {image!r} holds neither bytes nor a path.")
    if isinstance(image, (bytes, bytearray)):
        return io.BytesIO(image), f"image bytes ({len(image)} bytes)"
    if isinstance(image, (str, os.PathLike)):
        if base_dir is not None and not os.path.isabs(image):
            image = os.path.join(base_dir, image)
        return os.fspath(image), f"image file {os.fspath(image)!r}"
    raise TypeError(f"{type(image).__name__} is not an encoded image: pass bytes, a file path or a datasets "
                    '{"bytes", "path"} cell.')


def _is_encoded(image: Any) -> bool:
    return isinstance(image, (bytes, bytearray, str, os.PathLike)) or (
        isinstance(image, dict) and bool(image.keys() & {"bytes", "path"}))


def open_image(image: bytes | str | os.PathLike | dict, base_dir: str | os.PathLike | None = None, *,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an encoded image (bytes, a file path, relative ones read from `base_dir`, or a datasets `{"bytes",
    "path"}` cell), reading only its header: nothing is decoded yet, so a JPEG may still be `draft`ed to a reduced
    scale before `load()`. Close it when done (it is a context manager). `.size` is the stored size; EXIF orientation
    is not applied (`exif_orientation`, `oriented_size`, `apply_exif_orientation`).

    Raises `ImageTooLargeError` when the header claims more than `max_pixels` pixels (None: only Pillow's own limit),
    and `ValueError` naming the file when it cannot be read.
    """
    return _open(*_encoded_source(image, base_dir), max_pixels)


def _open(source: str | io.BytesIO, description: str, max_pixels: int | None) -> Image.Image:
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"{description} has more pixels than Pillow opens ({error}).") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot decode {description}: {error}") from error
    width, height = opened.size
    if max_pixels is not None and width * height > max_pixels:
        opened.close()
        raise ImageTooLargeError(
            f"{description} has {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed "
            "(`max_pixels`, by default hf_clip.processing_hf_clip.MAX_IMAGE_PIXELS): refused before decoding, as a "
            "possible decompression bomb."
        )
    return opened


def _decode_rgb(image: Any, base_dir: str | os.PathLike | None, min_size: int | None,
                max_pixels: int | None) -> Image.Image:
    source, description = _encoded_source(image, base_dir)
    with _open(source, description, max_pixels) as opened:
        try:
            if min_size is not None:
                opened.draft(None, (min_size, min_size))  # JPEG only: the smallest DCT scale keeping both sides
            opened.load()
            return _pil_to_rgb(apply_exif_orientation(opened))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"Cannot decode {description}: {error}") from error


def to_rgb_image(image: Any, base_dir: str | os.PathLike | None = None, *, min_size: int | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Turn one image into an 8-bit RGB PIL image, upright as its EXIF orientation says. It may be a PIL image, a
    numpy array, a torch tensor, a local file path (relative ones are read from `base_dir` when given), encoded
    bytes, or a `datasets.Image(decode=False)` cell `{"bytes": ..., "path": ...}`.

    An encoded image is opened by `open_image` (refused with `ImageTooLargeError` above `max_pixels`) and, with
    `min_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides at least `min_size`
    pixels (libjpeg's reduced DCT, `Image.draft`): the processor passes the size it resizes the short side to.

    Raises `ValueError` / `TypeError` that name what was wrong with the input.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(apply_exif_orientation(image))
    if _is_encoded(image):
        return _decode_rgb(image, base_dir, min_size, max_pixels)
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


def decode_size(image_processor: Any) -> int | None:
    """The smallest side an image must keep for `image_processor` to see no difference but rounding: the short side
    it resizes to (`size["shortest_edge"]`), or the larger of a fixed `height` and `width`; None when it does not
    resize (every pixel then counts)."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return None
    shortest_edge = size.get("shortest_edge")
    if shortest_edge:
        return int(shortest_edge)
    sides = [side for side in (size.get("height"), size.get("width")) if side]
    return max(sides) if sides else None


def _rgb_images(images: Any, min_size: int | None) -> Any:
    """`to_rgb_image` on every image, keeping the nesting of lists (an inner list may be empty: a sample without
    images); a 4-D array/tensor is a list of images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("`images` is an empty list.")
        return _nested_rgb_images(images, min_size)
    is_tensor = is_torch_available() and isinstance(images, torch.Tensor)
    if (isinstance(images, np.ndarray) or is_tensor) and images.ndim == 4:
        return [to_rgb_image(image) for image in images]
    return to_rgb_image(images, min_size=min_size)


def _nested_rgb_images(images: list | tuple, min_size: int | None) -> list:
    return [_nested_rgb_images(image, min_size) if isinstance(image, (list, tuple))
            else to_rgb_image(image, min_size=min_size) for image in images]


def _check_text(text: Any) -> None:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"`text` is a {type(text).__name__}; pass a str or a list of str.")
    if not texts:
        raise ValueError("`text` is an empty list.")
    for index, caption in enumerate(texts):
        if not isinstance(caption, str):
            raise TypeError(f"text[{index}] is a {type(caption).__name__}, not a str.")
        if not caption.strip():
            raise ValueError(f"text[{index}] is empty; every caption needs at least one word.")


class HFClipProcessor(ProcessorMixin):
    """Pairs a CLIP image processor (torchvision or PIL backend) with a CLIP BPE tokenizer.

    The call and its defaults are `CLIPProcessor`'s (`ProcessingKwargs` routing: `text_kwargs`, `images_kwargs`,
    or flat keywords; no padding, truncation or tensors unless asked), so batches for the model are built with
    `processor(text=..., images=..., padding=True, truncation=True, return_tensors="pt")`. On top, every image goes
    through `to_rgb_image` (any PIL mode, arrays, tensors, paths, bytes; 1x1 and extreme aspect ratios; EXIF
    orientation; encoded images above `MAX_IMAGE_PIXELS` refused, JPEGs decoded at the smallest DCT scale that keeps
    the short side the image processor resizes to, `decode_size`), and bad
    captions or captions longer than the tokenizer's `model_max_length` raise errors that say what is wrong.
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

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, *, vision_revision: str | None = None,
        text_revision: str | None = None, **hub_kwargs
    ) -> "HFClipProcessor":
        """The text model's tokenizer and the vision model's image processor (local folders or Hub ids), as
        `HFClipModel.from_vision_text_pretrained` composes their models. The tokenizer keeps its own context length,
        capped at the text model's positions when its `model_max_length` is unset, and returns no `token_type_ids`
        (every text is one segment). `hub_kwargs` (`revision`, `token`, ...) go to each `from_pretrained`;
        `vision_revision` / `text_revision` override its revision for one model."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from .towers import text_context_length

        vision_hub_kwargs = {**hub_kwargs, **({"revision": vision_revision} if vision_revision is not None else {})}
        hub_kwargs = {**hub_kwargs, **({"revision": text_revision} if text_revision is not None else {})}
        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path, **vision_hub_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The vision model {vision_model_name_or_path!r} has no image processor AutoImageProcessor can load "
                f"({str(error).splitlines()[0][:200]}). Pass one: HFClipProcessor(image_processor=AutoImageProcessor."
                "from_pretrained(FOLDER_WITH_preprocessor_config.json), tokenizer=...)."
            ) from None
        missing_tokenizer = (
            f"The text model {text_model_name_or_path!r} has no tokenizer AutoTokenizer can load ({{}}). Pass one: "
            "HFClipProcessor(image_processor=..., tokenizer=AutoTokenizer.from_pretrained(FOLDER_WITH_THE_TOKENIZER))."
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(missing_tokenizer.format(str(error).splitlines()[0][:200])) from None
        if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # Transformers 5 builds one from the config alone
            raise ValueError(missing_tokenizer.format("its folder holds no vocabulary, only the model's config"))
        context = text_context_length(AutoConfig.from_pretrained(text_model_name_or_path, **hub_kwargs))
        if context is not None and tokenizer.model_max_length > context:
            tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = context
        if "token_type_ids" in tokenizer.model_input_names:
            tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]
            tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: None = None,
        audio: None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """`ProcessorMixin.__call__`; returns `input_ids`/`attention_mask` and/or `pixel_values` (batch, 3, H, W)."""
        encoding = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is not None:
            has_mask = "attention_mask" in encoding
            rows = encoding["attention_mask"] if has_mask else encoding["input_ids"]
            if isinstance(text, str) and isinstance(rows, list):
                rows = [rows]
            longest = max(int(np.asarray(row).sum()) if has_mask else len(row) for row in rows)
            limit = self.tokenizer.model_max_length
            if longest > limit:
                raise ValueError(
                    f"A caption has {longest} tokens, more than the model's {limit}; use truncation=True."
                )
        return encoding

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """`ProcessorMixin.save_pretrained`, with the remote-code `auto_map` only in the files that name this class
        (`processor_config.json` and `tokenizer_config.json`). ProcessorMixin also writes it into the image
        processor, in memory and in the file, where it would send an image processor saved on its own to a module it
        does not carry; this processor's `to_dict()` stays what it was, as after loading."""
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            saved = self.save_pretrained(save_directory)
            self.push_to_hub(repo_id, **kwargs)
            return saved
        parts = (self, self.image_processor)
        had_auto_map = [part is not None and "auto_map" in part.__dict__ for part in parts]
        saved = super().save_pretrained(save_directory, **kwargs)
        for part, had in zip(parts, had_auto_map):
            if part is not None and not had:
                part.__dict__.pop("auto_map", None)
        processor_file = Path(save_directory, PROCESSOR_NAME)
        processor_dict = json.loads(processor_file.read_text(encoding="utf-8"))
        if not had_auto_map[1] and processor_dict.get("image_processor", {}).pop("auto_map", None) is not None:
            processor_file.write_text(json.dumps(processor_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return saved

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Images become 8-bit RGB PIL images (nesting kept) before the image processor sees them."""
        if images is not None:
            images = _rgb_images(images, decode_size(self.image_processor))
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        if images is None and text is None and videos is None and audio is None:
            raise ValueError("Pass `text`, `images` or both.")
        if text is not None:
            _check_text(text)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


__all__ = [
    "MAX_IMAGE_PIXELS",
    "HFClipProcessor",
    "ImageTooLargeError",
    "apply_exif_orientation",
    "decode_size",
    "exif_orientation",
    "open_image",
    "oriented_size",
    "to_rgb_image",
]
