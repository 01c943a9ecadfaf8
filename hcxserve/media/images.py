"""Opening client images: a cheap header-only probe (in the gateway, before any model work) and the full decode
(in the vision encoder), under the limits of `MediaConfig`.

Pillow is only asked for the formats clients send photos and screenshots in: its other plugins (DDS, SPIDER, BLP,
...) are rarely exercised parsers that fail in unexpected ways on hostile bytes.
"""

from __future__ import annotations

import io

from hcxserve.config import MediaConfig
from hcxserve.protocol.errors import MediaError, PayloadTooLargeError

# (JPEG includes the multi-picture MPO files of phone cameras: Pillow's JPEG opener hands them over)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _open_image(data: bytes, config: MediaConfig, param: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
    except Exception:  # noqa: BLE001 - a decoder of client bytes: whatever it raises means "not an image we take"
        raise MediaError(f"{param}: the data is not a decodable image", param=param) from None
    if width * height > config.max_image_pixels:
        raise PayloadTooLargeError(
            f"{param}: image is {width}x{height}, over the limit of {config.max_image_pixels} pixels", param=param
        )
    if min(width, height) < config.min_image_side:
        raise MediaError(f"{param}: image is {width}x{height}, smaller than {config.min_image_side} px", param=param)
    if max(width, height) / min(width, height) > config.max_image_aspect_ratio:
        raise MediaError(
            f"{param}: image is {width}x{height}, more elongated than {config.max_image_aspect_ratio:g}:1", param=param
        )
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
        if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - truncated or corrupt client data, whichever way the decoder says so
        raise MediaError(f"{param}: the image data is truncated or corrupt", param=param) from None
