import asyncio
import base64

import pytest

from hcxserve.config import MediaConfig
from hcxserve.media import MediaFetcher, decode_image, probe_image
from hcxserve.protocol.errors import MediaError, PayloadTooLargeError
from tests.conftest import data_url, make_png


def fetch(ref, **config):
    async def run():
        fetcher = MediaFetcher(MediaConfig(**config))
        try:
            return await fetcher.fetch(ref, param="messages[0].content[0]")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_data_url_and_bare_base64():
    png = make_png()
    assert fetch(data_url(png)).data == png
    assert fetch(base64.b64encode(png).decode()).data == png


def test_http_url_from_a_local_server(media_server):
    base, root = media_server
    assert fetch(f"{base}/red.png", allow_private_networks=True).data == (root / "red.png").read_bytes()


def test_private_addresses_are_refused_by_default(media_server):
    base, _ = media_server
    with pytest.raises(MediaError) as info:
        fetch(f"{base}/red.png")
    assert info.value.code == "forbidden_url"
    assert info.value.param == "messages[0].content[0]"


def test_missing_url_is_a_client_error(media_server):
    base, _ = media_server
    with pytest.raises(MediaError) as info:
        fetch(f"{base}/nope.png", allow_private_networks=True)
    assert "404" in info.value.message and info.value.status_code == 400


def test_unreachable_url():
    with pytest.raises(MediaError) as info:
        fetch("http://127.0.0.1:9/x.png", allow_private_networks=True, fetch_timeout_s=2)
    assert info.value.code == "unreachable_url"


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "s3://bucket/key.pt", "ftp://host/x.png"])
def test_other_schemes_are_refused(ref):
    with pytest.raises(MediaError, match="scheme"):
        fetch(ref)


def test_size_limits(media_server):
    base, _ = media_server
    with pytest.raises(PayloadTooLargeError):
        fetch(data_url(make_png()), max_image_bytes=100)
    with pytest.raises(PayloadTooLargeError):
        fetch(f"{base}/red.png", allow_private_networks=True, max_image_bytes=100)


def test_garbage_is_refused():
    with pytest.raises(MediaError):
        fetch("not a url and not base64!")
    with pytest.raises(MediaError):
        fetch("data:image/png;base64,")


def test_probe_and_decode():
    config = MediaConfig()
    assert probe_image(make_png(40, 30), config, param="p") == (40, 30)
    with pytest.raises(MediaError, match="not a decodable image"):
        probe_image(b"hello", config, param="p")
    with pytest.raises(PayloadTooLargeError):
        probe_image(make_png(100, 100), MediaConfig(max_image_pixels=5000), param="p")
    with pytest.raises(MediaError, match="smaller"):
        probe_image(make_png(2, 2), config, param="p")
    truncated = make_png(64, 64)[:-40]
    with pytest.raises(MediaError):
        decode_image(truncated, config)


def test_transparent_images_are_composited_on_white():
    image = decode_image(make_png(8, 8, (255, 0, 0), mode="RGBA"), MediaConfig())
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((7, 7))
    assert red == 255 and green > 100 and blue > 100  # half-transparent red over white
