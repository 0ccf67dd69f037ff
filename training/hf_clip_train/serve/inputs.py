"""Request inputs: telling images (base64 data URIs) from texts, and decoding images safely."""

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DATA_URI = re.compile(r"data:(?P<media_type>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)


class InputError(ValueError):
    """A request the server refuses: its HTTP status and a message naming the input (`param`) and the problem."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def is_image_input(text: str) -> bool:
    """Whether an input string is a base64 data URI (`data:image/png;base64,...`), which the server reads as an
    image; every other string is a text."""
    return DATA_URI.match(text) is not None


@dataclass
class ImageLimits:
    """Images whose header claims more than `max_pixels` pixels are refused before any pixel is decoded."""

    max_pixels: int = 40_000_000


def decode_image(data_uri: str, param: str, limits: ImageLimits) -> Image.Image:
    """The RGB image in a base64 data URI, or `InputError` naming `param` and what is wrong with it. The size is
    checked against `limits` from the header; the server turns PIL's own, lower-level check off
    (`Image.MAX_IMAGE_PIXELS = None`) so that this message, with the size, is the one a client sees."""
    match = DATA_URI.match(data_uri)
    media_type = match["media_type"]
    if not media_type.startswith("image/"):
        raise InputError(f"{param} is a data URI of media type {media_type!r}, not an image (image/png, image/jpeg "
                         "...).", param=param)
    try:
        data = base64.b64decode(data_uri[match.end():], validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"{param} is a data URI whose payload is not valid base64 ({error}).", param=param) from None
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InputError(f"{param} is an image too large to decode (its header claims more pixels than "
                         f"{limits.max_pixels:,}, the server's --max_image_pixels).", status=413, param=param) from None
    except UnidentifiedImageError:
        raise InputError(f"{param} is base64 that does not decode to an image: its {len(data)} bytes are in no image "
                         "format PIL reads.", param=param) from None
    except (OSError, ValueError) as error:
        raise InputError(f"{param} is base64 that does not decode to an image ({error}).", param=param) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InputError(f"{param} is an image of {width}×{height} = {width * height:,} pixels (from its header); "
                         f"this server takes at most {limits.max_pixels:,} (--max_image_pixels).", status=413,
                         param=param)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{param} is an image ({image.format}, {width}×{height}) that cannot be decoded: {error}.",
                         param=param) from None
