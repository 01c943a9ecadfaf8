"""Opening client images: a cheap header-only probe (in the gateway, before any model work) and the full decode
(in the vision encoder), under the limits of `MediaConfig`."""

from __future__ import annotations

import io

from hcxserve.config import MediaConfig
from hcxserve.protocol.errors import MediaError, PayloadTooLargeError


def _open_image(data: bytes, config: MediaConfig, param: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise MediaError(f"{param}: the data is not a decodable image", param=param) from None
    width, height = image.size
    if width * height > config.max_image_pixels:
        raise PayloadTooLargeError(
            f"{param}: image is {width}x{height}, over the limit of {config.max_image_pixels} pixels", param=param
        )
    if min(width, height) < config.min_image_side:
        raise MediaError(f"{param}: image is {width}x{height}, smaller than {config.min_image_side} px", param=param)
    return image


def probe_image(data: bytes, config: MediaConfig, *, param: str) -> tuple[int, int]:
    """Cheap header-only check (format and size) so bad images are refused before any model work."""
    return _open_image(data, config, param).size


def decode_image(data: bytes, config: MediaConfig, *, param: str = "image"):
    """Full decode to RGB; transparent images are composited on white, as the original encoder does."""
    from PIL import Image

    image = _open_image(data, config, param)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise MediaError(f"{param}: the image data is truncated or corrupt", param=param) from None
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
