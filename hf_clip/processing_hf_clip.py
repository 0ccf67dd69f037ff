"""HFClipProcessor: a CLIP image processor and a CLIP BPE tokenizer behind one call."""

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import PROCESSOR_NAME, is_torch_available, is_torchvision_available

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


def _rgb_images(images: Any) -> Any:
    """`to_rgb_image` on every image, keeping the nesting of lists (an inner list may be empty: a sample without
    images); a 4-D array/tensor is a list of images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("`images` is an empty list.")
        return _nested_rgb_images(images)
    is_tensor = is_torch_available() and isinstance(images, torch.Tensor)
    if (isinstance(images, np.ndarray) or is_tensor) and images.ndim == 4:
        return [to_rgb_image(image) for image in images]
    return to_rgb_image(images)


def _nested_rgb_images(images: list | tuple) -> list:
    return [_nested_rgb_images(image) if isinstance(image, (list, tuple)) else to_rgb_image(image) for image in images]


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
    through `to_rgb_image` (any PIL mode, arrays, tensors, paths, bytes; 1x1 and extreme aspect ratios), and bad
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
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **hub_kwargs
    ) -> "HFClipProcessor":
        """The text model's tokenizer and the vision model's image processor (local folders or Hub ids), as
        `HFClipModel.from_vision_text_pretrained` composes their models. The tokenizer keeps its own context length,
        capped at the text model's positions when its `model_max_length` is unset, and returns no `token_type_ids`
        (every text is one segment). `hub_kwargs` (`revision`, `token`, ...) go to each `from_pretrained`."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from .towers import text_context_length

        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path, **hub_kwargs)
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
            images = _rgb_images(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        if images is None and text is None and videos is None and audio is None:
            raise ValueError("Pass `text`, `images` or both.")
        if text is not None:
            _check_text(text)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


__all__ = ["HFClipProcessor", "to_rgb_image"]
